"""Which family a model name belongs to: "timm:ARCH" names a timm vision-only backbone
(lfm_ray.backbones), any other name an open_clip model (lfm_ray.model). No torch here: the
text encoders, the similarity sources and the checks ask it before any model is built."""

from __future__ import annotations

TIMM_PREFIX = "timm:"
FAMILIES = ("clip", "timm")


def model_family(name: str) -> str:
    """'timm' for a "timm:ARCH" model, else 'clip' (an open_clip model)."""
    return "timm" if str(name).startswith(TIMM_PREFIX) else "clip"


def timm_arch(name: str) -> str:
    """"timm:resnet50" → "resnet50"."""
    return str(name)[len(TIMM_PREFIX):]
