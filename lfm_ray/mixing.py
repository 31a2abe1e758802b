"""Pair sampling and label rules of every mixing method, behind one interface.

A mixer is built once per stage (α, τ and β may differ per stage). Per batch the trainer asks
`partners(indices, labels, generator)` for the partner images' dataset indices, gathers
them, and calls `mix(x_i, y_i, x_j, y_j, generator)`, which returns the mixed images and soft
targets (B, C). Losses only consume soft targets (timm's contract), so the trainer never
knows which mixing method runs.

LFM (paper Eq. 1 and 2): the partner class j of sample i is drawn with
P[y_i, j] = softmax_j(f_T[y_i]·f_T[j] / τ), diagonal excluded, then a uniform image of
class j; x = λ_x x_i + (1 − λ_x) x_j with λ_x ~ Beta(β, β) (one draw per batch), and
λ_y = clamp(λ_x − α (n_i − n_j)/(n_i + n_j), 0, 1).

Draws use the CPU generator the trainer passes, so a seed gives the same pairs and labels
on any device; class draws use Walker's alias tables (O(1) per draw).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from lfm_ray.errors import LfmError, unknown_name

# ConCutMix: softmax temperature over the two classes' cosine similarities (cosines of CLIP
# features differ by a few hundredths, so a small temperature is needed to separate them).
CONCUTMIX_TEMPERATURE = 0.01


# ---- the formulas ------------------------------------------------------------------------------
def local_sampling_matrix(text_features: torch.Tensor, tau: float) -> torch.Tensor:
    """P (C, C): row i is softmax_j(f_T[i]·f_T[j] / τ) over j ≠ i; P[i, i] = 0."""
    if tau <= 0:
        raise LfmError(f"tau={tau} is not valid; expected a number > 0")
    f = text_features.double()
    sim = (f @ f.t()) / tau
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    P = torch.softmax(sim.masked_fill(eye, float("-inf")), dim=1)
    return P.to(text_features.dtype if text_features.is_floating_point() else torch.float32)


def label_shift(lam_x, n_i, n_j, alpha: float) -> torch.Tensor:
    """λ_y = clamp(λ_x − α (n_i − n_j) / (n_i + n_j), 0, 1) (paper Eq. 2), broadcast."""
    lam_x, n_i, n_j = (torch.as_tensor(v, dtype=torch.float64) for v in (lam_x, n_i, n_j))
    return (lam_x - alpha * (n_i - n_j) / (n_i + n_j)).clamp(0.0, 1.0)


def sample_beta(beta: float, generator: torch.Generator) -> float:
    """λ ~ Beta(β, β) from the generator: X/(X+Y) with X, Y ~ Gamma(β) (Marsaglia–Tsang)."""
    x, y = _gamma(beta, generator), _gamma(beta, generator)
    return x / (x + y) if x + y > 0 else 0.5


def _gamma(shape: float, g: torch.Generator) -> float:
    if shape < 1.0:
        # Gamma(a) = Gamma(a + 1) · U^(1/a)
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        return _gamma(shape + 1.0, g) * u ** (1.0 / shape)
    d = shape - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    while True:
        x = float(torch.randn((), generator=g, dtype=torch.float64))
        v = (1.0 + c * x) ** 3
        if v <= 0:
            continue
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        if np.log(u) < 0.5 * x * x + d - d * v + d * np.log(v):
            return d * v


# ---- partner sampling ----------------------------------------------------------------------
def alias_tables(P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Walker/Vose alias tables for each row of P: (prob (C, K), alias (C, K)) in float64.

    A draw picks a column k uniformly, keeps k with probability prob[row, k], else takes
    alias[row, k]. Built with the exact Vose pairing per row (vectorised over rows).
    """
    P = P.double().cpu()
    rows, K = P.shape
    scaled = P / P.sum(dim=1, keepdim=True) * K
    prob = torch.ones(rows, K, dtype=torch.float64)
    alias = torch.arange(K).repeat(rows, 1)
    scaled_np = scaled.numpy().copy()
    prob_np, alias_np = prob.numpy(), alias.numpy()
    for r in range(rows):  # once per stage; O(K) per row
        s = scaled_np[r]
        small = [k for k in range(K) if s[k] < 1.0]
        large = [k for k in range(K) if s[k] >= 1.0]
        while small and large:
            lo, hi = small.pop(), large.pop()
            prob_np[r, lo] = s[lo]
            alias_np[r, lo] = hi
            s[hi] = s[hi] + s[lo] - 1.0
            (small if s[hi] < 1.0 else large).append(hi)
        for k in large + small:  # leftovers are 1 up to float rounding
            prob_np[r, k] = 1.0
            alias_np[r, k] = k
    # A zero-probability class is never kept, and never an alias (guards float rounding).
    zero = (P == 0).numpy()
    best = P.argmax(dim=1).numpy()
    prob_np[zero] = 0.0
    bad_alias = np.take_along_axis(zero, alias_np, axis=1)
    alias_np[bad_alias] = np.broadcast_to(best[:, None], alias_np.shape)[bad_alias]
    return torch.from_numpy(prob_np), torch.from_numpy(alias_np)


