"""Data layer: the count formula, shot groups, each loader on data fabricated in its real
on-disk format, determinism, the node cache, the `lfm-ray data` command, bad input."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from lfm_ray.cli import main
from lfm_ray.data import (
    ArraySet, ImageList, build_dataset, load_arrays, long_tail_counts, options_for, shot_groups,
)
from lfm_ray.data.split_files import class_names, places365_names
from lfm_ray.errors import LfmError
from lfm_ray.model import ImageSpec


# ---- counts and groups ----------------------------------------------------------------------
@pytest.mark.parametrize("classes,n_max,factor,total", [
    (10, 5000, 10, 20431), (10, 5000, 50, 13996), (10, 5000, 100, 12406),
    (100, 500, 10, 19573), (100, 500, 50, 12608), (100, 500, 100, 10847),
])
def test_long_tail_totals_match_table_7(classes, n_max, factor, total):
    counts = long_tail_counts(classes, factor, n_max)
    assert sum(counts) == total
    assert counts[0] == n_max and counts == sorted(counts, reverse=True)


def test_count_formula_truncates_toward_zero():
    counts = long_tail_counts(10, 100, 5000)
    assert counts == [int(5000 * (1 / 100) ** (k / 9)) for k in range(10)]


def test_shot_groups_at_the_boundaries():
    groups = shot_groups([19, 20, 100, 101, 500, 3])
    assert groups["few"].tolist() == [0, 5]
    assert groups["medium"].tolist() == [1, 2]
    assert groups["many"].tolist() == [3, 4]


# ---- digits-lt ----------------------------------------------------------------------------
def test_digits_lt_works_with_no_files_and_is_long_tailed():
    ds = build_dataset("digits-lt")
    assert ds.class_names[:3] == ["zero", "one", "two"]
    assert ds.train_images.dtype == np.uint8 and ds.train_images.shape[1:] == (8, 8, 3)
    assert ds.class_counts == long_tail_counts(10, 10, max(ds.class_counts))
    assert np.bincount(ds.test_labels).tolist() == [50] * 10  # balanced test set
    assert set(shot_groups(ds.class_counts)) == {"many", "medium", "few"}


def test_digits_lt_max_count_is_the_smallest_remaining_class():
    from sklearn.datasets import load_digits

    smallest = int(np.bincount(load_digits().target).min()) - 50  # 174 - 50 held out
    ds = build_dataset("digits-lt", imbalance_factor=5)
    assert ds.class_counts == long_tail_counts(10, 5, smallest)
    # The images are the bundled ones scaled 0..16 -> 0..255 on three equal channels.
    assert ds.train_images.max() == 255 and np.array_equal(ds.train_images[..., 0],
                                                           ds.train_images[..., 2])
    with pytest.raises(LfmError, match="test_per_class=200 leaves class 0 no training images"):
        build_dataset("digits-lt", test_per_class=200)


def test_digits_lt_is_deterministic_for_a_seed():
    a, b = build_dataset("digits-lt", seed=3), build_dataset("digits-lt", seed=3)
    c = build_dataset("digits-lt", seed=4)
    assert np.array_equal(a.train_images, b.train_images)
    assert not np.array_equal(a.train_images, c.train_images)
    assert a.class_counts == c.class_counts


# ---- CIFAR pickles --------------------------------------------------------------------------
def py2_pickle(obj) -> bytes:
    """obj as Python 2's cPickle wrote the official CIFAR files (protocol 2): str as 8-bit
    strings, a uint8 array through numpy.core.multiarray._reconstruct with numpy 1's dtype
    state. Handles what those files hold: dicts, lists, str, ints and 2-D uint8 arrays."""
    import struct

    def text(s):
        raw = s.encode("latin1") if isinstance(s, str) else bytes(s)
        return (b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<I", len(raw))) + raw

    def integer(n):
        n = int(n)
        if 0 <= n < 256:
            return b"K" + bytes([n])
        if 0 <= n < 65536:
            return b"M" + struct.pack("<H", n)
        return b"J" + struct.pack("<i", n)

    def value(v):
        if isinstance(v, dict):
            return b"}(" + b"".join(value(k) + value(x) for k, x in v.items()) + b"u"
        if isinstance(v, list):
            return b"](" + b"".join(value(x) for x in v) + b"e"
        if isinstance(v, (str, bytes)):
            return text(v)
        if isinstance(v, np.ndarray):
            assert v.dtype == np.uint8 and v.ndim == 2
            dtype = (b"cnumpy\ndtype\n" + text("u1") + integer(0) + integer(1) + b"\x87R"
                     + b"(" + integer(3) + text("|") + b"NNN" + integer(-1) + integer(-1)
                     + integer(0) + b"tb")
            return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n"
                    + integer(0) + b"\x85" + text("b") + b"\x87R"
                    + b"(" + integer(1) + integer(v.shape[0]) + integer(v.shape[1]) + b"\x86"
                    + dtype + b"\x89" + text(v.tobytes()) + b"tb")
        return integer(v)

    return b"\x80\x02" + value(obj) + b"."


# How the files are written: "py2" as the official archive (8-bit string keys), "py3" re-pickled
# under Python 3 with str keys (numpy 2 module paths; protocol 2 writes bytes via _codecs),
# "py3-bytes-keys" as a Python 3 script that loaded them with encoding="bytes" writes them.
KINDS = {
    "py2": py2_pickle,
    "py3": pickle.dumps,
    "py3-protocol-2": lambda obj: pickle.dumps(obj, protocol=2),
    "py3-protocol-5": lambda obj: pickle.dumps(obj, protocol=5),
    "py3-bytes-keys": lambda obj: pickle.dumps(
        {k.encode(): [x.encode() for x in v] if k.endswith("names") else v for k, v in obj.items()}),
}


def write_pickle(path, obj, kind="py2"):
    path.write_bytes(KINDS[kind](obj))


def read_pickle(path):
    """A fabricated file's dict (str keys), read with the plain unpickler."""
    obj = pickle.loads(path.read_bytes(), encoding="latin1")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def write_cifar10(root, per_class=60, test_per_class=5, seed=0, kind="py2"):
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    labels = np.repeat(np.arange(10), per_class)
    rng.shuffle(labels)
    chunks = np.array_split(np.arange(len(labels)), 5)
    for i, idx in enumerate(chunks, start=1):
        write_pickle(base / f"data_batch_{i}", {
            "batch_label": "training batch %d of 5" % i, "labels": labels[idx].tolist(),
            "data": rng.integers(0, 256, (len(idx), 3072), dtype=np.uint8)}, kind)
    test_labels = np.repeat(np.arange(10), test_per_class)
    write_pickle(base / "test_batch", {
        "labels": test_labels.tolist(),
        "data": rng.integers(0, 256, (len(test_labels), 3072), dtype=np.uint8)}, kind)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    write_pickle(base / "batches.meta", {"label_names": names, "num_vis": 3072}, kind)
    return base


