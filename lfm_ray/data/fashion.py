"""fashion-lt: Fashion-MNIST (Zalando Research, MIT licence) made long-tailed, with a val split.

Fashion-MNIST holds 70,000 grey 28×28 images of ten kinds of clothing (60,000 for training,
10,000 for testing, balanced), whose classes form confusable groups (tops; footwear): the
situation LFM is built for. The splits are fixed by one rule, whichever files they are read
from:

- every class's official training images are put in one fixed order (a permutation drawn
  with SPLIT_SEED); its first `val_per_class` images are the val split (held out: never
  trained on), the next POOL_TRAIN are the training candidates;
- the training split keeps n_k = int(max_count · (1/γ)^(k/9)) images of class k (CIFAR-LT's
  profile, γ the imbalance factor), drawn with `seed` from the class's candidates (from all
  its remaining images where max_count exceeds POOL_TRAIN);
- the test split is the first `test_per_class` images of each class of the official test set,
  in a fixed order drawn the same way.

The package ships the images this rule needs at its defaults (`lfm_ray/data/fashion_pool/`,
built from the official files by `scripts/build_fashion_pool.py`, in Fashion-MNIST's own IDX
format, gzipped), so the default needs no download. With `root` the official IDX files are
read instead (the Debian package `dataset-fashion-mnist` installs them in
/usr/share/datasets/fashion-mnist; torchvision's FashionMNIST/raw folder holds the same), so
what the pool cannot serve (a larger class, more val or test images) still works; where the
pool can serve a request, both give the same images.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np

from lfm_ray.data.base import LongTailDataset
from lfm_ray.data.counts import long_tail_counts, long_tail_subset
from lfm_ray.errors import LfmError

# The official labels (Fashion-MNIST's README), in label order.
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]
NUM_CLASSES = len(CLASS_NAMES)
# The official file names (also gzipped, as distributed), per split: (images, labels).
OFFICIAL = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
            "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
OFFICIAL_COUNTS = {"train": 6000, "test": 1000}  # images per class
# Where under a data root the files may sit: the root itself, or torchvision's layout.
SUBFOLDERS = ("", "FashionMNIST/raw", "fashion-mnist")
DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"

# The fixed order of each class's images is a permutation drawn with this seed: part of the
# data set's definition (which images are val, which are training candidates, which test).
SPLIT_SEED = 20170828  # Fashion-MNIST's publication date
# What the shipped pool holds per class: val images, training candidates, test images.
POOL_VAL = 100
POOL_TRAIN = 800
POOL_TEST = 500
POOL_PACKAGE = "lfm_ray.data"
POOL_FOLDER = "fashion_pool"
# Defaults: the largest class and γ = 100 give every shot group three or more classes
# (600, 359, 215, 129 | 77, 46, 27 | 16, 10, 6 images: many > 100, few < 20).
DEFAULT_MAX_COUNT = 600
DEFAULT_IMBALANCE = 100.0

# IDX: a big-endian header (two zero bytes, the element type, the number of dimensions, one
# 32-bit size per dimension), then the elements. Only unsigned bytes are used here.
IDX_UBYTE = 0x08


@dataclass(frozen=True)
class Split:
    """One split's images (uint8 (N, 28, 28)), labels and official indices (int64)."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray


# ---- IDX files -------------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """The uint8 array an IDX file (plain or gzipped) holds, checked against its header; a
    missing, truncated or foreign file is one LfmError naming it."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise LfmError(f"{path} does not exist") from None
    except (OSError, EOFError, zlib.error) as exc:
        reason = "it is truncated" if isinstance(exc, EOFError) else str(exc)
        raise LfmError(f"{path} cannot be read as a gzipped IDX file: {reason}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != IDX_UBYTE or raw[3] == 0:
        raise LfmError(f"{path} is not an IDX file of unsigned bytes (its header reads "
                       f"{raw[:4].hex() or 'nothing'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise LfmError(f"{path} is truncated: its header is cut short")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise LfmError(f"{path} is {what}: {len(raw)} bytes where its header "
                       f"({' × '.join(map(str, shape))}) asks for {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """A uint8 array as a gzipped IDX file (reproducible: no time stamp in the gzip header)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes(), compresslevel=9, mtime=0))


def find_official(root: Path, split: str) -> tuple[Path, Path]:
    """(images, labels) files of an official split under `root`, plain or gzipped; where
    neither is there, the gzipped name directly under root (the error names it)."""
    paths = []
    for name in OFFICIAL[split]:
        found = None
        for sub in SUBFOLDERS:
            for candidate in (root / sub / name, root / sub / f"{name}.gz"):
                if candidate.is_file():
                    found = candidate
                    break
            if found:
                break
        paths.append(found or root / f"{name}.gz")
    return paths[0], paths[1]


