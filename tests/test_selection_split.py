"""An empty selection split is one clear line before anything runs, and a study that selects
on test because it was asked to says so (no Ray here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lfm_ray import RunConfig, Study
from lfm_ray.cli import main
from lfm_ray.errors import LfmError
from test_study_record import write_folder


def empty_val(root: Path) -> Path:
    write_folder(root)
    for cls in ("ant", "bee", "cow"):
        (root / "val" / cls).mkdir(parents=True)  # class folders, no images
    return root


@pytest.mark.parametrize("command", [["study", "--grid", "mix.tau=0.05", "--name", "v"],
                                     ["train"]])
@pytest.mark.parametrize("dry", [True, False])
def test_a_val_folder_without_images_is_refused_before_anything_runs(tmp_path, capsys,
                                                                     command, dry):
    data = empty_val(tmp_path / "data")
    out = ["--results-dir", str(tmp_path / "r")] if command[0] == "study" else \
        ["--output", str(tmp_path / "r")]
    argv = [*command, "--dataset", "folder", "--data-root", str(data), *out,
            "--data.cache_dir", str(tmp_path / "cache"), *(["--dry-run"] if dry else [])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "val holds no images of the training classes" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_the_folder_builder_refuses_it_too(tmp_path):
    from lfm_ray.data import build_dataset

    with pytest.raises(LfmError, match="holds no images"):
        build_dataset("folder", empty_val(tmp_path / "data"))


def test_selecting_on_test_by_choice_is_said_so(tmp_path):
    from lfm_ray.study import check_study
    from lfm_ray.study.run import selection_note

    data = tmp_path / "data"
    write_folder(data, val=True)
    base = RunConfig().override({"data.name": "folder", "data.root": str(data),
                                 "data.selection_split": "test"})
    study = Study(name="t", base=base, grid={"mix.tau": [0.05]},
                  results_dir=str(tmp_path / "r"))
    check_study(study)
    note = selection_note(study)
    assert study.selection_split == "test" and "data.selection_split test chose" in note
    assert "no validation split" not in note
    auto = Study(name="a", base=base.copy().override({"data.selection_split": "auto"}),
                 grid={"mix.tau": [0.05]}, results_dir=str(tmp_path / "r"))
    check_study(auto)
    assert auto.selection_split == "val" and "validation split" in selection_note(auto)
    plain = RunConfig().override({"data.name": "digits-lt"})  # no validation split at all
    none = Study(name="n", base=plain, grid={"mix.tau": [0.05]},
                 results_dir=str(tmp_path / "r"))
    check_study(none)
    assert "this data set has no validation split" in selection_note(none)
