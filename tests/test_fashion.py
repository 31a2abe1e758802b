"""fashion-lt: the shipped pool, the official IDX files, the splits and their checks."""

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from lfm_ray.cli import main
from lfm_ray.data import build_dataset, data_fingerprint, has_validation_split, load_arrays, shot_groups
from lfm_ray.data import fashion
from lfm_ray.errors import LfmError

OFFICIAL = Path(fashion.DEBIAN_ROOT)
needs_official = pytest.mark.skipif(
    not (OFFICIAL / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="the official files (apt-get install dataset-fashion-mnist) are not installed")


@pytest.fixture(scope="module")
def default():
    return build_dataset("fashion-lt")


def fabricated_root(tmp_path: Path, per_class_train: int = 20, per_class_test: int = 5,
                    gz: bool = True) -> Path:
    """Official-format IDX files of a small balanced set: image k of class c has every pixel
    c * 20 + its rank, so a test can tell images apart."""
    root = tmp_path / "fm"
    root.mkdir(parents=True)
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(10), n).astype(np.uint8)
        images = (labels[:, None, None] * 20 + np.tile(np.arange(n), 10)[:, None, None]
                  + np.zeros((1, 28, 28))).astype(np.uint8)
        names = fashion.OFFICIAL[split]
        for name, array in ((names[0], images), (names[1], labels)):
            path = root / (name + ".gz" if gz else name)
            fashion.write_idx(root / (name + ".gz"), array)
            if not gz:
                (root / name).write_bytes(gzip.decompress((root / (name + ".gz")).read_bytes()))
                (root / (name + ".gz")).unlink()
            assert path.is_file()
    return root


def test_default_counts_give_every_shot_group_three_classes(default):
    assert default.class_counts == [600, 359, 215, 129, 77, 46, 27, 16, 10, 6]
    groups = shot_groups(default.class_counts)
    assert {g: len(idx) for g, idx in groups.items()} == {"many": 4, "medium": 3, "few": 3}
    assert default.class_names[0] == "T-shirt/top" and default.class_names[9] == "Ankle boot"
    assert default.train_images.shape == (1485, 28, 28, 3)
    assert np.array_equal(default.train_images[..., 0], default.train_images[..., 2])  # grey


def test_val_and_test_are_balanced_and_val_is_held_out(default):
    assert np.bincount(default.val_labels).tolist() == [fashion.POOL_VAL] * 10
    assert np.bincount(default.test_labels).tolist() == [fashion.POOL_TEST] * 10
    # Held out: no val image is a training image (as bytes: Fashion-MNIST has no duplicates
    # within a class among these).
    train = {img.tobytes() for img in default.train_images[..., 0]}
    assert not any(img.tobytes() in train for img in default.val_images[..., 0])
    assert has_validation_split("fashion-lt")


def test_the_seed_draws_other_images_and_is_deterministic(default):
    again, other = build_dataset("fashion-lt", seed=0), build_dataset("fashion-lt", seed=1)
    assert np.array_equal(default.train_images, again.train_images)
    assert other.class_counts == default.class_counts
    assert not np.array_equal(default.train_images[-6:], other.train_images[-6:])
    # val and test do not depend on the training draw
    assert np.array_equal(default.val_images, other.val_images)
    assert np.array_equal(default.test_images, other.test_images)


def test_the_imbalance_factor_and_largest_class_follow_cifars_rule():
    ds = build_dataset("fashion-lt", imbalance_factor=10, max_count=800)
    assert ds.class_counts == [int(800 * 0.1 ** (k / 9)) for k in range(10)]


def test_the_pool_is_small_and_carries_its_licence():
    folder = fashion.pool_dir()
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert total < 10e6
    licence = (folder / "LICENSE").read_text()
    assert "Zalando SE" in licence and "MIT" in licence
    assert "arXiv:1708.07747" in (folder / "README.md").read_text()


def test_what_the_pool_cannot_serve_names_the_data_root():
    for options in ({"max_count": 801}, {"val_per_class": 50}, {"test_per_class": 600}):
        with pytest.raises(LfmError, match="pool cannot serve.*--data-root.*dataset-fashion-mnist"):
            build_dataset("fashion-lt", **options)
    with pytest.raises(LfmError, match="max_count=0"):
        build_dataset("fashion-lt", max_count=0)


@needs_official
def test_the_pool_equals_the_official_files_where_it_can_serve():
    for options in ({}, {"seed": 3, "imbalance_factor": 50, "max_count": 800}):
        a = build_dataset("fashion-lt", **options)
        b = build_dataset("fashion-lt", root=OFFICIAL, **options)
        for split in ("train", "val", "test"):
            assert np.array_equal(a.split(split)[0], b.split(split)[0])
            assert np.array_equal(a.split(split)[1], b.split(split)[1])


@needs_official
def test_the_official_files_serve_larger_splits():
    ds = build_dataset("fashion-lt", root=OFFICIAL, max_count=5000, test_per_class=1000)
    assert ds.class_counts[0] == 5000 and len(ds.test_labels) == 10000


