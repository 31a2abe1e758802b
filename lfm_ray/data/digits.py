"""digits-lt: scikit-learn's bundled handwritten digits made long-tailed (no download)."""

from __future__ import annotations

import numpy as np

from lfm_ray.data.base import LongTailDataset
from lfm_ray.data.counts import long_tail_counts, long_tail_subset
from lfm_ray.errors import LfmError

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def build_digits_lt(root=None, imbalance_factor: float = 10.0, seed: int = 0,
                    test_per_class: int = 50) -> LongTailDataset:
    """Hold out `test_per_class` images per class, make the rest long-tailed.

    The 8×8 images (values 0..16) become uint8 0..255 with three equal channels.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=3)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx, rest_idx = [], []
    for k in range(10):
        idx = rng.permutation(np.flatnonzero(labels == k))
        if len(idx) <= test_per_class:
            raise LfmError(f"test_per_class={test_per_class} leaves class {k} no training images")
        test_idx.append(np.sort(idx[:test_per_class]))
        rest_idx.append(np.sort(idx[test_per_class:]))
    rest = np.concatenate(rest_idx)
    max_count = min(len(r) for r in rest_idx)
    counts = long_tail_counts(10, imbalance_factor, max_count)
    train = rest[long_tail_subset(labels[rest], counts, seed)]
    test = np.concatenate(test_idx)
    return LongTailDataset(
        name="digits-lt", class_names=list(DIGIT_NAMES),
        train_images=images[train], train_labels=labels[train],
        test_images=images[test], test_labels=labels[test],
    )
