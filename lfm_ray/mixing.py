"""Pair sampling and label rules of every mixing method, behind one interface.

A mixer is built once per stage (α, τ and β may differ per stage; β None is the method's own
law, config.MIX_BETA). Before each epoch the trainer calls `set_epoch(epoch_in_stage,
stage_epochs)`; per batch it asks `partners(indices, labels, generator)` for the partner
images' dataset indices, gathers them, and calls `mix(x_i, y_i, x_j, y_j, generator,
similarity_fn=...)`, which returns the mixed images and soft targets (B, C); a mixer with
`needs_similarity` gets the model's image-text cosines through `similarity_fn`. Losses only
consume soft targets, so the trainer never knows which mixing method runs.

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

import dataclasses
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lfm_ray.config import MIX_BETA, MixConfig
from lfm_ray.errors import LfmError, unknown_name
from lfm_ray.transfer import to_device

# Parameters a mixer accepts besides the common ones, with the run configuration's defaults
# (config.py holds them); every mixer accepts all of them so the trainer can pass the run's
# mixing section unchanged whatever the method. ConCutMix's ω, k and warm-up default to None
# there: they are per data set (CONCUTMIX_SETTINGS), which `RunConfig.mixer_params` fills in.
# `mix.similarity` is not a mixer parameter: the trainer resolves it into the matrix S it
# passes as `class_similarity` (lfm_ray/similarity.py).
MIXER_PARAMS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(MixConfig)
    if f.name not in ("method", "similarity")
}


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
    P = class_sampling_matrix(f @ f.t(), tau)
    return P.to(text_features.dtype if text_features.is_floating_point() else torch.float32)


def class_sampling_matrix(similarity: torch.Tensor, tau: float) -> torch.Tensor:
    """P (C, C) float64 from any class similarity S: row i is softmax_j(S[i, j] / τ) over
    j ≠ i, P[i, i] = 0 (paper Eq. 1, whose S is the text features' cosines; `mix.similarity`
    gives others). As `local_sampling_matrix`, in float64 with the diagonal masked."""
    if not tau > 0:
        raise LfmError(f"tau={tau} is not valid; expected a number > 0")
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1] \
            or similarity.shape[0] < 2:
        raise LfmError("local sampling needs a class similarity of shape (C, C) with C >= 2 "
                       f"classes; got shape {tuple(similarity.shape)}")
    sim = similarity.detach().double() / tau
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    return torch.softmax(sim.masked_fill(eye, float("-inf")), dim=1)


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
# Rows of a sampling matrix turned into alias tables at once: bounds the working set (about
# nine (rows, K) tensors of 8 bytes; at iNaturalist's 8,142 classes a whole matrix is 530 MB
# per float64 copy). 256 rows (150 MB there) built fastest here: 5.8 s for all 8,142 rows
# against 12.9 s in chunks of 2,048, whose working set spills out of the caches.
ALIAS_CHUNK_ROWS = 256


def alias_index_dtype(K: int) -> torch.dtype:
    """The smallest integer type holding K column indices (int16 up to 32,767 classes)."""
    return torch.int16 if K <= torch.iinfo(torch.int16).max else torch.int32


def alias_tables(P: torch.Tensor, column_mask: torch.Tensor | None = None,
                 chunk_rows: int = ALIAS_CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Walker/Vose alias tables of every row of P: (prob (R, K) float64, alias (R, K) of
    `alias_index_dtype(K)`).

    A draw from row r picks a column k uniformly, keeps k with probability prob[r, k], else
    takes alias[r, k]. `column_mask` (K,) bool zeroes the columns it excludes before each row
    is normalised. Built by Vose's sweep in prefix sums over every row of a chunk at once
    (_alias_rows), `chunk_rows` rows at a time (the same tables as all at once: rows are
    independent), on P's device, in float64. Columns the sweep leaves over carry mass 1 up
    to rounding and keep themselves; a zero-probability column is never kept and never an
    alias, so it is never drawn.
    """
    if P.dim() != 2 or P.shape[1] == 0:
        raise LfmError(f"alias tables need a (rows, K) matrix; got shape {tuple(P.shape)}")
    R, K = P.shape
    prob = torch.empty(R, K, dtype=torch.float64, device=P.device)
    alias = torch.empty(R, K, dtype=alias_index_dtype(K), device=P.device)
    for start in range(0, R, max(1, chunk_rows)):
        rows = P[start:start + chunk_rows].detach().double()
        if column_mask is not None:
            rows = rows * column_mask.to(rows.device, torch.float64)
        p, a = _alias_rows(rows)
        prob[start:start + chunk_rows] = p
        alias[start:start + chunk_rows] = a.to(alias.dtype)
    return prob, alias


