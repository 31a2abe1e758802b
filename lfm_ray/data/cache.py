"""The node-local decode-once cache: each split as a uint8 .npy, memory-mapped by every trial.

The first trial on a node builds the cache under a file lock and renames it into place; every
later trial (and every epoch) maps the same files, so the operating system keeps one copy of
the images in memory however many trials run on the node. Images are stored as the model's
own preprocessing gives them (lfm_ray/data/preprocess.py): lazily decoded sets resized by its
resize mode and interpolation and centre-cropped (or padded) to its input size.

Five-crop evaluation (`eval.tta fivecrop`) asks for the evaluation splits alone once more,
at the larger size the crops are cut from (`splits=`): a cache of its own, so the training
split is not stored twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lfm_ray.data.base import ImageList
from lfm_ray.data.preprocess import ImageSpec, preprocess_file, resize_uint8
from lfm_ray.errors import LfmError


# In-memory sets (digits, CIFAR) are stored resized to the model's input size when that copy
# stays under this size, so batches skip the per-step resize; larger ones (CIFAR at 224 px is
# 7.5 GB) keep their native size and are resized in batch on the device.
PRE_RESIZE_BYTES = 2 * 2**30
DEFAULT_CACHE = Path(os.environ.get("LFM_RAY_CACHE", Path.home() / ".cache" / "lfm-ray")) / "arrays"
SPLITS = ("train", "val", "test")
# Part of every cache key: bump it when what is stored changes, so old caches are not reused.
# 3: images follow the model's resize mode and interpolation (2 squashed them to S × S).
# 4: the key holds the data fingerprint (lfm_ray.data.fingerprint).
# 5: JPEGs are resized by PyTorch's uint8 kernel (within one level of Pillow's).
CACHE_FORMAT = 5


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


def _preprocessing(image: "ImageSpec | None") -> dict[str, Any] | None:
    """What of the model's ImageSpec decides the stored pixels (its mean and std do not)."""
    if image is None:
        return None
    return {"size": image.size, "resize_mode": image.resize_mode,
            "interpolation": image.interpolation, "fill_color": image.fill_color}


