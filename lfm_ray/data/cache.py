"""The node-local decode-once cache: each split as a uint8 .npy, memory-mapped by every trial.

The first trial on a node builds the cache under a file lock and renames it into place; every
later trial (and every epoch) maps the same files, so the operating system keeps one copy of
the images in memory however many trials run on the node.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lfm_ray.data.base import ImageList, decode_image
from lfm_ray.errors import LfmError

# In-memory sets (digits, CIFAR) are stored resized to the model's input size when that copy
# stays under this size, so batches skip the per-step resize; larger ones (CIFAR at 224 px is
# 7.5 GB) keep their native size and are resized in batch on the device.
PRE_RESIZE_BYTES = 2 * 2**30
DEFAULT_CACHE = Path(os.environ.get("LFM_RAY_CACHE", Path.home() / ".cache" / "lfm-ray")) / "arrays"
SPLITS = ("train", "val", "test")
# Part of every cache key: bump it when what is stored changes, so old caches are not reused.
CACHE_FORMAT = 2


@dataclass
class ArraySet:
    """Like LongTailDataset, with every split a uint8 (N, S, S, 3) memory map."""

    name: str
    class_names: list[str]
    class_counts: list[int]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str):
        if name == "val" and self.val_images is None:
            raise LfmError(f"{self.name} has no validation split; use 'test'")
        if name not in SPLITS:
            raise LfmError(f"split {name!r} is not valid; expected 'train', 'val' or 'test'")
        return getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")


def cache_key(name: str, root: Any, image_size: int | None, options: dict[str, Any]) -> str:
    """Hash of what decides the arrays: format, name, resolved root, image size, options.

    The files under the root are not hashed (that would mean reading them): a data set
    changed in place needs a new cache_dir or its cache folder deleted.
    """
    root_text = str(Path(root).expanduser().resolve()) if root is not None else ""
    # 10 and 10.0 are one imbalance factor, so they are one cache.
    same = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in options.items()}
    blob = json.dumps([CACHE_FORMAT, name, root_text, image_size, sorted(same.items())],
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _decode_into(out: np.ndarray, images: ImageList, size: int, label: str) -> None:
    """Decode and bicubic-resize every image once, on a thread per core (Pillow releases the
    GIL while it decodes and resizes); prints progress every ~10% for long decodes."""
    def one(i: int) -> None:
        out[i] = decode_image(images.paths[i], size)

    n = len(images)
    step = max(1, n // 10)
    pool = ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1))
    try:
        for done, _ in enumerate(pool.map(one, range(n)), start=1):
            if n >= 1000 and (done % step == 0 or done == n):
                print(f"  caching {label}: {done}/{n} images", flush=True)
    finally:  # a bad image stops the build at once, not after decoding all the rest
        pool.shutdown(wait=True, cancel_futures=True)


def load_arrays(name: str, root=None, image_size: int | None = None, cache_dir=None,
                **options: Any) -> ArraySet:
    """The data set as memory-mapped uint8 arrays, built once per node.

    Lazily decoded sets (ImageNet-LT, Places-LT, folder) need `image_size`: they are stored
    resized to image_size × image_size. In-memory sets are stored at that size when the copy
    is small (PRE_RESIZE_BYTES), else at their native size.
    """
    from lfm_ray.data import resolve_options

    options = resolve_options(name, options)  # unknown options fail before anything is written
    if image_size is not None and (int(image_size) != image_size or image_size < 1):
        raise LfmError(f"image_size={image_size} is not valid; expected a positive integer")
    base = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE
    key = cache_key(name, root, image_size, options)
    target = base / f"{name}-{key}"
    if not (target / "meta.json").is_file():
        base.mkdir(parents=True, exist_ok=True)
        with (base / f".{name}-{key}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per node; the others wait
            if not (target / "meta.json").is_file():
                _build(name, root, options, target, image_size)
    return _open(target)


def _build(name: str, root: Any, options: dict[str, Any], target: Path,
           image_size: int | None) -> None:
    from lfm_ray.data import build_dataset

    ds = build_dataset(name, root, **options)
    if image_size is None and any(isinstance(ds.split(s)[0], ImageList) for s in _splits(ds)):
        raise LfmError(f"{ds.name} decodes images lazily; give image_size "
                       "(the model's input size) to cache it")
    # Built in a temporary folder next to the target, then renamed into place in one step:
    # a reader sees either no cache or a complete one, never a half-written file.
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        for split in _splits(ds):
            images, labels = ds.split(split)
            file = tmp / f"{split}_images.npy"
            if isinstance(images, ImageList):
                # Written straight to disk: ImageNet-LT at 224 px is ~17 GB, more than RAM.
                out = np.lib.format.open_memmap(file, mode="w+", dtype=np.uint8,
                                                shape=(len(images), image_size, image_size, 3))
                _decode_into(out, images, image_size, f"{ds.name} {split}")
                out.flush()
                del out
            else:
                if image_size is not None and images.shape[1:3] != (image_size, image_size) \
                        and len(images) * image_size * image_size * 3 <= PRE_RESIZE_BYTES:
                    images = resize_uint8(images, image_size)
                np.save(file, np.ascontiguousarray(images, dtype=np.uint8))
            np.save(tmp / f"{split}_labels.npy", np.asarray(labels, dtype=np.int64))
        meta = {"name": ds.name, "class_names": ds.class_names,
                "class_counts": ds.class_counts, "splits": _splits(ds)}
        (tmp / "meta.json").write_text(json.dumps(meta))
        if target.exists():  # a folder left without meta.json by an older build
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _splits(ds) -> list[str]:
    return [s for s in SPLITS if s != "val" or ds.val_images is not None]


def resize_uint8(images: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
    """Bicubic resize of uint8 (N, H, W, 3) exactly as the batch builder does it in float
    (torch, align_corners=False, clamped), then rounded back to uint8."""
    import torch
    import torch.nn.functional as F

    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + chunk]))
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp_(0, 1)
        out[start:start + chunk] = x.mul_(255.0).round_().byte().permute(0, 2, 3, 1).numpy()
    return out


def _open(target: Path) -> ArraySet:
    meta = json.loads((target / "meta.json").read_text())
    arrays: dict[str, Any] = {}
    for split in meta["splits"]:
        arrays[f"{split}_images"] = np.load(target / f"{split}_images.npy", mmap_mode="r")
        arrays[f"{split}_labels"] = np.load(target / f"{split}_labels.npy")
    return ArraySet(name=meta["name"], class_names=meta["class_names"],
                    class_counts=meta["class_counts"], **arrays)
