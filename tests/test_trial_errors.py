"""A failing trial is one line in the study's terminal (its own message and where the full
log is; the traceback with --verbose), and --dry-run refuses what the run would: a
similarity file of the wrong size is read before anything is written, and a run that never
uses it does not read it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lfm_ray.cli import main

from captured import without_logging_errors

QUICK = ["--stage1.epochs", "1", "--stage2.epochs", "1", "--runtime.max_steps_per_epoch", "2"]


def similarity_file(path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    s = rng.random((n, n))
    np.save(path, (s + s.T) / 2)
    return path


# ---- --dry-run and a similarity file ---------------------------------------------------------
@pytest.mark.parametrize("command", [["train"], ["study", "--name", "sim",
                                                 "--grid", "mix.tau=0.05"]])
def test_a_similarity_file_of_the_wrong_size_is_refused_by_dry_run(tmp_path, capsys, command):
    """The reported case: an 11×11 file for digits-lt's 10 classes passed --dry-run and
    failed 16 s into the run."""
    bad = similarity_file(tmp_path / "s.npy", 11)
    where = ["--results-dir", str(tmp_path / "r")] if command[0] == "study" else \
        ["--output", str(tmp_path / "r")]
    argv = [*command, *QUICK, "--mix.similarity", f"file:{bad}", *where,
            "--data.cache_dir", str(tmp_path / "cache")]
    assert main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "s.npy" in err and "11" in err and "10" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()
    # The mixing that does not read it: not read (dry run and all).
    assert main([*argv, "--mix", "none", "--dry-run"]) == 0
    assert main([*argv, "--mix", "none", "--mix.similarity", f"file:{tmp_path / 'no.npy'}",
                 "--dry-run"]) == 0


def test_a_run_refuses_the_wrong_size_before_writing(tmp_path, capsys, local_ray):
    bad = similarity_file(tmp_path / "s.npy", 11)
    out = tmp_path / "out"
    assert main(["train", *QUICK, "--mix.similarity", f"file:{bad}", "--output", str(out),
                 "--data.cache_dir", str(tmp_path / "cache")]) == 2
    assert "11" in capsys.readouterr().err
    assert not out.exists()
    assert main(["study", "--name", "sim", *QUICK, "--grid", "mix.similarity=text,file:" +
                 str(bad), "--results-dir", str(tmp_path / "r"),
                 "--data.cache_dir", str(tmp_path / "cache")]) == 2
    assert "s.npy" in capsys.readouterr().err
    assert not (tmp_path / "r" / "sim").exists()


def test_a_run_without_lfm_trains_without_reading_the_file(tmp_path, local_ray):
    from lfm_ray import confusion

    out = tmp_path / "out"
    assert main(["train", *QUICK, "--mix", "none", "--num-workers", "0",
                 "--mix.similarity", f"file:{tmp_path / 'absent.npy'}", "--output", str(out),
                 "--data.cache_dir", str(tmp_path / "cache")]) == 0
    # The P kept beside its confusion matrix says what it was computed from.
    assert confusion.read(out / "confusion.npz")["source"] == "text"


# ---- one line per failed trial ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("verbose", [False, True])
def test_a_failed_trial_is_one_line_unless_verbose(tmp_path, capsys, caplog, local_ray,
                                                   verbose):
    argv = ["study", "--name", "nan", *QUICK, "--stage1.lr", "1e30", "--grid", "mix.tau=0.05",
            "--seeds", "0", "--no-report", "--results-dir", str(tmp_path / "r"),
            "--data.cache_dir", str(tmp_path / "cache"), *(["--verbose"] if verbose else [])]
    assert main(argv) == 0  # a failed trial is a result of the study, not an error of it
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if "failed" in ln and "nan_mix" in ln]
    table = pd.read_csv(tmp_path / "r" / "nan" / "trials.csv")
    assert list(table["status"]) == ["ERROR"] and "loss became nan" in table.loc[0, "error"]
    # Tune's own traceback goes through Ray's log handler (pytest's caplog sees its records).
    tune_traceback = "Trial task failed for trial" in caplog.text
    if verbose:
        assert tune_traceback
        return
    assert not tune_traceback and "Traceback" not in without_logging_errors(captured.err + captured.out)
    assert lines and all("LfmError: the training loss became nan" in ln and
                         "(full log: " in ln and ln.rstrip().endswith("error.txt)")
                         for ln in lines)
    assert "retrying" in lines[0] and "retrying" not in lines[-1]


# ---- portable tables -------------------------------------------------------------------------
def test_errors_and_copied_results_name_no_folder_of_this_machine(tmp_path, monkeypatch):
    from lfm_ray import Study
    from lfm_ray.study.tables import copy_artifacts, portable_text

    monkeypatch.chdir(tmp_path)
    study = Study(name="p", results_dir=str(tmp_path / "results"))
    storage = Path(study.storage_path).resolve()
    text = (f"LfmError: checkpoint '{storage}/p/stage1/t_1/checkpoint_000002' has no "
            f"state.pt; file {tmp_path}/data/s.npy and /elsewhere/deep/dir/x.npy, "
            "see http://host/a/b and a/b")
    out = portable_text(text, study)
    assert "'p/stage1/t_1/checkpoint_000002'" in out and "file data/s.npy" in out
    assert "…/dir/x.npy" in out and "http://host/a/b and a/b" in out
    assert str(tmp_path) not in out

    checkpoint = storage / "p" / "tune" / "t_1" / "checkpoint_000003"
    checkpoint.mkdir(parents=True)
    branch = storage / "p" / "stage1" / "s_1" / "checkpoint_000002"
    (checkpoint / "result.json").write_text(json.dumps({"acc_all": 0.5,
                                                        "stage1_from": str(branch)}))
    assert copy_artifacts(study, "t_1", str(checkpoint)) == "trials/t_1"
    copied = json.loads((tmp_path / "results" / "p" / "trials" / "t_1" / "result.json")
                        .read_text())
    assert copied["stage1_from"] == "p/stage1/s_1/checkpoint_000002"
