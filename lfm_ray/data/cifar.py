"""cifar10-lt / cifar100-lt from the standard CIFAR python pickles (torchvision's layout)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from lfm_ray.data.base import LongTailDataset, readable
from lfm_ray.data.counts import long_tail_counts, long_tail_subset
from lfm_ray.errors import LfmError

LAYOUT = {
    # name: (folder, train files, test file, meta file, label key, names key, n_max, URL)
    "cifar10-lt": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                   "test_batch", "batches.meta", b"labels", b"label_names", 5000,
                   "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100-lt": ("cifar-100-python", ["train"], "test", "meta", b"fine_labels",
                    b"fine_label_names", 500,
                    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            return pickle.load(fh, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise LfmError(f"{path} is not a CIFAR python pickle: {exc}") from None


def _images(batch: dict, path: Path) -> np.ndarray:
    if b"data" not in batch:
        raise LfmError(f"{path} has no b'data' key; is it a CIFAR python batch file?")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def _fetch_hint(name: str, root: Path) -> str:
    return (f"fetch them online with download=True (lfm-ray data {name} --root {root} "
            "--download)")


def _download(name: str, root: Path, url: str) -> None:
    """Fetch and unpack the official archive into root with torchvision (asked for by the
    user with download=True; the only case where anything is written under a data root)."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10-lt" else torchvision.datasets.CIFAR100
    try:
        cls(str(root), train=True, download=True)  # one archive holds train and test
    except (OSError, RuntimeError) as exc:  # offline, refused, or a corrupt archive
        raise LfmError(f"{name}: downloading {url} into {root} failed ({exc}); unpack the "
                       "archive there by hand") from None


def build_cifar_lt(name: str, root=None, imbalance_factor: float = 100.0, seed: int = 0,
                   download: bool = False) -> LongTailDataset:
    folder, train_files, test_file, meta_file, label_key, names_key, n_max, url = LAYOUT[name]
    if root is None:
        raise LfmError(f"{name} needs a data root (--data-root) holding {folder}/")
    root_path = Path(root).expanduser()
    base = root_path / folder
    needed = [base / f for f in [*train_files, test_file, meta_file]]
    if download and not all(p.is_file() for p in needed):
        _download(name, root_path, url)
    if not root_path.is_dir():
        raise LfmError(f"data root {str(root_path)!r} does not exist; create it and unpack "
                       f"{url} there (giving {folder}/), or {_fetch_hint(name, root_path)}")
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise LfmError(f"{name}: missing {missing[0]}; put the CIFAR python files under {base} "
                       f"(unpack {url}) or {_fetch_hint(name, root_path)}")
    meta = _unpickle(base / meta_file)
    if names_key not in meta:
        raise LfmError(f"{base / meta_file} has no {names_key!r} key")
    class_names = [readable(n.decode() if isinstance(n, bytes) else str(n)) for n in meta[names_key]]
    images, labels = [], []
    for f in train_files:
        batch = _unpickle(base / f)
        if label_key not in batch:
            raise LfmError(f"{base / f} has no {label_key!r} key")
        images.append(_images(batch, base / f))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    train_images, train_labels = np.concatenate(images), np.concatenate(labels)
    test = _unpickle(base / test_file)
    if label_key not in test:
        raise LfmError(f"{base / test_file} has no {label_key!r} key")
    test_images = _images(test, base / test_file)
    test_labels = np.asarray(test[label_key], dtype=np.int64)
    C = len(class_names)
    if train_labels.size and (train_labels.min() < 0 or train_labels.max() >= C):
        raise LfmError(f"{base}: training labels range over {train_labels.min()}..{train_labels.max()}, "
                       f"but {meta_file} names {C} classes")
    per_class = np.bincount(train_labels, minlength=C)
    counts = long_tail_counts(C, imbalance_factor, min(n_max, int(per_class.min())))
    keep = long_tail_subset(train_labels, counts, seed)
    return LongTailDataset(
        name=name, class_names=class_names,
        train_images=train_images[keep], train_labels=train_labels[keep],
        test_images=test_images, test_labels=test_labels,
    )
