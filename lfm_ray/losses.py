"""Every loss, taking soft targets (mixed labels) or hard labels, behind a registry.

`build_loss(name, class_counts, text_features=None, **params)` returns a module whose
forward is `(logits (B, C), targets) -> scalar`; targets are a LongTensor (B,) of labels or a
float (B, C) soft target. Hard labels become one-hot, so each loss has one code path.
Logits are the model's s·cos; the defaults of s per loss live in lfm_ray.config.LOGIT_SCALE.
A loss whose margin is in cosine units (LDAM, MMS) takes the scale of the logits it is given
(`logit_scale`) and puts its margin on that scale, so one knob (`model.logit_scale`) sets the
scale of every loss and a comparison can run them all at one common scale.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lfm_ray.config import LOGIT_SCALE
from lfm_ray.errors import LfmError, unknown_name


def as_soft(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Hard labels (B,) become one-hot (B, C); soft targets (B, C) pass through as float32."""
    if not targets.is_floating_point():
        if targets.dim() != 1:
            raise ValueError(f"hard labels must have shape (B,); got {tuple(targets.shape)}")
        return F.one_hot(targets.long(), num_classes).float()
    if targets.dim() != 2 or targets.shape[1] != num_classes:
        raise ValueError(f"soft targets must have shape (B, {num_classes}); "
                         f"got {tuple(targets.shape)}")
    return targets.float()


