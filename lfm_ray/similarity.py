"""Where LFM's class similarity S comes from (`mix.similarity`): a registry of sources.

LFM draws the partner class j of a class i with P[i, j] = softmax_j(S[i, j] / τ) over j ≠ i
(paper Eq. 1; `lfm_ray.mixing.class_sampling_matrix`). The paper's S is the cosine of the
classes' CLIP text features; the paper names where that fails (biological names the text
encoder does not know) and where it cannot apply (vision-only backbones). The sources:

- `text`: the run's own class features (`model.text`: CLIP's tower, or a pretrained text
  encoder such as GloVe word vectors on any backbone, lfm_ray/text.py): S = f_T f_Tᵀ. P then
  comes straight from the text features (`local_sampling_matrix`).
- `text:MODEL[:PRETRAINED]`: another open_clip text tower (a domain CLIP for biological
  names, say), used only for S, with the run's templates; its features are computed once and
  its weights looked up as the run's own (cache first, never downloaded when the hub cannot
  be reached). MODEL may be `hf-hub:org/name` or `local-dir:/path`, which carry their weights,
  or a word-vector encoder of lfm_ray/text.py (`text:glove`).
- `image-prototypes`: S[i, j] = cos(m_i, m_j), m_k the mean of the unit image features of
  class k's training images under the frozen, not yet trained image tower (CLIP's F_I, a
  timm model's pooled features), computed once per run before stage 1 (unflipped images,
  as evaluation sees them). The default for timm models.
- `taxonomy` / `taxonomy:FILE`: a class hierarchy; S[i, j] = depth of the lowest common
  ancestor of i and j / the full depth, in [0, 1] (the root has depth 0, a class at the full
  depth D shares D levels with itself). `taxonomy` is the data set's own (iNaturalist 2018:
  kingdom, phylum, class, order, family, genus, species); FILE is a JSON of each class's path
  from the root down to the class: {"class name": ["Animalia", ..., "class name"], ...} or a
  list of paths in class order.
- `file:PATH`: a .npy or .csv array with one row per class, in class order: a C×C array is S
  itself (finite and symmetric); any other C×d array is an embedding whose cosines give S.
- `uniform`: S = 0, so partners are uniform over the other classes (the ablation LFM must beat).

`auto` is `text` where the run has class text features (a CLIP model, or any model with a
text encoder) and `image-prototypes` for a timm model without one. Whatever S is, the text
features stay the classifier. lfm_ray.resolved records the resolved source in config.json
and study.json.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lfm_ray.errors import LfmError

AUTO = "auto"
KINDS = ("text", "image-prototypes", "taxonomy", "file", "uniform")
ACCEPTED = ("auto, text, text:MODEL[:PRETRAINED], image-prototypes, taxonomy, taxonomy:FILE.json, "
            "file:PATH.npy|.csv or uniform")
FILE_SUFFIXES = (".npy", ".csv")


@dataclass(frozen=True)
class Source:
    """One parsed `mix.similarity` value (never 'auto': see `similarity_source`)."""

    kind: str                       # one of KINDS
    model: str | None = None        # text:MODEL
    pretrained: str | None = None   # text:MODEL:PRETRAINED
    path: str | None = None         # file:PATH, taxonomy:FILE

    def __str__(self) -> str:
        if self.kind == "text" and self.model:
            return f"text:{self.model}" + (f":{self.pretrained}" if self.pretrained else "")
        if self.path:
            return f"{self.kind}:{self.path}"
        return self.kind

    def local_path(self, launch_dir: str | None = None) -> str | None:
        """The file this source names, absolute: a relative path is read from `launch_dir`,
        the folder the run was started from (Ray runs trials and workers in folders of
        their own), else from the current folder."""
        if self.path is None:
            return None
        path = os.path.expanduser(self.path)
        return os.path.abspath(os.path.join(launch_dir or os.getcwd(), path))

    def resolved(self, launch_dir: str | None = None) -> str:
        """As recorded: file paths made absolute."""
        if self.path:
            return f"{self.kind}:{self.local_path(launch_dir)}"
        return str(self)


def parse_similarity(text: str) -> Source:
    """A `mix.similarity` value (other than 'auto') as a Source; LfmError naming the forms."""
    value = str(text).strip()
    kind, sep, rest = value.partition(":")
    if kind == "text":
        if not sep:
            return Source("text")
        if not rest:
            raise LfmError(f"mix.similarity={text!r} names no model; expected text:MODEL or "
                           "text:MODEL:PRETRAINED, e.g. text:ViT-B-32:openai")
        if rest.startswith(("hf-hub:", "local-dir:")):
            return Source("text", model=rest)  # these carry their own weights
        model, _, pretrained = rest.partition(":")
        return Source("text", model=model, pretrained=pretrained or None)
    if kind in ("file", "taxonomy") and sep:
        if not rest:
            raise LfmError(f"mix.similarity={text!r} names no file; expected {kind}:PATH")
        if kind == "file" and not rest.lower().endswith(FILE_SUFFIXES):
            raise LfmError(f"mix.similarity={text!r}: a similarity file is .npy or .csv "
                           f"(a C×C matrix S or a C×d embedding), got {rest!r}")
        return Source(kind, path=rest)
    if value in ("image-prototypes", "taxonomy", "uniform"):
        return Source(value)
    if kind == "file":
        raise LfmError(f"mix.similarity={text!r} names no file; expected file:PATH")
    raise LfmError(f"mix.similarity={text!r} is not valid; expected {ACCEPTED}")


def similarity_source(cfg) -> Source:
    """The source a RunConfig's LFM draws S from, 'auto' resolved: the run's text features
    where it has them, else image prototypes."""
    from lfm_ray.text import has_text

    value = cfg.mix.similarity
    if value == AUTO:
        return Source("text") if has_text(cfg.model) else Source("image-prototypes")
    return parse_similarity(value)


def uses_similarity(cfg) -> bool:
    """Whether the run's mixing reads mix.similarity (LFM's partner draw); other methods
    never read its source (a file or another model), however it is set."""
    return cfg.mix.method == "lfm"


def sampling_source(cfg) -> Source:
    """Where the run's P (LFM's partner draw, and the P kept beside the confusion matrix)
    comes from: mix.similarity for LFM; for other methods, which never read that, the
    model's own (its class text features, or image prototypes for a model without any)."""
    from lfm_ray.text import has_text

    if uses_similarity(cfg):
        return similarity_source(cfg)
    return Source("text") if has_text(cfg.model) else Source("image-prototypes")


