"""ImageNet-LT and Places-LT: the standard OLTR split files, images under a user-given root.

Each split file has one "relative/path label" per line, e.g. `train/n01440764/x.JPEG 0`.
The files are looked for in the root itself, then in root/<prefix> (e.g. root/ImageNet_LT/);
image paths are relative to the root.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import numpy as np

from lfm_ray.data.base import ImageList, LongTailDataset
from lfm_ray.errors import LfmError

SPLIT_SETS = {
    # name: (file prefix, class-name file, number of classes, where to get the split files)
    "imagenet-lt": ("ImageNet_LT", "imagenet.txt", 1000,
                    "the OLTR release (ImageNet_LT_train.txt, _val.txt, _test.txt)"),
    "places-lt": ("Places_LT", "places.txt", 365,
                  "the OLTR release (Places_LT_train.txt, _val.txt, _test.txt)"),
}


def class_names(file_name: str) -> list[str]:
    text = files("lfm_ray.data").joinpath("classnames", file_name).read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _find_split(root: Path, prefix: str, split: str) -> Path | None:
    for folder in (root, root / prefix):
        path = folder / f"{prefix}_{split}.txt"
        if path.is_file():
            return path
    return None


def read_split_file(path: Path, root: Path, num_classes: int) -> tuple[list[str], np.ndarray]:
    """Paths (absolute) and labels; every line checked, errors name file and line."""
    paths, labels = [], []
    with path.open() as fh:
        for number, line in enumerate(fh, start=1):
            text = line.strip()
            if not text:
                continue
            parts = text.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise LfmError(f"{path}, line {number}: expected 'relative/path label', got {text!r}")
            rel, label_text = parts
            try:
                label = int(label_text)
            except ValueError:
                raise LfmError(f"{path}, line {number}: label {label_text!r} is not an integer") from None
            if not 0 <= label < num_classes:
                raise LfmError(f"{path}, line {number}: label {label} is out of range 0..{num_classes - 1}")
            full = root / rel
            if not os.path.exists(full):
                raise LfmError(f"{path}, line {number}: image {full} does not exist")
            paths.append(str(full))
            labels.append(label)
    if not paths:
        raise LfmError(f"{path} lists no images")
    return paths, np.asarray(labels, dtype=np.int64)


def build_split_set(name: str, root=None) -> LongTailDataset:
    prefix, names_file, num_classes, source = SPLIT_SETS[name]
    if root is None:
        raise LfmError(f"{name} needs a data root (--data-root) holding {prefix}_train.txt "
                       "and the images")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise LfmError(f"data root {str(root_path)!r} does not exist")
    splits = {}
    for split in ("train", "val", "test"):
        path = _find_split(root_path, prefix, split)
        if path is None:
            if split == "val":
                continue
            raise LfmError(f"{name}: missing {root_path / f'{prefix}_{split}.txt'}; "
                           f"get {source} and put the files in the data root")
        splits[split] = read_split_file(path, root_path, num_classes)
    names = class_names(names_file)
    val = splits.get("val")
    return LongTailDataset(
        name=name, class_names=names,
        train_images=ImageList(splits["train"][0]), train_labels=splits["train"][1],
        test_images=ImageList(splits["test"][0]), test_labels=splits["test"][1],
        val_images=ImageList(val[0]) if val else None, val_labels=val[1] if val else None,
    )
