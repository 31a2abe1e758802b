"""An interrupted study is never written up as finished: trials stopped on their way are
INTERRUPTED (not TERMINATED, not stopped early), the missing ones are listed, there is no
best.json and no report (a report rendered anyway says INCOMPLETE), and the exact lfm-ray
command that resumes it is printed. The real Ctrl-C runs behind --slow."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from lfm_ray import RunConfig, Study

ROOT = Path(__file__).resolve().parents[1]


def trial(trial_id: str, status: str, tau: float, seed: int, epoch: int) -> SimpleNamespace:
    """The few attributes of a Tune Trial that the tables read."""
    return SimpleNamespace(trial_id=trial_id, status=status,
                           config={"params": {"mix.tau": tau, "runtime.seed": seed}},
                           last_result={"epoch": epoch, "acc_all": 0.3 + epoch / 100},
                           checkpoint=None, error_file=None, error_text="")


def small_study(tmp_path: Path) -> Study:
    base = RunConfig().override({"stage1.epochs": 2, "stage2.epochs": 1})
    return Study(name="cut", base=base, grid={"mix.tau": [0.01, 0.05, 0.25]}, seeds=[0],
                 results_dir=str(tmp_path / "results"), selection_split="test")


def test_trials_stopped_on_their_way_are_interrupted_and_missing(tmp_path):
    from lfm_ray.study.run import missing_trials
    from lfm_ray.study.tables import Rows

    study = small_study(tmp_path)
    table = Rows(study).rows([trial("a", "TERMINATED", 0.01, 0, 3),
                              trial("b", "RUNNING", 0.05, 0, 1)])
    assert list(table["status"]) == ["TERMINATED", "INTERRUPTED"]
    assert not table["stopped_early"].any()  # an interruption is not ASHA's early stop
    assert missing_trials(study, table) == ["mix.tau=0.05, seed=0", "mix.tau=0.25, seed=0"]
    done = Rows(study).rows([trial(t, "TERMINATED", tau, 0, 3)
                             for t, tau in (("a", 0.01), ("b", 0.05), ("c", 0.25))])
    assert missing_trials(study, done) == []


def test_best_json_only_for_a_complete_study(tmp_path):
    from lfm_ray.study.tables import Rows, write_tables

    study = small_study(tmp_path)
    best = study.result_dir / "best.json"
    table = Rows(study).rows([trial("a", "TERMINATED", 0.01, 0, 3)])
    write_tables(study, table, complete=True)
    assert best.is_file()
    write_tables(study, table)  # while trials are missing there is no best
    assert not best.exists() and (study.result_dir / "trials.csv").is_file()


def test_the_resume_command_is_lfm_rays_own(tmp_path):
    from lfm_ray.study.run import resume_command

    study = small_study(tmp_path)
    assert resume_command(study) == f"lfm-ray study --resume cut --results-dir " \
                                    f"{shlex.quote(str(tmp_path / 'results'))}"
    assert resume_command(Study(name="x")) == "lfm-ray study --resume x"
    assert resume_command(Study(name="x", address="auto")) == \
        "lfm-ray study --resume x --address auto"


def test_a_report_of_an_interrupted_study_says_incomplete(tmp_path):
    from study_fixtures import TAUS, make_study

    from lfm_ray.analysis import write_report

    folder = make_study(tmp_path, "cut", {"mix.tau": TAUS}, seeds=(0, 1), meta={
        "status": "interrupted", "missing_trials": ["mix.tau=1.25, seed=1"],
        "resume_command": "lfm-ray study --resume cut"})
    table = pd.read_csv(folder / "trials.csv")
    table = table[~((table["mix.tau"] == 1.25) & (table["runtime.seed"] == 1))]
    table.loc[table.index[-1], "status"] = "INTERRUPTED"
    table.to_csv(folder / "trials.csv", index=False)
    page = Path(write_report(folder, png=False)).read_text()
    assert "<b>INCOMPLETE</b>" in page and "mix.tau=1.25, seed=1" in page
    assert "1 interrupted" in page and "lfm-ray study --resume cut" in page
    assert "No best configuration: the study is INCOMPLETE" in page
    assert "<title>INCOMPLETE" in page


# ---- a real Ctrl-C ------------------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_leaves_an_incomplete_study_and_the_printed_command_resumes_it(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    results = tmp_path / "results"
    command = [sys.executable, "-m", "lfm_ray.cli", "study", "--name", "cut",
               "--grid", "mix.tau=0.01,0.05,0.25", "--seeds", "0", "--max-concurrent", "1",
               "--stage1.epochs", "58", "--stage2.epochs", "2", "--no-report",
               "--data.cache_dir", str(tmp_path / "cache"), "--results-dir", str(results)]
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    table_path = results / "cut" / "trials.csv"
    deadline = time.time() + 400
    while time.time() < deadline and first.poll() is None:
        if table_path.is_file() and (pd.read_csv(table_path)["status"] == "TERMINATED").any():
            break
        time.sleep(0.3)
    assert first.poll() is None, "the study ended before it could be interrupted"
    time.sleep(2)  # the next trial is on its way (each takes well over 2 s)
    first.send_signal(signal.SIGINT)  # Ctrl-C: to the driver
    out, err = first.communicate(timeout=300)
    assert first.returncode == 130, err[-3000:]
    assert "Tuner.restore" not in out + err
    line = next(ln for ln in err.splitlines() if "was interrupted" in ln)
    finished = int(line.split("interrupted: ")[1].split(" trial(s) finished")[0])
    assert 1 <= finished < 3 and f"{finished} trial(s) finished, {3 - finished} not" in line
    resume = line.split("Resume it with: ")[1].strip()
    assert resume == f"lfm-ray study --resume cut --results-dir {results}"
    table = pd.read_csv(table_path)
    assert (table["status"] == "TERMINATED").sum() == finished
    assert (table.loc[table["status"] == "TERMINATED", "epoch"] == 60).all()
    # The trial on its way: not finished, not stopped early, its epochs short of 60.
    cut = table[table["status"] == "INTERRUPTED"]
    assert len(cut) == 1 and (cut["epoch"] < 60).all()
    assert set(table["status"]) == {"TERMINATED", "INTERRUPTED"}
    assert not table["stopped_early"].any()
    assert not (results / "cut" / "best.json").exists()
    assert not (results / "cut" / "report.html").exists()
    meta = json.loads((results / "cut" / "study.json").read_text())
    assert meta["status"] == "interrupted" and len(meta["missing_trials"]) == 3 - finished
    assert meta["resume_command"] == resume

    args = shlex.split(resume)
    assert args[0] == "lfm-ray"
    second = subprocess.run([sys.executable, "-m", "lfm_ray.cli", *args[1:], "--no-report"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    table = pd.read_csv(table_path)
    assert len(table) == 3 and (table["status"] == "TERMINATED").all()
    assert (table["epoch"] == 60).all()
    meta = json.loads((results / "cut" / "study.json").read_text())
    assert meta["status"] == "complete" and "missing_trials" not in meta
    assert [i["action"] for i in meta["invocations"]] == ["new", "resume"]
    assert (results / "cut" / "best.json").is_file()


class CtrlCAfterFirstTrial:
    """A Tune callback that sends this process Ctrl-C once a trial has finished (as a user
    would), once: `marker` records that it did (Tune saves callbacks with an experiment and
    a resumed one runs them again); made a ray.tune.Callback on first use."""

    def __new__(cls, marker: Path):
        from ray.tune import Callback

        class Sender(Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                if not marker.exists():
                    marker.write_text("sent")
                    os.kill(os.getpid(), signal.SIGINT)

        return Sender()


@pytest.mark.slow
def test_run_study_raises_study_interrupted_from_python(tmp_path, local_ray):
    from lfm_ray import RunConfig, Study, load_study, run_study
    from lfm_ray.study import StudyInterrupted

    base = RunConfig().override({"stage1.epochs": 30, "stage2.epochs": 2,
                                 "runtime.num_workers": 0, "data.cache_dir": str(tmp_path / "c")})
    study = Study(name="api", base=base, grid={"mix.tau": [0.01, 0.05, 0.25]}, seeds=[0],
                  max_concurrent=1, results_dir=str(tmp_path / "results"),
                  callbacks=[CtrlCAfterFirstTrial(tmp_path / "sent")])
    with pytest.raises(StudyInterrupted, match="lfm-ray study --resume api --results-dir"):
        run_study(study)
    folder = tmp_path / "results" / "api"
    assert not (folder / "best.json").exists()
    loaded = load_study(folder)
    assert loaded.incomplete and len(loaded.finished) >= 1
    assert (loaded.trials["epoch"][loaded.trials["status"] == "TERMINATED"] == 32).all()
    study.callbacks = []
    table = run_study(study)  # the same request again resumes and completes it
    assert len(table) == 3 and (table["status"] == "TERMINATED").all()
    assert not load_study(folder).incomplete and (folder / "best.json").is_file()