def check_similarity(cfg, weights: bool = False, launch_dir: str | None = None,
                     num_classes: int | None = None) -> None:
    """The similarity source of a RunConfig, checked before anything starts: its form, that
    the model family can have it, its model's name (and with `weights` its weights), the
    files it names (relative to `launch_dir`, else the current folder); with `num_classes`
    (the data set's, once known) a file is read whole and checked against them. A run whose
    mixing does not read it (uses_similarity) has only its form checked."""
    from lfm_ray.text import WORD_VECTORS, has_text, word_vectors_files

    source = similarity_source(cfg)
    if not uses_similarity(cfg):
        return
    if source.kind == "text" and source.model is None and not has_text(cfg.model):
        raise LfmError(f"mix.similarity={cfg.mix.similarity!r} needs the run's class text "
                       f"features, which the vision-only model {cfg.model.name} has not "
                       "without a text encoder; give it one (model.text glove), or use "
                       "image-prototypes (the default for timm models without one), "
                       "text:MODEL[:PRETRAINED] (another open_clip text tower or text:glove), "
                       "taxonomy, file:PATH or uniform")
    if source.kind == "text" and source.model in WORD_VECTORS:
        word_vectors_files(WORD_VECTORS[source.model])
    elif source.kind == "text" and source.model is not None:
        from lfm_ray.model import check_model_name, check_weights

        try:
            check_model_name(source.model, source.pretrained)
            if weights:
                check_weights(source.model, source.pretrained, cfg.model.cache_dir)
        except LfmError as exc:
            raise LfmError(f"mix.similarity={cfg.mix.similarity!r}: {exc}") from None
    if source.kind == "file":
        check_similarity_file(source.local_path(launch_dir))
        if num_classes is not None:
            read_similarity_file(source.local_path(launch_dir), num_classes)
    if source.kind == "taxonomy":
        if source.path is not None:
            read_taxonomy_file(source.local_path(launch_dir))
        elif not has_taxonomy(cfg.data.name):
            raise LfmError(f"mix.similarity='taxonomy': data set {cfg.data.name!r} has no "
                           f"class hierarchy of its own (those with one: "
                           f"{', '.join(TAXONOMY_SETS)}); give one as taxonomy:FILE.json")


