"""Build the Fashion-MNIST pool that lfm-ray ships for fashion-lt (lfm_ray/data/fashion_pool/).

    python scripts/build_fashion_pool.py                       # from the Debian package's files
    python scripts/build_fashion_pool.py --root DIR [--out DIR]

Reads the four official IDX files (the Debian package dataset-fashion-mnist installs them in
/usr/share/datasets/fashion-mnist), keeps every image fashion-lt's rule can draw at the pool's
sizes (lfm_ray.data.fashion: per class the first POOL_VAL + POOL_TRAIN training images and
the first POOL_TEST test images of the fixed order), and writes them class by class in that
order as gzipped IDX files, with each image's official index. The output is byte-for-byte
reproducible. It then checks that fashion-lt read from the pool equals fashion-lt read from
the official files at the defaults.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

from lfm_ray.data import fashion


def build(root: Path, out: Path) -> None:
    data = {s: fashion.read_official(root, s) for s in fashion.OFFICIAL}
    orders = fashion.pool_orders(data["train"][1], data["test"][1])
    out.mkdir(parents=True, exist_ok=True)
    for split, per_class in orders.items():
        keep = np.concatenate(per_class)
        images, labels = data[split][0][keep], data[split][1][keep]
        fashion.write_idx(out / f"{split}-images.gz", images)
        fashion.write_idx(out / f"{split}-labels.gz", labels.astype(np.uint8))
        fashion.write_idx(out / f"{split}-indices.gz", fashion.encode_indices(keep))
        print(f"{split}: {len(keep)} images ({len(keep) // fashion.NUM_CLASSES} per class)")
    for path in sorted(out.glob("*.gz")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        print(f"  {path.name}: {path.stat().st_size:,} bytes, sha256 {digest}…")
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"pool: {total / 1e6:.2f} MB in {out}")


def check(root: Path) -> None:
    """The pool and the official files give the same fashion-lt at the defaults."""
    a, b = fashion.build_fashion_lt(), fashion.build_fashion_lt(root=root)
    for split in ("train", "val", "test"):
        (xa, ya), (xb, yb) = a.split(split), b.split(split)
        if not (np.array_equal(xa, xb) and np.array_equal(ya, yb)):
            raise SystemExit(f"check failed: the pool's {split} split differs from the files'")
    print(f"check: the pool gives the official files' fashion-lt (train {a.class_counts})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(fashion.DEBIAN_ROOT),
                        help="folder of the official IDX files (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=fashion.pool_dir(),
                        help="where the pool goes (default: the package's pool folder)")
    args = parser.parse_args(argv)
    build(args.root, args.out)
    if args.out.resolve() == fashion.pool_dir().resolve():
        check(args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
