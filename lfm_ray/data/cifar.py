"""cifar10-lt / cifar100-lt from the standard CIFAR python pickles (torchvision's layout).

A pickle names the functions that rebuild its objects, and loading it calls them: a crafted
file in a downloaded data set could run any code. So the files are read by `_CifarUnpickler`,
which admits only what CIFAR files hold (dicts, lists, bytes, str, numbers, numpy arrays,
dtypes and scalars) and refuses any other name before anything is called. It reads both
kinds of file: the official Python-2 pickles (8-bit string keys, numpy.core paths) and files
re-pickled under Python 3 (str keys; numpy 2 writes numpy._core paths).
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from lfm_ray.data.base import LongTailDataset, readable
from lfm_ray.data.counts import long_tail_counts, long_tail_subset
from lfm_ray.errors import LfmError

LAYOUT = {
    # name: (folder, train files, test file, meta file, label key, names key, n_max, URL)
    "cifar10-lt": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                   "test_batch", "batches.meta", "labels", "label_names", 5000,
                   "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100-lt": ("cifar-100-python", ["train"], "test", "meta", "fine_labels",
                    "fine_label_names", 500,
                    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}
ROW_BYTES = 3 * 32 * 32  # one image: 1024 red, then 1024 green, then 1024 blue values


def _admitted() -> dict[tuple[str, str], Any]:
    """The only names a CIFAR file may use: numpy's array, dtype and scalar rebuilders under
    numpy 1's and numpy 2's module paths, and the encoder Python 3 writes bytes with at
    pickle protocol 2."""
    try:
        from numpy._core import multiarray, numeric  # numpy 2
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric
    names: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for core in ("numpy.core", "numpy._core"):
        names[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        names[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        names[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return names


class _Forbidden(pickle.UnpicklingError):
    """A pickle named something a CIFAR file never holds."""


class _CifarUnpickler(pickle.Unpickler):
    admitted = _admitted()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.admitted[(module, name)]
        except KeyError:
            raise _Forbidden(f"{module}.{name}") from None


def _unpickle(path: Path) -> dict[str, Any]:
    """The file's dict, its keys as str (Python-2 files have 8-bit string keys)."""
    try:
        with path.open("rb") as fh:
            # latin1 reads Python 2's 8-bit strings, numpy's array data among them, byte for
            # byte (as numpy and torchvision read these files).
            obj = _CifarUnpickler(fh, encoding="latin1").load()
    except _Forbidden as exc:
        raise LfmError(f"{path} is refused: it names {exc}, which a CIFAR python file never "
                       "holds (only dicts, lists, bytes, str, numbers and numpy arrays), and "
                       "loading it could run code; replace it with the file from the "
                       "official archive") from None
    except Exception as exc:  # a damaged or foreign file can fail in any way while it loads
        raise LfmError(f"{path} is not a CIFAR python pickle: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise LfmError(f"{path} holds a {type(obj).__name__}, not the dict of a CIFAR python file")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _text(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, 32, 32, 3) images, int64 (N,) labels) of one batch file, checked."""
    batch = _unpickle(path)
    for key in ("data", label_key):
        if key not in batch:
            raise LfmError(f"{path} has no {key!r} key; is it a CIFAR python batch file?")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        what = (f"a {data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else f"a {type(data).__name__}")
        raise LfmError(f"{path}: 'data' is {what}; a CIFAR batch holds a uint8 array of one "
                       f"{ROW_BYTES}-byte row per image")
    if data.shape[1] != ROW_BYTES:
        raise LfmError(f"{path}: 'data' rows are {data.shape[1]} bytes long; a CIFAR image is "
                       f"{ROW_BYTES} bytes (3 × 32 × 32)")
    labels = np.asarray(batch[label_key])
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise LfmError(f"{path}: {label_key!r} is not a list of integer labels")
    if len(labels) != len(data):
        raise LfmError(f"{path} holds {len(data)} images but {len(labels)} labels in "
                       f"{label_key!r}; the two must match")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return images, labels.astype(np.int64)


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
    names = meta.get(names_key)
    if not isinstance(names, list) or not names:
        raise LfmError(f"{base / meta_file} has no list of class names under {names_key!r}")
    class_names = [readable(_text(n)) for n in names]
    images, labels = zip(*(_batch(base / f, label_key) for f in train_files))
    train_images, train_labels = np.concatenate(images), np.concatenate(labels)
    test_images, test_labels = _batch(base / test_file, label_key)
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
