"""folder: a user's own data in ImageFolder layout (root/train/<class>/*, root/test/<class>/*,
optional root/val/). Class names come from the folder names, `_` and `-` read as spaces."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lfm_ray.data.base import ImageList, LongTailDataset, readable
from lfm_ray.data.counts import long_tail_counts, long_tail_subset
from lfm_ray.errors import LfmError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _scan(split_dir: Path, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """Image paths and labels of one split; its class folders must be training classes."""
    extra = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and d.name not in classes)
    if extra:  # most likely a typo; its images would otherwise be dropped without a word
        raise LfmError(f"folder: {split_dir / extra[0]} is not a class of "
                       f"{split_dir.parent / 'train'} (classes: {', '.join(classes)})")
    paths, labels = [], []
    for k, cls in enumerate(classes):
        folder = split_dir / cls
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(str(f))
                labels.append(k)
    return paths, np.asarray(labels, dtype=np.int64)


def empty_val(root_path: Path) -> LfmError:
    return LfmError(f"folder: {root_path / 'val'} holds no images of the training classes, so "
                    "there is nothing to select on; add images to val/<class>/, or remove val/ "
                    "(the study then selects on test and says so)")


def has_images(split_dir: Path) -> bool:
    """Whether some class folder of a split holds an image (stops at the first)."""
    return any(f.suffix.lower() in IMAGE_SUFFIXES for d in split_dir.iterdir() if d.is_dir()
               for f in d.iterdir())


def has_val(root) -> bool:
    """Whether a folder set has a validation split: val/ with images; a val/ without any
    is refused (an empty selection split is a mistake, not a choice)."""
    val = Path(root).expanduser() / "val"
    if not val.is_dir():
        return False
    if not has_images(val):
        raise empty_val(Path(root).expanduser())
    return True


def build_folder(root=None, imbalance_factor: float | None = None, seed: int = 0) -> LongTailDataset:
    """Images decoded lazily; with `imbalance_factor` the training split is made long-tailed
    (max count = the smallest class's count, subset drawn for `seed`), else used as is."""
    if root is None:
        raise LfmError("folder needs a data root (--data-root) with train/<class>/ and "
                       "test/<class>/ inside")
    root_path = Path(root).expanduser()
    for split in ("train", "test"):
        if not (root_path / split).is_dir():
            raise LfmError(f"folder: missing {root_path / split}; expected root/train/<class>/* "
                           "and root/test/<class>/* (ImageFolder layout)")
    classes = sorted(d.name for d in (root_path / "train").iterdir() if d.is_dir())
    if not classes:
        raise LfmError(f"folder: {root_path / 'train'} has no class folders")
    train_paths, train_labels = _scan(root_path / "train", classes)
    if imbalance_factor is not None:
        per_class = np.bincount(train_labels, minlength=len(classes))
        counts = long_tail_counts(len(classes), imbalance_factor, int(per_class.min()))
        keep = long_tail_subset(train_labels, counts, seed)
        train_paths = [train_paths[i] for i in keep]
        train_labels = train_labels[keep]
    test_paths, test_labels = _scan(root_path / "test", classes)
    if not test_paths:
        raise LfmError(f"folder: {root_path / 'test'} has no images of the training classes")
    val = _scan(root_path / "val", classes) if (root_path / "val").is_dir() else None
    if val is not None and not val[0]:
        raise empty_val(root_path)
    return LongTailDataset(
        name="folder", class_names=[readable(c) for c in classes],
        train_images=ImageList(train_paths), train_labels=train_labels,
        test_images=ImageList(test_paths), test_labels=test_labels,
        val_images=ImageList(val[0]) if val and val[0] else None,
        val_labels=val[1] if val and val[0] else None,
    )
