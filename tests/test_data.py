"""Data layer: the count formula, shot groups, each loader on data fabricated in its real
on-disk format, determinism, the node cache, the `lfm-ray data` command, bad input."""

from __future__ import annotations

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
def write_cifar10(root, per_class=60, test_per_class=5, seed=0):
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    labels = np.repeat(np.arange(10), per_class)
    rng.shuffle(labels)
    chunks = np.array_split(np.arange(len(labels)), 5)
    for i, idx in enumerate(chunks, start=1):
        batch = {b"data": rng.integers(0, 256, (len(idx), 3072), dtype=np.uint8),
                 b"labels": labels[idx].tolist(), b"batch_label": b"training batch"}
        (base / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test_labels = np.repeat(np.arange(10), test_per_class)
    test = {b"data": rng.integers(0, 256, (len(test_labels), 3072), dtype=np.uint8),
            b"labels": test_labels.tolist()}
    (base / "test_batch").write_bytes(pickle.dumps(test))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return base


def write_cifar100(root, per_class=30):
    rng = np.random.default_rng(1)
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    labels = np.repeat(np.arange(100), per_class)
    (base / "train").write_bytes(pickle.dumps({
        b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
        b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist()}))
    test = np.repeat(np.arange(100), 2)
    (base / "test").write_bytes(pickle.dumps({
        b"data": rng.integers(0, 256, (len(test), 3072), dtype=np.uint8),
        b"fine_labels": test.tolist()}))
    names = [f"class_{k}".encode() for k in range(100)]
    names[1] = b"aquarium_fish"
    (base / "meta").write_bytes(pickle.dumps({b"fine_label_names": names}))


def test_cifar10_lt_from_the_python_pickles(tmp_path):
    base = write_cifar10(tmp_path)
    ds = build_dataset("cifar10-lt", tmp_path, imbalance_factor=10)
    assert ds.class_counts == long_tail_counts(10, 10, 60)
    assert ds.train_images.shape[1:] == (32, 32, 3) and ds.train_images.dtype == np.uint8
    assert len(ds.test_labels) == 50
    # The channel-first rows of the pickle become HWC images.
    raw = pickle.loads((base / "test_batch").read_bytes())
    assert np.array_equal(ds.test_images[0], raw[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    again = build_dataset("cifar10-lt", tmp_path, imbalance_factor=10)
    other = build_dataset("cifar10-lt", tmp_path, imbalance_factor=10, seed=1)
    assert np.array_equal(ds.train_images, again.train_images)
    assert not np.array_equal(ds.train_images, other.train_images)


def test_cifar100_lt_readable_names(tmp_path):
    write_cifar100(tmp_path)
    ds = build_dataset("cifar100-lt", tmp_path, imbalance_factor=10)
    assert ds.class_names[1] == "aquarium fish"
    assert ds.num_classes == 100 and ds.class_counts[0] == 30


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
    batch = pickle.loads((base / "data_batch_2").read_bytes())
    batch[b"labels"][0] = 10
    (base / "data_batch_2").write_bytes(pickle.dumps(batch))
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


def test_load_arrays_resizes_lazy_sets_once(tmp_path):
    write_split_set(tmp_path / "data")
    a = load_arrays("imagenet-lt", root=tmp_path / "data", image_size=16, cache_dir=tmp_path / "c")
    assert a.train_images.shape == (1006, 16, 16, 3) and a.val_images.shape == (3, 16, 16, 3)
    with pytest.raises(LfmError, match="image_size"):
        load_arrays("imagenet-lt", root=tmp_path / "data", cache_dir=tmp_path / "c2")


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

    import lfm_ray.data as data

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
        load_arrays("folder", root=tmp_path / "data", image_size=8, cache_dir=tmp_path / "c")
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
                 "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "airplane" in out and f"training images {sum(long_tail_counts(10, 10, 60))}" in out
    assert main(["data", "imagenet-lt", "--root", str(tmp_path), "--seed", "1"]) == 2
    assert "takes no option 'seed'; accepted: none" in capsys.readouterr().err
    assert main(["data", "digits-lt", "--imbalance-factor", "0.5"]) == 2
    assert "imbalance_factor=0.5" in capsys.readouterr().err
