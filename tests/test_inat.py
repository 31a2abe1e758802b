"""iNaturalist 2018 on fabricated files in the official format: splits (train minus the
hold-out, the hold-out as val, val2018 as test), the taxonomy, errors, and a training with
LFM's taxonomy similarity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lfm_ray.errors import LfmError

# id -> (species, kingdom, phylum, class, order, family, genus, supercategory, train, val)
CATEGORIES = {
    2: ("Corvus corax", "Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus",
        "Aves", 8, 2),
    0: ("Corvus corone", "Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus",
        "Aves", 5, 2),
    3: ("Pica pica", "Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica",
        "Aves", 4, 2),
    1: ("Abies alba", "Plantae", "Tracheophyta", "Pinopsida", "Pinales", "Pinaceae", "Abies",
        "Plantae", 2, 2),
}
LEVELS = ("kingdom", "phylum", "class", "order", "family", "genus")


def fabricate(root: Path, categories=CATEGORIES) -> Path:
    """train2018.json, val2018.json, categories.json and tiny JPEGs, as the official release
    lays them out (train_val2018/<supercategory>/<id>/<name>.jpg), images in a shuffled order."""
    from PIL import Image

    rng = np.random.default_rng(0)
    cats, splits = [], {"train": ([], []), "val": ([], [])}
    image_id = 1000
    for cid, (name, *taxa, supercat, n_train, n_val) in categories.items():
        cats.append({"id": cid, "name": name, "supercategory": supercat,
                     **dict(zip(LEVELS, taxa))})
        for split, n in (("train", n_train), ("val", n_val)):
            for _ in range(n):
                rel = f"train_val2018/{supercat}/{cid}/{image_id:05d}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                size = (int(rng.integers(10, 20)), int(rng.integers(10, 20)))
                Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(
                    root / rel)
                images, anns = splits[split]
                images.append({"id": image_id, "file_name": rel, "width": size[1],
                               "height": size[0], "license": 1, "rights_holder": "x"})
                anns.append({"id": image_id + 50000, "image_id": image_id, "category_id": cid})
                image_id += 1
    for split, (images, anns) in splits.items():
        order = rng.permutation(len(images))
        (root / f"{split}2018.json").write_text(json.dumps({
            "info": {"year": 2018}, "images": [images[i] for i in order],
            "annotations": anns, "licenses": [],
            # The competition files carry obfuscated categories; categories.json has the names.
            "categories": [{"id": c["id"], "name": str(c["id"]), "supercategory": "x"}
                           for c in cats]}))
    (root / "categories.json").write_text(json.dumps(cats))
    return root


@pytest.fixture
def inat(tmp_path) -> Path:
    return fabricate(tmp_path / "inat")


def _ids_by_file(root: Path, split: str) -> dict[str, int]:
    raw = json.loads((root / f"{split}2018.json").read_text())
    cat = {a["image_id"]: a["category_id"] for a in raw["annotations"]}
    return {str(root / im["file_name"]): (im["id"], cat[im["id"]]) for im in raw["images"]}


def test_splits_hold_out_one_image_of_each_class_with_five(inat):
    from lfm_ray.data import build_dataset, has_validation_split
    from lfm_ray.data.inat import holdout_images

    ds = build_dataset("inat2018", inat)
    # Class k is the k-th category id: 0, 1, 2, 3.
    assert ds.class_names == ["Corvus corone", "Abies alba", "Corvus corax", "Pica pica"]
    train = _ids_by_file(inat, "train")
    val2018 = _ids_by_file(inat, "val")
    index_of = {0: 0, 1: 1, 2: 2, 3: 3}
    # val (selection) = one train2018 image of each class with >= 5 images: ids 0 (5) and 2 (8).
    held = [train[p] for p in ds.val_images.paths]
    assert sorted(c for _, c in held) == [0, 2]
    assert list(ds.val_labels) == [index_of[c] for _, c in held]
    assert [i for i, _ in held] == holdout_images(inat)
    # train = train2018 without them; counts 5-1, 2, 8-1, 4.
    assert sorted(ds.train_images.paths + ds.val_images.paths) == sorted(train)
    assert not set(ds.train_images.paths) & set(ds.val_images.paths)
    assert ds.class_counts == [4, 2, 7, 4]
    assert list(ds.train_labels) == [index_of[train[p][1]] for p in ds.train_images.paths]
    # test (reported) = val2018, untouched.
    assert sorted(ds.test_images.paths) == sorted(val2018)
    assert list(ds.test_labels) == [index_of[val2018[p][1]] for p in ds.test_images.paths]
    assert has_validation_split("inat2018", inat) and has_validation_split("inat2018")
    # The hold-out is drawn with the data set's seed, reproducibly.
    assert holdout_images(inat, seed=0) == holdout_images(inat, seed=0)
    seeds = {tuple(holdout_images(inat, seed=s)) for s in range(6)}
    assert len(seeds) > 1


def test_taxonomy_is_kingdom_to_species_in_class_order(inat):
    from lfm_ray.data.inat import taxonomy
    from lfm_ray.similarity import dataset_taxonomy, taxonomy_similarity

    paths = taxonomy(inat)
    assert paths[1] == ("Plantae", "Tracheophyta", "Pinopsida", "Pinales", "Pinaceae", "Abies",
                        "Abies alba")
    assert dataset_taxonomy("inat2018", inat) == paths
    S = taxonomy_similarity(paths).numpy()
    # Same genus: 6 of 7 levels; same family: 5; other kingdom: 0.
    assert S[0, 2] == pytest.approx(6 / 7) and S[0, 3] == pytest.approx(5 / 7)
    assert S[0, 1] == 0.0 and S[1, 1] == 1.0


def _edit(path: Path, change) -> None:
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("case,message", [
    ("no_categories", "missing .*categories.json; get https://github.com/visipedia/inat_comp"),
    ("unknown_category", "train2018.json: annotation 0 names category 99, which "
                         "categories.json does not list"),
    ("no_annotation", "train2018.json: image .* has no annotation"),
    ("missing_image", "train2018.json: image .*\\.jpg does not exist"),
    ("no_taxonomy", "categories.json: category 0 lacks 'genus'"),
    ("broken_json", "val2018.json cannot be read as JSON"),
])
def test_bad_files_are_refused_naming_them(inat, case, message):
    from lfm_ray.data import build_dataset

    if case == "no_categories":
        (inat / "categories.json").unlink()
    elif case == "unknown_category":
        _edit(inat / "train2018.json", lambda r: r["annotations"][0].update(category_id=99))
    elif case == "no_annotation":
        _edit(inat / "train2018.json", lambda r: r["annotations"].pop())
    elif case == "missing_image":
        raw = json.loads((inat / "train2018.json").read_text())
        (inat / raw["images"][3]["file_name"]).unlink()
    elif case == "no_taxonomy":
        _edit(inat / "categories.json", lambda r: r[0].pop("genus"))
    elif case == "broken_json":
        (inat / "val2018.json").write_text("{")
    with pytest.raises(LfmError, match=message):
        build_dataset("inat2018", inat)


def test_no_root_and_no_hold_out_are_refused(tmp_path):
    from lfm_ray.data import build_dataset

    with pytest.raises(LfmError, match="inat2018 needs a data root"):
        build_dataset("inat2018")
    small = {k: (*v[:-2], 3, 1) for k, v in CATEGORIES.items()}
    root = fabricate(tmp_path / "small", small)
    with pytest.raises(LfmError, match="no class has 5 or more images in train2018.json"):
        build_dataset("inat2018", root)


def test_inat_trains_with_the_taxonomy_similarity_and_selects_on_the_hold_out(inat, tmp_path):
    from test_train import fit_local, small_config

    from lfm_ray.similarity import taxonomy_similarity
    from lfm_ray.worker.loop import Run
    from lfm_ray.worker.distributed import WorkerInfo

    cfg = small_config(tmp_path, **{"data.name": "inat2018", "data.root": str(inat),
                                    "mix.method": "lfm", "mix.similarity": "taxonomy",
                                    "runtime.batch_size": 8}).validate()
    run = Run(cfg, WorkerInfo(rank=0, world_size=1, device=torch.device("cpu")))
    assert run.selection_split == "val"
    paths = [tuple(c) for c in [
        ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "Corvus corone"),
        ("Plantae", "Tracheophyta", "Pinopsida", "Pinales", "Pinaceae", "Abies", "Abies alba"),
        ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "Corvus corax"),
        ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "Pica pica")]]
    shared = [[sum(1 for x, y in zip(a, b) if x == y) / 7 for b in paths] for a in paths]
    assert torch.allclose(run.class_similarity, torch.tensor(shared, dtype=torch.float64))
    assert torch.allclose(run.class_similarity, taxonomy_similarity(paths))
    result = fit_local(cfg, tmp_path / "ckpt")
    m = result.metrics
    assert m["epoch"] == 2 and m["selection_split"] == "val"
    assert math.isfinite(m["val_acc_all"]) and math.isfinite(m["acc_all"])


def test_a_study_records_the_hold_out_it_selects_on(inat, tmp_path):
    from lfm_ray.config import RunConfig
    from lfm_ray.data.inat import holdout_images
    from lfm_ray.study import Study
    from lfm_ray.study.record import study_meta

    base = RunConfig().override({"data.name": "inat2018", "data.root": str(inat),
                                 "data.seed": 3})
    meta = study_meta(Study(name="s", base=base, grid={"mix.tau": [0.05]}), ["s"])
    held = meta["selection_holdouts"]["inat2018"]
    assert held["seed"] == 3 and held["image_ids"] == holdout_images(inat, 3)
    assert held["image_ids"] and "at least 5" in held["rule"]


def test_fingerprint_follows_the_json_files_and_the_images_they_list(inat):
    import os

    from lfm_ray.data import data_fingerprint

    before = data_fingerprint("inat2018", inat)
    assert data_fingerprint("inat2018", inat) == before
    image = next((inat / "train_val2018").rglob("*.jpg"))
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = data_fingerprint("inat2018", inat)
    assert changed != before
    cats = inat / "categories.json"
    cats.write_text(cats.read_text().replace("Pica pica", "Pica picb"))
    assert data_fingerprint("inat2018", inat) not in (before, changed)