def write_cifar100(root, per_class=30, kind="py2"):
    rng = np.random.default_rng(1)
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    labels = np.repeat(np.arange(100), per_class)
    write_pickle(base / "train", {
        "data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
        "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist()}, kind)
    test = np.repeat(np.arange(100), 2)
    write_pickle(base / "test", {
        "data": rng.integers(0, 256, (len(test), 3072), dtype=np.uint8),
        "fine_labels": test.tolist()}, kind)
    names = [f"class_{k}" for k in range(100)]
    names[1] = "aquarium_fish"
    write_pickle(base / "meta", {"fine_label_names": names}, kind)


def test_the_python_2_fabrication_is_a_valid_pickle(tmp_path):
    """py2_pickle's bytes load with the plain unpickler to the very arrays (so the reader's
    tests below read a real pickle), and name numpy 1's module path as the archive does."""
    import pickletools

    data = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
    raw = py2_pickle({"data": data, "labels": [0, 300, 70000], "batch_label": "b"})
    assert pickle.loads(raw, encoding="bytes")[b"labels"] == [0, 300, 70000]
    loaded = pickle.loads(raw, encoding="latin1")
    assert loaded["data"].dtype == np.uint8 and np.array_equal(loaded["data"], data)
    names = [arg for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"]
    assert names == ["numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"]


def test_cifar10_lt_from_the_python_pickles(tmp_path):
    base = write_cifar10(tmp_path)
    ds = build_dataset("cifar10-lt", tmp_path, imbalance_factor=10)
    assert ds.class_counts == long_tail_counts(10, 10, 60)
    assert ds.train_images.shape[1:] == (32, 32, 3) and ds.train_images.dtype == np.uint8
    assert len(ds.test_labels) == 50
    # The channel-first rows of the pickle become HWC images.
    raw = read_pickle(base / "test_batch")
    assert np.array_equal(ds.test_images[0], raw["data"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert ds.test_labels.tolist() == raw["labels"]
    again = build_dataset("cifar10-lt", tmp_path, imbalance_factor=10)
    other = build_dataset("cifar10-lt", tmp_path, imbalance_factor=10, seed=1)
    assert np.array_equal(ds.train_images, again.train_images)
    assert not np.array_equal(ds.train_images, other.train_images)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "py2"])
def test_re_pickled_cifar_files_load_to_the_same_arrays(tmp_path, kind):
    write_cifar10(tmp_path / "official")
    write_cifar10(tmp_path / "other", kind=kind)
    if kind.startswith("py3-protocol") or kind == "py3":
        assert b"numpy._core" in (tmp_path / "other/cifar-10-batches-py/test_batch").read_bytes()
    a = build_dataset("cifar10-lt", tmp_path / "official", imbalance_factor=10)
    b = build_dataset("cifar10-lt", tmp_path / "other", imbalance_factor=10)
    assert a.class_names == b.class_names and a.class_names[1] == "automobile"
    for split in ("train", "test"):
        (ia, la), (ib, lb) = a.split(split), b.split(split)
        assert np.array_equal(ia, ib) and np.array_equal(la, lb) and lb.dtype == np.int64
    write_cifar100(tmp_path / "c100", kind=kind)
    assert build_dataset("cifar100-lt", tmp_path / "c100", imbalance_factor=10).class_names[1] \
        == "aquarium fish"


def test_cifar100_lt_readable_names(tmp_path):
    write_cifar100(tmp_path)
    ds = build_dataset("cifar100-lt", tmp_path, imbalance_factor=10)
    assert ds.class_names[1] == "aquarium fish"
    assert ds.num_classes == 100 and ds.class_counts[0] == 30


class RunsCode:
    """Pickles to a call of `target(*args)`: what a crafted file does while it loads."""

    def __init__(self, target, *args):
        self.target, self.args = target, args

    def __reduce__(self):
        return self.target, self.args


def payloads(marker):
    import builtins
    import os

    return {
        "os.system": RunsCode(os.system, f"touch {marker}"),
        "builtins.exec": RunsCode(builtins.exec, f"open({str(marker)!r}, 'w').write('ran')"),
        "builtins.open": RunsCode(builtins.open, str(marker), "w"),
    }


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec", "builtins.open"])
@pytest.mark.parametrize("file,protocol", [("data_batch_2", 2), ("batches.meta", 5),
                                           ("test_batch", 4)])
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, payload, file, protocol):
    base = write_cifar10(tmp_path / "root")
    marker = tmp_path / "ran"
    crafted = read_pickle(base / file)
    crafted["labels" if "labels" in crafted else "label_names"] = payloads(marker)[payload]
    (base / file).write_bytes(pickle.dumps(crafted, protocol=protocol))
    # The name the pickle holds: os.system is posix.system, open is io.open, and protocol 2
    # writes builtins under its Python 2 name.
    module = {"os.system": r"(posix|nt)\.system", "builtins.exec": r"(builtins|__builtin__)\.exec",
              "builtins.open": r"io\.open"}[payload]
    with pytest.raises(LfmError, match=f"{base / file} is refused: it names {module}, which a "
                                       "CIFAR python file never holds"):
        build_dataset("cifar10-lt", tmp_path / "root", imbalance_factor=10)
    assert not marker.exists()
    # The same file through the plain unpickler does run it: the test's payload is live.
    pickle.loads((base / file).read_bytes())
    assert marker.exists()


def test_malformed_cifar_files_are_refused_naming_the_file(tmp_path):
    base = write_cifar10(tmp_path)

    def refused(needle):
        with pytest.raises(LfmError, match=needle):
            build_dataset("cifar10-lt", tmp_path, imbalance_factor=10)

    write_pickle(base / "batches.meta", ["airplane", "automobile"])
    refused(f"{base / 'batches.meta'} holds a list, not the dict of a CIFAR python file")
    write_pickle(base / "batches.meta", {"num_vis": 3072})
    refused(f"{base / 'batches.meta'} has no list of class names under 'label_names'")
    write_cifar10(tmp_path / "fresh")
    (base / "batches.meta").write_bytes((tmp_path / "fresh/cifar-10-batches-py/batches.meta").read_bytes())

    batch = read_pickle(base / "data_batch_3")
    good = dict(batch)
    write_pickle(base / "data_batch_3", {**batch, "data": batch["data"][:, :3000].copy()})
    refused(f"{base / 'data_batch_3'}: 'data' rows are 3000 bytes long; a CIFAR image is 3072")
    write_pickle(base / "data_batch_3", {**batch, "data": [[0] * 3072]})
    refused(f"{base / 'data_batch_3'}: 'data' is a list; a CIFAR batch holds a uint8 array")
    write_pickle(base / "data_batch_3", good)

    test = read_pickle(base / "test_batch")
    write_pickle(base / "test_batch", {**test, "labels": test["labels"][:-1]})
    refused(f"{base / 'test_batch'} holds 50 images but 49 labels in 'labels'")
    write_pickle(base / "test_batch", {**test, "labels": test["labels"] + [3]})
    refused(f"{base / 'test_batch'} holds 50 images but 51 labels in 'labels'")
    write_pickle(base / "test_batch", {"labels": test["labels"]})
    refused(f"{base / 'test_batch'} has no 'data' key")
    (base / "test_batch").write_bytes(b"\x80\x02}q\x00(X")  # cut short
    refused(f"{base / 'test_batch'} is not a CIFAR python pickle")


def test_cifar_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(LfmError, match="cifar-10-batches-py.*cifar-10-python.tar.gz"):
        build_dataset("cifar10-lt", tmp_path)
    base = write_cifar10(tmp_path / "x")
    (base / "data_batch_3").unlink()
    with pytest.raises(LfmError, match="missing .*data_batch_3"):
        build_dataset("cifar10-lt", tmp_path / "x")


def test_a_class_left_empty_is_an_error(tmp_path):
    write_cifar10(tmp_path, per_class=60)
    with pytest.raises(LfmError, match="class 9 .*no training images"):
        build_dataset("cifar10-lt", tmp_path, imbalance_factor=100)  # 60/100 -> 0


def test_cifar_labels_out_of_range_and_no_root(tmp_path):
    base = write_cifar10(tmp_path)
    batch = read_pickle(base / "data_batch_2")
    batch["labels"][0] = 10
    write_pickle(base / "data_batch_2", batch)
    with pytest.raises(LfmError, match="labels range over 0..10, but batches.meta names 10"):
        build_dataset("cifar10-lt", tmp_path, imbalance_factor=10)
    with pytest.raises(LfmError, match="cifar100-lt needs a data root"):
        build_dataset("cifar100-lt")


def test_cifar_download_goes_through_torchvision(tmp_path, monkeypatch):
    import torchvision

    calls = []

    class FakeCIFAR10:  # stands in for the network: writes the files the archive holds
        def __init__(self, root, train, download):
            calls.append((root, download))
            write_cifar10(__import__("pathlib").Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    ds = build_dataset("cifar10-lt", tmp_path, imbalance_factor=10, download=True)
    assert calls == [(str(tmp_path), True)] and ds.num_classes == 10
    build_dataset("cifar10-lt", tmp_path, imbalance_factor=10, download=True)
    assert len(calls) == 1  # files present: nothing fetched again

    def offline(root, train, download):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(LfmError, match="downloading .*cifar-100-python.tar.gz .*unreachable"):
        build_dataset("cifar100-lt", tmp_path / "new", download=True)


# ---- split files ----------------------------------------------------------------------------
def write_split_set(root, prefix="ImageNet_LT", classes=1000, bad_line=None):
    """Real layout: split/<wnid>/<file>.JPEG, one line per image. Every class gets at least
    one training image (as in the real release); classes 0..2 get more."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train_counts = [5, 3] + [1] * (classes - 2)
    for split, per_class in (("train", train_counts), ("val", [1, 1, 1]), ("test", [2, 2, 2])):
        lines = []
        for k, n in enumerate(per_class):
            for i in range(n):
                rel = f"{split}/n{k:08d}/img_{i}.JPEG"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(
                    root / rel, format="JPEG")
                lines.append(f"{rel} {k}")
        if bad_line and split == "train":
            lines.insert(1, bad_line)
        (root / f"{prefix}_{split}.txt").write_text("\n".join(lines) + "\n")


def test_imagenet_lt_split_files_and_lazy_images(tmp_path):
    write_split_set(tmp_path)
    ds = build_dataset("imagenet-lt", tmp_path)
    assert isinstance(ds.train_images, ImageList) and len(ds.train_images) == 1006
    assert ds.class_counts[:3] == [5, 3, 1] and ds.num_classes == 1000
    image = ds.train_images.load(0)
    assert image.dtype == np.uint8 and image.shape == (12, 10, 3)
    assert ds.val_images is not None and len(ds.val_labels) == 3


@pytest.mark.parametrize("line,needle", [
    ("only_a_path", "line 2: expected 'relative/path label'"),
    ("train/x.JPEG seven", "line 2: label 'seven' is not an integer"),
    ("train/n00000000/img_0.JPEG 5000", "line 2: label 5000 is out of range"),
    ("train/missing.JPEG 0", "line 2: image .*missing.JPEG does not exist"),
])
def test_split_file_errors_name_file_and_line(tmp_path, line, needle):
    write_split_set(tmp_path, prefix="Places_LT", classes=365, bad_line=line)
    with pytest.raises(LfmError, match=f"Places_LT_train.txt, {needle}"):
        build_dataset("places-lt", tmp_path)


def test_split_set_missing_files(tmp_path):
    with pytest.raises(LfmError, match="missing .*ImageNet_LT_train.txt"):
        build_dataset("imagenet-lt", tmp_path)
    with pytest.raises(LfmError, match="does not exist"):
        build_dataset("imagenet-lt", tmp_path / "nowhere")


def test_split_files_in_a_subfolder_of_the_root(tmp_path):
    write_split_set(tmp_path, prefix="Places_LT", classes=365)
    (tmp_path / "Places_LT_v2").mkdir()
    for split in ("train", "val", "test"):
        (tmp_path / f"Places_LT_{split}.txt").rename(tmp_path / "Places_LT_v2" / f"Places_LT_{split}.txt")
    ds = build_dataset("places-lt", tmp_path)
    assert ds.num_classes == 365 and ds.class_names[0] == "airfield"
    assert ds.test_images.paths[0] == str(tmp_path / "test/n00000000/img_0.JPEG")
    (tmp_path / "Places_LT_v2" / "Places_LT_test.txt").unlink()
    with pytest.raises(LfmError, match="missing .*Places_LT_test.txt .*OpenLongTailRecognition"):
        build_dataset("places-lt", tmp_path)


def test_shipped_class_names():
    imagenet, places = class_names("imagenet-lt"), class_names("places-lt")
    assert len(imagenet) == 1000 and imagenet[0] == "tench"
    # Places-LT: a name for each of the 365 classes, from the shipped official category list.
    assert len(places) == len(set(places)) == 365 and all(places)
    assert all("_" not in n and "/" not in n and n == n.strip() for n in places)
    with pytest.raises(LfmError, match="unknown split-file data set 'places.txt'"):
        class_names("places.txt")


def test_places_names_follow_the_rule():
    """Drop the leading '/<letter>/', read '/' and '_' as spaces; the list's own spelling
    stays. Spot checks of lines the rule changes, the names written out by hand."""
    places = class_names("places-lt")
    expected = {
        0: "airfield",                          # /a/airfield 0
        8: "apartment building outdoor",        # /a/apartment_building/outdoor 8
        13: "archaelogical excavation",         # /a/archaelogical_excavation 13
        22: "artists loft",                     # /a/artists_loft 22
        31: "bakery shop",                      # /b/bakery/shop 31
        89: "childs room",                      # /c/childs_room 89
        116: "desert sand",                     # /d/desert/sand 116
        313: "stadium football",                # /s/stadium/football 313
        342: "underwater ocean deep",           # /u/underwater/ocean_deep 342
        364: "zen garden",                      # /z/zen_garden 364
    }
    assert {k: places[k] for k in expected} == expected


def test_places_names_are_in_index_order_and_bad_lines_are_refused():
    lines = ["/b/bakery/shop 1", "/a/apartment_building/outdoor 2", "/a/airfield 0"]
    assert places365_names("\n".join(lines) + "\n") == [
        "airfield", "bakery shop", "apartment building outdoor"]
    with pytest.raises(LfmError, match="line 2: expected '/<letter>/<category> <index>'"):
        places365_names("/a/airfield 0\nairfield 1")
    with pytest.raises(LfmError, match="indices are not 0..N-1"):
        places365_names("/a/airfield 0\n/a/alley 2")


# ---- folder -------------------------------------------------------------------------------
def write_folder(root):
    for split, n in (("train", {"sea_lion": 6, "red-fox": 2}), ("test", {"sea_lion": 2, "red-fox": 2})):
        for cls, count in n.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((6, 6, 3), i * 20, dtype=np.uint8)).save(d / f"{i}.png")


def test_folder_layout(tmp_path):
    write_folder(tmp_path)
    ds = build_dataset("folder", tmp_path)
    assert ds.class_names == ["red fox", "sea lion"]
    assert ds.class_counts == [2, 6] and ds.val_images is None
    with pytest.raises(LfmError, match="no validation split"):
        ds.split("val")
    with pytest.raises(LfmError, match="missing .*train"):
        build_dataset("folder", tmp_path / "empty")


def test_folder_made_long_tailed_with_val_split(tmp_path):
    for split, per_class in (("train", 8), ("val", 1), ("test", 2)):
        for cls in ("ant", "bee", "cow"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((5, 7, 3), i, dtype=np.uint8)).save(d / f"{i}.png")
    ds = build_dataset("folder", tmp_path, imbalance_factor=4, seed=0)
    assert ds.class_counts == long_tail_counts(3, 4, 8) == [8, 4, 2]
    assert len(ds.val_labels) == 3 and ds.split("val")[0].load(0).shape == (5, 7, 3)
    again = build_dataset("folder", tmp_path, imbalance_factor=4, seed=0)
    other = build_dataset("folder", tmp_path, imbalance_factor=4, seed=1)
    assert again.train_images.paths == ds.train_images.paths
    assert other.train_images.paths != ds.train_images.paths
    assert build_dataset("folder", tmp_path).class_counts == [8, 8, 8]  # as is by default


def test_folder_bad_input(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "test" / "sea_loin").mkdir()
    with pytest.raises(LfmError, match="sea_loin is not a class of .*train"):
        build_dataset("folder", tmp_path)
    (tmp_path / "test" / "sea_loin").rmdir()
    (tmp_path / "train" / "walrus").mkdir()  # a class with no training images
    with pytest.raises(LfmError, match="class 2 \\('walrus'\\) has no training images"):
        build_dataset("folder", tmp_path)
    (tmp_path / "train" / "walrus").rmdir()
    (tmp_path / "train" / "sea_lion" / "0.png").write_bytes(b"not a png")
    ds = build_dataset("folder", tmp_path)
    with pytest.raises(LfmError, match="cannot read image .*0.png"):
        ds.train_images.load(ds.train_images.paths.index(str(tmp_path / "train/sea_lion/0.png")))


# ---- the node cache -------------------------------------------------------------------------
def test_load_arrays_builds_once_and_memory_maps(tmp_path):
    a = load_arrays("digits-lt", cache_dir=tmp_path, seed=0)
    assert isinstance(a, ArraySet) and isinstance(a.train_images, np.memmap)
    built = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    stamp = (tmp_path / built[0] / "train_images.npy").stat().st_mtime_ns
    b = load_arrays("digits-lt", cache_dir=tmp_path, seed=0)
    assert (tmp_path / built[0] / "train_images.npy").stat().st_mtime_ns == stamp  # not rebuilt
    assert np.array_equal(a.train_images, b.train_images)
    assert np.array_equal(a.train_images, build_dataset("digits-lt", seed=0).train_images)


def spec(size=16, resize_mode="shortest", interpolation="bicubic", fill_color=0,
         mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28)):
    return ImageSpec(size, mean, std, resize_mode=resize_mode, interpolation=interpolation,
                     fill_color=fill_color)


def test_load_arrays_resizes_lazy_sets_once(tmp_path):
    write_split_set(tmp_path / "data")
    a = load_arrays("imagenet-lt", root=tmp_path / "data", image=spec(16), cache_dir=tmp_path / "c")
    assert a.train_images.shape == (1006, 16, 16, 3) and a.val_images.shape == (3, 16, 16, 3)
    with pytest.raises(LfmError, match="give image= \\(the model's ImageSpec"):
        load_arrays("imagenet-lt", root=tmp_path / "data", cache_dir=tmp_path / "c2")
    with pytest.raises(TypeError, match="image= takes the model's ImageSpec"):
        load_arrays("imagenet-lt", root=tmp_path / "data", image=16, cache_dir=tmp_path / "c3")


def write_mixed_images(root):
    """A folder set of non-square (and one square, one small) JPEGs and PNGs in the colour
    modes real data sets hold: RGB, greyscale, RGBA, palette."""
    rng = np.random.default_rng(7)

    def picture(w, h, channels=3):
        y, x = np.mgrid[:h, :w]  # smooth shapes plus noise, like a photograph's detail
        base = np.stack([(x * 255 / w), (y * 255 / h), ((x + y) * 127 / (w + h))], -1)
        noise = rng.normal(0, 25, (h, w, 3))
        return np.clip(base + noise, 0, 255).astype(np.uint8)[..., :channels].squeeze()

    files = {
        "train/ant/wide.jpg": Image.fromarray(picture(37, 23)),
        "train/ant/tall.png": Image.fromarray(picture(20, 41)),
        "train/ant/grey.png": Image.fromarray(picture(30, 18, 1), mode="L"),
        "train/bee/alpha.png": Image.fromarray(np.dstack([picture(19, 33), picture(19, 33, 1)]), "RGBA"),
        "train/bee/palette.png": Image.fromarray(picture(50, 30)).convert("P", palette=Image.ADAPTIVE),
        "train/bee/square.jpg": Image.fromarray(picture(24, 24)),
        "train/bee/small.jpg": Image.fromarray(picture(11, 15)),
        "test/ant/0.jpg": Image.fromarray(picture(40, 25)),
        "test/bee/0.png": Image.fromarray(picture(25, 40)),
    }
    for rel, im in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        im.save(root / rel)


def open_clip_pixels(path, image):
    """open_clip's own evaluation transform for `image`, up to (not including) ToTensor."""
    import itertools

    import open_clip
    from torchvision.transforms import ToTensor

    transform = open_clip.image_transform(
        image.size, is_train=False, mean=image.mean, std=image.std,
        resize_mode=image.resize_mode, interpolation=image.interpolation,
        fill_color=image.fill_color)
    steps = list(itertools.takewhile(lambda t: not isinstance(t, ToTensor), transform.transforms))
    assert 0 < len(steps) == len(transform.transforms) - 2  # all but ToTensor and Normalize
    with Image.open(path) as im:
        for step in steps:
            im = step(im)
        return np.asarray(im)


@pytest.mark.parametrize("resize_mode,interpolation,fill_color", [
    ("shortest", "bicubic", 0), ("shortest", "bilinear", 0), ("longest", "bicubic", 0),
    ("longest", "bilinear", 200), ("squash", "bicubic", 0), ("squash", "bilinear", 0),
])
def test_cached_images_are_open_clips_preprocessing(tmp_path, resize_mode, interpolation,
                                                    fill_color):
    """The exact path equals open_clip's preprocessing of every file before ToTensor and
    Normalize, to the uint8 (tolerance 0); the cache holds the default path's pixels, which
    are the exact ones but for JPEGs (pinned within rounding by the draft and PyTorch-resize
    tests)."""
    from lfm_ray.data.preprocess import preprocess_file

    write_mixed_images(tmp_path / "data")
    image = spec(24, resize_mode, interpolation, fill_color)
    arrays = load_arrays("folder", root=tmp_path / "data", image=image, cache_dir=tmp_path / "c")
    ds = build_dataset("folder", tmp_path / "data")
    for split in ("train", "test"):
        cached, paths = arrays.split(split)[0], ds.split(split)[0].paths
        assert cached.shape == (len(paths), 24, 24, 3)
        for i, path in enumerate(paths):
            reference = open_clip_pixels(path, image)
            assert np.array_equal(preprocess_file(path, image, exact=True), reference), path
            assert np.array_equal(cached[i], preprocess_file(path, image)), path
            if not path.lower().endswith((".jpg", ".jpeg")):
                assert np.array_equal(cached[i], reference), path
    meta = json.loads(next((tmp_path / "c").glob("folder-*/meta.json")).read_text())
    assert meta["preprocessing"] == {"size": 24, "resize_mode": resize_mode,
                                     "interpolation": interpolation, "fill_color": fill_color}


def test_the_resize_mode_decides_the_pixels(tmp_path):
    """The centre crop keeps the middle of a wide image at its own aspect; a squash does not;
    'longest' pads it with the fill colour above and below."""
    write_mixed_images(tmp_path / "data")
    ds = build_dataset("folder", tmp_path / "data")
    wide = ds.train_images.paths.index(str(tmp_path / "data/train/ant/wide.jpg"))
    got = {mode: load_arrays("folder", root=tmp_path / "data", cache_dir=tmp_path / "c",
                             image=spec(24, mode, fill_color=9)).train_images[wide]
           for mode in ("shortest", "longest", "squash")}
    assert not np.array_equal(got["shortest"], got["squash"])
    # 37 × 23 → longest side 24: 24 × round(23 · 24 / 37) = 24 × 15, padded by 4 above, 5 below.
    assert (got["longest"][:4] == 9).all() and (got["longest"][-5:] == 9).all()
    assert not (got["longest"][4:-5] == 9).all()
    assert len([p for p in (tmp_path / "c").iterdir() if not p.name.startswith(".")]) == 3


def test_cache_keys_on_the_preprocessing_not_on_mean_and_std(tmp_path, monkeypatch):
    import lfm_ray.data.cache as cache

    def folders():
        return sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))

    load_arrays("digits-lt", image=spec(16), cache_dir=tmp_path)
    load_arrays("digits-lt", image=spec(16, mean=(0.5,) * 3, std=(0.5,) * 3), cache_dir=tmp_path)
    assert len(folders()) == 1
    load_arrays("digits-lt", image=spec(16, interpolation="bilinear"), cache_dir=tmp_path)
    load_arrays("digits-lt", image=spec(16, resize_mode="squash"), cache_dir=tmp_path)
    load_arrays("digits-lt", image=spec(16, resize_mode="longest", fill_color=3), cache_dir=tmp_path)
    assert len(folders()) == 4
    # The format is part of the key, so a cache of an older format (squashed) is never reused.
    key = cache.cache_key("digits-lt", None, spec(16), {"seed": 0})
    monkeypatch.setattr(cache, "CACHE_FORMAT", cache.CACHE_FORMAT - 1)
    assert cache.cache_key("digits-lt", None, spec(16), {"seed": 0}) != key


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_in_memory_sets_are_stored_resized_as_torchvision_resizes(tmp_path, interpolation):
    """digits (8 px, square) pre-resized into the cache: torchvision's Resize of each image as
    a PIL image, which is what open_clip's transform does to it (tolerance 0)."""
    from torchvision.transforms import InterpolationMode, Resize

    arrays = load_arrays("digits-lt", image=spec(32, interpolation=interpolation),
                         cache_dir=tmp_path)
    native = build_dataset("digits-lt").test_images
    resize = Resize(32, interpolation=InterpolationMode(interpolation))
    want = np.stack([np.asarray(resize(Image.fromarray(im))) for im in native])
    assert arrays.test_images.shape == (500, 32, 32, 3)
    assert np.array_equal(arrays.test_images, want)


def test_load_arrays_keys_on_resolved_options(tmp_path):
    load_arrays("digits-lt", cache_dir=tmp_path)
    load_arrays("digits-lt", cache_dir=tmp_path, seed=0, imbalance_factor=10)  # the defaults
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 1
    load_arrays("digits-lt", cache_dir=tmp_path, seed=1)
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2
    with pytest.raises(LfmError, match="takes no option 'sed'"):
        load_arrays("digits-lt", cache_dir=tmp_path / "never", sed=1)
    assert not (tmp_path / "never").exists()


def test_concurrent_load_arrays_build_once(tmp_path, monkeypatch):
    import threading
    import time

    import lfm_ray.data.registry as data

    real, builds = data.build_dataset, []

    def slow_build(*args, **kwargs):
        builds.append(1)
        time.sleep(0.3)  # both callers arrive while the first one builds
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "build_dataset", slow_build)
    results = [None, None]

    def trial(i):
        results[i] = load_arrays("digits-lt", cache_dir=tmp_path, seed=2)

    threads = [threading.Thread(target=trial, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert np.array_equal(results[0].train_labels, results[1].train_labels)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".building-")]


