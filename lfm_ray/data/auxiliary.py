"""Auxiliary classes for category extrapolation: the user's image folder and neighbour map, or
an embedded set, checked against the target classes and cached in the node cache.

The user gives (`aux.root`, `aux.neighbours`):
- an image folder `root/<auxiliary class>/*` (names read as class folders are: `_` and `-`
  as spaces), one folder per auxiliary class;
- a neighbour map, a JSON file `{target class: [auxiliary classes, ...]}`: N(t) for each
  target class t that has neighbours.

Both are checked before anything trains, each problem one message: a root that is not a
folder, no class folders, a class folder without images, two folders that name one class, an
auxiliary name that is also a target class, a map that is not a JSON object of lists of
names, a map naming an unknown target or auxiliary class, an auxiliary class no target lists
(a map that leaves one out most likely has a typo), and, when the images are cached, an
unreadable image. Names are matched after reading `_` and `-` as spaces, ignoring case.

Embedded sets (`aux.root` = one of EMBEDDED) stand in for crawled data on the embedded
`fashion-lt` and `digits-lt` (see `embedded_set`): they are built from the shipped
Fashion-MNIST pool or scikit-learn's digits deterministically and carry their own neighbour
map. An embedded name wins over a folder of the same name in
the working directory (give `./digits-aux` for the folder).

The images are cached like any data set (lfm_ray/data/cache.py): decoded and preprocessed
once per node as the model's preprocessing gives them, a uint8 memory map every trial shares.
The map is read afresh every time: it is small, and a changed map must not meet stale images.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lfm_ray.data.base import ImageList, readable
from lfm_ray.data.cache import DEFAULT_CACHE, PRE_RESIZE_BYTES, decode_into, cache_key
from lfm_ray.data.folder import IMAGE_SUFFIXES
from lfm_ray.data.preprocess import ImageSpec, resize_uint8
from lfm_ray.errors import LfmError


NEIGHBOURS_FILE = "neighbours.json"  # where `lfm-ray aux` writes the map, beside the folders
AUX_CACHE_NAME = "aux"               # the node cache's folder prefix for auxiliary images
# Seed of the fixed pixel permutation of digits-aux-scrambled (part of the set's definition).
SCRAMBLE_SEED = 20250611


def name_key(name: str) -> str:
    """The form names are matched in: `_` and `-` read as spaces, runs of spaces as one,
    case ignored ("Snow_Leopard" and "snow leopard" are one class)."""
    return " ".join(readable(str(name)).split()).casefold()


@dataclass
class AuxSource:
    """The auxiliary classes as given, checked: names, images (files or arrays), labels
    (0..C_a − 1), and N(t) per target class as indices of auxiliary classes (None: no map)."""

    root: str
    class_names: list[str]
    images: np.ndarray | ImageList
    labels: np.ndarray
    neighbours: list[list[int]] | None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class AuxArrays:
    """The cached auxiliary images: uint8 (N, S, S, 3) memory map (or native size for small
    embedded sets too big to store resized), labels, names, N(t) per target class."""

    class_names: list[str]
    images: np.ndarray
    labels: np.ndarray
    neighbours: list[list[int]] | None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ---- the user's folder and map -------------------------------------------------------------
def scan_folder(root: str | os.PathLike, target_names: Sequence[str]) -> tuple[list[str], ImageList,
                                                                              np.ndarray]:
    """(class names, image files, labels) of `root/<class>/*`, checked: every class folder has
    images, no two folders name one class, no auxiliary class is a target class."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise LfmError(f"aux.root {str(root)!r} is not a folder; expected root/<auxiliary "
                       f"class>/* image folders, or an embedded set ({', '.join(EMBEDDED)}, "
                       "for fashion-lt and digits-lt)")
    folders = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise LfmError(f"aux.root {str(path)!r} has no class folders; expected "
                       "root/<auxiliary class>/* with the images of each auxiliary class")
    targets = {name_key(n): n for n in target_names}
    seen: dict[str, str] = {}
    names, paths, labels = [], [], []
    for folder in folders:
        key = name_key(folder.name)
        if key in seen:
            raise LfmError(f"aux.root: folders {seen[key]!r} and {folder.name!r} name one "
                           f"auxiliary class ({readable(folder.name)!r}); merge or rename one")
        if key in targets:
            raise LfmError(f"auxiliary class {folder.name!r} ({folder}) is also a target class "
                           f"({targets[key]!r}); an auxiliary class must be a new class: "
                           "rename or remove its folder")
        files = sorted(f for f in folder.iterdir()
                       if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise LfmError(f"auxiliary class {folder.name!r} ({folder}) has no images (files "
                           f"ending in {', '.join(sorted(IMAGE_SUFFIXES))})")
        seen[key] = folder.name
        paths += [str(f) for f in files]
        labels += [len(names)] * len(files)
        names.append(readable(folder.name))
    return names, ImageList(paths), np.asarray(labels, dtype=np.int64)


def read_neighbour_map(path: str | os.PathLike) -> dict[str, list[str]]:
    """{target class: [auxiliary classes]} from a JSON file, its shape checked."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise LfmError(f"aux.neighbours {str(path)!r} is not a file; expected a JSON object "
                       "{\"target class\": [\"auxiliary class\", ...]}")
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LfmError(f"aux.neighbours {str(path)!r} is not readable JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise LfmError(f"aux.neighbours {str(path)!r} must be a JSON object {{target class: "
                       f"[auxiliary classes]}}, not a {type(raw).__name__}")
    out: dict[str, list[str]] = {}
    for target, aux in raw.items():
        if not isinstance(aux, list) or not all(isinstance(a, str) for a in aux):
            raise LfmError(f"aux.neighbours {str(path)!r}: the neighbours of {target!r} must be "
                           f"a list of auxiliary class names, got {aux!r}")
        out[str(target)] = list(dict.fromkeys(aux))
    return out


def neighbour_indices(mapping: dict[str, list[str]], target_names: Sequence[str],
                      aux_names: Sequence[str], where: str) -> list[list[int]]:
    """N(t) per target class (in the target order) as auxiliary class indices; every name of
    the map must be known, and every auxiliary class some target's neighbour."""
    targets = {name_key(n): k for k, n in enumerate(target_names)}
    aux = {name_key(n): a for a, n in enumerate(aux_names)}
    out: list[list[int]] = [[] for _ in target_names]
    listed: set[int] = set()
    for target, neighbours in mapping.items():
        key = name_key(target)
        if key not in targets:
            if key in aux:
                raise LfmError(f"{where}: {target!r} is an auxiliary class, not a target class; "
                               "the map's keys are target classes")
            raise LfmError(f"{where}: unknown target class {target!r}; target classes: "
                           f"{_listed(target_names)}")
        for name in neighbours:
            a = aux.get(name_key(name))
            if a is None:
                what = "a target class, not an auxiliary class" if name_key(name) in targets \
                    else "not an auxiliary class (no folder of that name)"
                raise LfmError(f"{where}: neighbour {name!r} of {target!r} is {what}; auxiliary "
                               f"classes: {_listed(aux_names)}")
            if a not in out[targets[key]]:
                out[targets[key]].append(a)
            listed.add(a)
    unlisted = [aux_names[a] for a in range(len(aux_names)) if a not in listed]
    if unlisted:
        raise LfmError(f"{where}: auxiliary class {unlisted[0]!r} is no target class's "
                       f"neighbour ({len(unlisted)} such); list it in the map or remove its "
                       "folder")
    return out


def _listed(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# ---- embedded sets (digits-lt, fashion-lt) ------------------------------------------------
def _digits_pool(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as digits-lt stores them (uint8 RGB 8×8), without any image equal
    to one of digits-lt's test images for `seed`: auxiliary data never shows a test image."""
    from sklearn.datasets import load_digits

    from lfm_ray.data.digits import build_digits_lt

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=3)
    test = build_digits_lt(seed=seed).test_images
    held_out = {img.tobytes() for img in np.asarray(test)}
    keep = np.array([img.tobytes() not in held_out for img in images])
    return images[keep], digits.target[keep].astype(np.int64)


def _quarter_turned(images: np.ndarray) -> np.ndarray:
    """Each image turned a quarter turn clockwise (exact: a permutation of its pixels)."""
    return np.ascontiguousarray(np.rot90(images, k=-1, axes=(1, 2)))


def _scrambled(images: np.ndarray) -> np.ndarray:
    """Each image's pixels permuted by one fixed permutation (SCRAMBLE_SEED): the same ink, no
    shape; extra data that is no digit's neighbour."""
    n, h, w, c = images.shape
    perm = np.random.default_rng(SCRAMBLE_SEED).permutation(h * w)
    return np.ascontiguousarray(images.reshape(n, h * w, c)[:, perm].reshape(n, h, w, c))


def _digits_set(prefix: str, transform: Callable[[np.ndarray], np.ndarray]):
    def build(seed: int) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, list[str]]]:
        from lfm_ray.data.digits import DIGIT_NAMES

        images, labels = _digits_pool(seed)
        names = [f"{prefix} {d}" for d in DIGIT_NAMES]
        mapping = {d: [f"{prefix} {d}"] for d in DIGIT_NAMES}
        return names, transform(images), labels, mapping
    return build