class PairSampler:
    """LFM's partner draw: class via row y_i of P (alias method), then a uniform image of it.

    Per-class index tables (dataset indices sorted by class, offsets, counts) make the image
    draw one gather; everything is vectorised over the batch.
    """

    def __init__(self, P: torch.Tensor, train_labels: torch.Tensor, device: torch.device | str = "cpu"):
        self.P = P.double().cpu()
        self.prob, self.alias = alias_tables(self.P)
        labels = torch.as_tensor(train_labels, dtype=torch.long).cpu()
        self.order = torch.argsort(labels, stable=True)
        self.counts = torch.bincount(labels, minlength=P.shape[0])
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.num_classes = P.shape[0]

    def sample_classes(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        labels = labels.cpu()
        n = len(labels)
        col = torch.randint(self.num_classes, (n,), generator=generator)
        keep = torch.rand(n, generator=generator, dtype=torch.float64) < self.prob[labels, col]
        return torch.where(keep, col, self.alias[labels, col])

    def sample_images(self, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(len(classes), generator=generator, dtype=torch.float64)
        counts = self.counts[classes]
        within = torch.minimum((u * counts).long(), counts - 1)  # u < 1, guard rounding
        return self.order[self.offsets[classes] + within]

    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Dataset indices of one partner per label."""
        return self.sample_images(self.sample_classes(labels, generator), generator)


def sample_classes_multinomial(P: torch.Tensor, labels: torch.Tensor,
                               generator: torch.Generator) -> torch.Tensor:
    """The plain path: one `torch.multinomial` over rows of P (the reference for tests)."""
    return torch.multinomial(P.double().cpu()[labels.cpu()], 1, generator=generator).squeeze(1)


# ---- mixers --------------------------------------------------------------------------------
def one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(y.long(), num_classes).float()


def _soft(y_i, y_j, lam_y: torch.Tensor, C: int) -> torch.Tensor:
    lam_y = lam_y.to(device=y_i.device, dtype=torch.float32).reshape(-1, 1)
    return lam_y * one_hot(y_i, C) + (1 - lam_y) * one_hot(y_j, C)


class Mixer:
    """No mixing: the batch as it is, one-hot targets. Base of every mixer."""

    needs_partners = False

    def __init__(self, *, class_counts, train_labels=None, text_features=None, alpha: float = 1.0,
                 tau: float = 0.05, beta: float = 0.2, device="cpu", **params: Any):
        self.counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
        self.num_classes = len(self.counts)
        self.alpha, self.tau, self.beta = float(alpha), float(tau), float(beta)
        self.text_features = text_features
        self.params = params

    def partners(self, indices: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor | None:
        return None

    def mix(self, x_i, y_i, x_j, y_j, generator, similarity_fn=None):
        return x_i, one_hot(y_i, self.num_classes).to(x_i.device)


class BatchPartnerMixer(Mixer):
    """Partners from a permutation of the batch (Mixup, Remix, CutMix, ConCutMix)."""

    needs_partners = True

    def partners(self, indices, labels, generator):
        return indices[torch.randperm(len(indices), generator=generator)]


class Mixup(BatchPartnerMixer):
    def mix(self, x_i, y_i, x_j, y_j, generator, similarity_fn=None):
        lam = sample_beta(self.beta, generator)
        x = lam * x_i + (1 - lam) * x_j
        return x, _soft(y_i, y_j, torch.full((len(y_i),), lam), self.num_classes)


def remix_label(lam_x: float, n_i: torch.Tensor, n_j: torch.Tensor, kappa: float,
                tau_r: float) -> torch.Tensor:
    """Remix (Chou et al. 2020): the label favours the minority class of a pair.

    λ_y = 0 if n_i/n_j ≥ κ and λ_x < τ_r; λ_y = 1 if n_i/n_j ≤ 1/κ and 1 − λ_x < τ_r;
    else λ_y = λ_x.
    """
    ratio = n_i.double() / n_j.double()
    lam = torch.full_like(ratio, float(lam_x))
    lam = torch.where((ratio >= kappa) & (lam_x < tau_r), torch.zeros_like(lam), lam)
    lam = torch.where((ratio <= 1.0 / kappa) & (1 - lam_x < tau_r), torch.ones_like(lam), lam)
    return lam


class Remix(BatchPartnerMixer):
    def mix(self, x_i, y_i, x_j, y_j, generator, similarity_fn=None):
        lam = sample_beta(self.beta, generator)
        x = lam * x_i + (1 - lam) * x_j
        lam_y = remix_label(lam, self.counts[y_i.cpu()], self.counts[y_j.cpu()],
                            float(self.params.get("remix_kappa", 3.0)),
                            float(self.params.get("remix_tau", 0.5)))
        return x, _soft(y_i, y_j, lam_y, self.num_classes)


def cut_box(lam: float, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """A box of area ≈ (1 − λ) of the image at a uniform centre, clipped to the image."""
    ratio = (1.0 - lam) ** 0.5
    bh, bw = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(height, (), generator=generator))
    cx = int(torch.randint(width, (), generator=generator))
    y0, y1 = max(cy - bh // 2, 0), min(cy + bh // 2, height)
    x0, x1 = max(cx - bw // 2, 0), min(cx + bw // 2, width)
    return y0, y1, x0, x1


def _cutmix_images(x_i, x_j, lam, generator):
    H, W = x_i.shape[-2:]
    y0, y1, x0, x1 = cut_box(lam, H, W, generator)
    x = x_i.clone()
    x[..., y0:y1, x0:x1] = x_j[..., y0:y1, x0:x1]
    area_lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W)  # the real share of x_i
    return x, area_lam


class CutMix(BatchPartnerMixer):
    def mix(self, x_i, y_i, x_j, y_j, generator, similarity_fn=None):
        lam = sample_beta(self.beta, generator)
        x, area_lam = _cutmix_images(x_i, x_j, lam, generator)
        return x, _soft(y_i, y_j, torch.full((len(y_i),), area_lam), self.num_classes)


class ConCutMix(BatchPartnerMixer):
    """CutMix whose area label is rectified toward the semantic similarity of the mixed
    image to the two classes' text features: λ_y = (1 − w)·λ_area + w·λ_sem, with λ_sem the
    softmax over (cos(x, f_T[y_i]), cos(x, f_T[y_j])) / CONCUTMIX_TEMPERATURE."""

    def mix(self, x_i, y_i, x_j, y_j, generator, similarity_fn=None):
        if similarity_fn is None:
            raise LfmError("concutmix needs the model's image-text similarity (similarity_fn)")
        lam = sample_beta(self.beta, generator)
        x, area_lam = _cutmix_images(x_i, x_j, lam, generator)
        sim = similarity_fn(x).float()
        pair = torch.stack([sim.gather(1, y_i.view(-1, 1)).squeeze(1),
                            sim.gather(1, y_j.view(-1, 1)).squeeze(1)], dim=1)
        sem = torch.softmax(pair / CONCUTMIX_TEMPERATURE, dim=1)[:, 0]
        sem = torch.where(y_i == y_j, torch.ones_like(sem), sem)
        w = float(self.params.get("concutmix_weight", 0.5))
        lam_y = (1 - w) * area_lam + w * sem.double().cpu()
        return x, _soft(y_i, y_j, lam_y, self.num_classes)


class LocalFeatureMixup(Mixer):
    """LFM: partners from semantically close classes, labels shifted toward the rarer class."""

    needs_partners = True

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        if self.text_features is None or kw.get("train_labels") is None:
            raise LfmError("lfm needs the class text features and the training labels")
        self.P = local_sampling_matrix(self.text_features.detach().float().cpu(), self.tau)
        self.sampler = PairSampler(self.P, kw["train_labels"])

    def partners(self, indices, labels, generator):
        return self.sampler.sample(labels, generator)

    def mix(self, x_i, y_i, x_j, y_j, generator, similarity_fn=None):
        lam = sample_beta(self.beta, generator)
        x = lam * x_i + (1 - lam) * x_j
        lam_y = label_shift(lam, self.counts[y_i.cpu()], self.counts[y_j.cpu()], self.alpha)
        return x, _soft(y_i, y_j, lam_y, self.num_classes)


MIXERS: dict[str, Callable[..., Mixer]] = {
    "none": Mixer,
    "mixup": Mixup,
    "remix": Remix,
    "cutmix": CutMix,
    "concutmix": ConCutMix,
    "lfm": LocalFeatureMixup,
}


def build_mixer(name: str, **kwargs: Any) -> Mixer:
    """A mixer by name; keyword arguments: class_counts, train_labels, text_features, alpha,
    tau, beta, device, remix_kappa, remix_tau, concutmix_weight."""
    if name not in MIXERS:
        raise unknown_name("mixing method", name, list(MIXERS))
    return MIXERS[name](**kwargs)
