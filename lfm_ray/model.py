"""The CLIP model: open_clip backbones, frozen text features, W_I and the cosine logits.

`build_clip` returns an open_clip model and the `ImageSpec` its own preprocessing config
gives, so the batch builder never drifts from the model. "tiny" is a small architecture in
open_clip's own JSON config format (lfm_ray/model_configs/tiny.json), registered with
open_clip's registry on first use, for tests and the embedded demo (random init, 32 px input).

Weights are looked up cache first, where open_clip caches them (the Hugging Face hub cache,
or `cache_dir`), so a cluster can pre-stage them and a machine without network never waits on
hub retries: what is cached is loaded with the hub in offline mode; what is missing is fetched
only when the hub answers a short probe, and otherwise the error says which file of which hub
repository to put into which cache directory.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import threading
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from lfm_ray.data.preprocess import check_preprocessing
from lfm_ray.errors import LfmError

TINY_MODEL = "tiny"
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
# A `pretrained` value with one of these endings (or a path separator) is a file, not a tag.
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
# Prompts per text-tower call: bounds memory for 1000 classes × several templates.
TEXT_BATCH = 256
# Architectures named first when an unknown one is listed (the full list is ~150 names).
_COMMON_MODELS = (TINY_MODEL, "ViT-B-32", "ViT-B-16", "ViT-L-14", "RN50")
_LIST_MODELS_HINT = "python -c \"import open_clip; print(open_clip.list_models())\""


@dataclass(frozen=True)
class ImageSpec:
    """What the model expects, from its open_clip preprocessing config: the square input size,
    per-channel mean and std (in [0, 1] units), and how an image is brought to that size:
    resize_mode (shortest, longest or squash, as open_clip defines them; see
    lfm_ray/data/preprocess.py), interpolation (bicubic or bilinear) and fill_color (the
    padding of 'longest'). Those three default to open_clip's own defaults (its PreprocessCfg),
    which is what a model without them in its config gets from open_clip too."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    fill_color: int = 0

    def __post_init__(self) -> None:
        check_preprocessing(self.size, self.resize_mode, self.interpolation, self.fill_color,
                            "ImageSpec")


# ---- names -----------------------------------------------------------------------------------
def register_configs() -> None:
    """Add lfm-ray's JSON architectures (tiny) to open_clip's registry, once per process."""
    import open_clip

    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(Path(str(files("lfm_ray").joinpath("model_configs"))))


def known_models() -> list[str]:
    """Every architecture open_clip can build here, lfm-ray's own included."""
    import open_clip

    register_configs()
    return list(open_clip.list_models())


def _looks_like_path(pretrained: str) -> bool:
    return (os.sep in pretrained or "/" in pretrained or pretrained.startswith(("~", "."))
            or pretrained.lower().endswith(WEIGHT_SUFFIXES))


def _arch(name: str) -> str:
    # open_clip accepts "ViT-B/32" for "ViT-B-32".
    return name.replace("/", "-")


def check_model_name(name: str, pretrained: str | None = None) -> None:
    """Unknown architecture, pretrained tag or weights file: LfmError listing what is known.

    Needs no network: it reads open_clip's registries and the file system only.
    """
    import open_clip

    register_configs()
    if name.startswith(HF_HUB_PREFIX):
        if not name[len(HF_HUB_PREFIX):].strip("/"):
            raise LfmError(f"model {name!r} names no hub repository; use hf-hub:org/name")
        if pretrained:
            # open_clip would silently ignore it; say so instead of loading something else.
            raise LfmError(f"model {name!r} carries its own weights; leave pretrained empty "
                           f"(got {pretrained!r})")
        return
    if name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(os.path.expanduser(name[len(LOCAL_DIR_PREFIX):]))
        if not (folder / "open_clip_config.json").is_file():
            raise LfmError(f"model {name!r}: {folder / 'open_clip_config.json'} does not exist; "
                           "a local-dir: model is a folder holding open_clip_config.json and "
                           "its weights file")
        if pretrained:
            raise LfmError(f"model {name!r} carries its own weights; leave pretrained empty "
                           f"(got {pretrained!r})")
        return
    models = open_clip.list_models()
    arch = _arch(name)
    if arch not in models:
        # Case-blind near misses ("vit-b-32", "ViT-B-23"), not every name sharing "ViT-".
        lower = {m.lower(): m for m in models}
        close = [lower[m] for m in difflib.get_close_matches(arch.lower(), lower, n=3, cutoff=0.8)]
        hint = f"did you mean {', '.join(close)}? " if close else ""
        common = [m for m in _COMMON_MODELS if m in models]
        raise LfmError(f"unknown model {name!r}; {hint}known: {', '.join(common)} and "
                       f"{len(models) - len(common)} more (list them with {_LIST_MODELS_HINT}), "
                       "or an hf-hub:org/name model")
    if not pretrained:
        return
    path = os.path.expanduser(pretrained)
    if open_clip.is_pretrained_cfg(arch, pretrained):
        return
    if os.path.isfile(path):
        return
    if os.path.isdir(path):
        raise LfmError(f"weights file {pretrained!r} for {name} is a directory; give the "
                       ".pt/.pth/.bin/.safetensors file in it (or local-dir:PATH as the model "
                       "for a folder with open_clip_config.json)")
    if _looks_like_path(pretrained):
        raise LfmError(f"weights file {pretrained!r} for {name} does not exist; give an "
                       "existing .pt/.pth/.bin/.safetensors file or a pretrained tag")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    shown = ", ".join(tags) if tags else "none (give a weights file path)"
    raise LfmError(f"unknown pretrained tag {pretrained!r} for {name}; known: {shown}")


