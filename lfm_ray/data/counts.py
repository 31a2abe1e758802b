"""Long-tailed class counts and shot groups (design.md §1)."""

from __future__ import annotations

import numpy as np

from lfm_ray.errors import LfmError

MANY_ABOVE = 100   # many-shot: n > 100
FEW_BELOW = 20     # few-shot: n < 20; medium: 20 <= n <= 100


def long_tail_counts(num_classes: int, imbalance_factor: float, max_count: int) -> list[int]:
    """n_k = int(max_count · (1/γ)^(k/(C−1))), truncated toward zero (the CIFAR-LT rule)."""
    if num_classes < 1:
        raise LfmError(f"num_classes={num_classes} is not valid; expected >= 1")
    if imbalance_factor < 1:
        raise LfmError(f"imbalance_factor={imbalance_factor} is not valid; expected a number >= 1")
    if num_classes == 1:
        return [int(max_count)]
    return [int(max_count * (1.0 / imbalance_factor) ** (k / (num_classes - 1)))
            for k in range(num_classes)]


def shot_groups(class_counts) -> dict[str, np.ndarray]:
    """Class indices per group: many (n > 100), medium (20 <= n <= 100), few (n < 20)."""
    counts = np.asarray(class_counts)
    return {
        "many": np.flatnonzero(counts > MANY_ABOVE),
        "medium": np.flatnonzero((counts >= FEW_BELOW) & (counts <= MANY_ABOVE)),
        "few": np.flatnonzero(counts < FEW_BELOW),
    }


def long_tail_subset(labels: np.ndarray, counts: list[int], seed: int) -> np.ndarray:
    """Indices keeping counts[k] images of class k, drawn without replacement for `seed`."""
    rng = np.random.default_rng(seed)
    keep = []
    for k, n in enumerate(counts):
        idx = np.flatnonzero(labels == k)
        if n > len(idx):
            raise LfmError(f"class {k} has {len(idx)} images, fewer than the {n} asked for")
        keep.append(np.sort(rng.choice(idx, size=n, replace=False)))
    return np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)
