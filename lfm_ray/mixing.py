"""Pair sampling and label rules of every mixing method, behind one interface.

A mixer is built once per stage (α, τ and β may differ per stage). Per batch the trainer asks
`partners(indices, labels, generator)` for the partner images' dataset indices, gathers
them, and calls `mix(x_i, y_i, x_j, y_j, generator)`, which returns the mixed images and soft
targets (B, C). Losses only consume soft targets, so the trainer never knows which mixing
method runs.

LFM (paper Eq. 1 and 2): the partner class j of sample i is drawn with
P[y_i, j] = softmax_j(f_T[y_i]·f_T[j] / τ), diagonal excluded, then a uniform image of
class j; x = λ_x x_i + (1 − λ_x) x_j with λ_x ~ Beta(β, β) (one draw per batch), and
λ_y = clamp(λ_x − α (n_i − n_j)/(n_i + n_j), 0, 1).

Every random draw goes through the torch.Generator the caller passes and happens on that
generator's device, so a seed reproduces the pairs, boxes and λ of a run. Class draws use
Walker/Vose alias tables (O(1) per draw: one uniform column, one uniform accept test); the
plain `torch.multinomial` path is kept for tests and the benchmark to compare against.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lfm_ray.errors import LfmError, unknown_name
from lfm_ray.transfer import to_device

# ConCutMix: softmax temperature over the two classes' cosine similarities. Cosines of CLIP
# image features to different class prompts differ by a few hundredths, so a temperature of
# the order of CLIP's own (1/100) is needed for the semantic label to move away from 1/2.
CONCUTMIX_TEMPERATURE = 0.01

# Parameters a mixer accepts besides the common ones; every mixer accepts all of them so the
# trainer can pass the run's mixing section unchanged whatever the method.
MIXER_PARAMS = {"remix_kappa": 3.0, "remix_tau": 0.5, "concutmix_weight": 0.5}


# ---- the formulas ------------------------------------------------------------------------------
def local_sampling_matrix(text_features: torch.Tensor, tau: float) -> torch.Tensor:
    """P (C, C): row i is softmax_j(f_T[i]·f_T[j] / τ) over j ≠ i; P[i, i] = 0.

    Computed in float64 with the diagonal masked to −inf before the softmax, so a small τ
    (0.002 gives logits up to 500) neither overflows nor leaks mass onto the diagonal.
    """
    if not tau > 0:
        raise LfmError(f"tau={tau} is not valid; expected a number > 0")
    if text_features.dim() != 2 or text_features.shape[0] < 2:
        raise LfmError("local sampling needs text features of shape (C, d) with C >= 2 classes; "
                       f"got shape {tuple(text_features.shape)}")
    f = text_features.detach().double()
    sim = (f @ f.t()) / tau
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    P = torch.softmax(sim.masked_fill(eye, float("-inf")), dim=1)
    return P.to(text_features.dtype if text_features.is_floating_point() else torch.float32)


def label_shift(lam_x: Any, n_i: Any, n_j: Any, alpha: float) -> torch.Tensor:
    """λ_y = clamp(λ_x − α (n_i − n_j) / (n_i + n_j), 0, 1) (paper Eq. 2), broadcast, float64."""
    lam_x, n_i, n_j = (torch.as_tensor(v, dtype=torch.float64) for v in (lam_x, n_i, n_j))
    return (lam_x - alpha * (n_i - n_j) / (n_i + n_j)).clamp(0.0, 1.0)


def sample_beta(beta: float, generator: torch.Generator) -> float:
    """λ ~ Beta(β, β) from the generator: X/(X+Y) with X, Y ~ Gamma(β) (Marsaglia–Tsang).

    torch.distributions.Beta takes no generator, so a seed could not reproduce it. The ratio
    is formed from log-Gamma variates: for small β both variates can underflow to 0.
    """
    if not beta > 0:
        raise LfmError(f"beta={beta} is not valid; expected a number > 0")
    log_x, log_y = _log_gamma(beta, generator), _log_gamma(beta, generator)
    return 1.0 / (1.0 + math.exp(min(log_y - log_x, 700.0)))


def _uniform(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g, dtype=torch.float64, device=g.device))


def _log_gamma(shape: float, g: torch.Generator) -> float:
    """log of a Gamma(shape, 1) variate."""
    if shape < 1.0:
        # Gamma(a) = Gamma(a + 1) · U^(1/a); U = 0 has probability 2^-53, kept off −inf.
        u = max(_uniform(g), 1e-300)
        return _log_gamma(shape + 1.0, g) + math.log(u) / shape
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = float(torch.randn((), generator=g, dtype=torch.float64, device=g.device))
        v = (1.0 + c * x) ** 3
        if v <= 0:
            continue
        u = _uniform(g)
        if u > 0 and math.log(u) < 0.5 * x * x + d - d * v + d * math.log(v):
            return math.log(d) + math.log(v)


# ---- partner sampling ----------------------------------------------------------------------
def alias_tables(P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Walker/Vose alias tables of every row of P: (prob (R, K) float64, alias (R, K) long).

    A draw from row r picks a column k uniformly, keeps k with probability prob[r, k], else
    takes alias[r, k]. Built by Vose's pairing run in lockstep over all rows (one tensor step
    pairs one deficient column with one surplus column in every row; at most K steps), on
    P's device, in float64. Columns left over when one list empties carry mass 1 up to
    rounding and keep themselves; a zero-probability column is never kept and never an alias,
    so it is never drawn.
    """
    if P.dim() != 2 or P.shape[1] == 0:
        raise LfmError(f"alias tables need a (rows, K) matrix; got shape {tuple(P.shape)}")
    Pd = P.detach().double()
    if bool((Pd < 0).any()) or not bool(torch.isfinite(Pd).all()):
        raise LfmError("sampling probabilities must be finite and >= 0")
    total = Pd.sum(dim=1, keepdim=True)
    if bool((total <= 0).any()):
        raise LfmError("every row of the sampling matrix needs a positive entry")
    R, K = Pd.shape
    device = Pd.device
    s = Pd / total * K                                   # scaled: mean 1 per row
    prob = torch.ones(R, K, dtype=torch.float64, device=device)
    alias = torch.arange(K, device=device).repeat(R, 1)
    is_small = s < 1.0
    # Stacks as index tensors: the first n entries of each row are live, the top at n − 1.
    small = torch.argsort((~is_small).to(torch.int8), dim=1, stable=True)
    large = torch.argsort(is_small.to(torch.int8), dim=1, stable=True)
    n_small = is_small.sum(dim=1)
    n_large = K - n_small
    while True:
        act = ((n_small > 0) & (n_large > 0)).nonzero().squeeze(1)
        if act.numel() == 0:
            break
        ns, nl = n_small[act], n_large[act]
        lo = small[act, ns - 1]
        hi = large[act, nl - 1]
        s_lo = s[act, lo]
        prob[act, lo] = s_lo
        alias[act, lo] = hi
        s_hi = (s[act, hi] + s_lo) - 1.0
        s[act, hi] = s_hi
        now_small = s_hi < 1.0
        # lo leaves the small stack. If hi fell below 1 it moves from the large stack into
        # lo's slot (the small count stays, the large count drops); else it stays large.
        small[act[now_small], ns[now_small] - 1] = hi[now_small]
        n_small[act[~now_small]] -= 1
        n_large[act[now_small]] -= 1
    prob.clamp_(0.0, 1.0)
    # Leftovers kept prob 1 and alias self. A zero column can only be among them through
    # rounding; then it hands its bucket to the row's most likely column.
    zero = Pd == 0
    if bool(zero.any()):
        best = Pd.argmax(dim=1, keepdim=True).expand(R, K)
        prob = prob.masked_fill(zero, 0.0)
        bad = zero.gather(1, alias)
        alias = torch.where(bad, best, alias)
    return prob, alias