# ---- the formulas ------------------------------------------------------------------------------
def cosine_similarity(embedding: Any) -> torch.Tensor:
    """S = cos of the rows of an embedding (C, d): (C, C) float64. A zero row has no
    direction: LfmError."""
    e = torch.as_tensor(np.asarray(embedding, dtype=np.float64))
    norms = e.norm(dim=1)
    zero = torch.nonzero(norms == 0).flatten()
    if len(zero):
        raise LfmError(f"class {int(zero[0])} has an all-zero embedding; its cosines are "
                       "undefined")
    e = e / norms[:, None]
    return e @ e.t()


def text_similarity(features: torch.Tensor) -> torch.Tensor:
    """S = f_T f_Tᵀ of L2-normalised class text features: (C, C) float64 on the CPU."""
    f = features.detach().double().cpu()
    return f @ f.t()


def taxonomy_similarity(paths: Sequence[Sequence[str]]) -> torch.Tensor:
    """S[i, j] = (levels the paths of i and j share from the root) / D, D the longest path:
    the depth of their lowest common ancestor over the full depth. (C, C) float64.

    Two classes share level l when their paths agree on every level up to l (a genus of the
    same name in two families is two nodes). Built level by level: each prefix of length l
    gets an integer id, and equal ids add 1 to S."""
    paths = [tuple(str(p) for p in path) for path in paths]
    if not paths or any(len(p) == 0 for p in paths):
        raise LfmError("a taxonomy needs a non-empty path for every class")
    depth = max(len(p) for p in paths)
    C = len(paths)
    ids = np.full((depth, C), -1, dtype=np.int64)
    for level in range(depth):
        seen: dict[tuple[str, ...], int] = {}
        for k, path in enumerate(paths):
            if len(path) > level:
                ids[level, k] = seen.setdefault(path[:level + 1], len(seen))
    S = torch.zeros((C, C), dtype=torch.float64)
    ids_t = torch.as_tensor(ids)
    for level in range(depth):
        row = ids_t[level]
        # Classes whose path ends above this level (id -1) share nothing from here on.
        S += ((row[:, None] == row[None, :]) & (row[:, None] >= 0)).double()
    return S / depth


def uniform_similarity(num_classes: int) -> torch.Tensor:
    """S = 0: P uniform over the other classes."""
    return torch.zeros((num_classes, num_classes), dtype=torch.float64)


@torch.no_grad()
def class_feature_means(features: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                        num_classes: int, positions: torch.Tensor, batch_size: int,
                        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        unit: bool = True, what: str = "image prototype") -> torch.Tensor:
    """m (C, d) float64 on the CPU: m_k the mean of the features (unit features with `unit`)
    of class k's training images.

    features(positions) gives the (B, d) features of the images at those positions of the
    training split; `positions` are the ones this worker sweeps (all of them on one worker)
    and `reduce` sums a tensor over the workers. A class without images: LfmError naming
    `what` needed it."""
    sums: torch.Tensor | None = None
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for start in range(0, len(positions), batch_size):
        pos = positions[start:start + batch_size]
        f = features(pos).detach().double().cpu()
        f = F.normalize(f, dim=-1) if unit else f
        if sums is None:
            sums = torch.zeros((num_classes, f.shape[1]), dtype=torch.float64)
        y = labels[pos].long().cpu()
        sums.index_add_(0, y, f)
        counts += torch.bincount(y, minlength=num_classes).double()
    if sums is None:
        raise LfmError(f"the {what} needs training images")
    if reduce is not None:
        sums, counts = reduce(sums), reduce(counts)
    empty = torch.nonzero(counts == 0).flatten()
    if len(empty):
        raise LfmError(f"class {int(empty[0])} has no training image for its {what}")
    return sums / counts[:, None]