# ---- where open_clip keeps weights -----------------------------------------------------------
@dataclass(frozen=True)
class _HubFiles:
    """Files of one hub repository a build needs; each entry lists interchangeable names,
    the one open_clip is configured with first, then the .safetensors twin it prefers when
    the repository has one."""

    repo: str
    needed: tuple[tuple[str, ...], ...]


def _hub_files(name: str, pretrained: str | None) -> _HubFiles | None:
    """The hub files open_clip downloads for this model, or None when it downloads none."""
    import open_clip
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.pretrained import _get_safe_alternatives

    if name.startswith(HF_HUB_PREFIX):
        repo = name[len(HF_HUB_PREFIX):].strip("/")
        return _HubFiles(repo, ((HF_CONFIG_NAME,), (HF_WEIGHTS_NAME, HF_SAFE_WEIGHTS_NAME)))
    if not pretrained or name.startswith(LOCAL_DIR_PREFIX):
        return None
    cfg = open_clip.get_pretrained_cfg(_arch(name), pretrained)
    hub = cfg.get("hf_hub", "") if cfg else ""
    if not hub or "file" in cfg:
        return None  # a local file, or an old url-only entry open_clip fetches itself
    # open_clip's convention: "org/repo/file.bin", or "org/repo/" for its default file name.
    repo, filename = os.path.split(hub)
    filename = filename or HF_WEIGHTS_NAME
    return _HubFiles(repo, ((filename, *_get_safe_alternatives(filename)),))


def _hub_cache(cache_dir: str | None) -> str:
    from huggingface_hub import constants

    return str(cache_dir or constants.HF_HUB_CACHE)


def _missing(hub: _HubFiles, cache_dir: str | None) -> list[tuple[str, ...]]:
    from huggingface_hub import try_to_load_from_cache

    return [names for names in hub.needed
            if not any(isinstance(try_to_load_from_cache(hub.repo, n, cache_dir=cache_dir), str)
                       for n in names)]


def _env_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
        "1", "ON", "YES", "TRUE")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub (or the proxy in front of it) accepts a connection within timeout_s.

    huggingface_hub retries a failed request for about half a minute; this probe, bounded
    as a whole (name lookup included, hence the thread), decides in at most timeout_s."""
    import socket

    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), None)
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub in offline mode: cached files are served without an etag request.

    The flag is read at call time by huggingface_hub, so flipping the module constant works
    after import (the environment variable would not)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def weights_from_cache_only() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the block: weights come from the local cache only, so a report or
    `lfm-ray data` never starts a download (build_clip reads the variable when it runs)."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def _not_cached(exc: BaseException) -> bool:
    """Whether exc (or what caused it) is the hub saying a file is not in the local cache."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _reason(exc: BaseException) -> str:
    """One line saying why a build failed; torch's own messages for a weights file that is
    not one, holds objects (refused: loading them could run code) or belongs to another
    model are multi-line and give advice that does not apply, so they are summarised."""
    import pickle

    from lfm_ray.safe_load import _refused_name

    message = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or message.startswith("Weights only load failed"):
        name = _refused_name(message)
        if name is not None:
            return (f"the file names {name}; a weights file holds only tensors, and loading "
                    "anything else could run code, so it is refused")
        return "it is not a PyTorch weights file"
    if "Error(s) in loading state_dict" in message:
        return _state_dict_mismatch(message)
    if isinstance(exc, (KeyError, EOFError)) or "PytorchStreamReader" in message \
            or "invalid load key" in message or "Invalid magic number" in message:
        return f"it is not a PyTorch weights file ({type(exc).__name__}: {message[:80]})"
    text = message.strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _state_dict_mismatch(message: str) -> str:
    """'its tensors do not fit this model: 3 missing (e.g. 'x'), ...' from torch's message."""
    import re

    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*)")):
        m = re.search(pattern, message)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            parts.append(f"{len(keys)} {label} keys (e.g. {keys[0]!r})" if keys else label)
    sizes = re.findall(r"size mismatch for ([^:]+):", message)
    if sizes:
        parts.append(f"{len(sizes)} of another shape (e.g. {sizes[0]!r})")
    detail = ", ".join(parts) or "its keys differ"
    return f"its tensors do not fit this model ({detail}); is it the weights of another model?"


