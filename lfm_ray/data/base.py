"""The data set object every loader returns, and the lazily decoded image list."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from lfm_ray.errors import LfmError


def decode_image(path: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB of one image file at its own size (the node cache stores images
    as the model's preprocessing gives them: lfm_ray.data.preprocess)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # missing, bad, too big
        raise LfmError(f"cannot read image {path}: {exc}") from None


class ImageList:
    """Image files decoded on demand (ImageNet-LT, Places-LT, folders): too big to hold."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        """uint8 (H, W, 3) RGB."""
        return decode_image(self.paths[i])


@dataclass
class LongTailDataset:
    """Training split (long-tailed), balanced test split, optional validation split.

    Images are uint8 arrays (N, H, W, 3) for sets that fit in memory, else an ImageList.
    """

    name: str
    class_names: list[str]
    train_images: np.ndarray | ImageList
    train_labels: np.ndarray
    test_images: np.ndarray | ImageList
    test_labels: np.ndarray
    val_images: np.ndarray | ImageList | None = None
    val_labels: np.ndarray | None = None
    class_counts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        C = len(self.class_names)
        for split, labels in (("train", self.train_labels), ("test", self.test_labels),
                              ("val", self.val_labels)):
            if labels is None or len(labels) == 0:
                continue
            lo, hi = int(np.min(labels)), int(np.max(labels))
            if lo < 0 or hi >= C:
                raise LfmError(f"{self.name}: {split} labels range over {lo}..{hi}, "
                               f"but there are {C} classes (0..{C - 1})")
        counts = np.bincount(np.asarray(self.train_labels, dtype=np.int64), minlength=C)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            k = int(empty[0])
            raise LfmError(f"{self.name}: class {k} ({self.class_names[k]!r}) has no training "
                           "images; lower the imbalance factor or check the data")
        self.class_counts = [int(c) for c in counts]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str):
        """(images, labels) of 'train', 'val' or 'test'."""
        if name == "train":
            return self.train_images, self.train_labels
        if name == "test":
            return self.test_images, self.test_labels
        if name == "val":
            if self.val_images is None:
                raise LfmError(f"{self.name} has no validation split; use 'test'")
            return self.val_images, self.val_labels
        raise LfmError(f"split {name!r} is not valid; expected 'train', 'val' or 'test'")


def readable(name: str) -> str:
    """'aquarium_fish' -> 'aquarium fish'."""
    return name.replace("_", " ").replace("-", " ").strip()