def _fashion_set(prefix: str, transform: Callable[[np.ndarray], np.ndarray]):
    def build(seed: int) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, list[str]]]:
        from lfm_ray.data import fashion

        images, labels = fashion.auxiliary_pool()
        rgb = np.repeat(images[..., None], 3, axis=3)
        names = [f"{prefix} {c}" for c in fashion.CLASS_NAMES]
        mapping = {c: [f"{prefix} {c}"] for c in fashion.CLASS_NAMES}
        return names, transform(rgb), labels, mapping
    return build


# name -> (the target data set it is for, builder(seed) -> names, images, labels, map). The
# digit k's auxiliary class is built from every non-test image of digit k:
# - digits-aux: turned a quarter turn clockwise ("rotated three"): the same strokes, a new
#   class, visually close; each digit's neighbour is its turned class. A quarter turn, not a
#   mirror image: training flips images horizontally at random, which would make a mirrored
#   three a three.
# - digits-aux-scrambled: pixels permuted by one fixed permutation ("scrambled three"): as
#   much extra data, from classes no digit resembles (the paper's random-extra-data control).
# fashion-aux and fashion-aux-scrambled do the same for fashion-lt ("rotated Sneaker"), from
# the shipped pool's training candidates (never a val or test image).
EMBEDDED: dict[str, tuple[str, Callable[[int], tuple]]] = {
    "digits-aux": ("digits-lt", _digits_set("rotated", _quarter_turned)),
    "digits-aux-scrambled": ("digits-lt", _digits_set("scrambled", _scrambled)),
    "fashion-aux": ("fashion-lt", _fashion_set("rotated", _quarter_turned)),
    "fashion-aux-scrambled": ("fashion-lt", _fashion_set("scrambled", _scrambled)),
}