def _alias_rows(Pd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Alias tables of the float64 rows Pd (R, K): (prob float64, alias long), by the sweep of
    Vose's method written with prefix sums, so every row is built at once in O(K log K)
    tensor work instead of K dependent steps.

    Scale each row to mean 1 (s = K·p). Columns with s < 1 are light and lack d = 1 − s;
    the others are heavy with surplus e = s − 1. The sweep walks both kinds in column order:
    the current heavy fills the next light's lack while its own weight stays above 1; once it
    falls to w ≤ 1 it keeps w and the next heavy fills its lack. With D the lack of the lights
    before a column and E the surplus of the heavies up to it (both prefix sums), the current
    heavy's weight is 1 + E − D, so:
    - light c is filled by the first heavy j with E_j > D_c: prob s_c, alias j;
    - heavy j keeps 1 + E_j − D*, where D* is the first D of a light not filled by heavies up
      to j (the first D ≥ E_j), and takes the next heavy as its alias.
    Columns the sweep never reaches (its end, only through rounding) keep prob 1 and alias
    self, as Vose's leftovers."""
    if bool((Pd < 0).any()) or not bool(torch.isfinite(Pd).all()):
        raise LfmError("sampling probabilities must be finite and >= 0")
    total = Pd.sum(dim=1, keepdim=True)
    if bool((total <= 0).any()):
        raise LfmError("every row of the sampling matrix needs a positive entry")
    R, K = Pd.shape
    device = Pd.device
    s = Pd / total * K                                   # scaled: mean 1 per row
    light = s < 1.0
    zero_f = torch.zeros((), dtype=torch.float64, device=device)
    surplus = torch.cumsum(torch.where(light, zero_f, s - 1.0), dim=1)      # E, inclusive
    lack = torch.zeros(R, K + 1, dtype=torch.float64, device=device)        # D, exclusive,
    torch.cumsum(torch.where(light, 1.0 - s, zero_f), dim=1, out=lack[:, 1:])  # total at K
    columns = torch.arange(K, device=device)
    prob = torch.ones(R, K, dtype=torch.float64, device=device)
    alias = columns.repeat(R, 1)
    # Lights: the first heavy whose running surplus passes the lack before them.
    filler = torch.searchsorted(surplus, lack[:, :K].contiguous(), right=True)
    lit = light & (filler < K)
    prob = torch.where(lit, s, prob)
    alias = torch.where(lit, filler.clamp(max=K - 1), alias)
    del filler
    # Heavies: the next heavy column after each column (K where none follows).
    heavy_at = torch.where(light, K, columns)
    next_heavy = torch.full((R, K), K, dtype=torch.long, device=device)
    next_heavy[:, :-1] = torch.flip(torch.cummin(torch.flip(heavy_at, [1]), dim=1).values,
                                    [1])[:, 1:]
    del heavy_at
    first = torch.searchsorted(lack, surplus, right=False)   # first D >= E_j, K + 1 if none
    reached = lack.gather(1, first.clamp(max=K))
    done = ~light & (first <= K) & (next_heavy < K)
    prob = torch.where(done, 1.0 + surplus - reached, prob)
    alias = torch.where(done, next_heavy, alias)
    prob.clamp_(0.0, 1.0)  # a heavy's 1 + E − D* leaves [0, 1] only by rounding
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
    return out.scatter_add(1, alias.long(), (1.0 - prob.double()) / K)


class ClassImages:
    """Uniform draws of a training image of given classes, vectorised.

    Per-class index tables (dataset indices sorted by class, offsets, counts) make the draw
    one gather: idx = order[offset[c] + floor(u · count[c])]. The tables are built on
    `device` and copied once to any other device a generator lives on.
    """

    def __init__(self, train_labels: Any, num_classes: int, device: torch.device | str = "cpu"):
        device = torch.device(device)
        labels = torch.as_tensor(train_labels, dtype=torch.long).to(device)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise LfmError(f"training labels must lie in 0..{num_classes - 1} for "
                           f"{num_classes} classes")
        self.num_classes = num_classes
        self.counts = torch.bincount(labels, minlength=num_classes)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.order = torch.argsort(labels, stable=True)
        self._device = device
        self._copies: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(counts, offsets, order) on `device`."""
        if device == self._device:
            return self.counts, self.offsets, self.order
        if device not in self._copies:
            self._copies[device] = tuple(t.to(device) for t in (
                self.counts, self.offsets, self.order))
        return self._copies[device]

    def sample(self, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A uniform training image (dataset index) of each given class, on the generator's
        device. Every class asked for must have an image."""
        dev = generator.device
        counts, offsets, order = self.tables(dev)
        classes = classes.to(dev, torch.long)
        u = torch.rand(classes.numel(), generator=generator, dtype=torch.float64, device=dev)
        count = counts[classes]
        within = torch.minimum((u * count).long(), count - 1)  # u < 1; guards rounding
        return order[offsets[classes] + within]


class PairSampler:
    """LFM's partner draw: class j via row y_i of P (alias method), then a uniform image of j.

    Everything is vectorised over the batch; the draws run on the generator's device (tables
    are copied there once). Classes without training images get probability 0 in every row
    (renormalised), since no partner image of theirs exists.
    """

    def __init__(self, P: torch.Tensor, train_labels: Any, device: torch.device | str = "cpu"):
        device = torch.device(device)
        C = P.shape[0]
        if P.dim() != 2 or P.shape[1] != C:
            raise LfmError(f"the sampling matrix must be square; got shape {tuple(P.shape)}")
        self.num_classes = C
        self.images = ClassImages(train_labels, C, device)
        self.counts = self.images.counts
        self._source = P.detach().to(device)
        self._available = self.counts > 0
        mass = self._source @ self._available.to(self._source.dtype)
        stranded = ((mass <= 0) & self._available).nonzero().squeeze(1)
        if stranded.numel():
            raise LfmError(f"class {int(stranded[0])} has no partner class with training images "
                           "and a positive sampling probability; raise tau")
        # Rows of classes without images are never asked for; give them a harmless uniform row.
        self._dead = mass <= 0
        self.prob, self.alias = alias_tables(self._source, column_mask=self._available)
        if bool(self._dead.any()):
            self.prob[self._dead] = 1.0
            self.alias[self._dead] = torch.arange(C, device=device).to(self.alias.dtype)
        self._device = device
        self._copies: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @property
    def P(self) -> torch.Tensor:
        """The law the sampler draws from (float64): the rows of P over the classes with
        training images, renormalised. Built on demand (the plain path of tests and the
        benchmark); the sampler itself keeps only its alias tables."""
        Pd = self._source.double() * self._available.double()
        Pd[self._dead] = 1.0 / self.num_classes
        return Pd / Pd.sum(dim=1, keepdim=True)

    def table_bytes(self) -> int:
        """Memory of the sampler's own tables (alias tables and per-class image index)."""
        tensors = (self.prob, self.alias, self.images.counts, self.images.offsets,
                   self.images.order)
        return sum(t.element_size() * t.nelement() for t in tensors)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device == self._device:
            return self.prob, self.alias
        if device not in self._copies:
            self._copies[device] = (self.prob.to(device), self.alias.to(device))
        return self._copies[device]

    def sample_classes(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One partner class per label, from row `label` of P: O(1) per draw."""
        dev = generator.device
        prob, alias = self._tables(dev)
        labels = labels.to(dev, torch.long)
        n = labels.numel()
        col = torch.randint(self.num_classes, (n,), generator=generator, device=dev)
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=dev)
        keep = u < prob[labels, col]
        return torch.where(keep, col, alias[labels, col])

    def sample_images(self, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A uniform training image (dataset index) of each given class."""
        return self.images.sample(classes, generator)

    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Dataset indices of one partner per label (on the generator's device)."""
        return self.sample_images(self.sample_classes(labels, generator), generator)

    def sample_plain(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The same law by the plain path: `torch.multinomial` per row, then the image tables."""
        classes = sample_classes_multinomial(self.P, labels, generator)
        return self.sample_images(classes, generator)


class BalancedSampler:
    """ConCutMix's foreground draw: a uniform class among the classes with training images,
    then a uniform image of it (vectorised, on the generator's device)."""

    def __init__(self, train_labels: Any, num_classes: int, device: torch.device | str = "cpu"):
        self.images = ClassImages(train_labels, num_classes, device)
        self.classes = (self.images.counts > 0).nonzero().squeeze(1)
        if self.classes.numel() == 0:
            raise LfmError("the class-balanced sampler needs training images")
        self._classes: dict[torch.device, torch.Tensor] = {}

    def sample_classes(self, n: int, generator: torch.Generator) -> torch.Tensor:
        dev = generator.device
        if dev not in self._classes:
            self._classes[dev] = self.classes.to(dev)
        classes = self._classes[dev]
        pick = torch.randint(classes.numel(), (n,), generator=generator, device=dev)
        return classes[pick]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Dataset indices of n images drawn independently."""
        return self.images.sample(self.sample_classes(n, generator), generator)


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
    """No mixing: the batch as it is, one-hot targets. Base of every mixer.

    `beta` None takes the method's own law of λ (config.MIX_BETA); the resolved value is
    `self.beta` (None for a method that draws no λ), and `settings()` lists it with the
    method's other resolved parameters. The trainer tells a mixer where it is in the stage
    with `set_epoch` before each epoch; only ConCutMix's warm-up uses it.
    """

    name = "none"
    needs_partners = False
    needs_similarity = False  # whether `mix` wants the model's image-text cosines
    own_params: tuple[str, ...] = ()  # the entries of MIXER_PARAMS this method uses

    def __init__(self, *, class_counts: Any, train_labels: Any = None,
                 text_features: torch.Tensor | None = None, alpha: float = 1.0,
                 tau: float = 0.05, beta: float | None = None,
                 device: torch.device | str = "cpu",
                 class_similarity: torch.Tensor | None = None, **params: Any):
        unknown = sorted(set(params) - set(MIXER_PARAMS))
        if unknown:
            raise LfmError(f"mixing method {self.name!r} takes no parameter {unknown[0]!r}; "
                           f"accepted: {', '.join(sorted(MIXER_PARAMS))}")
        if not alpha >= 0:
            raise LfmError(f"alpha={alpha} is not valid; expected a number >= 0")
        if not tau > 0:
            raise LfmError(f"tau={tau} is not valid; expected a number > 0")
        if beta is None:
            beta = MIX_BETA[self.name]
        elif not beta > 0:
            raise LfmError(f"beta={beta} is not valid; expected a number > 0, or None for "
                           f"the method's own law")
        self.counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
        self.num_classes = len(self.counts)
        self.alpha, self.tau = float(alpha), float(tau)
        self.beta = None if beta is None else float(beta)
        self.text_features = text_features
        # LFM's S where it is not the text features' cosines (lfm_ray/similarity.py).
        self.class_similarity = class_similarity
        self.train_labels = train_labels
        self.device = torch.device(device)
        self.params = _checked_params({**MIXER_PARAMS, **params})
        self.epoch_in_stage: int | None = None
        self.stage_epochs: int | None = None

    def set_epoch(self, epoch_in_stage: int, stage_epochs: int) -> None:
        """Where the stage is: epoch `epoch_in_stage` (0-based) of `stage_epochs`."""
        self.epoch_in_stage, self.stage_epochs = int(epoch_in_stage), int(stage_epochs)

    def settings(self) -> dict[str, Any]:
        """The method's resolved settings (β after the method's default), for a record."""
        return {"method": self.name, "beta": self.beta,
                **{k: self.params[k] for k in self.own_params}}

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


def _checked_params(params: dict[str, Any]) -> dict[str, Any]:
    """MIXER_PARAMS values as numbers, range-checked; ConCutMix's may be None here (its
    mixer refuses None)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if value is None:
            out[key] = None
            continue
        if key == "concutmix_topk":
            if isinstance(value, bool) or float(value) != int(float(value)) or int(value) < 1:
                raise LfmError(f"concutmix_topk={value!r} is not valid; expected an integer >= 1")
            out[key] = int(value)
        else:
            out[key] = float(value)
    accepted = {
        "remix_kappa": (lambda v: v >= 1, "a number >= 1"),
        "remix_tau": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        "concutmix_omega": (lambda v: v >= 0, "a number >= 0"),
        "concutmix_prob": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        "concutmix_warmup": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    }
    for key, (ok, what) in accepted.items():
        if out.get(key) is not None and not ok(out[key]):
            raise LfmError(f"{key}={out[key]} is not valid; expected {what}")
    return out


class BatchPartnerMixer(Mixer):
    """Partners from a permutation of the batch (Mixup, Remix, CutMix)."""

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
    own_params = ("remix_kappa", "remix_tau")

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


def concutmix_semantic_label(cosines: torch.Tensor, k: int) -> torch.Tensor:
    """ConCutMix's ŷ_sem (B, C), float64: per row, the inverse Euclidean distances from the
    (unit) image feature to the k nearest (unit) class centres, L1-normalised; 0 elsewhere.

    ‖f − c‖² = 2 − 2 cos(f, c) for unit vectors, so the distances follow from the cosines.
    As ConCutMix's code, every centre at least as near as the k-th nearest is kept (ties at
    the k-th distance keep all of them). A feature on a centre (distance 0) gets that class
    alone: d² is kept >= 1e-12, so its inverse distance (1e6) takes all but ~1e-6 of the mass.
    """
    d2 = (2.0 - 2.0 * cosines.double()).clamp(min=1e-12)
    inverse = d2.rsqrt()
    kth = inverse.topk(k, dim=1).values[:, -1:]
    inverse = torch.where(inverse >= kth, inverse, torch.zeros_like(inverse))
    return inverse / inverse.sum(dim=1, keepdim=True)


def concutmix_rho(lam: float, n_a: torch.Tensor, n_b: torch.Tensor, omega: float,
                  sum_log_counts: float) -> torch.Tensor:
    """ρ = ω · log(λ N_a + (1 − λ) N_b) / Σ_k log N_k (float64), as ConCutMix computes it
    (no clamp; `ConCutMix` refuses an ω that could push ρ above 1)."""
    n_a, n_b = n_a.double(), n_b.double()
    return omega * torch.log(lam * n_a + (1.0 - lam) * n_b) / sum_log_counts


class ConCutMix(Mixer):
    """ConCutMix (PanHaulin/ConCutMix): CutMix whose area label is rectified toward the
    semantic label of the mixed image, target = ρ·ŷ_sem + (1 − ρ)·ỹ_area.

    - A batch is cut-mixed with probability `concutmix_prob`; otherwise the images pass as
      they are with one-hot targets (as ConCutMix's training loop does).
    - The box is pasted from a foreground image drawn class-balanced (`BalancedSampler`);
      λ ~ Beta(β, β) (Beta(1, 1) by default), one λ and one box per batch, and ỹ_area is
      λ·onehot(y_i) + (1 − λ)·onehot(y_j) with λ the area x_i keeps after clipping.
    - ŷ_sem: `concutmix_semantic_label` of the mixed images' cosines to the class text
      features (the model's `similarity_fn`), k = `concutmix_topk`; ρ: `concutmix_rho`,
      ω = `concutmix_omega`, N the training counts.
    - Warm-up: while epoch_in_stage < concutmix_warmup · stage_epochs (from `set_epoch`) the
      target is ỹ_area alone and no similarity is computed.
    """

    name = "concutmix"
    needs_partners = True
    needs_similarity = True
    own_params = ("concutmix_omega", "concutmix_topk", "concutmix_prob", "concutmix_warmup")

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        missing = [k for k in self.own_params if self.params[k] is None]
        if missing:
            raise LfmError(f"concutmix needs {missing[0]} (the run configuration takes it from "
                           "the data set's row of lfm_ray.config.CONCUTMIX_SETTINGS)")
        if self.train_labels is None:
            raise LfmError("concutmix needs the training labels (for its foreground sampler)")
        self.omega = self.params["concutmix_omega"]
        self.topk = self.params["concutmix_topk"]
        if self.topk > self.num_classes:
            raise LfmError(f"concutmix_topk={self.topk} is not valid for {self.num_classes} "
                           f"classes; expected an integer in 1..{self.num_classes}")
        # A class without training images has log N = −inf; it adds nothing here (log 1).
        log_counts = self.counts.clamp(min=1).log()
        self.sum_log_counts = float(log_counts.sum())
        if not self.sum_log_counts > 0:
            raise LfmError("concutmix needs a class with more than one training image "
                           "(Σ_k log N_k is 0)")
        rho_max = self.omega * float(log_counts.max()) / self.sum_log_counts
        if rho_max > 1:
            raise LfmError(
                f"concutmix_omega={self.omega} gives ρ up to {rho_max:.3g} > 1 on these class "
                f"counts (targets would turn negative); expected ω <= "
                f"{self.sum_log_counts / float(log_counts.max()):.6g}")
        self.sampler = BalancedSampler(self.train_labels, self.num_classes, self.device)

    def set_epoch(self, epoch_in_stage: int, stage_epochs: int) -> None:
        if epoch_in_stage < 0 or stage_epochs < 1:
            raise LfmError(f"set_epoch({epoch_in_stage}, {stage_epochs}) is not valid; expected "
                           "epoch_in_stage >= 0 and stage_epochs >= 1")
        super().set_epoch(epoch_in_stage, stage_epochs)

    @property
    def in_warmup(self) -> bool:
        """Whether the current epoch uses the area label alone."""
        warmup = self.params["concutmix_warmup"]
        if warmup == 0:
            return False
        if self.epoch_in_stage is None:
            raise LfmError(f"concutmix has a warm-up (concutmix_warmup={warmup}): call "
                           "set_epoch(epoch_in_stage, stage_epochs) before mixing")
        return self.epoch_in_stage < warmup * self.stage_epochs

    def partners(self, indices, labels, generator):
        return self.sampler.sample(len(indices), generator).to(indices.device)

    def mix(self, x_i, y_i, x_j, y_j, generator, similarity_fn=None):
        if x_j is None or y_j is None:
            raise LfmError("concutmix needs the foreground images and labels (from partners)")
        warmup = self.in_warmup  # checked on every batch, cut or not
        cut = float(torch.rand((), generator=generator, dtype=torch.float64,
                               device=generator.device)) < self.params["concutmix_prob"]
        if not cut:
            return x_i, one_hot(to_device(y_i, x_i.device), self.num_classes)
        x, area_lam = _cutmix_images(x_i, x_j, generator, self.beta)
        if warmup:
            return x, _soft(y_i, y_j, _batch_lambda(area_lam, len(y_i)), self.num_classes,
                            x_i.device)
        if similarity_fn is None:
            raise LfmError("concutmix after its warm-up needs the model's image-text similarity "
                           "(similarity_fn: images -> (B, C) cosines to the class text features)")
        with torch.no_grad():  # a label, not a path for gradients
            cos = similarity_fn(x).double()
        if cos.shape != (len(y_i), self.num_classes):
            raise LfmError(f"similarity_fn returned shape {tuple(cos.shape)}; expected "
                           f"({len(y_i)}, {self.num_classes})")
        dev = cos.device
        yi, yj = to_device(y_i, dev).long(), to_device(y_j, dev).long()
        area = (area_lam * F.one_hot(yi, self.num_classes).double()
                + (1.0 - area_lam) * F.one_hot(yj, self.num_classes).double())
        counts = self.counts.to(dev)
        rho = concutmix_rho(area_lam, counts[yi], counts[yj], self.omega,
                            self.sum_log_counts).unsqueeze(1)
        target = rho * concutmix_semantic_label(cos, self.topk) + (1.0 - rho) * area
        return x, to_device(target.float(), x_i.device)


class LocalFeatureMixup(Mixer):
    """LFM: partners from semantically close classes, labels shifted toward the rarer class."""

    name = "lfm"
    needs_partners = True

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "alpha": self.alpha, "tau": self.tau}

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        if self.train_labels is None:
            raise LfmError("lfm needs the training labels")
        if self.class_similarity is not None:
            # Once per stage: P = softmax(S/τ) of the given class similarity, on the device.
            S = self.class_similarity
            if tuple(S.shape) != (self.num_classes, self.num_classes):
                raise LfmError(f"lfm got a class similarity of shape {tuple(S.shape)} for "
                               f"{self.num_classes} classes")
            self.P = class_sampling_matrix(S.to(self.device), self.tau)
        else:
            if self.text_features is None:
                raise LfmError("lfm needs the class text features or a class similarity")
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
                tau: float = 0.05, beta: float | None = None,
                device: torch.device | str = "cpu",
                class_similarity: torch.Tensor | None = None, **params: Any) -> Mixer:
    """The mixer `name` (see MIXERS) for one stage. `beta` None: the method's own law of λ
    (config.MIX_BETA), which the mixer's `beta` then holds. `class_similarity`: LFM's S
    (C, C) where it is not the text features' cosines (then P = softmax(S/τ) of it).
    params: remix_kappa, remix_tau, concutmix_omega, concutmix_topk, concutmix_prob,
    concutmix_warmup (every mixer accepts them; only its own are used)."""
    if name not in MIXERS:
        raise unknown_name("mixing method", name, list(MIXERS))
    return MIXERS[name](class_counts=class_counts, train_labels=train_labels,
                        text_features=text_features, alpha=alpha, tau=tau, beta=beta,
                        device=device, class_similarity=class_similarity, **params)