def _weights_missing(name: str, pretrained: str | None, hub: _HubFiles,
                     missing: list[tuple[str, ...]], cache_dir: str | None) -> LfmError:
    """Where open_clip looks for the weights, and the two ways to put them there."""
    cache = _hub_cache(cache_dir)
    wanted = " and ".join(names[0] + (f" (or {' or '.join(names[1:])})" if names[1:] else "")
                          for names in missing)
    folder = f"{cache}/models--{hub.repo.replace('/', '--')}/snapshots/<revision>/"
    what = f"the weights of {name}/{pretrained}" if pretrained else f"the files of the model {name}"
    get = " ".join(["hf download", hub.repo, *(names[0] for names in missing)])
    local = ("or pass a local weights file as pretrained (--pretrained /path/to/weights.pt)"
             if pretrained else "or give a local folder holding them as local-dir:/path")
    return LfmError(
        f"{what} are not cached and the Hugging Face hub cannot be reached"
        f"{' (HF_HUB_OFFLINE is set)' if _env_offline() else ''}; open_clip looks for "
        f"{wanted} of the hub repository {hub.repo} in the cache {cache} (as {folder}); on a "
        f"machine with network access run `{get} --cache-dir {cache}` and copy that cache "
        f"folder here, {local}"
    )


def _fetch(name: str, pretrained: str | None, hub: _HubFiles, cache_dir: str | None) -> None:
    """Download what the build needs with open_clip's own downloaders, before building.

    Done up front because open_clip, for hf-hub: models, logs a failed weights download
    and goes on with random weights; here it is an error."""
    import open_clip
    from open_clip.pretrained import download_pretrained, download_pretrained_from_hf

    try:
        if name.startswith(HF_HUB_PREFIX):
            from open_clip.constants import HF_CONFIG_NAME

            download_pretrained_from_hf(hub.repo, filename=HF_CONFIG_NAME, cache_dir=cache_dir)
            download_pretrained_from_hf(hub.repo, cache_dir=cache_dir)
        else:
            download_pretrained(open_clip.get_pretrained_cfg(_arch(name), pretrained),
                                cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one message
        what = f"{name}/{pretrained}" if pretrained else name
        raise LfmError(f"could not download the weights of {what} from the hub repository "
                       f"{hub.repo} into {_hub_cache(cache_dir)}: {_reason(exc)}") from None


def _cache_first(build: Callable[[], Any], what: str) -> Any:
    """build() with the hub offline; if it lacks a file that is not cached, once more online
    when the hub answers. Other failures are user-facing load errors."""
    try:
        with _hub_offline():
            return build()
    except LfmError:
        raise
    except ImportError as exc:
        raise LfmError(f"{what} needs a package that is not installed: {_reason(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - open_clip raises plain exceptions
        if not _not_cached(exc):
            raise LfmError(f"{what} could not be loaded: {_reason(exc)}") from None
        if _env_offline() or not _hub_reachable():
            raise LfmError(f"{what} needs files from the Hugging Face hub that are not in "
                           f"its cache, and the hub cannot be reached: {_reason(exc)}") from None
    try:
        return build()
    except Exception as exc:  # noqa: BLE001
        raise LfmError(f"{what} could not be loaded: {_reason(exc)}") from None


@contextlib.contextmanager
def _quiet_build(random_init: bool) -> Iterator[None]:
    """open_clip logs every step of a build at INFO, and warns "initialized randomly" even
    when random init is what was asked; keep both out of a run's output."""
    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not (random_init and "initialized randomly" in record.getMessage())

    root = logging.getLogger()
    flt = _Filter()
    level = root.level
    root.addFilter(flt)
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.removeFilter(flt)
        root.setLevel(level)


def _image_spec(model: nn.Module, name: str) -> ImageSpec:
    """The model's own preprocessing config as an ImageSpec; what it leaves out is open_clip's
    default (PreprocessCfg), as in open_clip's own transform."""
    import open_clip
    from open_clip.transform import PreprocessCfg

    cfg = open_clip.get_model_preprocess_cfg(model)
    default = PreprocessCfg()
    size = cfg.get("size", default.size)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise LfmError(f"model {name} takes non-square {tuple(size)} images; lfm-ray "
                           "feeds square images only")
        size = size[0]
    interpolation = cfg.get("interpolation") or default.interpolation
    if interpolation == "random":  # a training-time choice; open_clip evaluates it as bicubic
        interpolation = "bicubic"
    resize_mode = cfg.get("resize_mode") or default.resize_mode
    fill_color = cfg.get("fill_color", default.fill_color)
    check_preprocessing(int(size), resize_mode, interpolation, fill_color,
                        f"the preprocessing config of model {name}")
    mean, std = cfg.get("mean", default.mean), cfg.get("std", default.std)
    return ImageSpec(int(size), tuple(float(v) for v in mean), tuple(float(v) for v in std),
                     resize_mode=resize_mode, interpolation=interpolation, fill_color=fill_color)


# ---- the model -------------------------------------------------------------------------------
def build_clip(name: str, pretrained: str | None = None, cache_dir: str | None = None,
               device: str | torch.device = "cpu") -> tuple[nn.Module, ImageSpec]:
    """(open_clip model in eval mode, ImageSpec from the model's own preprocessing config).

    name: any open_clip architecture ("ViT-B-32", "tiny"), an "hf-hub:org/name" model or a
    "local-dir:/path" folder. pretrained: an open_clip tag ("openai"), a weights file
    (.pt/.pth/.bin/.safetensors), or None for random init. cache_dir: open_clip's download
    cache (None: the Hugging Face hub default). The tokenizer travels with the model as
    `model.lfm_tokenizer`, so text features always use the model's own tokenizer.
    """
    import open_clip

    check_model_name(name, pretrained)
    if pretrained and not open_clip.is_pretrained_cfg(_arch(name), pretrained):
        pretrained = os.path.expanduser(pretrained)  # a weights file
    hub = _hub_files(name, pretrained)
    if hub is not None:
        missing = _missing(hub, cache_dir)
        if missing:
            if _env_offline() or not _hub_reachable():
                raise _weights_missing(name, pretrained, hub, missing, cache_dir)
            _fetch(name, pretrained, hub, cache_dir)

    what = f"{name} with weights {pretrained!r}" if pretrained else f"model {name}"
    with _quiet_build(random_init=not pretrained and hub is None):
        model = _cache_first(lambda: open_clip.create_model(
            name, pretrained=pretrained, device=device, cache_dir=cache_dir), what)
        tokenizer = _cache_first(lambda: open_clip.get_tokenizer(name, cache_dir=cache_dir),
                                 f"the tokenizer of {name}")
    model.lfm_tokenizer = tokenizer
    model.eval()
    return model, _image_spec(model, name)


@torch.no_grad()
def text_features(clip_model: nn.Module, class_names: Sequence[str], templates: Sequence[str],
                  device: str | torch.device = "cpu", tokenizer: Callable | None = None
                  ) -> torch.Tensor:
    """(C, d) L2-normalised class features on `device`: per class the normalised mean over
    the templates (a prompt ensemble) of the normalised features of template.format(name).

    The tokenizer is the one build_clip attached to the model unless one is given."""
    tokenizer = tokenizer or getattr(clip_model, "lfm_tokenizer", None)
    if tokenizer is None:
        raise ValueError("no tokenizer: build the model with build_clip or pass tokenizer=")
    if not class_names:
        raise LfmError("no class names to compute text features for")
    if not templates:
        raise LfmError("no prompt templates; give at least one, e.g. 'a photo of a {}'")
    for template in templates:
        if "{}" not in template:
            raise LfmError(f"prompt template {template!r} has no '{{}}' for the class name")
    # The text tower runs where the model lives; the result moves to `device`.
    model_device = next(clip_model.parameters()).device
    was_training = clip_model.training
    clip_model.eval()
    total = None
    for template in templates:
        prompts = [template.format(n) for n in class_names]
        parts = [F.normalize(clip_model.encode_text(
                     tokenizer(prompts[i:i + TEXT_BATCH]).to(model_device)).float(), dim=-1)
                 for i in range(0, len(prompts), TEXT_BATCH)]
        feats = torch.cat(parts)
        total = feats if total is None else total + feats
    clip_model.train(was_training)
    return F.normalize(total / len(templates), dim=-1).to(device)


class LFMClassifier(nn.Module):
    """z_k = s · cos(W_I F_I(x), f_T[k]): the image tower F_I, W_I (d×d, no bias, identity
    init) and the frozen class text features f_T (a buffer; the text tower is not kept).

    What stage 1 trains is the model's `finetune` mode (lfm_ray.finetune.prepare sets it;
    "full" by default). In mode "classifier" the class weights w_k, initialised from f_T[k],
    replace f_T[k] in the logits (`class_weights`; None otherwise).

    Where f_T comes from another encoder than the tower's own (lfm_ray.text: word vectors on
    a CLIP or timm image tower), `bridge_from` is the tower's output width and F_I(x) =
    B·tower(x) + b, a linear bridge to the text dimension d that stage 1 trains in every
    mode (`bridge`; None otherwise)."""

    def __init__(self, visual: nn.Module, text_features: torch.Tensor, logit_scale: float,
                 bridge_from: int | None = None):
        super().__init__()
        self.visual = visual
        d = text_features.shape[1]
        self.bridge = nn.Linear(int(bridge_from), d) if bridge_from is not None else None
        self.proj = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(d))
        self.register_buffer("text_features", F.normalize(text_features.detach().float(), dim=-1))
        self.register_parameter("class_weights", None)
        self.logit_scale = float(logit_scale)
        self.finetune = "full"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """F_I(x): the image tower's embedding (through the bridge where there is one), (B, d)."""
        feats = self.visual(images)
        return feats if self.bridge is None else self.bridge(feats)

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        """s · cos(W_I feats, w_k) for every class k: (B, C); w_k = f_T[k] unless the class
        weights train (mode classifier)."""
        z = F.normalize(self.proj(feats.float()), dim=-1)
        if self.class_weights is None:
            return self.logit_scale * z @ self.text_features.t()
        return self.logit_scale * z @ F.normalize(self.class_weights.float(), dim=-1).t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(images))

    def set_stage(self, stage: int) -> None:
        """Stage 1: what the model's fine-tuning mode trains (full: F_I), W_I frozen.
        Stage 2: W_I trainable, everything else frozen."""
        from lfm_ray.finetune import trainable_names

        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        train = set(trainable_names(self, stage))
        for name, p in self.named_parameters():
            p.requires_grad_(name in train)

    def weights(self) -> dict[str, Any]:
        """What a checkpoint keeps of the model: the tower (with any added modules), the
        bridge, W_I and, in mode classifier, the class weights."""
        out: dict[str, Any] = {"visual": self.visual.state_dict(), "proj": self.proj.state_dict()}
        if self.bridge is not None:
            out["bridge"] = self.bridge.state_dict()
        if self.class_weights is not None:
            out["class_weights"] = self.class_weights.detach().clone()
        return out

    def load_weights(self, state: dict[str, Any]) -> None:
        """Restore what `weights` kept (a checkpoint of a model prepared the same way)."""
        self.visual.load_state_dict(state["visual"])
        self.proj.load_state_dict(state["proj"])
        if self.bridge is not None:
            if state.get("bridge") is None:
                raise LfmError("the checkpoint holds no bridge to the text features; it was "
                               "trained with the image tower's own text tower")
            self.bridge.load_state_dict(state["bridge"])
        if self.class_weights is not None:
            if state.get("class_weights") is None:
                raise LfmError("the checkpoint holds no class weights; it was not trained "
                               "with stage1.finetune=classifier")
            with torch.no_grad():
                self.class_weights.copy_(state["class_weights"])


def build_classifier(model_cfg, class_names: Sequence[str], logit_scale: float,
                     device: str | torch.device = "cpu") -> tuple[LFMClassifier, ImageSpec]:
    """The classifier for a ModelConfig: text features computed once, the text tower dropped."""
    clip, spec = build_clip(model_cfg.name, model_cfg.pretrained, model_cfg.cache_dir, device)
    feats = text_features(clip, class_names, model_cfg.templates, device)
    model = LFMClassifier(clip.visual, feats, logit_scale).to(device)
    return model, spec


def check_weights(name: str, pretrained: str | None = None, cache_dir: str | None = None) -> None:
    """LfmError where building the model would fail for want of its weights: the name and tag
    are checked, and hub weights must be cached or the hub reachable. Loads nothing."""
    check_model_name(name, pretrained)
    hub = _hub_files(name, pretrained)
    if hub is None:
        return
    missing = _missing(hub, cache_dir)
    if missing and (_env_offline() or not _hub_reachable()):
        raise _weights_missing(name, pretrained, hub, missing, cache_dir)