def image_prototype_similarity(features: Callable[[torch.Tensor], torch.Tensor],
                               labels: torch.Tensor, num_classes: int, positions: torch.Tensor,
                               batch_size: int,
                               reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                               ) -> torch.Tensor:
    """S[i, j] = cos(m_i, m_j), m_k the mean of the unit features of class k's images
    (`class_feature_means`). (C, C) float64 on the CPU."""
    return cosine_similarity(class_feature_means(features, labels, num_classes, positions,
                                                 batch_size, reduce).numpy())


# ---- files ---------------------------------------------------------------------------------
def check_similarity_file(path: str) -> None:
    """What can be told of a file:PATH without reading it all (a check before a run, made for
    every trial a study may run): it exists and, for a .npy, holds a 2-D numeric array of at
    least two rows. `read_similarity_file` checks the rest when the run starts."""
    full = os.path.expanduser(path)
    where = f"similarity file {path!r}"
    if not os.path.isfile(full):
        raise LfmError(f"{where} does not exist")
    if full.lower().endswith(".npy"):
        try:
            header = np.load(full, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise LfmError(f"{where} cannot be read as a .npy array: {reason}") from None
        if header.ndim != 2 or header.shape[0] < 2 or header.shape[1] < 1 \
                or header.dtype.kind not in "biuf":
            raise LfmError(f"{where} holds a {header.dtype} array of shape {header.shape}; "
                           "expected a C×C matrix S or a C×d embedding of numbers, one row "
                           "per class")


def read_similarity_file(path: str, num_classes: int | None = None) -> torch.Tensor:
    """S from a file:PATH (.npy or .csv, one row per class): a C×C array is S itself and must
    be finite and symmetric; any other C×d array is an embedding (S = its cosines). With
    `num_classes`, its rows must be that many. Every problem is one LfmError naming the file."""
    full = os.path.expanduser(path)
    where = f"similarity file {path!r}"
    if not os.path.isfile(full):
        raise LfmError(f"{where} does not exist")
    try:
        if full.lower().endswith(".npy"):
            raw = np.load(full, allow_pickle=False)
        elif full.lower().endswith(".csv"):
            raw = np.loadtxt(full, delimiter=",", dtype=np.float64, ndmin=2)
        else:
            raise LfmError(f"{where}: expected a .npy or .csv file")
        array = np.asarray(raw, dtype=np.float64)
    except LfmError:
        raise
    except Exception as exc:  # noqa: BLE001 - any read or parse error becomes one message
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LfmError(f"{where} cannot be read as numbers (one row per class, comma-"
                       f"separated in a .csv, no header): {reason}") from None
    if array.ndim != 2 or array.shape[0] < 2 or array.shape[1] < 1:
        raise LfmError(f"{where} holds an array of shape {array.shape}; expected a C×C matrix "
                       "S or a C×d embedding, one row per class")
    if not np.isfinite(array).all():
        raise LfmError(f"{where} holds values that are not finite (nan or inf)")
    rows = array.shape[0]
    if num_classes is not None and rows != num_classes:
        raise LfmError(f"{where} has {rows} rows, but the data set has {num_classes} classes; "
                       "expected one row per class, in class order")
    if array.shape == (rows, rows):
        scale = max(1.0, float(np.abs(array).max()))
        asym = float(np.abs(array - array.T).max())
        if asym > 1e-6 * scale:
            raise LfmError(f"{where} is a {rows}×{rows} matrix, so it is taken as S, but it "
                           f"is not symmetric (largest |S - Sᵀ| = {asym:.3g}); a C×C embedding "
                           "is ambiguous: give S symmetric, or an embedding with d ≠ C columns")
        return torch.as_tensor(array)
    try:
        return cosine_similarity(array)
    except LfmError as exc:
        raise LfmError(f"{where}: {exc}") from None


def read_taxonomy_file(path: str, class_names: Sequence[str] | None = None
                       ) -> list[tuple[str, ...]]:
    """A taxonomy:FILE.json: {"class name": [root, ..., class]} or a list of such paths in
    class order. Returns the paths in class order (with `class_names` every class must have
    one; without, the file's own order: what a check before the run needs). Every problem is
    one LfmError naming the file."""
    full = os.path.expanduser(path)
    where = f"taxonomy file {path!r}"
    if not os.path.isfile(full):
        raise LfmError(f"{where} does not exist")
    try:
        raw = json.loads(Path(full).read_text())
    except Exception as exc:  # noqa: BLE001
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LfmError(f"{where} cannot be read as JSON: {reason}") from None

    def path_of(value: Any, what: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not value \
                or not all(isinstance(v, (str, int)) for v in value):
            raise LfmError(f"{where}: the path of {what} must be a non-empty list of names "
                           f"from the root down to the class, got {value!r}")
        return tuple(str(v) for v in value)

    if isinstance(raw, dict):
        paths = {str(k): path_of(v, repr(k)) for k, v in raw.items()}
        if class_names is None:
            class_names = list(paths)
        missing = [n for n in class_names if n not in paths]
        if missing:
            raise LfmError(f"{where} has no path for class {missing[0]!r} ({len(missing)} of "
                           f"{len(class_names)} classes missing)")
        ordered = [paths[n] for n in class_names]
    elif isinstance(raw, list):
        ordered = [path_of(v, f"class {k}") for k, v in enumerate(raw)]
        if class_names is not None and len(ordered) != len(class_names):
            raise LfmError(f"{where} lists {len(ordered)} paths, but the data set has "
                           f"{len(class_names)} classes; expected one per class, in class "
                           "order (or a mapping from class name to path)")
    else:
        raise LfmError(f"{where} must hold a mapping from class name to path, or a list of "
                       "paths in class order")
    check_taxonomy(ordered, class_names, where)
    return ordered


def check_taxonomy(paths: Sequence[tuple[str, ...]], class_names: Sequence[str] | None,
                   where: str) -> None:
    """Two classes with one path would be one leaf: refused, naming them."""
    seen: dict[tuple[str, ...], int] = {}
    for k, path in enumerate(paths):
        if path in seen:
            name = (lambda i: repr(class_names[i]) if class_names else str(i))
            raise LfmError(f"{where}: classes {name(seen[path])} and {name(k)} have the same "
                           f"path {list(path)}; end each path with its own class")
        seen[path] = k


# ---- data sets with a class hierarchy of their own ------------------------------------------------
# data set name -> module:function(root) giving each class's path (root → class) in class order.
TAXONOMY_SETS = {"inat2018": "lfm_ray.data.inat:taxonomy"}


def has_taxonomy(dataset: str) -> bool:
    return dataset in TAXONOMY_SETS


def dataset_taxonomy(dataset: str, root: Any) -> list[tuple[str, ...]]:
    """The data set's own class hierarchy: each class's path from the root, in class order."""
    import importlib

    if dataset not in TAXONOMY_SETS:
        raise LfmError(f"data set {dataset!r} has no class hierarchy of its own (those with "
                       f"one: {', '.join(TAXONOMY_SETS)}); give one as taxonomy:FILE.json")
    module, _, function = TAXONOMY_SETS[dataset].partition(":")
    return getattr(importlib.import_module(module), function)(root)


# ---- one run ---------------------------------------------------------------------------------
def other_text_similarity(source: Source, class_names: Sequence[str], templates: Sequence[str],
                          cache_dir: str | None, device: torch.device, seed: int
                          ) -> torch.Tensor:
    """S from another open_clip text tower (or a word-vector encoder, text:glove): its class
    text features' cosines. A randomly initialised tower is seeded with the run's seed, and
    the global RNG is left as it was."""
    from lfm_ray.model import build_clip, seeded_build, text_features
    from lfm_ray.text import WORD_VECTORS, word_vector_features

    if source.model in WORD_VECTORS:
        return text_similarity(word_vector_features(WORD_VECTORS[source.model], class_names))

    try:
        clip, _ = seeded_build(seed, lambda: build_clip(source.model, source.pretrained,
                                                        cache_dir, device), device)
    except LfmError as exc:
        raise LfmError(f"mix.similarity={str(source)!r}: {exc}") from None
    feats = text_features(clip, class_names, templates, device)
    del clip
    return text_similarity(feats)


def for_run(run, launch_dir: str | None = None) -> torch.Tensor | None:
    """LFM's S for a trainer's `Run` (lfm_ray.worker.loop.Run), once, before stage 1: None where
    P comes straight from the run's own text features (`text`), or where nothing reads S
    (neither LFM nor a kept confusion matrix, whose file carries P). Reads the run's
    configuration, classes, model (not yet trained), images, batch builder and worker;
    relative file paths from `launch_dir` (where the run was started)."""
    cfg = run.cfg
    source = sampling_source(cfg)
    if source.kind == "text" and source.model is None:
        return None
    if not uses_similarity(cfg) and not run.keep_confusion:
        return None
    C = run.num_classes
    if source.kind == "uniform":
        return uniform_similarity(C)
    if source.kind == "file":
        return read_similarity_file(source.local_path(launch_dir), C)
    if source.kind == "taxonomy":
        if source.path is not None:
            paths = read_taxonomy_file(source.local_path(launch_dir), run.class_names)
        else:
            paths = dataset_taxonomy(cfg.data.name, cfg.data.root)
            if len(paths) != C:
                raise LfmError(f"the taxonomy of {cfg.data.name} has {len(paths)} classes, "
                               f"the data set {C}")
        return taxonomy_similarity(paths)
    if source.kind == "text":
        return other_text_similarity(source, run.class_names, cfg.model.templates,
                                     cfg.model.cache_dir, run.info.device, cfg.runtime.seed)
    return _run_prototypes(run)


@contextlib.contextmanager
def training_features(run) -> Iterator[tuple[Callable[[torch.Tensor], torch.Tensor],
                                              torch.Tensor,
                                              Callable[[torch.Tensor], torch.Tensor] | None]]:
    """A sweep of a trainer's `Run` training images through its model as it is now, in eval
    mode: (features, positions, reduce). features(pos) is the (B, d) float32 `model.encode`
    of the unflipped images at those positions (as evaluation sees them); positions are this
    worker's share; reduce sums a tensor over the workers (None on one worker)."""
    from lfm_ray.worker.distributed import all_reduce_sum

    info, model = run.info, run.model
    was_training = model.training
    model.eval()

    @torch.no_grad()
    def features(pos: torch.Tensor) -> torch.Tensor:
        with run.autocast:
            return model.encode(run.build(run.train_images.gather(pos))).float()

    def reduce(t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t.to(info.device), info).cpu()

    positions = torch.arange(info.rank, len(run.train_images), info.world_size)
    try:
        yield features, positions, (reduce if info.distributed else None)
    finally:
        model.train(was_training)


def _run_prototypes(run) -> torch.Tensor:
    """image-prototypes over the run's training split, shared out over its workers."""
    with training_features(run) as (features, positions, reduce):
        return image_prototype_similarity(features, run.train_labels, run.num_classes,
                                          positions, run.cfg.runtime.eval_batch_size, reduce)
