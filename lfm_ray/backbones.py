"""Backbones: open_clip models (lfm_ray/model.py) and vision-only timm models behind one door.

`model.name` picks the family: "timm:ARCH" (a timm architecture, e.g. `timm:resnet50`,
`timm:vit_base_patch16_224`) is a vision-only model; any other name is an open_clip model
(model.py). A timm model's weights are `model.pretrained`: a timm tag of the architecture
(`a1_in1k` for `resnet50.a1_in1k`, looked up cache first as open_clip weights are, never
downloaded when the hub cannot be reached), a weights file, or None for random init.

A timm model without a text encoder (`model.text` none, its default) classifies with a
linear head over its pooled features, z = s·(W f + b) (`LinearClassifier`; s the run's logit
scale, 1 for CE): stage 1 trains the backbone and the head, stage 2 retrains a fresh head
alone on the frozen backbone (classifier re-training, the decoupled recipe). What needs class
text features is then refused (`check_family`): the zero-shot baseline, the MMS loss,
ConCutMix's semantic label, and LFM's similarity from text (`mix.similarity` takes image
prototypes by default instead). With a pretrained text encoder (`model.text glove`,
lfm_ray/text.py) a timm model classifies as LFM does, by cosines to the frozen class text
features after a bridge to their dimension and W_I, and everything text-based works, LFM's
similarity S from the text encoder included. Its images follow timm's own data config
(`timm_image_spec`).
"""

from __future__ import annotations

import difflib
import logging
import os
from typing import Any, Sequence

import torch
import torch.nn as nn

from lfm_ray import weights
from lfm_ray.errors import LfmError
from lfm_ray.families import TIMM_PREFIX, model_family, timm_arch

# timm's eval crop modes and the lfm-ray resize mode that does the same (lfm_ray.data.preprocess):
# 'center' resizes the short side and takes the centre crop, 'squash' resizes to S × S.
TIMM_CROP_MODES = {"center": "shortest", "squash": "squash"}
# What a timm model needs besides text-free training, and why it cannot have it.
NEEDS_TEXT = {
    "runtime.zero_shot": "the zero-shot baseline classifies with the class text features",
    "loss.name=mms": "the MMS loss puts its margins on the class text features' cosines",
    "mix.method=concutmix": "ConCutMix's semantic label measures distances to the class "
                            "text features",
}


# ---- names ---------------------------------------------------------------------------------
def _weights_file(pretrained: str | None) -> str | None:
    """The weights file a pretrained value names (a path, or a name ending in .pt/.pth/...),
    expanded; None for a tag or no weights."""
    if not pretrained:
        return None
    path = os.path.expanduser(pretrained)
    return path if weights.looks_like_path(pretrained) or os.path.isfile(path) else None


def check_timm_name(name: str, pretrained: str | None = None) -> None:
    """Unknown timm architecture or tag, missing weights file: one LfmError listing what is
    known. Reads timm's registry and the file system only."""
    import timm

    arch = timm_arch(name)
    if not arch:
        raise LfmError(f"model {name!r} names no timm architecture; use timm:ARCH, e.g. "
                       "timm:resnet50")
    base, _, tag = arch.partition(".")
    if tag:
        raise LfmError(f"model {name!r} names weights in the architecture; give the tag as "
                       f"the pretrained value: --model {TIMM_PREFIX}{base} --pretrained {tag} "
                       f"(or leave pretrained empty for a random init of {TIMM_PREFIX}{base})")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.8)
        hint = f"did you mean {', '.join(TIMM_PREFIX + c for c in close)}? " if close else ""
        raise LfmError(f"unknown timm model {name!r}; {hint}list them with "
                       "python -c \"import timm; print(timm.list_models())\"")
    if not pretrained:
        return
    file = _weights_file(pretrained)
    if file is not None:
        if not os.path.isfile(file):
            raise LfmError(f"weights file {pretrained!r} for {name} does not exist; give an "
                           "existing .pth/.bin/.safetensors file or a timm tag")
        return
    tags = timm_tags(arch)
    if pretrained not in tags:
        shown = ", ".join(tags) if tags else "none (give a weights file path)"
        raise LfmError(f"unknown pretrained tag {pretrained!r} for {name}; timm's tags of "
                       f"{arch}: {shown}")


