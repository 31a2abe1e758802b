"""Killing a study's driver loses no finished trial: the same command resumes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def start(command: list[str], cwd: Path) -> subprocess.Popen:
    """The study in a process group of its own, so the kill takes its Ray processes too."""
    return subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def kill_and_run_again(first: subprocess.Popen, command: list[str],
                       cwd: Path) -> subprocess.CompletedProcess:
    """SIGKILL the running study, then run the same command to its end."""
    assert first.poll() is None, "the study ended before it could be interrupted"
    time.sleep(1.5)  # let Tune save its experiment state once more
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    time.sleep(2)
    second = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True,
                            timeout=400)
    assert second.returncode == 0, second.stderr[-2000:]
    return second


@pytest.mark.slow
def test_killed_study_resumes_without_rerunning_finished_trials(tmp_path):
    command = [sys.executable, str(ROOT / "studies" / "tau_sweep.py"), "--smoke",
               "--dataset", "digits-lt", "--seeds", "0", "--name", "resume", "--max-concurrent", "1", "--no-report",
               "--num-workers", "1",  # worker-group trials: long enough to be interrupted
               "--storage-path", str(tmp_path / "ray"), "--results-dir", str(tmp_path / "results")]
    table_path = tmp_path / "results" / "resume" / "trials.csv"
    first = start(command, tmp_path)
    deadline = time.time() + 240
    finished = pd.DataFrame()
    while time.time() < deadline and first.poll() is None:
        if table_path.is_file():
            table = pd.read_csv(table_path)
            finished = table[table["status"] == "TERMINATED"]
            if len(finished) >= 1:
                break
        time.sleep(0.5)
    assert len(finished) >= 1, "no trial finished before the deadline"
    second = kill_and_run_again(first, command, tmp_path)
    assert "study 'resume' (resume)" in second.stderr
    final = pd.read_csv(table_path)
    assert len(final) == 2 and (final["status"] == "TERMINATED").all()
    assert sorted(final["mix.tau"].unique()) == [0.002, 0.01]
    # The trials finished before the kill were kept, not run again: same ids, same results.
    kept = final.set_index("trial_id").loc[finished["trial_id"]]
    for _, before in finished.iterrows():
        after = kept.loc[before["trial_id"]]
        assert after["acc_all"] == before["acc_all"]
        assert after["wall_time_s"] == before["wall_time_s"]


@pytest.mark.slow
def test_killed_in_process_trial_resumes_from_its_last_epoch(tmp_path):
    """A trial training in its own process keeps its checkpoints in Tune: killed mid-trial,
    the same command resumes it from its last epoch rather than from the start."""
    epochs = 24  # about 0.3 s each: the kill lands mid-trial
    command = [sys.executable, "-m", "lfm_ray.cli", "study", "--name", "mid",
               "--dataset", "digits-lt", "--grid", "mix.tau=0.05", "--num-workers", "0",
               "--no-report",
               "--stage1.epochs", str(epochs - 2), "--stage2.epochs", "2",
               "--storage-path", str(tmp_path / "ray"), "--results-dir", str(tmp_path / "results")]
    first = start(command, tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        if list((tmp_path / "ray" / "mid" / "tune").glob("mid_*/checkpoint_000002")):
            break
        time.sleep(0.05)
    second = kill_and_run_again(first, command, tmp_path)
    assert "study 'mid' (resume)" in second.stderr
    final = pd.read_csv(tmp_path / "results" / "mid" / "trials.csv")
    assert len(final) == 1 and final.loc[0, "status"] == "TERMINATED"
    assert final.loc[0, "epoch"] == epochs
    results = [json.loads(line) for line in next(
        (tmp_path / "ray" / "mid" / "tune").glob("mid_*/result.json")).read_text().splitlines()]
    restarts = [r["epoch"] for r in results if r["iterations_since_restore"] == 1]
    assert restarts[0] == 1 and len(restarts) == 2, restarts
    assert restarts[1] > 3  # the restored trial went on after its checkpointed epochs
    assert sorted({r["epoch"] for r in results}) == list(range(1, epochs + 1))