def alias_distribution(prob: torch.Tensor, alias: torch.Tensor) -> torch.Tensor:
    """The exact distribution the alias tables draw from, per row (for tests and checks)."""
    K = prob.shape[1]
    out = prob.double() / K
    return out.scatter_add(1, alias, (1.0 - prob.double()) / K)


class PairSampler:
    """LFM's partner draw: class j via row y_i of P (alias method), then a uniform image of j.

    Per-class index tables (dataset indices sorted by class, offsets, counts) make the image
    draw one gather: idx = order[offset[j] + floor(u · count[j])]. Everything is vectorised
    over the batch; the draws run on the generator's device (tables are copied there once).
    Classes without training images get probability 0 in every row (renormalised), since no
    partner image of theirs exists.
    """

    def __init__(self, P: torch.Tensor, train_labels: Any, device: torch.device | str = "cpu"):
        device = torch.device(device)
        labels = torch.as_tensor(train_labels, dtype=torch.long).to(device)
        C = P.shape[0]
        if P.dim() != 2 or P.shape[1] != C:
            raise LfmError(f"the sampling matrix must be square; got shape {tuple(P.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= C):
            raise LfmError(f"training labels must lie in 0..{C - 1} for {C} classes")
        self.num_classes = C
        self.counts = torch.bincount(labels, minlength=C)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.order = torch.argsort(labels, stable=True)
        Pd = P.detach().double().to(device) * (self.counts > 0).double()
        mass = Pd.sum(dim=1)
        stranded = ((mass <= 0) & (self.counts > 0)).nonzero().squeeze(1)
        if stranded.numel():
            raise LfmError(f"class {int(stranded[0])} has no partner class with training images "
                           "and a positive sampling probability; raise tau")
        # Rows of classes without images are never asked for; give them a harmless uniform row.
        Pd[mass <= 0] = 1.0 / C
        self.P = Pd / Pd.sum(dim=1, keepdim=True)
        self.prob, self.alias = alias_tables(self.P)
        self._device = device
        self._copies: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device == self._device:
            return self.prob, self.alias, self.counts, self.offsets, self.order
        if device not in self._copies:
            self._copies[device] = tuple(t.to(device) for t in (
                self.prob, self.alias, self.counts, self.offsets, self.order))
        return self._copies[device]

    def sample_classes(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One partner class per label, from row `label` of P: O(1) per draw."""
        dev = generator.device
        prob, alias, *_ = self._tables(dev)
        labels = labels.to(dev, torch.long)
        n = labels.numel()
        col = torch.randint(self.num_classes, (n,), generator=generator, device=dev)
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=dev)
        keep = u < prob[labels, col]
        return torch.where(keep, col, alias[labels, col])

    def sample_images(self, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A uniform training image (dataset index) of each given class."""
        dev = generator.device
        _, _, counts, offsets, order = self._tables(dev)
        classes = classes.to(dev, torch.long)
        u = torch.rand(classes.numel(), generator=generator, dtype=torch.float64, device=dev)
        count = counts[classes]
        within = torch.minimum((u * count).long(), count - 1)  # u < 1; guards rounding
        return order[offsets[classes] + within]

    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Dataset indices of one partner per label (on the generator's device)."""
        return self.sample_images(self.sample_classes(labels, generator), generator)

    def sample_plain(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The same law by the plain path: `torch.multinomial` per row, then the image tables."""
        classes = sample_classes_multinomial(self.P, labels, generator)
        return self.sample_images(classes, generator)


def sample_classes_multinomial(P: torch.Tensor, labels: torch.Tensor,
                               generator: torch.Generator) -> torch.Tensor:
    """The plain path: one `torch.multinomial` over the rows P[labels] (reference for tests)."""
    dev = generator.device
    rows = P.detach().double().to(dev)[labels.to(dev, torch.long)]
    return torch.multinomial(rows, 1, generator=generator).squeeze(1)


# ---- mixers --------------------------------------------------------------------------------
def one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(y.long(), num_classes).float()


def _soft(y_i: torch.Tensor, y_j: torch.Tensor, lam_y: torch.Tensor, C: int,
          device: torch.device) -> torch.Tensor:
    """λ_y onehot(y_i) + (1 − λ_y) onehot(y_j), (B, C) float32 on `device`."""
    lam_y = to_device(lam_y.to(torch.float32), device).reshape(-1, 1)
    y_i, y_j = to_device(y_i, device), to_device(y_j, device)
    return lam_y * one_hot(y_i, C) + (1 - lam_y) * one_hot(y_j, C)


def _batch_lambda(lam: float, n: int) -> torch.Tensor:
    return torch.full((n,), float(lam), dtype=torch.float64)


class Mixer:
    """No mixing: the batch as it is, one-hot targets. Base of every mixer."""

    name = "none"
    needs_partners = False

    def __init__(self, *, class_counts: Any, train_labels: Any = None,
                 text_features: torch.Tensor | None = None, alpha: float = 1.0,
                 tau: float = 0.05, beta: float = 0.2, device: torch.device | str = "cpu",
                 **params: Any):
        unknown = sorted(set(params) - set(MIXER_PARAMS))
        if unknown:
            raise LfmError(f"mixing method {self.name!r} takes no parameter {unknown[0]!r}; "
                           f"accepted: {', '.join(sorted(MIXER_PARAMS))}")
        if not alpha >= 0:
            raise LfmError(f"alpha={alpha} is not valid; expected a number >= 0")
        if not tau > 0:
            raise LfmError(f"tau={tau} is not valid; expected a number > 0")
        if not beta > 0:
            raise LfmError(f"beta={beta} is not valid; expected a number > 0")
        self.counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
        self.num_classes = len(self.counts)
        self.alpha, self.tau, self.beta = float(alpha), float(tau), float(beta)
        self.text_features = text_features
        self.train_labels = train_labels
        self.device = torch.device(device)
        self.params = {**MIXER_PARAMS, **{k: float(v) for k, v in params.items()}}
        if not self.params["remix_kappa"] >= 1:
            raise LfmError(f"remix_kappa={self.params['remix_kappa']} is not valid; expected >= 1")
        if not 0 <= self.params["remix_tau"] <= 1:
            raise LfmError(f"remix_tau={self.params['remix_tau']} is not valid; expected 0..1")
        if not 0 <= self.params["concutmix_weight"] <= 1:
            raise LfmError(f"concutmix_weight={self.params['concutmix_weight']} is not valid; "
                           "expected 0..1")

    def partners(self, indices: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor | None:
        """Dataset indices of the partner images, or None when the method mixes nothing."""
        return None

    def mix(self, x_i: torch.Tensor, y_i: torch.Tensor, x_j: torch.Tensor | None,
            y_j: torch.Tensor | None, generator: torch.Generator,
            similarity_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed images, soft targets (B, C) float on the images' device)."""
        return x_i, one_hot(to_device(y_i, x_i.device), self.num_classes)


class BatchPartnerMixer(Mixer):
    """Partners from a permutation of the batch (Mixup, Remix, CutMix, ConCutMix)."""

    needs_partners = True

    def partners(self, indices: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        perm = torch.randperm(len(indices), generator=generator, device=generator.device)
        return indices[perm.to(indices.device)]


class Mixup(BatchPartnerMixer):
    """x = λ x_i + (1 − λ) x_j, y = λ y_i + (1 − λ) y_j, λ ~ Beta(β, β) once per batch."""

    name = "mixup"

    def mix(self, x_i, y_i, x_j, y_j, generator, similarity_fn=None):
        lam = sample_beta(self.beta, generator)
        x = lam * x_i + (1 - lam) * x_j
        return x, _soft(y_i, y_j, _batch_lambda(lam, len(y_i)), self.num_classes, x_i.device)


def remix_label(lam_x: float, n_i: torch.Tensor, n_j: torch.Tensor, kappa: float,
                tau_r: float) -> torch.Tensor:
    """Remix (Chou et al. 2020), the paper's rule: the label favours the minority class.

    λ_y = 0 if n_i/n_j ≥ κ and λ_x < τ_r; λ_y = 1 if n_i/n_j ≤ 1/κ and 1 − λ_x < τ_r;
    else λ_y = λ_x.
    """
    n_i, n_j = torch.as_tensor(n_i, dtype=torch.float64), torch.as_tensor(n_j, dtype=torch.float64)
    ratio = n_i / n_j
    lam = torch.full_like(ratio, float(lam_x))
    lam = torch.where((ratio >= kappa) & (lam_x < tau_r), torch.zeros_like(lam), lam)
    lam = torch.where((ratio <= 1.0 / kappa) & (1 - lam_x < tau_r), torch.ones_like(lam), lam)
    return lam


class Remix(BatchPartnerMixer):
    """Images mixed as Mixup; the label by `remix_label` (κ = remix_kappa, τ_r = remix_tau)."""

    name = "remix"

    def mix(self, x_i, y_i, x_j, y_j, generator, similarity_fn=None):
        lam = sample_beta(self.beta, generator)
        x = lam * x_i + (1 - lam) * x_j
        lam_y = remix_label(lam, self.counts[y_i.cpu()], self.counts[y_j.cpu()],
                            self.params["remix_kappa"], self.params["remix_tau"])
        return x, _soft(y_i, y_j, lam_y, self.num_classes, x_i.device)


def cut_box(lam: float, height: int, width: int,
            generator: torch.Generator) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): a box of side √(1 − λ) of the image's at a uniform centre, clipped."""
    ratio = math.sqrt(1.0 - lam)
    bh, bw = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(height, (), generator=generator, device=generator.device))
    cx = int(torch.randint(width, (), generator=generator, device=generator.device))
    y0, y1 = max(cy - bh // 2, 0), min(cy + bh // 2, height)
    x0, x1 = max(cx - bw // 2, 0), min(cx + bw // 2, width)
    return y0, y1, x0, x1


def _cutmix_images(x_i: torch.Tensor, x_j: torch.Tensor, generator: torch.Generator,
                   beta: float) -> tuple[torch.Tensor, float]:
    """x_i with one box (the same for the batch) pasted from x_j; λ = x_i's real area share."""
    lam = sample_beta(beta, generator)
    H, W = x_i.shape[-2:]
    y0, y1, x0, x1 = cut_box(lam, H, W, generator)
    x = x_i.clone()
    x[..., y0:y1, x0:x1] = x_j[..., y0:y1, x0:x1]
    area_lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W)  # the clipped box decides the label
    return x, area_lam


class CutMix(BatchPartnerMixer):
    """A box of area 1 − λ from the partner; the label is the real clipped area share."""

    name = "cutmix"

    def mix(self, x_i, y_i, x_j, y_j, generator, similarity_fn=None):
        x, area_lam = _cutmix_images(x_i, x_j, generator, self.beta)
        return x, _soft(y_i, y_j, _batch_lambda(area_lam, len(y_i)), self.num_classes, x_i.device)


class ConCutMix(BatchPartnerMixer):
    """CutMix whose area label is rectified toward the semantic similarity of the mixed image
    to the two classes' text features: λ_y = (1 − w)·λ_area + w·λ_sem, with λ_sem the softmax
    over (cos(x, f_T[y_i]), cos(x, f_T[y_j])) / CONCUTMIX_TEMPERATURE, w = concutmix_weight."""

    name = "concutmix"

    def mix(self, x_i, y_i, x_j, y_j, generator, similarity_fn=None):
        if similarity_fn is None:
            raise LfmError("concutmix needs the model's image-text similarity (similarity_fn: "
                           "images -> (B, C) cosines to the class text features)")
        x, area_lam = _cutmix_images(x_i, x_j, generator, self.beta)
        with torch.no_grad():  # a label, not a path for gradients
            sim = similarity_fn(x).float()
        yi, yj = to_device(y_i, sim.device).view(-1, 1), to_device(y_j, sim.device).view(-1, 1)
        pair = torch.cat([sim.gather(1, yi), sim.gather(1, yj)], dim=1)
        sem = torch.softmax(pair / CONCUTMIX_TEMPERATURE, dim=1)[:, 0]
        # Two images of one class: the label is that class whatever the weight.
        sem = torch.where(yi.squeeze(1) == yj.squeeze(1), torch.ones_like(sem), sem)
        w = self.params["concutmix_weight"]
        lam_y = (1 - w) * area_lam + w * sem.double().cpu()
        return x, _soft(y_i, y_j, lam_y, self.num_classes, x_i.device)


class LocalFeatureMixup(Mixer):
    """LFM: partners from semantically close classes, labels shifted toward the rarer class."""

    name = "lfm"
    needs_partners = True

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        if self.text_features is None or self.train_labels is None:
            raise LfmError("lfm needs the class text features and the training labels")
        if self.text_features.shape[0] != self.num_classes:
            raise LfmError(f"lfm got {self.text_features.shape[0]} text features for "
                           f"{self.num_classes} classes")
        # Once per stage: P on the run's device, then the alias and per-class index tables.
        self.P = local_sampling_matrix(self.text_features.detach().float().to(self.device),
                                       self.tau)
        self.sampler = PairSampler(self.P, self.train_labels, self.device)

    def partners(self, indices, labels, generator):
        return self.sampler.sample(labels, generator).to(indices.device)

    def mix(self, x_i, y_i, x_j, y_j, generator, similarity_fn=None):
        lam = sample_beta(self.beta, generator)
        x = lam * x_i + (1 - lam) * x_j
        lam_y = label_shift(lam, self.counts[y_i.cpu()], self.counts[y_j.cpu()], self.alpha)
        return x, _soft(y_i, y_j, lam_y, self.num_classes, x_i.device)


MIXERS: dict[str, Callable[..., Mixer]] = {
    "none": Mixer,
    "mixup": Mixup,
    "remix": Remix,
    "cutmix": CutMix,
    "lfm": LocalFeatureMixup,
    "concutmix": ConCutMix,
}


def build_mixer(name: str, *, class_counts: Any, train_labels: Any = None,
                text_features: torch.Tensor | None = None, alpha: float = 1.0,
                tau: float = 0.05, beta: float = 0.2, device: torch.device | str = "cpu",
                **params: Any) -> Mixer:
    """The mixer `name` (see MIXERS) for one stage; params: remix_kappa, remix_tau,
    concutmix_weight (every mixer accepts them; only its own are used)."""
    if name not in MIXERS:
        raise unknown_name("mixing method", name, list(MIXERS))
    return MIXERS[name](class_counts=class_counts, train_labels=train_labels,
                        text_features=text_features, alpha=alpha, tau=tau, beta=beta,
                        device=device, **params)
