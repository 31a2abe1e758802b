"""The baseline the fashion-lt recipe must beat: a linear classifier on raw pixels.

    python scripts/linear_baseline.py [DATA_SEED ...]

scikit-learn's LogisticRegression (L2, C = 1) on the 784 raw pixels / 255 of fashion-lt's
long-tailed training split (its defaults), evaluated on its val and test splits; per shot
group the mean of the group's per-class accuracies (the splits are balanced).
"""

from __future__ import annotations

import sys
import time

import numpy as np
from sklearn.linear_model import LogisticRegression

from lfm_ray.data import build_dataset, shot_groups


def main(argv: list[str]) -> int:
    for seed in [int(s) for s in argv] or [0]:
        ds = build_dataset("fashion-lt", seed=seed)
        flat = lambda images: images[..., 0].reshape(len(images), -1) / 255.0  # noqa: E731
        start = time.perf_counter()
        clf = LogisticRegression(max_iter=3000).fit(flat(ds.train_images), ds.train_labels)
        groups = shot_groups(ds.class_counts)
        line = [f"data seed {seed}:"]
        for split in ("val", "test"):
            images, labels = ds.split(split)
            pred = clf.predict(flat(images))
            per_class = np.array([np.mean(pred[labels == k] == k) for k in range(10)])
            line.append(f"{split} all {np.mean(pred == labels):.4f}")
            if split == "test":
                line += [f"{g} {per_class[idx].mean():.4f}" for g, idx in groups.items()]
        print("  ".join(line) + f"  ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
