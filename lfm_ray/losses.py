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
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lfm_ray.config import LOGIT_SCALE, LossConfig
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


def log_prior(class_counts: Sequence[int]) -> torch.Tensor:
    """log(n_k / Σn), float32. A class without training images counts as one image (log of
    0 would make its logit vanish and its loss infinite on a soft target that names it)."""
    counts = torch.as_tensor(list(class_counts), dtype=torch.float64).clamp(min=1)
    return (counts / counts.sum()).log().float()


class BalancedSoftmax(nn.Module):
    """Balanced softmax (BalCE): cross-entropy on z_k + τ·log(n_k / Σn) (τ = 1: Ren et al.'s
    balanced softmax; any τ: logit adjustment). Σn shifts every logit alike, so it leaves
    the loss as it is; it keeps the adjustment's scale that of a probability."""

    def __init__(self, class_counts: Sequence[int], tau: float = 1.0):
        super().__init__()
        if not tau >= 0:
            raise LfmError(f"balce tau={tau} is not valid; expected a number >= 0")
        self.register_buffer("log_prior", float(tau) * log_prior(class_counts))

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


# ---- reweighting and LADE (as LIFT and LIFT+ define them: shijxcs/LIFT, utils/losses.py) ------
def _counts(class_counts: Sequence[int]) -> torch.Tensor:
    """n_k as float64, a class without training images counted as one (see log_prior)."""
    return torch.as_tensor(list(class_counts), dtype=torch.float64).clamp(min=1)


def class_balanced_weights(class_counts: Sequence[int], beta: float) -> torch.Tensor:
    """Cui et al.'s class-balanced weights: the inverse effective number of samples,
    w_k = (1 − β) / (1 − β^n_k), scaled to mean 1 over the classes (float32)."""
    if not 0 <= beta < 1:
        raise LfmError(f"cb beta={beta} is not valid; expected a number in [0, 1)")
    n = _counts(class_counts)
    w = (1 - beta) / (1 - torch.pow(torch.tensor(float(beta), dtype=torch.float64), n))
    return (w / w.mean()).float()


def generalized_reweighting_weights(class_counts: Sequence[int], exponent: float) -> torch.Tensor:
    """GRW's weights (Zhang et al. 2021): w_k = (n_k / Σn)^(−ρ), scaled to mean 1 (float32)."""
    if not exponent >= 0:
        raise LfmError(f"grw exponent={exponent} is not valid; expected a number >= 0")
    n = _counts(class_counts)
    w = (n / n.sum()).pow(-float(exponent))
    return (w / w.mean()).float()


class WeightedCrossEntropy(nn.Module):
    """Class-weighted cross-entropy, the weighted mean over the batch:
    Σ_i Σ_k w_k t_ik (−log p_ik) / Σ_i Σ_k w_k t_ik. On hard labels this is PyTorch's
    cross_entropy(weight=w) (the batch's loss divided by its total weight, as LIFT's CB and
    GRW); a soft target spreads each sample's weight over its classes as its loss."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.register_buffer("weights", weights.detach().float())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        soft = as_soft(targets, logits.shape[1])
        weighted = soft * self.weights
        logp = F.log_softmax(logits.float(), dim=1)
        return -(weighted * logp).sum() / weighted.sum()


class LADE(nn.Module):
    """LADE (Hong et al., CVPR 2021) as LIFT defines it: balanced softmax plus `weight` times
    the negative ReMINE estimate of the log-likelihood ratio, weighted by the class prior π.

    Per class c over the batch of B samples: first_c = Σ_i t_ic z_ic / (Σ_i t_ic + 1e-8) (the
    mean target logit of its samples; 0 for a class not in the batch), second_c =
    logsumexp_i(z_ic − log π_c − log C) − log B, estimate_c = first_c − second_c −
    λ·second_c²; loss = BalCE(z, t) − weight · Σ_c π_c · estimate_c. Hard labels give LIFT's
    LADELoss exactly; a soft target counts as t_ic of a sample of class c.
    """

    def __init__(self, class_counts: Sequence[int], weight: float = LossConfig.lade_weight,
                 remine_lambda: float = LossConfig.lade_remine_lambda):
        super().__init__()
        if not weight >= 0:
            raise LfmError(f"lade weight={weight} is not valid; expected a number >= 0")
        if not remine_lambda >= 0:
            raise LfmError(f"lade remine_lambda={remine_lambda} is not valid; expected a "
                           "number >= 0")
        self.weight, self.remine_lambda = float(weight), float(remine_lambda)
        prior = log_prior(class_counts)
        self.register_buffer("log_prior", prior)
        self.register_buffer("prior", prior.exp())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        z = logits.float()
        B, C = z.shape
        soft = as_soft(targets, C)
        balanced = soft_cross_entropy(z + self.log_prior, soft)
        first = (soft * z).sum(dim=0) / (soft.sum(dim=0) + 1e-8)
        second = torch.logsumexp(z - self.log_prior - math.log(C), dim=0) - math.log(B)
        estimate = first - second - self.remine_lambda * second.pow(2)
        return balanced - self.weight * (self.prior * estimate).sum()


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ce": lambda class_counts, text_features: CrossEntropy(),
    "balce": lambda class_counts, text_features, tau=1.0: BalancedSoftmax(class_counts, tau),
    "focal": lambda class_counts, text_features, gamma=2.0: Focal(gamma),
    "ldam": lambda class_counts, text_features, max_margin=0.5,
    logit_scale=LOGIT_SCALE["ldam"]: LDAM(class_counts, max_margin, logit_scale),
    "mms": lambda class_counts, text_features, margin=0.3,
    logit_scale=LOGIT_SCALE["mms"]: MarginMetricSoftmax(text_features, margin, logit_scale),
    "cb": lambda class_counts, text_features, beta=LossConfig.cb_beta: WeightedCrossEntropy(
        class_balanced_weights(class_counts, beta)),
    "grw": lambda class_counts, text_features, exponent=LossConfig.grw_exponent:
    WeightedCrossEntropy(generalized_reweighting_weights(class_counts, exponent)),
    "lade": lambda class_counts, text_features, weight=LossConfig.lade_weight,
    remine_lambda=LossConfig.lade_remine_lambda: LADE(class_counts, weight, remine_lambda),
}

# Parameters that went, and what took their place.
REPLACED_PARAMS = {"scale": "logit_scale", "temperature": "logit_scale (= 1 / temperature)"}


def build_loss(name: str, class_counts: Sequence[int], text_features: torch.Tensor | None = None,
               **params: Any) -> nn.Module:
    """The loss `name` (see LOSSES); params are its own (tau; gamma; max_margin, logit_scale;
    margin, logit_scale; beta; exponent; weight, remine_lambda). `logit_scale` is the scale s of the logits the loss will get
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


