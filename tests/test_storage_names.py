"""No study or run can land in, or delete, another's folders: each study's Ray state is a
folder of its own, reserved and malformed names are refused, and --restart removes only what
the study (or the training) wrote. One Ray instance for the module."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lfm_ray import RunConfig, Study
from lfm_ray.cli import main
from lfm_ray.errors import LfmError
from lfm_ray.study import validate

from captured import own_text

SMOKE = ["--stage1.epochs", "1", "--stage2.epochs", "1", "--runtime.max_steps_per_epoch", "2",
         "--no-report"]


def study_argv(tmp_path: Path, name: str, *flags: str) -> list[str]:
    return ["study", "--name", name, "--seeds", "0", *SMOKE,
            "--data.cache_dir", str(tmp_path / "cache"),
            "--results-dir", str(tmp_path / "results"), *flags]


def trials(tmp_path: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(tmp_path / "results" / name / "trials.csv")


@pytest.mark.parametrize("name", ["ray", "a.b", "x+y", ".hidden", "-x", "a/b", "a b", ""])
def test_reserved_and_malformed_names_are_refused(tmp_path, name):
    study = Study(name=name, grid={"mix.tau": [0.05]}, results_dir=str(tmp_path / "r"))
    with pytest.raises(LfmError, match="study name"):
        validate(study)
    assert not (tmp_path / "r").exists()


def test_a_study_named_ray_is_refused_from_the_command_line(tmp_path, capsys):
    assert main(study_argv(tmp_path, "ray", "--grid", "mix.tau=0.05", "--dry-run")) == 2
    err = capsys.readouterr().err
    assert "reserved" in err and err.count("\n") == 1
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("results, storage", [
    ("r", "r"),          # the study's results folder would be its storage folder
    ("r/x", "r"),        # the results folder inside the storage path
    ("r", "r/s/deep"),   # the storage folder inside the study's results folder
])
def test_results_and_storage_folders_may_not_overlap(tmp_path, results, storage):
    study = Study(name="s", grid={"mix.tau": [0.05]}, results_dir=str(tmp_path / results),
                  storage_path=str(tmp_path / storage))
    with pytest.raises(LfmError, match="would overlap"):
        validate(study)


def test_the_default_storage_is_a_ray_folder_in_the_results_folder(tmp_path):
    study = Study(name="s", results_dir=str(tmp_path / "r"))
    assert study.storage_path == str(tmp_path / "r" / "ray")
    assert Study(name="s").results_dir == "runs" and Study(name="s").storage_path == "runs/ray"


@pytest.mark.slow
def test_extensions_and_look_alike_names_keep_apart(tmp_path, capsys, local_ray):
    """`col` extended runs a second experiment; studies named col-ext1, col_stage1 and
    col_train each keep their own trials; `col --restart` leaves all of them alone."""
    assert main(study_argv(tmp_path, "col", "--grid", "mix.tau=0.05")) == 0
    assert main(study_argv(tmp_path, "col", "--grid", "mix.tau=0.05,0.25", "--extend")) == 0
    col = trials(tmp_path, "col")
    assert sorted(col["mix.tau"]) == [0.05, 0.25]
    for name, tau in (("col-ext1", 1.25), ("col_stage1", 6.25), ("col_train", 0.01)):
        assert main(study_argv(tmp_path, name, "--grid", f"mix.tau={tau}")) == 0
        # Run again: it resumes its own experiment, nobody else's.
        assert main(study_argv(tmp_path, name, "--grid", f"mix.tau={tau}")) == 0
        own = trials(tmp_path, name)
        assert list(own["mix.tau"]) == [tau] and (own["status"] == "TERMINATED").all()
        best = json.loads((tmp_path / "results" / name / "best.json").read_text())
        assert best["val_acc_all"]["params"] == {"mix.tau": tau}  # fashion-lt selects on val
    capsys.readouterr()
    storage = tmp_path / "results" / "ray"
    assert sorted(p.name for p in storage.iterdir()) == ["col", "col-ext1", "col_stage1",
                                                         "col_train"]
    assert sorted(p.name for p in (storage / "col").iterdir()) == [
        "lfm_ray_study.json", "tune", "tune-ext1"]
    others = {n: sorted(trials(tmp_path, n)["trial_id"]) for n in ("col-ext1", "col_stage1",
                                                                   "col_train")}
    before = {n: sorted(p.name for p in (storage / n).rglob("*")) for n in others}

    (tmp_path / "results" / "col" / "notes.txt").write_text("mine")
    assert main(study_argv(tmp_path, "col", "--grid", "mix.tau=0.05,0.25", "--restart")) == 0
    err = capsys.readouterr().err
    assert "kept" in err and "notes.txt" in err
    assert (tmp_path / "results" / "col" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (storage / "col").iterdir()) == ["lfm_ray_study.json", "tune"]
    for n, ids in others.items():
        assert sorted(trials(tmp_path, n)["trial_id"]) == ids
        assert sorted(p.name for p in (storage / n).rglob("*")) == before[n]


@pytest.mark.slow
def test_a_storage_folder_that_is_not_the_studys_is_refused(tmp_path, capsys, local_ray):
    """Another study's folder under the same storage path (same name, other results folder),
    or a folder lfm-ray did not make: refused, also with --restart, and left as it was."""
    shared = str(tmp_path / "shared")
    assert main(study_argv(tmp_path, "same", "--grid", "mix.tau=0.05",
                           "--storage-path", shared)) == 0
    capsys.readouterr()
    other = ["study", "--name", "same", "--seeds", "0", *SMOKE, "--grid", "mix.tau=0.05",
             "--data.cache_dir", str(tmp_path / "cache"), "--storage-path", shared,
             "--results-dir", str(tmp_path / "elsewhere")]
    for extra in ([], ["--restart"]):
        assert main(other + extra) == 2
        err = own_text(capsys.readouterr().err)
        assert "holds study 'same'" in err and err.count("\n") == 1
    assert not (tmp_path / "elsewhere").exists()
    assert (Path(shared) / "same" / "tune").is_dir()

    (tmp_path / "results" / "ray" / "mine").mkdir(parents=True)
    (tmp_path / "results" / "ray" / "mine" / "data.txt").write_text("keep")
    assert main(study_argv(tmp_path, "mine", "--grid", "mix.tau=0.05", "--restart")) == 2
    assert "not made by lfm-ray for this study" in capsys.readouterr().err
    assert (tmp_path / "results" / "ray" / "mine" / "data.txt").read_text() == "keep"


def test_a_record_of_the_earlier_layout_is_not_resumed(tmp_path, capsys):
    """study.json of an earlier lfm-ray (its experiments beside other studies'): no resume
    or extend; --restart may not touch the old folders."""
    from lfm_ray.study import check_study

    study = Study(name="old", base=RunConfig(), grid={"mix.tau": [0.05]},
                  results_dir=str(tmp_path / "results"))
    folder = tmp_path / "results" / "old"
    folder.mkdir(parents=True)
    from lfm_ray.study.record import request

    (folder / "study.json").write_text(json.dumps({"name": "old", "request": request(study),
                                                   "experiments": ["old"]}))
    with pytest.raises(LfmError, match="earlier lfm-ray"):
        check_study(study)
    assert check_study(study, restart=True).kind == "restart"
    (tmp_path / "results" / "ray" / "old").mkdir(parents=True)  # its old Tune experiment
    (tmp_path / "results" / "ray" / "old" / "experiment_state-x.json").write_text("{}")
    with pytest.raises(LfmError, match="remove it by hand"):
        check_study(study, restart=True)


# ---- lfm-ray train ------------------------------------------------------------------------------
def train_argv(tmp_path: Path, out: Path, *flags: str) -> list[str]:
    return ["train", "--output", str(out), "--stage1.epochs", "1", "--stage2.epochs", "1",
            "--runtime.max_steps_per_epoch", "2", "--data.cache_dir", str(tmp_path / "cache"),
            *flags]


@pytest.mark.slow
def test_train_into_a_studies_folder_restarts_without_touching_it(tmp_path, capsys, local_ray):
    """The reported case: `lfm-ray train --output results` where results/ holds ray/
    (other studies' Tune state): the run's own files go beside it, the refusal names exactly
    what --restart removes, and the restart removes only that."""
    out = tmp_path / "results"
    (out / "ray" / "tau_sweep" / "tune").mkdir(parents=True)
    (out / "ray" / "tau_sweep" / "tune" / "state.json").write_text("{}")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "a_study_named_checkpoints.txt").write_text("keep")
    assert main(train_argv(tmp_path, out)) == 0
    capsys.readouterr()
    assert main(train_argv(tmp_path, out, "--loss", "focal")) == 2
    err = capsys.readouterr().err
    listed = err.split("discard that output's run (")[1].split(")")[0]
    assert listed.split(" in ")[0].split(", ") == [
        "config.json", "history.csv", "metrics.json", "confusion.npz", "run.ray/",
        "run.checkpoints/"] or listed.split(" in ")[0].split(", ") == [
        "config.json", "history.csv", "metrics.json", "confusion.npz", "run.ray/"]
    assert "ray/," not in listed and " ray/" not in listed
    assert main(train_argv(tmp_path, out, "--loss", "focal", "--restart")) == 0
    assert (out / "ray" / "tau_sweep" / "tune" / "state.json").read_text() == "{}"
    assert (out / "checkpoints" / "a_study_named_checkpoints.txt").read_text() == "keep"
    assert json.loads((out / "config.json").read_text())["loss"]["name"] == "focal"