def soft_cross_entropy(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """−Σ_k t_k log softmax(z)_k, mean over the batch (in float32 whatever the autocast)."""
    return -(soft * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


class CrossEntropy(nn.Module):
    """−Σ_k t_k log softmax(z)_k, mean over the batch."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return soft_cross_entropy(logits, as_soft(targets, logits.shape[1]))


class BalancedSoftmax(nn.Module):
    """Balanced softmax (BalCE): cross-entropy on z_k + log n_k."""

    def __init__(self, class_counts: Sequence[int]):
        super().__init__()
        counts = torch.as_tensor(list(class_counts), dtype=torch.float32)
        # A class without training images gets log 1 = 0 rather than −inf, which would
        # make its logit vanish and its loss infinite on a soft target that names it.
        self.register_buffer("log_prior", counts.clamp(min=1).log())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return soft_cross_entropy(logits.float() + self.log_prior, as_soft(targets, logits.shape[1]))


class Focal(nn.Module):
    """−Σ_k t_k (1 − p_k)^γ log p_k."""

    def __init__(self, gamma: float = 2.0):
        super().__init__()
        if gamma < 0:
            raise LfmError(f"focal gamma={gamma} is not valid; expected a number >= 0")
        self.gamma = float(gamma)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        soft = as_soft(targets, logits.shape[1])
        logp = F.log_softmax(logits.float(), dim=1)
        weight = (1 - logp.exp()).clamp(min=0).pow(self.gamma)
        return -(soft * weight * logp).sum(dim=1).mean()


def _check_scale(name: str, logit_scale: float) -> float:
    if not logit_scale > 0:
        raise LfmError(f"{name} logit_scale={logit_scale} is not valid; expected a number > 0")
    return float(logit_scale)


class LDAM(nn.Module):
    """Label-distribution-aware margins m_k ∝ n_k^(−1/4), the largest `max_margin`.

    Logits are s·cos (s = `logit_scale`, 30 by default as LDAM's authors); the margin is in
    cosine units, so s·m_y comes off the target's logit: s·(cos_y − m_y), the original LDAM.
    A soft target weights each class's margin by its target, s·t_k·m_k; then soft CE.
    """

    def __init__(self, class_counts: Sequence[int], max_margin: float = 0.5,
                 logit_scale: float = LOGIT_SCALE["ldam"]):
        super().__init__()
        if not max_margin > 0:
            raise LfmError(f"ldam max_margin={max_margin} is not valid; expected a number > 0")
        counts = torch.as_tensor(list(class_counts), dtype=torch.float64).clamp(min=1)
        m = counts.pow(-0.25)
        self.register_buffer("margins", (m * (max_margin / m.max())).float())
        self.logit_scale = _check_scale("ldam", logit_scale)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        soft = as_soft(targets, logits.shape[1])
        shifted = logits.float() - self.logit_scale * soft * self.margins
        return soft_cross_entropy(shifted, soft)


class MarginMetricSoftmax(nn.Module):
    """MMS: for target c the non-target logits get + s·margin·(1 − cos(f_T[c], f_T[k])).

    Logits are s·cos (s = `logit_scale`, 100 = 1/T with T = 0.01 by default as the LFM
    authors); the margin is in cosine units, so at s = 100 this is their
    (cos + margin·(1 − cos)) / T. A soft target is the expectation Σ_c t_c L_c over its
    classes with t_c > 0, computed only for those classes.
    """

    def __init__(self, text_features: torch.Tensor, margin: float = 0.3,
                 logit_scale: float = LOGIT_SCALE["mms"]):
        super().__init__()
        if text_features is None:
            raise LfmError("mms needs the class text features")
        if not margin >= 0:
            raise LfmError(f"mms margin={margin} is not valid; expected >= 0")
        scale = _check_scale("mms", logit_scale)
        f = F.normalize(text_features.detach().float(), dim=-1)
        margins = scale * margin * (1 - f @ f.t())  # on the logits' scale
        margins.fill_diagonal_(0.0)
        self.register_buffer("margins", margins)
        self.logit_scale = scale

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        B, C = logits.shape
        soft = as_soft(targets, C)
        # Only the classes a row names matter; k = the most any row names (2 for a mixed label),
        # so the work is B·k·C, never B·C·C. Rows naming fewer pad with zero weights.
        k = int((soft > 0).sum(dim=1).max()) if B else 0
        weights, classes = soft.topk(k, dim=1)                      # (B, k)
        adjusted = logits.unsqueeze(1) + self.margins[classes]      # (B, k, C)
        logp = F.log_softmax(adjusted, dim=2).gather(2, classes.unsqueeze(2)).squeeze(2)
        return -(weights * logp).sum(dim=1).mean()


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ce": lambda class_counts, text_features: CrossEntropy(),
    "balce": lambda class_counts, text_features: BalancedSoftmax(class_counts),
    "focal": lambda class_counts, text_features, gamma=2.0: Focal(gamma),
    "ldam": lambda class_counts, text_features, max_margin=0.5,
    logit_scale=LOGIT_SCALE["ldam"]: LDAM(class_counts, max_margin, logit_scale),
    "mms": lambda class_counts, text_features, margin=0.3,
    logit_scale=LOGIT_SCALE["mms"]: MarginMetricSoftmax(text_features, margin, logit_scale),
}

# Parameters that went, and what took their place.
REPLACED_PARAMS = {"scale": "logit_scale", "temperature": "logit_scale (= 1 / temperature)"}


def build_loss(name: str, class_counts: Sequence[int], text_features: torch.Tensor | None = None,
               **params: Any) -> nn.Module:
    """The loss `name` (see LOSSES); params are its own (gamma; max_margin, logit_scale;
    margin, logit_scale). `logit_scale` is the scale s of the logits the loss will get
    (z = s·cos); LDAM's and MMS's margins are put on it. Its default is the loss's own
    (config.LOGIT_SCALE)."""
    if name not in LOSSES:
        raise unknown_name("loss", name, list(LOSSES))
    builder = LOSSES[name]
    accepted = [p for p in inspect.signature(builder).parameters
                if p not in ("class_counts", "text_features")]
    for key in params:
        if key not in accepted:
            hint = f" ({key} was replaced by {REPLACED_PARAMS[key]})" \
                if key in REPLACED_PARAMS and "logit_scale" in accepted else ""
            raise LfmError(f"loss {name!r} takes no parameter {key!r}{hint}; "
                           f"accepted: {', '.join(accepted) or 'none'}")
    module = builder(class_counts, text_features, **params)
    if text_features is not None:
        module = module.to(text_features.device)
    return module
