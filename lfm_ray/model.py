"""The CLIP model: open_clip backbones, frozen text features, W_I and the cosine logits.

`build_clip` returns an open_clip model and the `ImageSpec` its own preprocessing config
gives, so the batch builder never drifts from the model. "tiny" is a small architecture in
open_clip's own JSON config format (lfm_ray/model_configs/tiny.json), registered with
open_clip's registry on first use, for tests and the embedded demo (random init, 32 px input).

Weights are looked up cache first (lfm_ray.weights). `ImageSpec` lives beside the image
preprocessing it describes (lfm_ray.data.preprocess).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lfm_ray import weights
from lfm_ray.data.preprocess import ImageSpec, check_preprocessing
from lfm_ray.errors import LfmError

TINY_MODEL = "tiny"
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
# Prompts per text-tower call: bounds memory for 1000 classes × several templates.
TEXT_BATCH = 256
# Architectures named first when an unknown one is listed (the full list is ~150 names).
_COMMON_MODELS = (TINY_MODEL, "ViT-B-32", "ViT-B-16", "ViT-L-14", "RN50")
_LIST_MODELS_HINT = "python -c \"import open_clip; print(open_clip.list_models())\""


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
    if weights.looks_like_path(pretrained):
        raise LfmError(f"weights file {pretrained!r} for {name} does not exist; give an "
                       "existing .pt/.pth/.bin/.safetensors file or a pretrained tag")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    shown = ", ".join(tags) if tags else "none (give a weights file path)"
    raise LfmError(f"unknown pretrained tag {pretrained!r} for {name}; known: {shown}")


# ---- where open_clip keeps weights -----------------------------------------------------------
def _hub_files(name: str, pretrained: str | None) -> weights.HubFiles | None:
    """The hub files open_clip downloads for this model, or None when it downloads none."""
    import open_clip
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.pretrained import _get_safe_alternatives

    if name.startswith(HF_HUB_PREFIX):
        repo = name[len(HF_HUB_PREFIX):].strip("/")
        return weights.HubFiles(repo, ((HF_CONFIG_NAME,), (HF_WEIGHTS_NAME, HF_SAFE_WEIGHTS_NAME)))
    if not pretrained or name.startswith(LOCAL_DIR_PREFIX):
        return None
    cfg = open_clip.get_pretrained_cfg(_arch(name), pretrained)
    hub = cfg.get("hf_hub", "") if cfg else ""
    if not hub or "file" in cfg:
        return None  # a local file, or an old url-only entry open_clip fetches itself
    # open_clip's convention: "org/repo/file.bin", or "org/repo/" for its default file name.
    repo, filename = os.path.split(hub)
    filename = filename or HF_WEIGHTS_NAME
    return weights.HubFiles(repo, ((filename, *_get_safe_alternatives(filename)),))


def _fetch(name: str, pretrained: str | None, hub: weights.HubFiles, cache_dir: str | None) -> None:
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
                       f"{hub.repo} into {weights.hub_cache(cache_dir)}: "
                       f"{weights.load_failure_reason(exc)}") from None


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
def seeded_build(seed: int, build: Callable[[], Any], device: Any = None) -> Any:
    """build() with torch's global generator seeded as the trainer seeds before it builds its
    model (lfm_ray.worker.loop.Run), so a randomly initialised tower (tiny) is the run's own;
    the global generator (and `device`'s, on a GPU) is left as it was."""
    devices = [device] if device is not None and torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        return build()


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
        missing = weights.missing_files(hub, cache_dir)
        if missing:
            if weights.env_offline() or not weights.hub_reachable():
                raise weights.weights_missing_error(name, pretrained, hub, missing, cache_dir)
            _fetch(name, pretrained, hub, cache_dir)

    what = f"{name} with weights {pretrained!r}" if pretrained else f"model {name}"
    with _quiet_build(random_init=not pretrained and hub is None):
        model = weights.cache_first(lambda: open_clip.create_model(
            name, pretrained=pretrained, device=device, cache_dir=cache_dir), what)
        tokenizer = weights.cache_first(lambda: open_clip.get_tokenizer(name, cache_dir=cache_dir),
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


def trainable_names(model: nn.Module, stage: int) -> list[str]:
    """Names (as model.named_parameters gives them) of what `stage` trains: in stage 1 the
    model's mode's set (`model.finetune`, set by lfm_ray.finetune.prepare; full where unset),
    in stage 2 W_I (proj.weight) alone."""
    if hasattr(model, "trainable_names"):  # a model that says itself what it trains (timm)
        return model.trainable_names(stage)
    if stage == 2:
        return ["proj.weight"]
    mode = getattr(model, "finetune", "full")
    names = [name for name, _ in model.named_parameters()]
    # A bridge to another encoder's text features (lfm_ray.text) starts untrained: stage 1
    # trains it in every mode.
    bridge = [n for n in names if n.startswith("bridge.")]
    if mode == "full":
        return [n for n in names if n.startswith("visual.")] + bridge
    if mode == "classifier":
        return [n for n in names if n == "class_weights"] + bridge
    if mode == "bitfit":  # "in_proj_bias" of the attention included
        return [n for n in names if n.startswith("visual.") and n.endswith("bias")] + bridge
    added = _tuning_parameters(model)
    return [n for n in names if n in added] + bridge


def _tuning_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters of the modules a lightweight mode added (lfm_ray.finetune's
    TuningModules, which say so by `tuning_module`)."""
    return {f"{prefix}.{name}" for prefix, module in model.named_modules()
            if getattr(module, "tuning_module", False)
            for name, _ in module.named_parameters()}


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
    missing = weights.missing_files(hub, cache_dir)
    if missing and (weights.env_offline() or not weights.hub_reachable()):
        raise weights.weights_missing_error(name, pretrained, hub, missing, cache_dir)