def embedded_set(name: str, seed: int = 0):
    """(class names, uint8 images (N, H, W, 3), labels, neighbour map) of an embedded set,
    built for its data set's data seed `seed` (no test or val image is in it)."""
    return EMBEDDED[name][1](int(seed))


# ---- resolving what the configuration names ------------------------------------------------
def aux_source(cfg, target_names: Sequence[str]) -> AuxSource:
    """The auxiliary classes `cfg.aux` names, checked against the target classes (no image is
    decoded; a folder's images are read when cached)."""
    aux = cfg.aux
    if aux.root is None:
        raise LfmError("aux.root is not set: there are no auxiliary classes")
    mapping: dict[str, list[str]] | None = None
    where = f"aux.neighbours {aux.neighbours!r}"
    if aux.root in EMBEDDED:
        dataset, _ = EMBEDDED[aux.root]
        if cfg.data.name != dataset:
            raise LfmError(f"aux.root {aux.root!r} is the embedded auxiliary set of {dataset}; "
                           f"for data set {cfg.data.name!r} give a folder of auxiliary images "
                           "(--aux-root) and a neighbour map (--aux-neighbours)")
        names, images, labels, own_map = embedded_set(aux.root, cfg.data.seed)
        if aux.neighbours is None:
            mapping, where = own_map, f"the neighbour map of {aux.root}"
        source_images: np.ndarray | ImageList = images
    else:
        names, source_images, labels = scan_folder(aux.root, target_names)
    if aux.neighbours is not None:
        mapping = read_neighbour_map(aux.neighbours)
    if mapping is None and aux.silence != "none":
        hint = Path(aux.root).expanduser() / NEIGHBOURS_FILE
        extra = f" ({hint} exists: --aux-neighbours {hint})" if hint.is_file() else ""
        raise LfmError(f"aux.silence={aux.silence!r} needs a neighbour map: give "
                       f"--aux-neighbours FILE{extra}, or aux.silence none to train the "
                       "auxiliary classes without silencing")
    neighbours = None if mapping is None else neighbour_indices(mapping, target_names, names,
                                                                where)
    return AuxSource(root=aux.root, class_names=list(names), images=source_images,
                     labels=np.asarray(labels, dtype=np.int64), neighbours=neighbours)