# ---- category extrapolation: neighbour silencing ------------------------------------------------
SILENCE_MODES = ("none", "neighbours", "neighbours+aux")


def silenced_sets(neighbours: Sequence[Sequence[int]], num_aux: int, mode: str) -> torch.Tensor:
    """S (C, C) bool over C = C_t + C_a classes (targets first): row y is the silenced set
    S(y) of a sample of class y.

    `neighbours[t]` is N(t), the auxiliary neighbours of target t (auxiliary indices
    0..C_a − 1); A(a) = the targets that list a. Mode "neighbours": S(t) = N(t), S(a) = A(a);
    "neighbours+aux": S(a) = A(a) ∪ every other auxiliary class; "none": nothing silenced. A
    class is never in its own silenced set.
    """
    if mode not in SILENCE_MODES:
        raise LfmError(f"silence mode {mode!r} is not valid; expected one of "
                       f"{', '.join(SILENCE_MODES)}")
    C_t = len(neighbours)
    S = torch.zeros(C_t + num_aux, C_t + num_aux, dtype=torch.bool)
    if mode == "none":
        return S
    for t, aux in enumerate(neighbours):
        for a in aux:
            if not 0 <= int(a) < num_aux:
                raise LfmError(f"neighbour {a} of target class {t} is not an auxiliary class "
                               f"index (0..{num_aux - 1})")
            S[t, C_t + int(a)] = True        # N(t) silenced for a sample of t
            S[C_t + int(a), t] = True        # A(a) silenced for a sample of a
    if mode == "neighbours+aux":
        S[C_t:, C_t:] = True
    S.fill_diagonal_(False)
    return S


class NeighbourSilencing(nn.Module):
    """Balanced softmax with neighbour silencing ("Learning from Neighbors", Zhao et al.).

    For a sample whose unmixed label is y, the classes of S(y) (`silenced`, see
    `silenced_sets`) leave the softmax (logit −∞) and the target: with z'_j = z_j +
    τ·log(n_j / Σn), loss = −Σ_{j ∉ S(y)} t_j log softmax_{k ∉ S(y)}(z')_j, the batch mean.
    The kept target is not renormalised (a mixed label's mass on a silenced class is dropped).
    τ = 0 is plain cross-entropy with silencing. The forward takes the unmixed labels
    (`needs_labels`): (logits (B, C), targets (B, C) or (B,), labels (B,)) -> scalar.
    """

    needs_labels = True

    def __init__(self, class_counts: Sequence[int], silenced: torch.Tensor, tau: float = 1.0):
        super().__init__()
        C = len(list(class_counts))
        if tuple(silenced.shape) != (C, C) or silenced.dtype != torch.bool:
            raise LfmError(f"the silenced sets must be a ({C}, {C}) bool matrix; got "
                           f"{tuple(silenced.shape)} {silenced.dtype}")
        if bool(silenced.diagonal().any()):
            raise LfmError("a class may not be in its own silenced set")
        if not tau >= 0:
            raise LfmError(f"neighbour silencing tau={tau} is not valid; expected a number >= 0")
        self.tau = float(tau)
        self.register_buffer("log_prior", self.tau * log_prior(class_counts))
        self.register_buffer("silenced", silenced.clone())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        C = logits.shape[1]
        soft = as_soft(targets, C)
        mask = self.silenced[labels.to(self.silenced.device).long()].to(logits.device)
        z = (logits.float() + self.log_prior).masked_fill(mask, float("-inf"))
        # Silenced entries are 0 · (−inf) in the sum: both factors are zeroed there instead,
        # so neither the loss nor its gradient sees a NaN.
        logp = F.log_softmax(z, dim=1).masked_fill(mask, 0.0)
        kept = soft.masked_fill(mask, 0.0)
        return -(kept * logp).sum(dim=1).mean()


def build_silencing_loss(name: str, class_counts: Sequence[int], silenced: torch.Tensor,
                         balce_tau: float = 1.0) -> NeighbourSilencing:
    """Neighbour silencing on loss `name`: balce (τ = `balce_tau`) or ce (τ = 0). The other
    losses are not a softmax cross-entropy over the logits, so silencing is refused for them."""
    if name == "balce":
        return NeighbourSilencing(class_counts, silenced, balce_tau)
    if name == "ce":
        return NeighbourSilencing(class_counts, silenced, 0.0)
    raise LfmError(f"neighbour silencing needs loss ce or balce, got {name!r}; train the "
                   "auxiliary classes with aux.silence none, or use --loss balce")
