"""The README's first command works on a fresh clone: a user's study goes to the git-ignored
runs/, never into the committed demo results, which studies/run_all.py writes explicitly;
.ci/run runs that command exactly as the README writes it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_first_command() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"^```bash\n(.*)$", text, flags=re.M).group(1)


def test_a_users_study_goes_to_a_git_ignored_folder():
    from lfm_ray.commands.catalog import tau_sweep

    from lfm_ray.commands.run_flags import new_parser
    from lfm_ray.commands.study_flags import add_study_flags, study_from_args

    parser = new_parser(prog="tau_sweep.py")
    add_study_flags(parser, default_name="tau_sweep")
    args = parser.parse_args([])
    args.datasets = ["digits-lt"]
    study = study_from_args(args, tau_sweep.declare(args), script="tau_sweep")
    assert study.result_dir == Path("runs") / "tau_sweep"
    assert Path(study.storage_path) == Path("runs") / "ray"
    for path in ("runs/tau_sweep/trials.csv", "runs/tau_sweep/report.html",
                 "runs/ray/tau_sweep/tune/experiment_state.json"):
        ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path])
        assert ignored.returncode == 0, f"{path} is not git-ignored"


def test_run_all_writes_the_committed_results_explicitly():
    import runpy

    flags = runpy.run_path(str(ROOT / "studies" / "run_all.py"))["FLAGS"]  # the script itself
    assert flags[flags.index("--results-dir") + 1] == "results"


def test_ci_runs_the_readmes_first_command_as_written():
    first = readme_first_command()
    assert first.startswith('pip install -e ".[dev]" && python studies/')
    ci = (ROOT / ".ci" / "run").read_text()
    # .ci/run reads the line from the README (the first line of its first bash block) and
    # runs it, failing when it fails, then checks the clone is clean.
    extracted = subprocess.run(["awk", '/^```bash$/ { getline; print; exit }',
                                str(ROOT / "README.md")], capture_output=True, text=True)
    assert extracted.stdout.strip() == first
    assert "awk '/^```bash$/ { getline; print; exit }' README.md" in ci
    assert 'bash -euo pipefail -c "${first}"' in ci and "git status --porcelain" in ci
    assert ci.index('-c "${first}"') < ci.index("\npytest -q") and "--slow" in ci


@pytest.mark.slow
def test_the_first_command_on_a_fresh_clone_trains_reports_and_leaves_git_clean(tmp_path):
    """The README's first command (its study, with --smoke to keep the test short; .ci/run
    runs it as written) on a fresh clone: exit 0, a report in runs/, `git status` clean."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    command = readme_first_command().split("&&", 1)[1].split()
    assert command[:2] == ["python", "studies/tau_sweep.py"]
    env = {**os.environ, "PYTHONPATH": str(clone), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, *command[1:], "--smoke"], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (clone / "runs" / "tau_sweep" / "report.html").is_file()
    assert (clone / "runs" / "tau_sweep" / "best.json").is_file()
    status = subprocess.run(["git", "-C", str(clone), "status", "--porcelain"],
                            capture_output=True, text=True, check=True).stdout
    assert status == "", status