def cache_key(name: str, root: Any, image: "ImageSpec | None", options: dict[str, Any],
              splits: tuple[str, ...] | None = None, fingerprint: str = "") -> str:
    """Hash of what decides the arrays: format, name, resolved root, the image size, resize
    mode, interpolation and fill colour, options, the data fingerprint (the source files'
    hashes, sizes and modification times: lfm_ray.data.fingerprint, so a data set changed in
    place gets a new cache rather than the stale one), and the splits where not all are
    stored.
    """
    root_text = str(Path(root).expanduser().resolve()) if root is not None else ""
    # 10 and 10.0 are one imbalance factor, so they are one cache.
    same = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in options.items()}
    key = [CACHE_FORMAT, name, root_text, _preprocessing(image), sorted(same.items()),
           fingerprint]
    if splits is not None:  # only then: a full cache keeps the key it always had
        key.append(sorted(splits))
    blob = json.dumps(key, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# A build of lazily decoded images records its progress this often (images), so a killed
# build continues where it stopped.
PROGRESS_EVERY = 512


# The build hands images to its threads in runs of this many: one hand-over per image costs
# the waiting thread a wake-up and the GIL each time (about 8 % of a 500 × 375 JPEG's time).
DECODE_RUN = 16


def decode_into(out: np.ndarray, images: ImageList, image: "ImageSpec", label: str,
                 done: np.ndarray | None = None,
                 save_progress: Callable[[np.ndarray], None] | None = None,
                 threads: int | None = None) -> None:
    """Decode and preprocess every image not yet `done`: in runs of DECODE_RUN images on a
    thread per core (Pillow, simplejpeg and PyTorch release the GIL while they decode and
    resize), or in this thread when `threads` is 1. Every PROGRESS_EVERY images the written
    rows are flushed and `save_progress(done)` records them. Prints progress every ~10 %.
    PyTorch runs one thread per call meanwhile: the parallelism is the pool's."""
    import torch

    n = len(images)
    done = np.zeros(n, dtype=bool) if done is None else done

    def run(indices: list[int]) -> list[int]:
        for i in indices:
            out[i] = preprocess_file(images.paths[i], image)
            done[i] = True  # per image, so a run cut short still records what it wrote
        return indices

    todo = np.flatnonzero(~done).tolist()
    runs = [todo[k:k + DECODE_RUN] for k in range(0, len(todo), DECODE_RUN)]
    step = max(1, n // 10)
    threads = threads or min(32, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    finished = recorded = n - len(todo)
    try:
        for indices in (pool.map(run, runs) if pool is not None else map(run, runs)):
            before, finished = finished, finished + len(indices)
            if save_progress is not None and finished - recorded >= PROGRESS_EVERY:
                written = done.copy()  # taken first: the threads go on marking rows
                out.flush()  # rows on disk before they are recorded as done
                save_progress(written)
                recorded = finished
            if n >= 1000 and (finished // step > before // step or finished == n):
                print(f"  caching {label}: {finished}/{n} images", flush=True)
    finally:  # a bad image stops the build at once, not after decoding all the rest
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(torch_threads)
        if save_progress is not None:
            out.flush()
            save_progress(done)


def load_arrays(name: str, root=None, image: "ImageSpec | None" = None, cache_dir=None,
                splits: tuple[str, ...] | None = None, **options: Any) -> ArraySet:
    """The data set as memory-mapped uint8 arrays, built once per node.

    image: the model's ImageSpec (build_clip gives it). Lazily decoded sets (ImageNet-LT,
    Places-LT, folder) need it: they are stored as its preprocessing gives them, S × S. The
    square in-memory sets are stored resized to S × S with its interpolation when that copy
    is small (PRE_RESIZE_BYTES), else at their native size (the batch builder resizes them).
    splits: store only these of the data set's splits (the others are None in the result;
    five-crop evaluation keeps val and test at a larger size so); None: all of them.
    """
    from lfm_ray.data.registry import resolve_options

    options = resolve_options(name, options)  # unknown options fail before anything is written
    if image is not None and not hasattr(image, "resize_mode"):
        raise TypeError(f"image= takes the model's ImageSpec (from build_clip), not {image!r}")
    from lfm_ray.data.fingerprint import data_fingerprint

    if splits is not None:
        unknown = [s for s in splits if s not in SPLITS]
        if unknown or not splits:
            raise ValueError(f"splits={splits!r}: expected some of {', '.join(SPLITS)}")
        splits = tuple(sorted(set(splits), key=SPLITS.index))
    base = cache_base(cache_dir)
    key = cache_key(name, root, image, options, splits, data_fingerprint(name, root))
    target = base / f"{name}-{key}"
    if not (target / "meta.json").is_file():
        make_cache_dir(base)
        with (base / f".{name}-{key}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per node; the others wait
            if not (target / "meta.json").is_file():
                _build(name, root, options, target, image, splits)
    return _open(target)


def cache_base(cache_dir: Any = None) -> Path:
    """The folder the node cache lives in (data.cache_dir, else DEFAULT_CACHE)."""
    return Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE


def check_cache_dir(cache_dir: Any = None) -> None:
    """The cache folder exists and is writable, or can be created; creates nothing."""
    base = cache_base(cache_dir).absolute()
    probe = base
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise LfmError(f"the image cache folder {str(base)!r} (data.cache_dir) cannot be "
                       f"created: {str(probe)!r} is a file; give a writable data.cache_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == base else f"cannot be created in {str(probe)!r}"
        raise LfmError(f"the image cache folder {str(base)!r} (data.cache_dir) {what}; give "
                       "a writable data.cache_dir")


def make_cache_dir(base: Path) -> None:
    """Create the cache folder, or one LfmError naming it (data.cache_dir)."""
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LfmError(f"the image cache folder {str(base)!r} (data.cache_dir) cannot be "
                       f"created: {exc.strerror or exc}; give a writable data.cache_dir") from None
    if not os.access(base, os.W_OK | os.X_OK):
        raise LfmError(f"the image cache folder {str(base)!r} (data.cache_dir) is not "
                       "writable; give a writable data.cache_dir")


def _build(name: str, root: Any, options: dict[str, Any], target: Path,
           image: "ImageSpec | None", only: tuple[str, ...] | None = None) -> None:
    from lfm_ray.data.registry import build_dataset

    ds = build_dataset(name, root, **options)
    stored = [s for s in _splits(ds) if only is None or s in only]
    if image is None and any(isinstance(ds.split(s)[0], ImageList) for s in stored):
        raise LfmError(f"{ds.name} decodes images lazily; give image= (the model's ImageSpec: "
                       "its input size and preprocessing) to cache it")
    # Built in a folder next to the target, then renamed into place in one step: a reader
    # sees either no cache or a complete one, never a half-written file. The folder is named
    # after the target, so a build killed half-way continues from its recorded progress.
    tmp = target.parent / f".building-{target.name}"
    tmp.mkdir(exist_ok=True)
    for split in stored:
        images, labels = ds.split(split)
        file = tmp / f"{split}_images.npy"
        if isinstance(images, ImageList):
            # Written straight to disk: ImageNet-LT at 224 px is ~17 GB, more than RAM.
            size = image.size
            shape = (len(images), size, size, 3)
            progress = tmp / f"{split}_done.npy"
            done = _progress(file, progress, shape)
            out = np.lib.format.open_memmap(file, mode="r+" if done is not None else "w+",
                                            dtype=np.uint8, shape=shape)
            if done is not None and done.any():
                print(f"  caching {ds.name} {split}: continuing a stopped build, "
                      f"{int(done.sum())}/{len(images)} images done", flush=True)
            try:
                decode_into(out, images, image, f"{ds.name} {split}", done,
                             lambda d, _p=progress: _save_progress(_p, d))
            except LfmError:
                # A bad image: the data must change, which gives another cache key, so the
                # progress here would never be resumed; a killed build keeps it.
                del out
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            out.flush()
            del out
        else:
            # Square, so every resize mode is the plain resize to S × S.
            if image is not None and images.shape[1:3] != (image.size, image.size) \
                    and len(images) * image.size * image.size * 3 <= PRE_RESIZE_BYTES:
                images = resize_uint8(images, image.size, image.interpolation)
            np.save(file, np.ascontiguousarray(images, dtype=np.uint8))
        np.save(tmp / f"{split}_labels.npy", np.asarray(labels, dtype=np.int64))
        if only is not None:  # a partial cache is an extra copy: say what it costs
            size = np.load(file, mmap_mode="r").shape[1]
            print(f"  cached {ds.name} {split} at {size} px besides the full cache: "
                  f"{file.stat().st_size / 2**20:.1f} MiB", flush=True)
    meta = {"name": ds.name, "class_names": ds.class_names,
            "class_counts": ds.class_counts, "splits": stored,
            "preprocessing": _preprocessing(image)}
    for progress in tmp.glob("*_done.npy"):  # the build is whole: no progress to keep
        progress.unlink()
    (tmp / "meta.json").write_text(json.dumps(meta))
    if target.exists():  # a folder left without meta.json by an older build
        shutil.rmtree(target)
    os.replace(tmp, target)


def _progress(file: Path, progress: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """Which images of a stopped build of `file` are already written, or None to start it
    afresh (no build, or one of another shape)."""
    if not (file.is_file() and progress.is_file()):
        return None
    try:
        existing = np.load(file, mmap_mode="r")
        done = np.load(progress)
    except (OSError, ValueError):
        return None
    if existing.shape != shape or done.shape != (shape[0],) or done.dtype != bool:
        return None
    return done.copy()


def _save_progress(path: Path, done: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, done)
    os.replace(tmp, path)


def _splits(ds) -> list[str]:
    return [s for s in SPLITS if s != "val" or ds.val_images is not None]


def _open(target: Path) -> ArraySet:
    meta = json.loads((target / "meta.json").read_text())
    arrays: dict[str, Any] = {f"{s}_{kind}": None for s in SPLITS for kind in ("images", "labels")}
    for split in meta["splits"]:
        arrays[f"{split}_images"] = np.load(target / f"{split}_images.npy", mmap_mode="r")
        arrays[f"{split}_labels"] = np.load(target / f"{split}_labels.npy")
    return ArraySet(name=meta["name"], class_names=meta["class_names"],
                    class_counts=meta["class_counts"], **arrays)