def read_official(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, 28, 28) images, int64 labels) of an official split under root."""
    images_path, labels_path = find_official(root, split)
    for path in (images_path, labels_path):
        if not path.is_file():
            raise LfmError(f"fashion-lt: {path} does not exist; give as --data-root a folder "
                           f"holding Fashion-MNIST's four IDX files (the Debian package "
                           f"dataset-fashion-mnist installs them in {DEBIAN_ROOT})")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise LfmError(f"{images_path} holds images of shape {images.shape[1:]}; "
                       "Fashion-MNIST's are 28 × 28")
    if labels.ndim != 1 or len(labels) != len(images):
        raise LfmError(f"{labels_path} holds {labels.shape} labels for {len(images)} images "
                       f"in {images_path.name}")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise LfmError(f"{labels_path} holds label {int(labels.max())}; Fashion-MNIST's are "
                       f"0..{NUM_CLASSES - 1}")
    return images, labels.astype(np.int64)


# ---- the rule --------------------------------------------------------------------------------
def class_orders(labels: np.ndarray, split: str) -> list[np.ndarray]:
    """Every class's indices into the official split, in the data set's fixed order."""
    # One generator per split and class, so the order of a class never depends on another.
    salt = {"train": 0, "test": 1}[split]
    return [np.random.default_rng([SPLIT_SEED, salt, k]).permutation(np.flatnonzero(labels == k))
            for k in range(NUM_CLASSES)]


def select(train_orders: list[np.ndarray], test_orders: list[np.ndarray], *, max_count: int,
           imbalance_factor: float, seed: int, val_per_class: int, test_per_class: int
           ) -> dict[str, np.ndarray]:
    """Official indices of each split ({"train", "val", "test"}) by the rule in the module
    docstring, from each class's indices in the fixed order (`class_orders`, or the pool's
    prefixes of them)."""
    window = max(POOL_TRAIN, max_count)
    candidates = [order[val_per_class:val_per_class + window] for order in train_orders]
    counts = long_tail_counts(NUM_CLASSES, imbalance_factor, max_count)
    pool = np.concatenate(candidates)
    labels = np.concatenate([np.full(len(c), k) for k, c in enumerate(candidates)])
    return {"train": pool[long_tail_subset(labels, counts, seed)],
            "val": np.concatenate([order[:val_per_class] for order in train_orders]),
            "test": np.concatenate([order[:test_per_class] for order in test_orders])}


def pool_orders(train_labels: np.ndarray, test_labels: np.ndarray
                ) -> dict[str, list[np.ndarray]]:
    """What the pool keeps of each class's fixed order: every image the defaults or any
    request within POOL_VAL, POOL_TRAIN and POOL_TEST can draw."""
    return {"train": [o[:POOL_VAL + POOL_TRAIN] for o in class_orders(train_labels, "train")],
            "test": [o[:POOL_TEST] for o in class_orders(test_labels, "test")]}


# ---- the shipped pool ------------------------------------------------------------------------
def pool_dir() -> Path:
    return Path(str(files(POOL_PACKAGE).joinpath(POOL_FOLDER)))


def pool_files() -> list[Path]:
    """Every data file of the pool: images, labels and official indices of each split."""
    return [pool_dir() / f"{split}-{kind}.gz" for split in OFFICIAL
            for kind in ("images", "labels", "indices")]


def encode_indices(indices: np.ndarray) -> np.ndarray:
    """Official indices as the pool stores them: (N, 4) big-endian bytes (IDX of bytes)."""
    return np.ascontiguousarray(np.asarray(indices, dtype=">u4")).view(np.uint8).reshape(-1, 4)


def decode_indices(raw: np.ndarray) -> np.ndarray:
    return raw.reshape(-1, 4).astype(np.int64) @ np.array([1 << 24, 1 << 16, 1 << 8, 1])


def read_pool() -> dict[str, Split]:
    """The pool's splits: per class, its first images in the fixed order (class by class)."""
    out = {}
    for split in OFFICIAL:
        base = pool_dir()
        images = read_idx(base / f"{split}-images.gz")
        labels = read_idx(base / f"{split}-labels.gz").astype(np.int64)
        indices = decode_indices(read_idx(base / f"{split}-indices.gz"))
        if not (len(images) == len(labels) == len(indices)):
            raise LfmError(f"the fashion-lt pool in {base} is inconsistent: {split} holds "
                           f"{len(images)} images, {len(labels)} labels, {len(indices)} indices")
        out[split] = Split(images, labels, indices)
    return out


