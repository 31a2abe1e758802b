"""Warm starts from an earlier study, the cost estimate of --dry-run, the measured cost in the
report, and --budget-hours: checks against direct computations from the trials.csv they read,
and (slow) smoke studies on digits-lt."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from captured import own_text
from study_fixtures import TAUS, make_study

from lfm_ray.cli import main
from lfm_ray.config import DataConfig, RunConfig
from lfm_ray.errors import LfmError
from lfm_ray.study import Dim, Study


def study_args(tmp_path, name: str, *flags: str) -> list[str]:
    return ["study", "--name", name, "--dataset", "digits-lt", "--smoke", "--no-report",
            "--runtime.max_steps_per_epoch", "2", "--data.cache_dir", str(tmp_path / "cache"),
            "--storage-path", str(tmp_path / "ray"),
            "--results-dir", str(tmp_path / "results"), *flags]


def one_line(err: str) -> str:
    lines = [ln for ln in own_text(err).splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# ---- warm starts ---------------------------------------------------------------------------------
LRS = [1e-3, 1e-3, 3e-3, 3e-3, 1e-2, 2e-2, 5e-2]
ACCS = [0.50, 0.70, 0.62, 0.64, 0.61, 0.55, None]  # the last trial failed
SEEDS = [0, 1, 0, 1, 0, 0, 0]


def earlier_optuna(tmp_path: Path, name: str = "old", objectives=(), rows=None) -> Path:
    """An earlier Optuna study over stage1.lr as lfm_ray.study leaves it (the columns the
    warm start reads), two configurations with two seeds each."""
    d = tmp_path / "results" / name
    d.mkdir(parents=True)
    rows = rows if rows is not None else [
        {"trial_id": f"t{i}", "status": "ERROR" if acc is None else "TERMINATED",
         "stage1.lr": lr, "runtime.seed": seed, "acc_all": acc,
         "acc_few": None if acc is None else 1 - acc + 0.01 * i,
         "acc_many": acc, "data.name": "digits-lt", "model.name": "tiny", "wall_time_s": 20.0,
         "epoch": 2} for i, (lr, acc, seed) in enumerate(zip(LRS, ACCS, SEEDS))]
    pd.DataFrame(rows).to_csv(d / "trials.csv", index=False)
    (d / "study.json").write_text(json.dumps({
        "name": name, "study_id": "old-id", "search": "optuna",
        "swept": ["stage1.lr", "runtime.seed"], "metric": "acc_all", "mode": "max",
        "objectives": list(objectives), "started": "2026-12-01 10:00:00", "status": "complete",
        "versions": {"git_commit": "abc1234"}}))
    return d


def direct_best(k: int) -> list[float]:
    """The K best learning rates by mean acc_all over seeds, computed by hand."""
    sums: dict[float, list[float]] = {}
    for lr, acc in zip(LRS, ACCS):
        if acc is not None:
            sums.setdefault(lr, []).append(acc)
    means = {lr: sum(v) / len(v) for lr, v in sums.items()}
    return sorted(means, key=lambda lr: -means[lr])[:k]


def optuna_study(tmp_path, **kw) -> Study:
    kw.setdefault("space", {"stage1.lr": Dim.loguniform(1e-4, 1e-1)})
    kw.setdefault("num_samples", 3)
    return Study(name="new", search="optuna",
                 base=RunConfig(data=DataConfig("digits-lt")),
                 storage_path=str(tmp_path / "ray"), results_dir=str(tmp_path / "results"), **kw)


def test_warm_start_takes_the_k_best_by_the_mean_over_seeds(tmp_path):
    from lfm_ray.study.warm import resolve_warm_start

    earlier_optuna(tmp_path)
    # 0.63 and 0.61: means over seeds (1e-3's single 0.70 trial is not its mean, 0.60)
    assert direct_best(2) == [3e-3, 1e-2]
    study = optuna_study(tmp_path, warm_start="old:2")
    resolve_warm_start(study)
    assert study.warm_points == [{"stage1.lr": lr} for lr in direct_best(2)]
    record = study.warm_record
    assert record["study"] == "old" and record["study_id"] == "old-id"
    assert record["commit"] == "abc1234" and record["started"] == "2026-12-01 10:00:00"
    assert [p["values"]["acc_all"] for p in record["points"]] == pytest.approx([0.63, 0.61])
    study = optuna_study(tmp_path, warm_start=str(tmp_path / "results" / "old"))  # a path; K 1
    resolve_warm_start(study)
    assert study.warm_points == [{"stage1.lr": direct_best(1)[0]}]


def test_warm_start_from_a_multi_objective_study_takes_its_pareto_set(tmp_path):
    from lfm_ray.study.warm import resolve_warm_start

    earlier_optuna(tmp_path, objectives=("acc_few", "acc_many"))
    table = pd.read_csv(tmp_path / "results" / "old" / "trials.csv")
    means = table[table["status"] == "TERMINATED"].groupby("stage1.lr")[
        ["acc_few", "acc_many"]].mean()
    points = list(means.itertuples())
    front = [p.Index for p in points
             if not any(q.acc_few >= p.acc_few and q.acc_many >= p.acc_many
                        and (q.acc_few > p.acc_few or q.acc_many > p.acc_many) for q in points)]
    study = optuna_study(tmp_path, warm_start="old", num_samples=8)
    resolve_warm_start(study)
    assert sorted(p["stage1.lr"] for p in study.warm_points) == sorted(front)
    assert "Pareto set" in study.warm_record["rule"]


def test_a_warm_start_point_outside_the_space_is_refused_and_nothing_written(tmp_path, capsys):
    earlier_optuna(tmp_path)
    code = main(study_args(tmp_path, "new", "--search", "optuna", "--num-samples", "2",
                           "--space", "stage1.lr=loguniform:1e-4:2e-3", "--warm-start", "old:2"))
    line = one_line(capsys.readouterr().err)
    assert code == 2
    assert "stage1.lr=0.003 lies outside this study's space" in line, line
    assert not (tmp_path / "results" / "new").exists() and not (tmp_path / "ray").exists()
    code = main(study_args(tmp_path, "new", "--search", "optuna", "--num-samples", "2",
                           "--space", "loss.name=choice:ce,focal", "--warm-start", "old"))
    assert code == 2
    assert "its parameter stage1.lr is not in this study's space" in \
        one_line(capsys.readouterr().err)
    assert not (tmp_path / "results" / "new").exists()


def test_a_missing_or_empty_earlier_study_and_a_grid_are_refused(tmp_path, capsys):
    space = ["--search", "optuna", "--space", "stage1.lr=loguniform:1e-4:1e-1"]
    assert main(study_args(tmp_path, "new", *space, "--warm-start", "nowhere")) == 2
    assert "--warm-start 'nowhere': no earlier study there" in one_line(capsys.readouterr().err)
    earlier_optuna(tmp_path, "failed", rows=[{"trial_id": "t0", "status": "ERROR",
                                              "stage1.lr": 1e-3, "acc_all": None}])
    assert main(study_args(tmp_path, "new", *space, "--warm-start", "failed")) == 2
    assert "study 'failed' has no finished trials" in one_line(capsys.readouterr().err)
    earlier_optuna(tmp_path)
    assert main(study_args(tmp_path, "new", "--grid", "stage1.lr=0.001",
                           "--warm-start", "old")) == 2
    assert "a grid study has no searcher to start" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "results" / "new").exists()


@pytest.mark.slow
def test_a_warm_start_is_optunas_first_trials_and_recorded(tmp_path, capsys, local_ray):
    import optuna

    earlier_optuna(tmp_path)
    db = f"sqlite:///{tmp_path / 'optuna.db'}"
    flags = ["--search", "optuna", "--num-samples", "3", "--max-concurrent", "1",
             "--space", "stage1.lr=loguniform:1e-4:1e-1", "--optuna-storage", db]
    assert main(study_args(tmp_path, "new", *flags, "--warm-start", "old:2")) == 0
    trials = optuna.load_study(study_name="new", storage=db).trials
    assert len(trials) == 3
    assert [t.params["params/stage1.lr"] for t in trials[:2]] == direct_best(2)
    assert trials[0].system_attrs.get("fixed_params") == {"params/stage1.lr": direct_best(2)[0]}
    assert "fixed_params" not in trials[2].system_attrs  # sampled by TPE
    meta = json.loads((tmp_path / "results" / "new" / "study.json").read_text())
    assert meta["request"]["warm_start"] == "old:2"
    assert [p["params"] for p in meta["warm_start"]["points"]] == \
        [{"stage1.lr": lr} for lr in direct_best(2)]
    assert meta["warm_start"]["study"] == "old" and meta["warm_start"]["commit"] == "abc1234"
    capsys.readouterr()
    # Another warm start under the stored name is a difference like any other.
    assert main(study_args(tmp_path, "new", *flags, "--warm-start", "old:1")) == 2
    assert 'warm_start: "old:2" -> "old:1"' in one_line(capsys.readouterr().err)


# ---- the cost before: --dry-run's estimate --------------------------------------------------------
def test_dry_run_estimates_the_cost_from_earlier_timings(tmp_path, capsys):
    make_study(tmp_path, "old", {"mix.tau": TAUS}, seeds=(0, 1))      # digits-lt, tiny: 4 epochs
    other = make_study(tmp_path, "other", {"mix.tau": TAUS}, seeds=(0,))
    table = pd.read_csv(other / "trials.csv")
    table["model.name"] = "resnet32"  # another model: not a timing of this study's trials
    table.to_csv(other / "trials.csv", index=False)
    old = pd.read_csv(tmp_path / "results" / "old" / "trials.csv")
    old.loc[0, "epoch"] = 2           # stopped after 2 epochs: its time per epoch counts
    old.to_csv(tmp_path / "results" / "old" / "trials.csv", index=False)

    code = main(study_args(tmp_path, "new", "--grid", "mix.tau=0.01,0.1,1", "--seeds", "0,1",
                           "--dry-run"))
    captured = capsys.readouterr()
    assert code == 0
    plan = json.loads(captured.out)
    per_epoch = [w / e for w, e in zip(old["wall_time_s"], old["epoch"])]
    minutes = 6 * (sum(per_epoch) / len(per_epoch)) * 2 / 60   # 6 smoke trials of 2 epochs
    cost = plan["cost_estimate"]
    assert plan["trials"] == cost["trials"] == 6
    assert cost["trial_minutes"] == pytest.approx(minutes, abs=1e-3)
    assert cost["gpu_hours"] == 0.0 and cost["gpus_per_trial"] == [0]
    assert cost["from"] == {"digits-lt / tiny": {"trials": 6, "studies": ["old"],
                                                 "seconds_per_epoch": pytest.approx(
                                                     sum(per_epoch) / 6, abs=1e-3)}}
    assert f"about {minutes:.1f} trial-minutes" in captured.err
    assert not (tmp_path / "results" / "new").exists()


def test_the_estimate_counts_gpu_hours_per_trial(tmp_path):
    from lfm_ray.study.cost import estimate

    make_study(tmp_path, "old", {"mix.tau": TAUS}, seeds=(0,))         # walls 30, 31, 32 s
    base = RunConfig(data=DataConfig("digits-lt")).override({
        "stage1.epochs": 3, "stage2.epochs": 5, "runtime.num_workers": 2,
        "runtime.gpus_per_worker": 0.5})
    study = Study(name="new", base=base, grid={"mix.tau": [0.1]},
                  results_dir=str(tmp_path / "results"))
    cost = estimate(study, [base, base])
    seconds = (30 + 31 + 32) / 3 / 4 * 8                                 # per trial
    assert cost["trial_minutes"] == pytest.approx(2 * seconds / 60, abs=1e-3)
    assert cost["gpu_hours"] == pytest.approx(2 * seconds / 3600 * 2 * 0.5, abs=1e-4)


def test_dry_run_says_when_it_has_no_earlier_timings(tmp_path, capsys):
    code = main(study_args(tmp_path, "new", "--grid", "mix.tau=0.01,0.1", "--dry-run"))
    captured = capsys.readouterr()
    assert code == 0
    cost = json.loads(captured.out)["cost_estimate"]
    assert "trial_minutes" not in cost and cost["trials"] == 2
    assert "no earlier timings of digits-lt with model tiny" in cost["note"]
    assert "cost estimate of 2 trials: no estimate: no earlier timings" in captured.err


# ---- the cost after: the report, the budget ----------------------------------------------------------
def test_the_report_header_gives_the_measured_cost(tmp_path):
    from lfm_ray.analysis import write_report

    d = make_study(tmp_path, "rec", {"mix.tau": TAUS}, seeds=(0, 1),
                   meta={"budget_hours": 2.0, "budget_unit": "GPU-hours"})
    walls = pd.read_csv(d / "trials.csv")["wall_time_s"]
    header = write_report(d, png=False).read_text().split("<nav>")[0]
    assert f"measured cost {walls.sum() / 60:.1f} trial-minutes, 0.000 GPU-hours" in header
    assert "budget 2 GPU-hours" in header
    stopped = make_study(tmp_path, "cut", {"mix.tau": TAUS}, seeds=(0,), meta={
        "budget_hours": 0.5, "budget_unit": "trial-hours", "status": "stopped_by_budget",
        "missing_trials": ["2 of 5 trials"],
        "resume_command": "lfm-ray study --resume cut --budget-hours <more than 0.5>"})
    page = write_report(stopped, png=False).read_text()
    assert "<b>INCOMPLETE</b> — this study is stopped by budget" in page
    assert "stopped by its budget of 0.5 trial-hours" in page
    assert "--budget-hours &lt;more than 0.5&gt;" in page
    assert not (stopped / "best.json").exists()


def test_the_budget_stops_launching_before_the_cost_would_pass_it():
    from lfm_ray.study.budget import Budget

    budget = Budget(hours=1.0, unit_gpus=2, spent_before=0.2, costs_before=[0.2])
    assert budget.allows_launch()            # 0.2 + 1 x 0.2 <= 1
    for trial in "abc":
        budget.launched(trial)
    assert budget.allows_launch()            # 0.2 + (3 running + 1) x 0.2 = 1.0: within
    budget.launched("d")
    assert not budget.allows_launch()        # 0.2 + (4 + 1) x 0.2 = 1.2: would pass
    assert budget.stopped and not budget.allows_launch()
    fresh = Budget(hours=1.0, unit_gpus=2)
    fresh.launched("a")
    fresh.result("a", {"time_total_s": 900.0})
    fresh.ended("a", None)
    assert fresh.spent == pytest.approx(900 / 3600 * 2)   # GPU-hours
    cpu = Budget(hours=1.0, unit_gpus=0)
    cpu.ended("a", {"time_total_s": 1800.0})
    assert cpu.spent == pytest.approx(0.5)                  # trial-hours without GPUs


def test_a_spent_budget_is_refused_before_anything_runs(tmp_path):
    from lfm_ray.study.budget import budget_for

    study = Study(name="s", base=RunConfig(data=DataConfig("digits-lt")), budget_hours=0.01,
                  grid={"mix.tau": [0.1]}, results_dir=str(tmp_path))
    table = pd.DataFrame({"status": ["TERMINATED", "ERROR", "INTERRUPTED"],
                          "wall_time_s": [30.0, 6.0, 500.0]})
    with pytest.raises(LfmError, match=r"budget of 0.01 trial-hours is already exhausted "
                                       r"\(0.01 trial-hours measured over 2 ended trials"):
        budget_for(study, table)
    study.budget_hours = 0.1
    assert budget_for(study, table).spent == pytest.approx(36 / 3600)
    study.budget_hours = 0
    with pytest.raises(LfmError, match="--budget-hours 0 is not valid"):
        budget_for(study, table)


@pytest.mark.slow
def test_a_tiny_budget_stops_the_study_and_a_larger_one_finishes_it(tmp_path, capsys,
                                                                      local_ray):
    grid = ["--grid", "mix.tau=0.01,0.1,1", "--seeds", "0", "--max-concurrent", "1"]
    result = tmp_path / "results" / "taus"
    assert main(study_args(tmp_path, "taus", *grid, "--budget-hours", "1e-6")) == 3
    assert "stopped by its budget" in own_text(capsys.readouterr().err)
    meta = json.loads((result / "study.json").read_text())
    assert meta["status"] == "stopped_by_budget" and meta["budget_hours"] == 1e-6
    assert "--budget-hours <more than 1e-06>" in meta["resume_command"]
    table = pd.read_csv(result / "trials.csv")
    assert list(table["status"]) == ["TERMINATED"]   # one launched, no more
    assert not (result / "best.json").exists()
    before = (result / "study.json").read_text()
    assert main(study_args(tmp_path, "taus", *grid, "--budget-hours", "1e-6")) == 2
    assert "is already exhausted" in one_line(capsys.readouterr().err)
    assert (result / "study.json").read_text() == before
    assert main(study_args(tmp_path, "taus", *grid, "--budget-hours", "10")) == 0
    meta = json.loads((result / "study.json").read_text())
    table = pd.read_csv(result / "trials.csv")
    assert meta["status"] == "complete" and (table["status"] == "TERMINATED").sum() == 3
    assert sorted(table["mix.tau"]) == [0.01, 0.1, 1.0]
    assert (result / "best.json").exists()
    assert [i["action"] for i in meta["invocations"]] == ["new", "resume"]  # refused: none
    assert math.isclose(meta["budget_hours"], 10)