def timm_tags(arch: str) -> list[str]:
    """The pretrained tags timm knows for an architecture ("a1_in1k", ...)."""
    import timm

    return [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*") if "." in n]


def check_backbone(model_cfg) -> None:
    """The model's name and weights value, either family (no network, nothing loaded)."""
    if model_family(model_cfg.name) == "timm":
        check_timm_name(model_cfg.name, model_cfg.pretrained)
        return
    from lfm_ray.model import check_model_name

    check_model_name(model_cfg.name, model_cfg.pretrained)


def check_family(cfg) -> None:
    """What a run of this model family cannot do, refused before anything starts."""
    from lfm_ray.head_init import check_classifier_init

    family = model_family(cfg.model.name)
    check_classifier_init(cfg, family)
    if family == "clip":
        if cfg.model.image_size is not None:
            raise LfmError(f"model.image_size={cfg.model.image_size} is for timm: models; the "
                           f"CLIP model {cfg.model.name} takes its own input size (leave it "
                           "null)")
        return
    from lfm_ray.text import has_text

    if cfg.stage1.finetune != "full":
        raise LfmError(f"stage1.finetune={cfg.stage1.finetune!r} is for open_clip ViTs; the "
                       f"vision-only model {cfg.model.name} fine-tunes fully in stage 1 "
                       "(backbone and head) and retrains its head in stage 2")
    if has_text(cfg.model):
        return  # a text encoder gives it class features (zero-shot: lfm_ray.text.check_text)
    wants = {"runtime.zero_shot": cfg.runtime.zero_shot,
             "loss.name=mms": cfg.loss.name == "mms",
             "mix.method=concutmix": cfg.mix.method == "concutmix"}
    for what, asked in wants.items():
        if asked:
            raise LfmError(f"{what} needs class text features, which the vision-only model "
                           f"{cfg.model.name} has not: {NEEDS_TEXT[what]}. Give it a text "
                           "encoder (model.text glove), use an open_clip model, or another "
                           "setting (loss ce, balce, focal or ldam; a mixing method other "
                           "than concutmix)")


# ---- weights: cache first --------------------------------------------------------------------
def _timm_hub_files(arch: str, pretrained: str | None):
    """The hub files timm reads for `arch.pretrained`, or None (random init, a file, or
    weights timm fetches from a plain URL)."""
    import timm

    if not pretrained or _weights_file(pretrained) is not None:
        return None
    cfg = timm.models.get_pretrained_cfg(f"{arch}.{pretrained}")
    hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub:
        return None
    filename = getattr(cfg, "hf_hub_filename", None)
    # timm reads model.safetensors where the repository has it, else pytorch_model.bin.
    names = (filename,) if filename else ("model.safetensors", "pytorch_model.bin")
    return weights.HubFiles(hub.split("@")[0], (names,))


def _url_weights(arch: str, pretrained: str | None, cache_dir: str | None) -> str | None:
    """For weights timm fetches from a plain URL: where torch's hub cache keeps that file."""
    import timm

    if not pretrained or _weights_file(pretrained) is not None \
            or _timm_hub_files(arch, pretrained) is not None:
        return None
    cfg = timm.models.get_pretrained_cfg(f"{arch}.{pretrained}")
    url = getattr(cfg, "url", None) if cfg is not None else None
    if not url:
        return None
    folder = cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
    return os.path.join(folder, os.path.basename(url.split("?")[0]))


def check_timm_weights(name: str, pretrained: str | None, cache_dir: str | None) -> None:
    """LfmError where building would fail for want of weights: hub weights must be cached or
    the hub reachable. Loads nothing."""
    check_timm_name(name, pretrained)
    arch = timm_arch(name)
    hub = _timm_hub_files(arch, pretrained)
    if hub is not None:
        missing = weights.missing_files(hub, cache_dir)
        if missing and (weights.env_offline() or not weights.hub_reachable()):
            cache = weights.hub_cache(cache_dir)
            wanted = " or ".join(missing[0])
            raise LfmError(
                f"the weights of {name}/{pretrained} are not cached and the Hugging Face hub "
                f"cannot be reached{' (HF_HUB_OFFLINE is set)' if weights.env_offline() else ''}; "
                f"timm looks for {wanted} of the hub repository {hub.repo} in the cache "
                f"{cache}; on a machine with network access run `hf download {hub.repo} "
                f"{missing[0][0]} --cache-dir {cache}` and copy that cache folder here, or "
                "pass a local weights file as pretrained (--pretrained /path/to/weights.pth)")
        return
    file = _url_weights(arch, pretrained, cache_dir)
    if file is not None and not os.path.isfile(file) \
            and (weights.env_offline() or not weights.hub_reachable()):
        raise LfmError(f"the weights of {name}/{pretrained} are not cached ({file}) and cannot "
                       "be downloaded from here; put the file there or pass a local weights "
                       "file as pretrained")


def check_backbone_weights(model_cfg) -> None:
    """Whether the model's weights can be had (cached, or the hub reachable), either family."""
    if model_family(model_cfg.name) == "timm":
        check_timm_weights(model_cfg.name, model_cfg.pretrained, model_cfg.cache_dir)
        return
    from lfm_ray.model import check_weights

    check_weights(model_cfg.name, model_cfg.pretrained, model_cfg.cache_dir)


# ---- building ----------------------------------------------------------------------------------
def _file_keys(path: str) -> set[str]:
    """The parameter names a weights file holds (timm's own reader: wrapped checkpoints too)."""
    from timm.models import load_state_dict

    try:
        return set(load_state_dict(path))
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file
        raise LfmError(f"weights file {path!r} cannot be read: {str(exc).splitlines()[0]}"
                       ) from None


def build_timm(name: str, pretrained: str | None = None, cache_dir: str | None = None,
               image_size: int | None = None, device: str | torch.device = "cpu"
               ) -> tuple[nn.Module, Any]:
    """(timm model returning pooled features (num_classes=0), in eval mode, ImageSpec).

    pretrained: a timm tag of the architecture (hub weights, cache first), a weights file
    (loaded by timm, its classifier dropped; every backbone parameter must be in it), or None
    for random init. image_size: the square input size (fixed-size models such as ViTs are
    built for it, their position embeddings resampled by timm), None for the data config's.
    """
    import timm

    check_timm_name(name, pretrained)
    arch = timm_arch(name)
    kwargs: dict[str, Any] = {"num_classes": 0}
    default = timm.models.get_pretrained_cfg(arch)
    if image_size is not None and default is not None and default.fixed_input_size:
        kwargs["img_size"] = int(image_size)
    what = f"{name} with weights {pretrained!r}" if pretrained else f"model {name}"
    file = _weights_file(pretrained)
    if not pretrained:
        build = lambda: timm.create_model(arch, pretrained=False, **kwargs)  # noqa: E731
    elif file is not None:
        build = lambda: timm.create_model(  # noqa: E731
            arch, pretrained=True, pretrained_cfg_overlay={"file": file, "source": None},
            **kwargs)
    else:
        check_timm_weights(name, pretrained, cache_dir)  # cached, or the hub answers
        build = lambda: timm.create_model(  # noqa: E731
            f"{arch}.{pretrained}", pretrained=True, cache_dir=cache_dir, **kwargs)
    with _quiet_timm():
        model = weights.cache_first(build, what)
    if file is not None:
        # timm loads a file without its classifier non-strictly; a file of another
        # architecture must not leave layers at random init, nor bring layers it has not.
        held, ours = _file_keys(file), set(model.state_dict())
        lacking = [k for k in ours if k not in held and not k.endswith("num_batches_tracked")]
        heads = model.pretrained_cfg.get("classifier") or ()
        heads = (heads,) if isinstance(heads, str) else tuple(heads)
        extra = sorted(k for k in held - ours if not k.startswith(tuple(f"{h}." for h in heads)))
        if lacking or extra:
            what = (f"lacks {len(lacking)} of its parameters (first: {lacking[0]})" if lacking
                    else f"holds {len(extra)} parameters it has not (first: {extra[0]})")
            raise LfmError(f"weights file {pretrained!r} does not fit {name}: it {what}")
    model = model.to(device).eval()
    return model, timm_image_spec(model, name, image_size)


def _quiet_timm():
    """timm logs each weight load at INFO, and keys it leaves out at WARNING; build_timm
    checks a weights file's keys itself and says what does not fit."""
    import contextlib

    @contextlib.contextmanager
    def quiet():
        log = logging.getLogger("timm")
        level = log.level
        log.setLevel(max(level, logging.ERROR))
        try:
            yield
        finally:
            log.setLevel(level)

    return quiet()


def timm_image_spec(model: nn.Module, name: str, image_size: int | None = None):
    """timm's own data config of the model (resolve_model_data_config: input size, mean,
    std, interpolation, crop mode) as an ImageSpec. timm's crop_pct (resize to S / crop_pct,
    then the centre S × S) is taken as 1: the short side goes to S, as CLIP's preprocessing.
    `image_size` replaces the config's input size."""
    from timm.data import resolve_model_data_config

    from lfm_ray.data.preprocess import ImageSpec

    cfg = resolve_model_data_config(model)
    _, height, width = cfg["input_size"]
    if image_size is None and height != width:
        raise LfmError(f"model {name} takes non-square {height}×{width} images; lfm-ray "
                       "feeds square images only (set model.image_size)")
    size = int(image_size) if image_size is not None else int(height)
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation == "random":  # a training-time choice; evaluated as bicubic
        interpolation = "bicubic"
    if interpolation not in ("bicubic", "bilinear"):
        raise LfmError(f"model {name}: timm's data config asks for {interpolation!r} "
                       "interpolation; lfm-ray resizes with bicubic or bilinear only")
    crop_mode = cfg.get("crop_mode", "center")
    if crop_mode not in TIMM_CROP_MODES:
        raise LfmError(f"model {name}: timm's crop mode {crop_mode!r} is not supported; "
                       f"supported: {', '.join(TIMM_CROP_MODES)}")
    return ImageSpec(size, tuple(float(v) for v in cfg["mean"]),
                     tuple(float(v) for v in cfg["std"]),
                     resize_mode=TIMM_CROP_MODES[crop_mode], interpolation=interpolation)


def build_backbone(model_cfg, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """(backbone, ImageSpec) of a ModelConfig: an open_clip model (model.build_clip, its text
    tower included) or a timm model returning pooled features."""
    if model_family(model_cfg.name) == "timm":
        return build_timm(model_cfg.name, model_cfg.pretrained, model_cfg.cache_dir,
                          model_cfg.image_size, device)
    from lfm_ray.model import build_clip

    return build_clip(model_cfg.name, model_cfg.pretrained, model_cfg.cache_dir, device)


class LinearClassifier(nn.Module):
    """z = s · (W f + b): a vision-only backbone's pooled features f and a linear head.

    Shaped as LFMClassifier for the trainer: `visual` is the backbone, `encode` its features,
    `head` the logits, and the head is called `proj` (stage 2's trainable part, as W_I is
    for CLIP), so checkpoints and the training loop treat both alike. s is the run's logit
    scale (1 for CE, BalCE and Focal; LDAM's s·m_y margin then sits on these logits).
    """

    # A timm model fine-tunes fully in stage 1 (backbone and head; lfm_ray.finetune's
    # lightweight modes are for open_clip ViTs, refused by check_family).
    finetune = "full"

    def __init__(self, visual: nn.Module, num_features: int, num_classes: int,
                 logit_scale: float = 1.0):
        super().__init__()
        self.visual = visual
        self.proj = nn.Linear(int(num_features), int(num_classes))
        self.logit_scale = float(logit_scale)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features, (B, num_features)."""
        return self.visual(images)

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.proj(feats.float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(images))

    def set_stage(self, stage: int) -> None:
        """Stage 1: backbone and head trainable. Stage 2: the head alone."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        for p in self.visual.parameters():
            p.requires_grad_(stage == 1)
        for p in self.proj.parameters():
            p.requires_grad_(True)

    def trainable_names(self, stage: int) -> list[str]:
        """What each stage trains: stage 1 backbone and head, stage 2 the head alone."""
        names = [name for name, _ in self.named_parameters()]
        return names if stage == 1 else [n for n in names if n.startswith("proj.")]

    def weights(self) -> dict[str, Any]:
        """What a checkpoint keeps of the model: the backbone and the head."""
        return {"visual": self.visual.state_dict(), "proj": self.proj.state_dict()}

    def load_weights(self, state: dict[str, Any]) -> None:
        self.visual.load_state_dict(state["visual"])
        self.proj.load_state_dict(state["proj"])

    @torch.no_grad()
    def begin_stage(self, stage: int) -> None:
        """Called when a stage starts afresh (not when a run resumes inside it): stage 2
        retrains the classifier from W = 0, b = 0 (the same start on every run, so a branch
        from a shared stage 1 equals the full run)."""
        if stage == 2:
            self.proj.weight.zero_()
            self.proj.bias.zero_()


def build_classifier_for(backbone: nn.Module, cfg, class_names: Sequence[str],
                         device: str | torch.device = "cpu", image_size: int = 224
                         ) -> tuple[nn.Module, torch.Tensor | None]:
    """(classifier, class text features or None) for a RunConfig on a built backbone.

    With class features (`model.text`, lfm_ray/text.py): LFM's LFMClassifier over them
    (computed once; a CLIP model's text tower is not kept), its image tower bridged to their
    dimension where they come from another encoder than the tower's own (its `bridge`).
    Without (a timm model's `none`): a LinearClassifier. `image_size` is the model's input
    size (a tower's output width is measured on one image of it)."""
    from lfm_ray.model import LFMClassifier
    from lfm_ray.text import CLIP, NONE, class_features, feature_dim, resolve_text

    text = resolve_text(cfg.model)
    if text == NONE:
        model = LinearClassifier(backbone, feature_dim(backbone, image_size), len(class_names),
                                 cfg.logit_scale)
        return model.to(device), None
    if text == CLIP:
        feats = class_features(cfg.model, class_names, device, clip_model=backbone)
        return LFMClassifier(backbone.visual, feats, cfg.logit_scale).to(device), feats
    feats = class_features(cfg.model, class_names, device)
    tower = backbone.visual if model_family(cfg.model.name) == "clip" else backbone
    model = LFMClassifier(tower, feats, cfg.logit_scale,
                          bridge_from=feature_dim(tower, image_size))
    return model.to(device), feats