def load_aux_arrays(cfg, target_names: Sequence[str], image: "ImageSpec | None" = None,
                    cache_dir: str | os.PathLike | None = None) -> AuxArrays:
    """The auxiliary classes of `cfg.aux` with their images cached on this node (built once,
    under a lock, as the target data set's; keyed on the root, the model's preprocessing and,
    for an embedded set, the data seed)."""
    source = aux_source(cfg, target_names)
    base = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE
    embedded = source.root in EMBEDDED
    options = {"seed": int(cfg.data.seed)} if embedded else {}
    root = None if embedded else source.root
    key = cache_key(f"{AUX_CACHE_NAME}:{source.root if embedded else 'folder'}", root, image,
                    options)
    target = base / f"{AUX_CACHE_NAME}-{key}"
    if not (target / "meta.json").is_file():
        base.mkdir(parents=True, exist_ok=True)
        with (base / f".{AUX_CACHE_NAME}-{key}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per node; the others wait
            if not (target / "meta.json").is_file():
                _build(source, target, image)
    meta = json.loads((target / "meta.json").read_text())
    if [name_key(n) for n in meta["class_names"]] != [name_key(n) for n in source.class_names]:
        raise LfmError(f"the cached auxiliary images in {target} are of other classes than "
                       f"{source.root} has now; delete that folder to cache them again")
    images = np.load(target / "images.npy", mmap_mode="r")
    labels = np.load(target / "labels.npy")
    return AuxArrays(class_names=source.class_names, images=images, labels=labels,
                     neighbours=source.neighbours)


def _build(source: AuxSource, target: Path, image: "ImageSpec | None") -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        file = tmp / "images.npy"
        if isinstance(source.images, ImageList):
            if image is None:
                raise LfmError("auxiliary images from a folder are cached as the model's "
                               "preprocessing gives them; give image= (the model's ImageSpec)")
            out = np.lib.format.open_memmap(file, mode="w+", dtype=np.uint8,
                                            shape=(len(source.images), image.size, image.size, 3))
            try:
                decode_into(out, source.images, image, "auxiliary images")
            except LfmError as exc:
                raise LfmError(f"aux.root {source.root!r}: {exc}") from None
            out.flush()
            del out
        else:
            images = source.images
            if image is not None and images.shape[1:3] != (image.size, image.size) \
                    and len(images) * image.size * image.size * 3 <= PRE_RESIZE_BYTES:
                images = resize_uint8(images, image.size, image.interpolation)
            np.save(file, np.ascontiguousarray(images, dtype=np.uint8))
        np.save(tmp / "labels.npy", source.labels)
        meta: dict[str, Any] = {"root": source.root, "class_names": source.class_names,
                                "counts": np.bincount(source.labels).tolist()}
        (tmp / "meta.json").write_text(json.dumps(meta))
        if target.exists():  # a folder left without meta.json by an interrupted build
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
