"""The CLIP model: open_clip backbones, frozen text features, W_I and the cosine logits.

`build_clip` returns an open_clip model and the `ImageSpec` its own preprocessing config
gives, so the batch builder never drifts from the model. "tiny" is a small architecture in
open_clip's own JSON config format (lfm_ray/model_configs/tiny.json), registered with
open_clip's registry, for tests and the embedded demo (random init, 32 px input).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lfm_ray.errors import LfmError

TINY_MODEL = "tiny"
_registered = False


@dataclass(frozen=True)
class ImageSpec:
    """What the model expects: square input size, per-channel mean and std (in [0, 1] units)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def register_configs() -> None:
    """Add lfm-ray's JSON architectures (tiny) to open_clip's registry, once."""
    global _registered
    if _registered:
        return
    import open_clip

    open_clip.add_model_config(Path(str(files("lfm_ray").joinpath("model_configs"))))
    _registered = True


def _image_spec(model: nn.Module) -> ImageSpec:
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ImageSpec(int(size), tuple(float(v) for v in cfg["mean"]),
                     tuple(float(v) for v in cfg["std"]))


def _hub_location(name: str, tag: str) -> tuple[str, str] | None:
    """(repo id, file name) open_clip downloads for name/tag from the Hugging Face hub."""
    import open_clip

    hub = (open_clip.get_pretrained_cfg(name, tag) or {}).get("hf_hub", "")
    if not hub:
        return None
    repo, filename = os.path.split(hub)
    return repo, filename or "open_clip_pytorch_model.bin"


def _hub_cache(cache_dir: str | None) -> str:
    return cache_dir or os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")


def _is_cached(repo: str, filename: str, cache_dir: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    stem = filename.rsplit(".", 1)[0]
    names = [filename, "open_clip_model.safetensors", f"{stem}.safetensors"]
    return any(isinstance(try_to_load_from_cache(repo, n, cache_dir=cache_dir), str) for n in names)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    import socket

    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("//")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _check_weights_available(name: str, tag: str, cache_dir: str | None) -> None:
    """Fail at once, with where to put the weights, when they are neither cached nor
    downloadable (instead of a minute of hub retries and a traceback)."""
    where = _hub_location(name, tag)
    if where is None or os.environ.get("HF_HUB_OFFLINE") == "0":
        return
    repo, filename = where
    if _is_cached(repo, filename, cache_dir) or _hub_reachable():
        return
    cache = _hub_cache(cache_dir)
    raise LfmError(
        f"the weights of {name}/{tag} are not cached and the Hugging Face hub cannot be "
        f"reached; put {filename} of the repository {repo} into {cache} (on a machine with "
        f"network access: huggingface-cli download {repo} {filename} --cache-dir {cache}), "
        "or pass --pretrained /path/to/weights"
    )


@contextlib.contextmanager
def _quiet_random_init(active: bool):
    """Hide open_clip's "initialized randomly" warning when random init is what was asked."""
    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    flt = _Filter()
    level = root.level
    if active:
        root.addFilter(flt)
    root.setLevel(max(level, logging.WARNING))  # open_clip logs every step of a build at INFO
    try:
        yield
    finally:
        root.removeFilter(flt)
        root.setLevel(level)


def check_model_name(name: str, pretrained: str | None = None) -> None:
    """Unknown architecture or pretrained tag: LfmError listing the known ones."""
    import open_clip

    register_configs()
    if name.startswith("hf-hub:") or name.startswith("local-dir:"):
        return
    if name not in open_clip.list_models():
        models = open_clip.list_models()
        raise LfmError(f"unknown model {name!r}; known: {TINY_MODEL}, ViT-B-32, ViT-B-16, "
                       f"ViT-L-14, RN50 and {len(models) - 5} more "
                       "(python -c 'import open_clip; print(open_clip.list_models())')")
    if pretrained and not os.path.exists(os.path.expanduser(pretrained)):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            shown = ", ".join(tags) if tags else "none (give a weights file)"
            raise LfmError(f"unknown pretrained tag {pretrained!r} for {name}; known: {shown}")


def build_clip(name: str, pretrained: str | None = None, cache_dir: str | None = None,
               device: str | torch.device = "cpu"):
    """(open_clip model, ImageSpec). `pretrained`: a tag ("openai"), a weights file, or None;
    `name` may be an "hf-hub:org/repo" model. The tokenizer is kept as `model.lfm_tokenizer`."""
    import open_clip

    check_model_name(name, pretrained)
    is_hub = name.startswith("hf-hub:") or name.startswith("local-dir:")
    tag = pretrained
    if tag and not is_hub and not os.path.exists(os.path.expanduser(tag)):
        _check_weights_available(name, tag, cache_dir)
    try:
        with _quiet_random_init(tag is None):
            model = open_clip.create_model(
                name, pretrained=os.path.expanduser(tag) if tag else None,
                device=device, cache_dir=cache_dir,
            )
    except LfmError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub and file errors become one message
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if tag and os.path.exists(os.path.expanduser(tag)):
            raise LfmError(f"weights file {tag!r} could not be loaded into {name}: {reason}") from None
        raise LfmError(f"could not load the weights of {name}{'/' + tag if tag else ''}: "
                       f"{reason}; put them into {_hub_cache(cache_dir)} or pass "
                       "--pretrained /path/to/weights") from None
    with _quiet_random_init(False):
        model.lfm_tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
    model.eval()
    return model, _image_spec(model)


@torch.no_grad()
def text_features(clip_model: nn.Module, class_names: Sequence[str], templates: Sequence[str],
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """(C, d) L2-normalised features: per class the normalised mean over the templates
    (a prompt ensemble) of the normalised text features of `template.format(name)`."""
    tokenizer = clip_model.lfm_tokenizer
    device = torch.device(device)
    per_template = []
    for template in templates:
        tokens = tokenizer([template.format(n) for n in class_names]).to(device)
        per_template.append(F.normalize(clip_model.encode_text(tokens).float(), dim=-1))
    mean = torch.stack(per_template).mean(dim=0)
    return F.normalize(mean, dim=-1)


class LFMClassifier(nn.Module):
    """z_k = s · cos(W_I F_I(x), f_T[k]): the image tower, W_I (identity init), text features."""

    def __init__(self, visual: nn.Module, text_features: torch.Tensor, logit_scale: float):
        super().__init__()
        self.visual = visual
        d = text_features.shape[1]
        self.proj = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(d))
        self.register_buffer("text_features", F.normalize(text_features.float(), dim=-1))
        self.logit_scale = float(logit_scale)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """F_I(x): the image tower's embedding."""
        return self.visual(images)

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.proj(feats.float()), dim=-1)
        return self.logit_scale * z @ self.text_features.t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(images))

    def set_stage(self, stage: int) -> None:
        """Stage 1: F_I trainable, W_I frozen. Stage 2: F_I frozen, W_I trainable."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        for p in self.visual.parameters():
            p.requires_grad_(stage == 1)
        self.proj.weight.requires_grad_(stage == 2)


def build_classifier(model_cfg, class_names: Sequence[str], logit_scale: float,
                     device: str | torch.device = "cpu") -> tuple[LFMClassifier, ImageSpec]:
    """The classifier for a ModelConfig: text features computed once, the text tower dropped."""
    clip, spec = build_clip(model_cfg.name, model_cfg.pretrained, model_cfg.cache_dir, device)
    feats = text_features(clip, class_names, model_cfg.templates, device)
    model = LFMClassifier(clip.visual, feats, logit_scale).to(device)
    return model, spec
