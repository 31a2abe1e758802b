"""`lfm-ray aux`: neighbour proposals by text similarity, image cleaning by the class prototype,
and the folder and map it writes, which training then accepts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lfm_ray.curation import (
    keep_by_prototype, neighbour_counts, propose_neighbours, prototype_cosines, read_candidates,
)
from lfm_ray.errors import LfmError


def test_tail_classes_get_more_neighbours_in_proportion_to_the_ratio():
    counts = [124, 62, 40, 12]
    assert neighbour_counts(counts, k=2, max_k=50) == [
        math.ceil(2 * 124 / n) for n in counts]                     # 2, 4, 7, 21
    assert neighbour_counts(counts, k=2, max_k=10) == [2, 4, 7, 10]   # capped
    assert neighbour_counts([5, 5], k=3, max_k=3) == [3, 3]          # balanced: k each
    with pytest.raises(LfmError, match="1 <= k <= max_k"):
        neighbour_counts(counts, k=4, max_k=3)


def test_proposals_are_the_most_similar_candidates_first():
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Candidate angles: 10°, 80°, 45°, 30° from the first axis.
    angles = torch.tensor([10.0, 80.0, 45.0, 30.0]) * math.pi / 180
    cands = torch.stack([angles.cos(), angles.sin()], dim=1) * torch.tensor([[2.0], [1], [3], [1]])
    assert propose_neighbours(targets, cands, [2, 3]) == [[0, 3], [1, 2, 3]]
    assert propose_neighbours(targets, cands, [9, 0]) == [[0, 3, 2, 1], []]


def test_images_are_kept_between_the_two_cosines_to_their_prototype():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 16, generator=g, dtype=torch.float64)
    cos = prototype_cosines(feats)
    unit = feats / feats.norm(dim=1, keepdim=True)
    proto = unit.mean(0) / unit.mean(0).norm()
    assert torch.allclose(cos, unit @ proto)
    low, high = float(cos.quantile(0.25)), float(cos.quantile(0.75))
    keep = keep_by_prototype(feats, low, high)
    assert torch.equal(keep, (cos >= low) & (cos <= high)) and 0 < int(keep.sum()) < 40
    with pytest.raises(LfmError, match="min_cos=0.9, max_cos=0.5 are not valid"):
        keep_by_prototype(feats, 0.9, 0.5)


def test_candidates_file_skips_comments_repeats_and_target_names(tmp_path):
    f = tmp_path / "names.txt"
    f.write_text("# ImageNet-21k leaves\nsnow leopard\n\nThree\nsnow_leopard\nwolf\n")
    assert read_candidates(f, ["one", "three"]) == (["snow leopard", "wolf"], ["Three"])
    f.write_text("wolf\n../escape\n")
    with pytest.raises(LfmError, match="line 2: '../escape' cannot be a class folder name"):
        read_candidates(f, ["one"])
    f.write_text("three\n")
    with pytest.raises(LfmError, match="names no class that is not a target class"):
        read_candidates(f, ["three"])


def write_candidates(tmp_path: Path) -> tuple[Path, Path]:
    """Candidate names and images for digits-lt: turned digits of three classes (images
    from scikit-learn's digits) and names without images."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    names = ["rotated three", "rotated seven", "rotated one", "upside-down nine", "wolf"]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    images = tmp_path / "crawled"
    for digit, name in ((3, "rotated three"), (7, "rotated_seven"), (1, "rotated one")):
        folder = images / name
        folder.mkdir(parents=True)
        for i, idx in enumerate(np.flatnonzero(digits.target == digit)[:6]):
            pixels = np.round(np.rot90(digits.images[idx], k=-1) * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).convert("RGB").save(folder / f"{i}.png")
    (images / "wolf").mkdir()   # a candidate folder without images
    return tmp_path / "names.txt", images


def test_aux_command_writes_a_folder_and_map_that_training_accepts(tmp_path, capsys):
    from lfm_ray.cli import main

    names, images = write_candidates(tmp_path)
    out = tmp_path / "aux"
    code = main(["aux", "--dataset", "digits-lt", "--candidates", str(names), "--images",
                 str(images), "--output", str(out), "--k", "1", "--max-k", "5", "--min-cos", "-1",
                 "--max-cos", "1"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    mapping = json.loads((out / "neighbours.json").read_text())
    # digits-lt's counts run 124 .. 12: the largest class is proposed 1 neighbour, the
    # smallest all five candidates (ceil(124 / 12) = 11, capped at 5); only those with images
    # stay in the map.
    from lfm_ray.data import build_dataset

    ds = build_dataset("digits-lt")
    k_t = dict(zip(ds.class_names, neighbour_counts(ds.class_counts, 1, 5)))
    assert k_t["zero"] == 1 and k_t["nine"] == 5 and "zero (k=1)" in printed.out
    assert all(len(v) <= k_t[t] for t, v in mapping.items())
    imaged = {"rotated three", "rotated seven", "rotated one"}
    assert set(mapping["nine"]) == imaged
    listed = {n for ns in mapping.values() for n in ns}
    assert listed == imaged
    for name in listed:
        kept = sorted(p.name for p in (out / name).iterdir())
        assert kept == [f"{i}.png" for i in range(6)]     # thresholds -1..1 keep every image
    assert "no images under --images" in printed.out and "wrote" in printed.out
    # The map and the folder are what training takes.
    from lfm_ray.config import DataConfig, RunConfig
    from lfm_ray.data.auxiliary import aux_source
    from lfm_ray.data.digits import DIGIT_NAMES

    cfg = RunConfig(data=DataConfig("digits-lt")).override({"aux.root": str(out),
                                "aux.neighbours": str(out / "neighbours.json")})
    source = aux_source(cfg, DIGIT_NAMES)
    assert set(source.class_names) == listed
    # A new folder is needed for another run; nothing is overwritten.
    assert main(["aux", "--dataset", "digits-lt", "--candidates", str(names), "--output",
                 str(out)]) == 2
    assert "is not an empty folder" in capsys.readouterr().err


def test_aux_command_without_images_writes_the_proposals(tmp_path, capsys):
    from lfm_ray.cli import main
    from lfm_ray.data import build_dataset

    names, _ = write_candidates(tmp_path)
    out = tmp_path / "proposed"
    assert main(["aux", "--dataset", "digits-lt", "--candidates", str(names), "--output",
                 str(out), "--k", "2", "--max-k", "4"]) == 0
    mapping = json.loads((out / "neighbours.json").read_text())
    counts = build_dataset("digits-lt").class_counts
    assert [len(mapping[n]) for n in build_dataset("digits-lt").class_names] == \
        neighbour_counts(counts, 2, 4)
    assert sorted(p.name for p in out.iterdir()) == ["neighbours.json"]
    assert "wrote" in capsys.readouterr().out


def test_aux_command_refuses_bad_thresholds_before_reading_anything(tmp_path, capsys):
    from lfm_ray.cli import main

    code = main(["aux", "--candidates", str(tmp_path / "none.txt"), "--output",
                 str(tmp_path / "o"), "--min-cos", "0.99", "--max-cos", "0.7"])
    err = capsys.readouterr().err
    assert code == 2 and "min_cos=0.99, max_cos=0.7 are not valid" in err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()
