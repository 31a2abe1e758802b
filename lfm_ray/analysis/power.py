"""How small a difference a study's seeds could have detected, and how many seeds a claim needs.

When a report finds no configuration better than the others, "no difference" is not what
it found: it found no difference *larger than these seeds can see*. This module puts a
number on that, with the same test the report decides with.

Method (named in every sentence it writes): the power of a two-sided t-test at level
1 − confidence (95 % by default) on the paired differences of two configurations over the
seeds both ran. With n seeds and the observed standard deviation s of the paired
differences, the test statistic is noncentral t with n − 1 degrees of freedom and
noncentrality δ√n / s, so its power is

    power(δ) = P(T'_{n−1, δ√n/s} > t_{1−a/2, n−1}) + P(T'_{n−1, δ√n/s} < −t_{1−a/2, n−1}).

The minimum detectable difference (MDD) is the δ with power(δ) = 80 %, solved exactly on
the noncentral t (the textbook shortcut (t_{1−a/2, n−1} + t_{power, n−1}) · s / √n gives
71-77 % power at 2-3 seeds, too few to trust). Seeds needed for a difference δ: the
smallest n ≥ 2 whose MDD at the same s is at most δ. Where the configurations share fewer
than two seeds, the two-sample version (pooled s, 2n − 2 degrees of freedom, noncentrality
δ / (s √(2/n)), n seeds per configuration) is used and named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import optimize, stats

MAX_SEEDS = 10_000  # beyond this, "more than 10,000 seeds": a different question


@dataclass(frozen=True)
class Design:
    """What the test sees: `paired` differences (one sample of n) or two samples of n."""

    paired: bool = True
    confidence: float = 0.95
    power: float = 0.80

    @property
    def name(self) -> str:
        kind = ("paired t-test over the seeds both configurations ran" if self.paired
                else "two-sample t-test with pooled spread")
        return (f"{kind}, {self.confidence:.0%} two-sided, {self.power:.0%} power, "
                "noncentral t").replace("%", " %")


def _two_sided(crit: float, df: int, nc: float) -> float:
    """P(|T'| > crit) for T' noncentral t; scipy's lower tail can come back NaN far out,
    where it is 0."""
    upper = float(stats.nct.sf(crit, df, nc))
    lower = float(stats.nct.cdf(-crit, df, nc))
    return upper + (lower if math.isfinite(lower) else 0.0)


def _df_and_scale(n: int, paired: bool) -> tuple[int, float]:
    """Degrees of freedom and the standard error of the difference per unit of s."""
    if paired:
        return n - 1, 1.0 / math.sqrt(n)
    return 2 * n - 2, math.sqrt(2.0 / n)


def t_test_power(delta: float, sd: float, n: int, design: Design = Design()) -> float:
    """Power of the two-sided t-test to detect a true difference `delta` with `n` seeds
    (per configuration) and standard deviation `sd` (of the paired differences, or pooled)."""
    if n < 2:
        raise ValueError(f"power needs at least 2 seeds, got {n}")
    df, scale = _df_and_scale(n, design.paired)
    crit = stats.t.ppf((1 + design.confidence) / 2, df)
    if sd <= 0:
        return 1.0 if delta != 0 else 1 - design.confidence
    return _two_sided(crit, df, abs(delta) / (sd * scale))


def detectable_difference(sd: float, n: int, design: Design = Design()) -> float:
    """The smallest true difference the test detects with `design.power` at `n` seeds and
    spread `sd` (same unit as `sd`); NaN with fewer than two seeds or no spread measured."""
    if n < 2 or not math.isfinite(sd):
        return float("nan")
    if sd == 0:
        return 0.0
    df, scale = _df_and_scale(n, design.paired)
    crit = stats.t.ppf((1 + design.confidence) / 2, df)

    def short(nc: float) -> float:
        return _two_sided(crit, df, nc) - design.power

    hi = crit + stats.norm.ppf(design.power) + 1.0
    while short(hi) < 0:
        hi *= 2
    nc = optimize.brentq(short, 0.0, hi, xtol=1e-10)
    return float(nc * sd * scale)


def seeds_needed(delta: float, sd: float, design: Design = Design(),
                 max_seeds: int = MAX_SEEDS) -> int | None:
    """The smallest n ≥ 2 at which a true difference `delta` is detected with
    `design.power`, given spread `sd`; None when more than `max_seeds` would be needed
    (or `delta` is 0)."""
    if not math.isfinite(sd) or not math.isfinite(delta):
        return None
    if sd == 0:
        return 2
    if delta == 0:
        return None

    def enough(n: int) -> bool:
        return detectable_difference(sd, n, design) <= abs(delta)

    if not enough(max_seeds):
        return None
    lo, hi = 1, 2  # enough() is monotone in n: double, then bisect
    while not enough(hi):
        lo, hi = hi, min(2 * hi, max_seeds)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if enough(mid):
            hi = mid
        else:
            lo = mid
    return max(hi, 2)


def power_sentence(sd: float, n: int, paired: bool, diff: float, unit: float = 100.0,
                   target: float = 1.0) -> str:
    """The sentence a "no configuration is better" verdict carries: the smallest difference
    these seeds could have detected, and about how many seeds the observed difference and a
    `target`-point difference would need (values in fractions, shown × `unit` as points)."""
    design = Design(paired=paired)
    mdd = detectable_difference(sd, n, design)
    if not math.isfinite(mdd):
        return "with fewer than two seeds there is no spread to say what difference they could detect"
    what = "paired differences" if paired else "values (pooled)"
    out = (f"these {n} seeds could have detected a difference of {mdd * unit:.2f} points "
           f"(minimum detectable difference: {design.name}, observed std of the {what} "
           f"{sd * unit:.2f} points)")
    asks = []
    for delta, label in ((abs(diff), "the observed difference"), (target / unit, None)):
        if not math.isfinite(delta) or delta == 0:
            continue
        need = seeds_needed(delta, sd, design)
        seeds = f"more than {MAX_SEEDS:,} seeds" if need is None else f"about {need} seeds"
        asks.append(f"{label or 'a difference'} of {delta * unit:.2f} points would need "
                    f"{seeds}{'' if paired else ' per configuration'}")
    return out + ("; " + ", ".join(asks) if asks else "")


def detectable_text(sep, unit: float = 100.0) -> str:
    """power_sentence for a `lfm_ray.analysis.load.Separation` that separated nothing: its
    best against the runner-up, with the spread observed between them; "" where no test ran."""
    if sep.test not in ("paired", "unpaired") or sep.n < 2:
        return ""
    text = power_sentence(sep.sd, sep.n, sep.test == "paired", sep.diff, unit=unit)
    if sep.test == "unpaired":
        text += (" (a lower bound: the rule used without shared seeds, non-overlapping "
                 "intervals of the means, is stricter than this test)")
    return text
