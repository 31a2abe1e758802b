"""iNaturalist 2018 (`inat2018`): the official annotation files, images below the root.

The root holds the competition's COCO-style files, train2018.json and val2018.json (`images`
with `id` and `file_name`, `annotations` with `image_id` and `category_id`, `categories`),
and categories.json, the un-obfuscated category list released after the competition: per
category its `id`, species `name` and its `kingdom`, `phylum`, `class`, `order`, `family` and
`genus`. Image paths (`file_name`, e.g. train_val2018/Plantae/7477/<hash>.jpg) are relative to
the root. 8,142 classes in the official files; class k is the k-th category id in ascending
order (the official ids run 0..8141), named by its species name.

iNat2018 has no labelled test split: the field reports on val2018. lfm-ray maps the data set
onto its three splits so that model selection never sees val2018:
- train: train2018 without the hold-out;
- val, the selection split: the hold-out carved from train2018, one image from each class
  with at least HOLDOUT_MIN_COUNT (5) training images, drawn with the data set's `seed`
  (`holdout_images` gives their ids);
- test, the reported split: val2018.
Shot groups (many/medium/few) follow the usual thresholds on the training counts after the
hold-out. The taxonomy (kingdom → species) feeds `mix.similarity=taxonomy` (`taxonomy`).
Nothing is written under the root.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lfm_ray.data.base import ImageList, LongTailDataset
from lfm_ray.errors import LfmError

NAME = "inat2018"
TRAIN_FILE, VAL_FILE, CATEGORIES_FILE = "train2018.json", "val2018.json", "categories.json"
TAXONOMY_LEVELS = ("kingdom", "phylum", "class", "order", "family", "genus")
HOLDOUT_MIN_COUNT = 5
SOURCE = ("https://github.com/visipedia/inat_comp/tree/master/2018 (train2018.json, "
          "val2018.json, the un-obfuscated categories.json and train_val2018.tar.gz)")


def _root(root: Any) -> Path:
    if root is None:
        raise LfmError(f"{NAME} needs a data root (--data-root) holding {TRAIN_FILE}, "
                       f"{VAL_FILE}, {CATEGORIES_FILE} and the images; get {SOURCE}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise LfmError(f"data root {str(path)!r} does not exist; it should hold {TRAIN_FILE}, "
                       f"{VAL_FILE}, {CATEGORIES_FILE} and the images they list (get {SOURCE})")
    return path


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise LfmError(f"{NAME}: missing {path}; get {SOURCE}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LfmError(f"{path} cannot be read as JSON: {str(exc).splitlines()[0]}") from None


def read_categories(root: Any) -> list[dict[str, Any]]:
    """categories.json's entries sorted by id, each checked for its name and taxonomy."""
    path = _root(root) / CATEGORIES_FILE
    raw = _read_json(path)
    if isinstance(raw, dict):  # the file may also be a whole annotation file's layout
        raw = raw.get("categories")
    if not isinstance(raw, list) or not raw:
        raise LfmError(f"{path}: expected a list of categories (or an object with "
                       "'categories')")
    seen: set[int] = set()
    for number, cat in enumerate(raw):
        fields = ("id", "name", *TAXONOMY_LEVELS)
        lacking = [f for f in fields if not isinstance(cat, dict) or f not in cat]
        if lacking:
            raise LfmError(f"{path}: category {number} lacks {lacking[0]!r}; each category "
                           f"has {', '.join(fields)}")
        if not isinstance(cat["id"], int) or cat["id"] in seen:
            raise LfmError(f"{path}: category {number} has id {cat['id']!r}; ids are "
                           "integers, each once")
        seen.add(cat["id"])
    return sorted(raw, key=lambda c: c["id"])


def class_names(root: Any) -> list[str]:
    """The species names, in class order."""
    return [str(c["name"]) for c in read_categories(root)]


def taxonomy(root: Any) -> list[tuple[str, ...]]:
    """Each class's path kingdom → phylum → class → order → family → genus → species, in
    class order (what `mix.similarity=taxonomy` reads)."""
    return [tuple(str(c[level]) for level in TAXONOMY_LEVELS) + (str(c["name"]),)
            for c in read_categories(root)]