def test_a_bad_image_stops_the_cache_build_and_leaves_nothing(tmp_path):
    write_folder(tmp_path / "data")
    (tmp_path / "data" / "test" / "red-fox" / "1.png").write_bytes(b"truncated")
    with pytest.raises(LfmError, match="cannot read image .*red-fox/1.png"):
        load_arrays("folder", root=tmp_path / "data", image=spec(8), cache_dir=tmp_path / "c")
    assert not [p for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")]


def test_nothing_is_written_to_the_data_root(tmp_path):
    write_cifar10(tmp_path / "root")
    before = sorted(p.name for p in (tmp_path / "root").rglob("*"))
    load_arrays("cifar10-lt", root=tmp_path / "root", cache_dir=tmp_path / "cache",
                imbalance_factor=10)
    assert sorted(p.name for p in (tmp_path / "root").rglob("*")) == before


# ---- names and options ----------------------------------------------------------------------
def test_unknown_name_option_and_bad_factor():
    with pytest.raises(LfmError, match="unknown data set 'mnist'; known: cifar10-lt"):
        build_dataset("mnist")
    with pytest.raises(LfmError, match="takes no option 'download'; accepted: imbalance_factor"):
        build_dataset("digits-lt", download=True)
    with pytest.raises(LfmError, match="imbalance_factor=0.5"):
        build_dataset("digits-lt", imbalance_factor=0.5)
    assert options_for("imagenet-lt", seed=1, imbalance_factor=None) == {}


# ---- the command ----------------------------------------------------------------------------
def test_data_command_prints_the_table(capsys):
    assert main(["data", "digits-lt"]) == 0
    out = capsys.readouterr().out
    assert "nine" in out and "imbalance ratio" in out and "few" in out


def test_data_command_bad_name_is_one_line_exit_2(capsys):
    assert main(["data", "mnist"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown data set 'mnist'" in err and "Traceback" not in err


def test_data_command_flags(tmp_path, capsys):
    write_cifar10(tmp_path)
    assert main(["data", "cifar10-lt", "--data-root", str(tmp_path), "--imbalance-factor", "10",
                 "--data.seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "airplane" in out and f"training images {sum(long_tail_counts(10, 10, 60))}" in out
    assert main(["data", "imagenet-lt", "--root", str(tmp_path), "--data.seed", "1"]) == 2
    assert "takes no option 'seed'; accepted: none" in capsys.readouterr().err
    assert main(["data", "digits-lt", "--imbalance-factor", "0.5"]) == 2
    assert "imbalance_factor=0.5" in capsys.readouterr().err


def test_a_killed_cache_build_continues_where_it_stopped(tmp_path, monkeypatch):
    """A build that stops half-way (here: the process interrupted after some images) keeps
    its progress; the next build decodes only the rest and gives the same cache as one
    uninterrupted build."""
    import lfm_ray.data.cache as cache

    write_mixed_images(tmp_path / "data")
    image = spec(16)
    whole = load_arrays("folder", root=tmp_path / "data", image=image, cache_dir=tmp_path / "a")
    monkeypatch.setattr(cache, "PROGRESS_EVERY", 2)
    real, decoded = cache.preprocess_file, []

    def stops_after_three(path, img):
        if len(decoded) == 3:
            raise KeyboardInterrupt  # as a kill would, mid-build
        decoded.append(path)
        return real(path, img)

    monkeypatch.setattr(cache, "preprocess_file", stops_after_three)
    with pytest.raises(KeyboardInterrupt):
        load_arrays("folder", root=tmp_path / "data", image=image, cache_dir=tmp_path / "b")
    assert [p.name for p in (tmp_path / "b").iterdir() if p.name.startswith(".building-")]
    first = list(decoded)
    decoded.clear()
    monkeypatch.setattr(cache, "preprocess_file", lambda path, img: (decoded.append(path),
                                                                     real(path, img))[1])
    again = load_arrays("folder", root=tmp_path / "data", image=image, cache_dir=tmp_path / "b")
    assert not set(first[:2]) & set(decoded)  # the recorded images were not decoded again
    for split in ("train", "test"):
        assert np.array_equal(again.split(split)[0], whole.split(split)[0])
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".building-")]


def test_torch_resize_of_jpegs_is_within_one_level_of_pillows(tmp_path):
    """The default path resizes an RGB or greyscale JPEG with PyTorch's uint8 kernel: every
    resize mode and filter within one level of open_clip's Pillow calls, on under 2 % of the
    pixels; a PNG and an upscaled JPEG take Pillow's path, exactly."""
    from PIL import Image

    from lfm_ray.data.preprocess import preprocess_file

    rng = np.random.default_rng(1)
    smooth = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize(
        (500, 375), Image.Resampling.BICUBIC)
    noise = Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
    for name, im in (("smooth", smooth), ("noise", noise), ("grey", smooth.convert("L"))):
        im.save(tmp_path / f"{name}.jpg", quality=90)
    smooth.save(tmp_path / "smooth.png")
    smooth.resize((40, 30)).save(tmp_path / "tiny.jpg")
    for name in ("smooth", "noise", "grey"):
        for mode in ("shortest", "longest", "squash"):
            for interpolation in ("bicubic", "bilinear"):
                image = spec(224, resize_mode=mode, interpolation=interpolation)
                fast = preprocess_file(str(tmp_path / f"{name}.jpg"), image).astype(int)
                exact = preprocess_file(str(tmp_path / f"{name}.jpg"), image, exact=True)
                diff = np.abs(fast - exact)
                assert diff.max() <= 1 and (diff > 0).mean() < 0.02, (name, mode, interpolation)
    for name in ("smooth.png", "tiny.jpg"):
        assert np.array_equal(preprocess_file(str(tmp_path / name), spec(224)),
                              preprocess_file(str(tmp_path / name), spec(224), exact=True))


def test_simplejpeg_decodes_the_pixels_pillow_decodes(tmp_path):
    """The fast path's decoder gives Pillow's decode exactly: baseline and progressive,
    4:2:0, 4:2:2 and 4:4:4 chroma, restart markers, greyscale, odd sizes."""
    from lfm_ray.data.preprocess import decode_jpeg

    rng = np.random.default_rng(2)
    smooth = Image.fromarray(rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)).resize(
        (333, 251), Image.Resampling.BICUBIC)
    noisy = Image.fromarray(np.clip(np.asarray(smooth).astype(int)
                                    + rng.integers(-20, 21, (251, 333, 3)), 0, 255)
                            .astype(np.uint8))
    cases = {"baseline": {}, "progressive": {"progressive": True},
             "s444": {"subsampling": 0}, "s422": {"subsampling": 1},
             "restart": {"restart_marker_blocks": 4}, "q60": {"quality": 60}}
    for name, options in cases.items():
        for kind, im in (("smooth", smooth), ("noisy", noisy), ("grey", noisy.convert("L"))):
            path = tmp_path / f"{name}-{kind}.jpg"
            im.save(path, **({"quality": 90} | options))
            with Image.open(path) as pil:
                mode, reference = pil.mode, np.asarray(pil)
            pixels = decode_jpeg(str(path), mode)
            assert pixels.dtype == np.uint8, (name, kind)
            assert np.array_equal(pixels if mode == "RGB" else pixels[..., 0], reference), \
                (name, kind)


def test_a_truncated_jpeg_names_itself_on_both_paths(tmp_path):
    """A JPEG whose header reads but whose data stops short is refused with its path, on the
    fast path (simplejpeg, strict) as on the exact one (Pillow)."""
    from lfm_ray.data.preprocess import preprocess_file

    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(
        tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    for exact in (False, True):
        with pytest.raises(LfmError, match="cannot read image .*cut.jpg"):
            preprocess_file(str(tmp_path / "cut.jpg"), spec(224), exact=exact)


def test_the_build_gives_the_same_cache_on_one_thread_and_on_several(tmp_path):
    """decode_into on this thread and on a pool, in runs of images, writes the same rows as
    preprocess_file one image at a time, and marks every row done."""
    from lfm_ray.data.base import ImageList
    from lfm_ray.data.cache import DECODE_RUN, decode_into
    from lfm_ray.data.preprocess import preprocess_file

    rng = np.random.default_rng(4)
    paths = []
    for i in range(2 * DECODE_RUN + 3):  # two full runs and a short one
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    image = spec(32)
    expected = np.stack([preprocess_file(p, image) for p in paths])
    for threads in (1, 3):
        out, done = np.zeros_like(expected), np.zeros(len(paths), dtype=bool)
        done[5] = True  # recorded by an earlier build: left as it is
        decode_into(out, ImageList(paths), image, "test", done, threads=threads)
        assert done.all()
        assert not out[5].any()
        assert np.array_equal(np.delete(out, 5, axis=0), np.delete(expected, 5, axis=0))


def test_jpeg_draft_decoding_stays_within_rounding_of_the_full_decode(tmp_path):
    """A JPEG at least four times the size it is resized to is decoded at a reduced scale;
    the pixels stay within a mean absolute difference of 2 levels of the exact path (and a
    smaller JPEG is decoded in full: only the resize's one-level rounding remains)."""
    from PIL import Image

    from lfm_ray.data.preprocess import preprocess_file

    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize(
        (1200, 900), Image.Resampling.BICUBIC)
    noise = Image.fromarray(rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8))
    small = smooth.resize((120, 90))
    for name, im in (("smooth", smooth), ("noise", noise), ("small", small)):
        im.save(tmp_path / f"{name}.jpg", quality=90)
    image = spec(64)
    for name in ("smooth", "noise"):
        fast = preprocess_file(str(tmp_path / f"{name}.jpg"), image).astype(int)
        exact = preprocess_file(str(tmp_path / f"{name}.jpg"), image, exact=True).astype(int)
        assert fast.shape == exact.shape == (64, 64, 3)
        assert 0 < np.abs(fast - exact).mean() < 2.0, name  # drafted, within rounding
    small_path = str(tmp_path / "small.jpg")
    assert np.abs(preprocess_file(small_path, image).astype(int)
                  - preprocess_file(small_path, image, exact=True)).max() <= 1
