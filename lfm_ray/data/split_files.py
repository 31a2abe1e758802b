"""ImageNet-LT and Places-LT: the standard OLTR split files, images under a user-given root.

Each split file has one "relative/path label" per line, e.g. `train/n01440764/x.JPEG 0`.
The split files are looked for in the root itself, then in the folders the OLTR release and
its users put them in: root/ImageNet_LT/, root/ImageNet_LT_v2/, root/data_txt/ (Places_LT
likewise). Image paths are relative to the root. Nothing is written under the root.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import numpy as np

from lfm_ray.data.base import ImageList, LongTailDataset
from lfm_ray.errors import LfmError, unknown_name

OLTR = "https://github.com/zhmiao/OpenLongTailRecognition-OLTR"
SPLIT_SETS = {
    # name: (file prefix, number of classes, where to get the split files)
    "imagenet-lt": ("ImageNet_LT", 1000,
                    f"the split files from {OLTR} and the ILSVRC-2012 images from "
                    "https://image-net.org"),
    "places-lt": ("Places_LT", 365,
                  f"the split files from {OLTR} and the Places365-Standard images from "
                  "http://places2.csail.mit.edu"),
}
# The official Places365 category list, shipped unchanged (MIT licence):
# https://github.com/CSAILVision/places365/blob/master/categories_places365.txt
PLACES365_CATEGORIES = "categories_places365.txt"


def _package_text(file_name: str) -> str:
    return files("lfm_ray.data").joinpath("classnames", file_name).read_text()


def places365_names(categories: str) -> list[str]:
    """Class names from the Places365 category list, by the rule of the LFM authors' names.

    Each line is '/<letter>/<category>[/<sub-category>] <index>'. The name is the path
    without its leading '/<letter>/', with every '/' and '_' read as a space:
    '/a/apartment_building/outdoor 8' gives 'apartment building outdoor', '/b/bakery/shop 31'
    'bakery shop'. The list's own spelling is kept ('archaelogical excavation'). Names are
    returned in index order.
    """
    by_index: dict[int, str] = {}
    for number, line in enumerate(categories.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or parts[0].count("/") < 2 \
                or not parts[0].startswith("/"):
            raise LfmError(f"Places365 category list, line {number}: expected "
                           f"'/<letter>/<category> <index>', got {line!r}")
        path, index = parts
        by_index[int(index)] = path.split("/", 2)[2].replace("/", " ").replace("_", " ")
    if sorted(by_index) != list(range(len(by_index))):
        raise LfmError("Places365 category list: the indices are not 0..N-1, each once")
    return [by_index[k] for k in range(len(by_index))]


def class_names(name: str) -> list[str]:
    """The class names of 'imagenet-lt' (the shipped list, one per line, in label order) or
    'places-lt' (derived from the Places365 category list)."""
    if name == "places-lt":
        return places365_names(_package_text(PLACES365_CATEGORIES))
    if name == "imagenet-lt":
        return [line.strip() for line in _package_text("imagenet.txt").splitlines() if line.strip()]
    raise unknown_name("split-file data set", name, list(SPLIT_SETS))


def _split_folders(root: Path, prefix: str) -> list[Path]:
    return [root, root / prefix, root / f"{prefix}_v2", root / "data_txt"]


def find_split(root: Path, prefix: str, split: str) -> Path | None:
    for folder in _split_folders(root, prefix):
        path = folder / f"{prefix}_{split}.txt"
        if path.is_file():
            return path
    return None


# Leading bytes of compressed files someone might give instead of the text split file.
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"PK\x03\x04": "zip"}


def check_text_file(path: Path) -> None:
    """A split file is plain text: a compressed one is named as such (unpack it first)."""
    if path.is_dir():
        raise LfmError(f"{path} is a folder, not a split file")
    with path.open("rb") as fh:
        head = fh.read(8)
    for magic, kind in COMPRESSED.items():
        if head.startswith(magic):
            raise LfmError(f"{path} is {kind}-compressed; a split file is plain text "
                           "('relative/path label' per line): unpack it first")


def _lines(fh, path: Path):
    try:
        yield from fh
    except UnicodeDecodeError as exc:
        raise LfmError(f"{path} is not a UTF-8 text file ({exc.reason} at byte "
                       f"{exc.start}); a split file is 'relative/path label' per line") from None


def read_split_file(path: Path, root: Path, num_classes: int) -> tuple[list[str], np.ndarray]:
    """Paths (absolute) and labels; every line checked, errors name file and line."""
    check_text_file(path)
    paths, labels = [], []
    with path.open(encoding="utf-8", errors="strict") as fh:
        for number, line in enumerate(_lines(fh, path), start=1):
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
            full = root / rel.lstrip("/")  # a leading / would make pathlib drop the root
            if not os.path.exists(full):
                raise LfmError(f"{path}, line {number}: image {full} does not exist")
            paths.append(str(full))
            labels.append(label)
    if not paths:
        raise LfmError(f"{path} lists no images")
    return paths, np.asarray(labels, dtype=np.int64)


def build_split_set(name: str, root=None) -> LongTailDataset:
    prefix, num_classes, source = SPLIT_SETS[name]
    if root is None:
        raise LfmError(f"{name} needs a data root (--data-root) holding {prefix}_train.txt "
                       "and the images")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise LfmError(f"data root {str(root_path)!r} does not exist; it should hold "
                       f"{prefix}_train.txt, _val.txt, _test.txt and the images they list "
                       f"(get {source})")
    splits = {}
    for split in ("train", "val", "test"):
        path = find_split(root_path, prefix, split)
        if path is None:
            if split == "val":
                continue
            looked = ", ".join(str(f) for f in _split_folders(root_path, prefix)[1:])
            raise LfmError(f"{name}: missing {root_path / f'{prefix}_{split}.txt'} (also looked "
                           f"in {looked}); get {source}")
        splits[split] = read_split_file(path, root_path, num_classes)
    names = class_names(name)
    val = splits.get("val")
    return LongTailDataset(
        name=name, class_names=names,
        train_images=ImageList(splits["train"][0]), train_labels=splits["train"][1],
        test_images=ImageList(splits["test"][0]), test_labels=splits["test"][1],
        val_images=ImageList(val[0]) if val else None, val_labels=val[1] if val else None,
    )
