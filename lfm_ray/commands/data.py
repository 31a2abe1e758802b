"""`lfm-ray data DATASET`: a data set's class count table and imbalance statistics."""

from __future__ import annotations

import argparse

import numpy as np


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="class count table and imbalance statistics of a data set",
        description="Print a data set's class counts, shot groups and imbalance.")
    p.add_argument("dataset", help="digits-lt, cifar10-lt, cifar100-lt, imagenet-lt, places-lt, folder")
    # --data-root as well, the name train and study use (and error messages give).
    p.add_argument("--root", "--data-root", dest="root", help="data root (not needed for digits-lt)")
    p.add_argument("--imbalance-factor", type=float, help="n_max / n_min of the training split")
    p.add_argument("--seed", type=int, help="seed of the long-tailed subset")
    p.add_argument("--download", action="store_true",
                   help="cifar10-lt/cifar100-lt: fetch the CIFAR files into --root with torchvision")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lfm_ray.data import build_dataset, shot_groups

    # Only the flags given are passed on: a flag the data set does not take (--seed for
    # imagenet-lt) is an error naming the options it does take, not silently ignored.
    given = {"imbalance_factor": args.imbalance_factor, "seed": args.seed,
             "download": args.download or None}
    ds = build_dataset(args.dataset, args.root, **{k: v for k, v in given.items() if v is not None})
    print(format_table(ds.class_names, ds.class_counts, np.asarray(ds.test_labels), shot_groups))
    return 0


def format_table(names, counts, test_labels, shot_groups) -> str:
    counts = np.asarray(counts)
    groups = shot_groups(counts)
    group_of = {int(k): g for g, idx in groups.items() for k in idx}
    test = np.bincount(test_labels, minlength=len(counts))
    width = max(12, max(len(n) for n in names))
    lines = [f"{'class':>5}  {'name':<{width}}  {'train':>6}  {'group':<6}  {'test':>5}"]
    for k, (name, n) in enumerate(zip(names, counts)):
        lines.append(f"{k:>5}  {name:<{width}}  {n:>6}  {group_of[k]:<6}  {test[k]:>5}")
    lines.append("")
    lines.append(f"classes {len(counts)}, training images {counts.sum()}, test images {test.sum()}")
    lines.append(f"largest class {counts.max()}, smallest {counts.min()}, "
                 f"imbalance ratio {counts.max() / counts.min():.1f}")
    lines.append("shot groups (many > 100, medium 20..100, few < 20): "
                 + ", ".join(f"{g} {len(idx)} classes / {counts[idx].sum()} images"
                             for g, idx in groups.items()))
    return "\n".join(lines)
