"""A configuration's figures over its seeds, shared by the study's tables (best.json) and
the reports: the t-interval of a mean, and which configurations no other dominates."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided Student-t interval of the mean; NaN bounds below two
    values."""
    import numpy as np
    from scipy import stats

    v = np.asarray(values, dtype=float)
    n = len(v)
    mean = float(v.mean()) if n else float("nan")
    if n < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half


def dominates(a: Sequence[float], b: Sequence[float], sign: float) -> bool:
    """Whether `a` is at least as good as `b` in every objective and better in one
    (`sign` 1: higher is better, -1: lower is better)."""
    return all(sign * x >= sign * y for x, y in zip(a, b)) and \
        any(sign * x > sign * y for x, y in zip(a, b))


def non_dominated(points: Mapping[Any, Sequence[float]], sign: float) -> list[Any]:
    """The keys of `points` (key -> its objectives' values) that no other point dominates,
    in their given order."""
    return [k for k, p in points.items()
            if not any(dominates(q, p, sign) for j, q in points.items() if j != k)]