def auxiliary_pool() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, 28, 28) images, labels) the embedded auxiliary sets (fashion-aux) are made
    from: the pool's training candidates, every one of them (never a val or test image;
    training images may appear, transformed, as digits-aux's do)."""
    pool = read_pool()["train"]
    keep = np.concatenate([np.flatnonzero(pool.labels == k)[POOL_VAL:]
                           for k in range(NUM_CLASSES)])
    return pool.images[keep], pool.labels[keep]


def _check(name: str, value, low: int, high: int | None, why: str = "") -> int:
    if isinstance(value, bool) or not float(value).is_integer() or value < low \
            or (high is not None and value > high):
        bound = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
        raise LfmError(f"fashion-lt: {name}={value!r} is not valid; expected {bound}{why}")
    return int(value)


def build_fashion_lt(root=None, imbalance_factor: float = DEFAULT_IMBALANCE,
                     max_count: int = DEFAULT_MAX_COUNT, seed: int = 0,
                     val_per_class: int = POOL_VAL, test_per_class: int = POOL_TEST
                     ) -> LongTailDataset:
    """fashion-lt from the shipped pool (root None) or from the official IDX files under root.

    imbalance_factor γ and max_count (the largest class) set the training counts; `seed`
    draws the training images; val_per_class and test_per_class size the balanced val and
    test splits. The images become uint8 (N, 28, 28, 3), three equal channels."""
    official = OFFICIAL_COUNTS["train"]
    val_per_class = _check("val_per_class", val_per_class, 1, official - 1)
    max_count = _check("max_count", max_count, 1, official - val_per_class,
                       f" (each class has {official} training images, {val_per_class} of "
                       "them val)")
    test_per_class = _check("test_per_class", test_per_class, 1, OFFICIAL_COUNTS["test"])
    if root is None:
        needs = []
        if max_count > POOL_TRAIN:
            needs.append(f"max_count={max_count} (at most {POOL_TRAIN})")
        if val_per_class != POOL_VAL:
            needs.append(f"val_per_class={val_per_class} (the pool's split holds {POOL_VAL})")
        if test_per_class > POOL_TEST:
            needs.append(f"test_per_class={test_per_class} (at most {POOL_TEST})")
        if needs:
            raise LfmError(f"fashion-lt: the shipped pool cannot serve {', '.join(needs)}; "
                           "give the official Fashion-MNIST files as --data-root (the Debian "
                           f"package dataset-fashion-mnist installs them in {DEBIAN_ROOT})")
        pool = read_pool()
        orders = {s: [pool[s].indices[pool[s].labels == k] for k in range(NUM_CLASSES)]
                  for s in OFFICIAL}
        picked = select(orders["train"], orders["test"], max_count=max_count,
                        imbalance_factor=imbalance_factor, seed=seed,
                        val_per_class=val_per_class, test_per_class=test_per_class)
        rows = {s: dict(zip(pool[s].indices.tolist(), range(len(pool[s].indices))))
                for s in OFFICIAL}

        def take(split: str, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            at = np.array([rows[split][int(i)] for i in which], dtype=np.int64)
            return pool[split].images[at], pool[split].labels[at]
    else:
        base = Path(root).expanduser()
        if not base.is_dir():
            raise LfmError(f"fashion-lt: data root {str(base)!r} does not exist; give a folder "
                           f"holding Fashion-MNIST's IDX files (the Debian package "
                           f"dataset-fashion-mnist installs them in {DEBIAN_ROOT}), or no "
                           "root for the shipped pool")
        data = {s: read_official(base, s) for s in OFFICIAL}
        picked = select(class_orders(data["train"][1], "train"),
                        class_orders(data["test"][1], "test"), max_count=max_count,
                        imbalance_factor=imbalance_factor, seed=seed,
                        val_per_class=val_per_class, test_per_class=test_per_class)

        def take(split: str, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return data[split][0][which], data[split][1][which]

    splits = {"train": take("train", picked["train"]), "val": take("train", picked["val"]),
              "test": take("test", picked["test"])}
    rgb = {s: np.repeat(images[..., None], 3, axis=3) for s, (images, _) in splits.items()}
    return LongTailDataset(
        name="fashion-lt", class_names=list(CLASS_NAMES),
        train_images=rgb["train"], train_labels=splits["train"][1],
        val_images=rgb["val"], val_labels=splits["val"][1],
        test_images=rgb["test"], test_labels=splits["test"][1],
    )