def test_plain_and_gzipped_idx_files_and_torchvisions_folder(tmp_path):
    gz = fabricated_root(tmp_path / "a")
    plain = fabricated_root(tmp_path / "b", gz=False)
    tv = tmp_path / "c" / "FashionMNIST" / "raw"
    shutil.copytree(gz, tv)
    options = {"max_count": 10, "imbalance_factor": 5, "val_per_class": 5, "test_per_class": 3}
    a = build_dataset("fashion-lt", root=gz, **options)
    b = build_dataset("fashion-lt", root=plain, **options)
    c = build_dataset("fashion-lt", root=tmp_path / "c", **options)
    for other in (b, c):
        assert np.array_equal(a.train_images, other.train_images)
    assert a.class_counts == [10, 8, 6, 5, 4, 4, 3, 2, 2, 2]
    # val images are the first five of each class's fixed order, never trained on
    val = set(a.val_images[:, 0, 0, 0].tolist())
    assert not val & set(a.train_images[:, 0, 0, 0].tolist())


def test_a_missing_or_truncated_file_is_one_line_naming_it(tmp_path, capsys):
    root = fabricated_root(tmp_path)
    labels = root / "t10k-labels-idx1-ubyte.gz"
    labels.unlink()
    assert main(["data", "fashion-lt", "--root", str(root), "--no-gamma"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(labels) in err and "does not exist" in err
    fabricated_root(tmp_path / "again")
    images = tmp_path / "again" / "fm" / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:200])  # a cut-off download
    assert main(["data", "fashion-lt", "--root", str(images.parent), "--no-gamma"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(images) in err and "truncated" in err
    raw = images.parent / "train-images-idx3-ubyte"
    images.unlink()
    full = fashion.read_idx(tmp_path / "fm" / "train-images-idx3-ubyte.gz")
    header = bytes([0, 0, 8, 3]) + b"".join(int(n).to_bytes(4, "big") for n in full.shape)
    raw.write_bytes(header + full.tobytes()[:-5])  # an uncompressed file cut short
    with pytest.raises(LfmError, match=f"{raw}.*truncated"):
        build_dataset("fashion-lt", root=images.parent, max_count=10, val_per_class=5,
                      test_per_class=3)


def test_a_foreign_file_is_refused(tmp_path):
    root = fabricated_root(tmp_path)
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"not an idx file"))
    with pytest.raises(LfmError, match="is not an IDX file"):
        build_dataset("fashion-lt", root=root, max_count=10, val_per_class=5, test_per_class=3)


def test_the_fingerprint_follows_the_source(tmp_path):
    pool = data_fingerprint("fashion-lt")
    assert pool == data_fingerprint("fashion-lt")
    root = fabricated_root(tmp_path)
    files = data_fingerprint("fashion-lt", root)
    assert files != pool
    labels = root / "train-labels-idx1-ubyte.gz"
    data = fashion.read_idx(labels).copy()
    data[[0, -1]] = data[[-1, 0]]  # same size, other content
    fashion.write_idx(labels, data)
    assert data_fingerprint("fashion-lt", root) != files


def test_the_node_cache_holds_the_splits(tmp_path, default):
    arrays = load_arrays("fashion-lt", cache_dir=tmp_path)
    assert arrays.class_counts == default.class_counts
    assert np.array_equal(arrays.val_images, default.val_images)
    assert np.array_equal(arrays.test_labels, default.test_labels)


def test_the_data_command_shows_the_val_split(capsys):
    assert main(["data", "fashion-lt", "--no-gamma"]) == 0
    out = capsys.readouterr().out
    assert "val images 1000" in out and "test images 5000" in out
    assert "many 4 classes" in out and "few 3 classes" in out


def test_the_embedded_auxiliary_sets_never_show_a_val_or_test_image(default):
    from lfm_ray.data.auxiliary import embedded_set

    names, images, labels, mapping = embedded_set("fashion-aux")
    assert names[0] == "rotated T-shirt/top" and mapping["Bag"] == ["rotated Bag"]
    assert images.shape == (10 * fashion.POOL_TRAIN, 28, 28, 3)
    assert np.bincount(labels).tolist() == [fashion.POOL_TRAIN] * 10
    unturned = np.rot90(images[..., 0], k=1, axes=(1, 2))  # back a quarter turn
    held_out = {img.tobytes() for split in ("val", "test")
                for img in default.split(split)[0][..., 0]}
    assert not any(np.ascontiguousarray(img).tobytes() in held_out for img in unturned)
    # Every training image is among them (turned), as digits-aux holds digits-lt's.
    pool = {np.ascontiguousarray(img).tobytes() for img in unturned}
    assert all(img.tobytes() in pool for img in default.train_images[..., 0])
    scrambled = embedded_set("fashion-aux-scrambled")
    assert scrambled[0][6] == "scrambled Shirt" and scrambled[1].shape == images.shape