def read_annotations(path: Path, root: Path, index_of: dict[int, int]
                     ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(absolute image paths, labels, image ids) of one annotation file, in its image order.
    Every image must have exactly one annotation of a known category and exist on disk."""
    raw = _read_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list) \
            or not isinstance(raw.get("annotations"), list):
        raise LfmError(f"{path}: expected a COCO-style object with 'images' and 'annotations'")
    category_of: dict[Any, int] = {}
    for number, ann in enumerate(raw["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
            raise LfmError(f"{path}: annotation {number} needs 'image_id' and 'category_id'")
        if ann["category_id"] not in index_of:
            raise LfmError(f"{path}: annotation {number} names category {ann['category_id']!r}, "
                           f"which {CATEGORIES_FILE} does not list")
        if ann["image_id"] in category_of:
            raise LfmError(f"{path}: image {ann['image_id']!r} has more than one annotation")
        category_of[ann["image_id"]] = index_of[ann["category_id"]]
    paths, labels, ids = [], [], []
    for number, image in enumerate(raw["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise LfmError(f"{path}: image {number} needs 'id' and 'file_name'")
        if image["id"] not in category_of:
            raise LfmError(f"{path}: image {image['id']!r} ({image['file_name']}) has no "
                           "annotation")
        full = root / str(image["file_name"]).lstrip("/")
        if not os.path.exists(full):
            raise LfmError(f"{path}: image {full} does not exist")
        paths.append(str(full))
        labels.append(category_of[image["id"]])
        ids.append(image["id"])
    if not paths:
        raise LfmError(f"{path} lists no images")
    return paths, np.asarray(labels, dtype=np.int64), np.asarray(ids)


def holdout_positions(labels: np.ndarray, num_classes: int, seed: int = 0) -> np.ndarray:
    """Positions (into train2018's image order) of the hold-out: one image, uniformly drawn
    with `seed`, of each class with at least HOLDOUT_MIN_COUNT images; in class order."""
    rng = np.random.default_rng(seed)
    picked = []
    for k in range(num_classes):
        members = np.flatnonzero(labels == k)
        if len(members) >= HOLDOUT_MIN_COUNT:
            picked.append(int(members[rng.integers(len(members))]))
    return np.asarray(picked, dtype=np.int64)


def _read(root: Any) -> dict[str, Any]:
    path = _root(root)
    cats = read_categories(path)
    index_of = {c["id"]: k for k, c in enumerate(cats)}
    train = read_annotations(path / TRAIN_FILE, path, index_of)
    val = read_annotations(path / VAL_FILE, path, index_of)
    return {"categories": cats, "train": train, "val": val}


def holdout_images(root: Any, seed: int = 0) -> list[int]:
    """The train2018 image ids held out as the selection split (what study.json records),
    in class order."""
    files = _read(root)
    _, labels, ids = files["train"]
    return [ids[p].item() for p in holdout_positions(labels, len(files["categories"]), seed)]


def build_inat2018(root=None, seed: int = 0) -> LongTailDataset:
    """train = train2018 without the hold-out, val = the hold-out (selection), test = val2018
    (reported); `seed` draws the hold-out."""
    files = _read(root)
    names = [str(c["name"]) for c in files["categories"]]
    paths, labels, _ = files["train"]
    held = holdout_positions(labels, len(names), seed)
    if len(held) == 0:
        raise LfmError(f"{NAME}: no class has {HOLDOUT_MIN_COUNT} or more images in "
                       f"{TRAIN_FILE}, so there is no hold-out to select on")
    keep = np.ones(len(paths), dtype=bool)
    keep[held] = False
    kept = np.flatnonzero(keep)
    test_paths, test_labels, _ = files["val"]
    return LongTailDataset(
        name=NAME, class_names=names,
        train_images=ImageList([paths[i] for i in kept]), train_labels=labels[kept],
        test_images=ImageList(test_paths), test_labels=test_labels,
        val_images=ImageList([paths[i] for i in held]), val_labels=labels[held],
    )
