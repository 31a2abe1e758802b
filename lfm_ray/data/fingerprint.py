"""A data set's fingerprint: what its source files are, without reading its images.

The node cache, a training's config.json and a study's record key on it, so a data set whose
files changed in place (images replaced, a split file edited, a CIFAR batch swapped) is
never served from a stale cache nor resumed as if it were the same data. Two kinds of file:

- split and annotation files (ImageNet-LT's and Places-LT's split lists, iNaturalist's JSON
  files, CIFAR's meta file, digits' bundled CSV, fashion-lt's shipped pool and the official
  Fashion-MNIST label files): their bytes are hashed (they are small, and an edit may keep the
  size and the modification time);
- image files (every image a split file lists, every image of a folder set, CIFAR's batch
  files, Fashion-MNIST's official image files): their size and modification time (nanoseconds), as `make` and `rsync` judge a file;
  reading a million images per trial would cost minutes.

Paths enter relative to the data root, so the same files at another root fingerprint the
same; a copy that keeps modification times (rsync -a, aws s3 sync) does too. A file a split
lists that does not exist enters as missing (the data set's own builder then names it).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from lfm_ray.errors import unknown_name

# Bump when what is fingerprinted changes, so no old fingerprint matches a new one.
FINGERPRINT_VERSION = 1
HASHED, STAT = "content", "stat"


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _entry(path: Path, root: Path | None, kind: str) -> list[Any]:
    """[relative path, kind, what of it counts]; a missing file or folder is 'missing'."""
    rel = os.path.relpath(path, root) if root is not None else path.name
    try:
        if path.is_dir():
            return [rel, "folder", "missing"]  # a folder where a file should be
        if kind == HASHED:
            return [rel, kind, _hash_file(path)]
        st = path.stat()
        return [rel, kind, [st.st_size, st.st_mtime_ns]]
    except OSError:
        return [rel, kind, "missing"]


def _digits_files(root: Any, **_: Any) -> Iterator[tuple[Path, str]]:
    from importlib.resources import files

    # scikit-learn's bundled digits: the embedded set's only source.
    yield Path(str(files("sklearn.datasets").joinpath("data", "digits.csv.gz"))), HASHED


def _fashion_files(root: Any, **_: Any) -> Iterator[tuple[Path, str]]:
    from lfm_ray.data import fashion

    if root is None:  # the shipped pool: the embedded set's only source
        for path in fashion.pool_files():
            yield path, HASHED
        return
    for split in fashion.OFFICIAL:
        images, labels = fashion.find_official(Path(root).expanduser(), split)
        yield images, STAT
        yield labels, HASHED


def _cifar_files(name: str):
    def source(root: Any, **_: Any) -> Iterator[tuple[Path, str]]:
        from lfm_ray.data.cifar import LAYOUT

        folder, train_files, test_file, meta_file = LAYOUT[name][:4]
        base = Path(root).expanduser() / folder
        for f in [*train_files, test_file]:
            yield base / f, STAT
        yield base / meta_file, HASHED
    return source


def _split_set_files(name: str):
    def source(root: Any, **_: Any) -> Iterator[tuple[Path, str]]:
        from lfm_ray.data.split_files import SPLIT_SETS, find_split

        prefix = SPLIT_SETS[name][0]
        root_path = Path(root).expanduser()
        for split in ("train", "val", "test"):
            path = find_split(root_path, prefix, split)
            if path is None:
                yield root_path / f"{prefix}_{split}.txt", HASHED  # enters as missing
                continue
            yield path, HASHED
            with path.open(errors="replace") as fh:
                for line in fh:
                    parts = line.strip().rsplit(maxsplit=1)
                    if len(parts) == 2:
                        yield root_path / parts[0].lstrip("/"), STAT
    return source


def _folder_files(root: Any, **_: Any) -> Iterator[tuple[Path, str]]:
    from lfm_ray.data.folder import IMAGE_SUFFIXES

    root_path = Path(root).expanduser()
    for split in ("train", "val", "test"):
        top = root_path / split
        if not top.is_dir():
            continue
        for class_dir in sorted(d for d in top.iterdir() if d.is_dir()):
            for f in sorted(class_dir.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    yield f, STAT


def _inat_files(root: Any, **_: Any) -> Iterator[tuple[Path, str]]:
    from lfm_ray.data.inat import CATEGORIES_FILE, TRAIN_FILE, VAL_FILE

    root_path = Path(root).expanduser()
    yield root_path / CATEGORIES_FILE, HASHED
    for name in (TRAIN_FILE, VAL_FILE):
        path = root_path / name
        yield path, HASHED
        try:
            images = json.loads(path.read_text()).get("images", [])
        except (OSError, ValueError, AttributeError):
            continue  # unreadable: enters by its hash or as missing; the builder names it
        for image in images if isinstance(images, list) else []:
            if isinstance(image, dict) and "file_name" in image:
                yield root_path / str(image["file_name"]).lstrip("/"), STAT


SOURCES = {
    "fashion-lt": _fashion_files,
    "digits-lt": _digits_files,
    "cifar10-lt": _cifar_files("cifar10-lt"),
    "cifar100-lt": _cifar_files("cifar100-lt"),
    "imagenet-lt": _split_set_files("imagenet-lt"),
    "places-lt": _split_set_files("places-lt"),
    "inat2018": _inat_files,
    "folder": _folder_files,
}


def source_entries(name: str, root: Any = None) -> list[list[Any]]:
    """[relative path, kind, hash or (size, mtime_ns) or 'missing'] of every source file of
    data set `name` under `root`, in a stable order."""
    if name not in SOURCES:
        raise unknown_name("data set", name, list(SOURCES))
    # The embedded sets need no root (fashion-lt reads the official files where one is given).
    if name == "digits-lt" or (name == "fashion-lt" and root is None):
        root_path = None
    else:
        if root is None:
            return [["<no data root>", "root", "missing"]]
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            return [[str(root_path), "root", "missing"]]
    return [_entry(path, root_path, kind) for path, kind in SOURCES[name](root)]


def data_fingerprint(name: str, root: Any = None) -> str:
    """A 16-hex-digit hash of data set `name`'s source files under `root` (see the module
    docstring): equal exactly when no split, annotation or image file changed."""
    blob = json.dumps([FINGERPRINT_VERSION, name, source_entries(name, root)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_data_fingerprint(cfg) -> str:
    """The data fingerprint of a RunConfig's data set (cfg.data.name under cfg.data.root);
    builds no cache and decodes no image."""
    return data_fingerprint(cfg.data.name, cfg.data.root)


def _group(rel: str) -> str:
    """The part of a data set a file belongs to, for saying what changed: its top folder
    under the root (train/, val/, test/ of a folder set; an image folder of a split-file
    set), or the file itself at the root."""
    head, sep, _ = str(rel).replace(os.sep, "/").partition("/")
    return head + "/" if sep else head


def fingerprint_summary(name: str, root: Any = None) -> dict[str, Any]:
    """The fingerprint of data set `name` under `root`, with a file count and a hash per
    part of it (`_group`), so a change can be named (`describe_change`)."""
    entries = source_entries(name, root)
    groups: dict[str, list[list[Any]]] = {}
    for entry in entries:
        groups.setdefault(_group(entry[0]), []).append(entry)
    digest = hashlib.sha256(json.dumps([FINGERPRINT_VERSION, name, entries]).encode())
    return {"fingerprint": digest.hexdigest()[:16],
            "parts": {g: {"files": sum(e[2] != "missing" for e in items),
                          "hash": hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]}
                      for g, items in sorted(groups.items())}}


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two `fingerprint_summary` results, in words."""
    a, b = old.get("parts") or {}, new.get("parts") or {}
    said = []
    for part in sorted(set(a) | set(b)):
        if part not in b:
            said.append(f"{part} is gone")
        elif part not in a:
            said.append(f"{part} is new ({b[part]['files']} files)")
        elif a[part] != b[part]:
            n, m = a[part]["files"], b[part]["files"]
            count = (f"{n - m} files fewer ({n} -> {m})" if m < n else
                     f"{m - n} files more ({n} -> {m})" if m > n else f"{n} files")
            said.append(f"{part} changed ({count}; files replaced, renamed or edited)"
                        if m == n else f"{part} changed: {count}")
    if not said:
        said.append(f"fingerprint {old.get('fingerprint')} -> {new.get('fingerprint')}")
    return ", ".join(said)
