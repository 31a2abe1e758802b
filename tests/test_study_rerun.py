"""What runs is what was asked, on the real engine: reruns under a stored name (resume, refuse,
extend, restart), the recorded command, the Python API, tracker files and the stock
TorchTrainer fallback. One Ray instance for the module."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from lfm_ray.driver.launch import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def run_tau(tmp_path, *flags: str) -> int:
    from lfm_ray.commands.catalog import tau_sweep

    return tau_sweep.main(["--smoke", "--name", "taus", "--no-report", "--dataset", "digits-lt",
                           "--runtime.max_steps_per_epoch", "2",
                           "--data.cache_dir", str(tmp_path / "cache"),
                           "--storage-path", str(tmp_path / "ray"),
                           "--results-dir", str(tmp_path / "results"), *flags])


def table(tmp_path) -> pd.DataFrame:
    return pd.read_csv(tmp_path / "results" / "taus" / "trials.csv")


@pytest.mark.slow
def test_a_rerun_resumes_refuses_extends_or_restarts(tmp_path, capsys, local_ray):
    assert run_tau(tmp_path, "--seeds", "0") == 0
    out = capsys.readouterr().out
    # The terminal: Tune's status table with the swept parameter, not a configuration table
    # and a result table for every trial (those come with --verbose).
    assert "Trial status" in out and "params/mix.tau" in out
    assert "started with configuration" not in out and "completed after" not in out
    assert "best trial" not in out  # one trial's value is no comparison
    first = table(tmp_path)
    assert sorted(first["mix.tau"]) == [0.002, 0.01] and len(first) == 2
    meta_path = tmp_path / "results" / "taus" / "study.json"
    meta = json.loads(meta_path.read_text())
    assert meta["command"][:2] == ["python", "studies/tau_sweep.py"] or \
        meta["command"][1].endswith("studies/tau_sweep.py")
    assert "--seeds" in meta["command"]
    assert "pytest" in " ".join(meta["called_by"])  # called from this test, not a shell
    assert meta["versions"]["lfm-ray"] and "cpu_model" in meta["machine"]

    # The same request again: resumed, nothing retrained.
    assert run_tau(tmp_path, "--seeds", "0") == 0
    assert sorted(table(tmp_path)["trial_id"]) == sorted(first["trial_id"])
    capsys.readouterr()

    # More seeds without --extend: refused, every difference named, nothing written.
    before = meta_path.read_text()
    assert run_tau(tmp_path, "--seeds", "0,1") == 2
    err = capsys.readouterr().err
    assert "seeds: [0] -> [0, 1]" in err and "--extend" in err and "--restart" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert meta_path.read_text() == before
    assert sorted(table(tmp_path)["trial_id"]) == sorted(first["trial_id"])

    # Another loss and learning rate: refused, and it cannot be an extension.
    assert run_tau(tmp_path, "--seeds", "0", "--loss", "focal", "--stage1.lr", "0.001") == 2
    err = capsys.readouterr().err
    assert "base_configs.digits-lt.loss.name: \"ce\" -> \"focal\"" in err
    assert "base_configs.digits-lt.stage1.lr: 0.002 -> 0.001" in err
    assert "--extend" not in err.split("To proceed")[1]
    assert run_tau(tmp_path, "--seeds", "0", "--loss", "focal", "--extend") == 2
    assert "cannot be extended" in capsys.readouterr().err
    assert table(tmp_path)["loss.name"].eq("ce").all()

    # --extend with a new seed: only the two new trials run; the finished ones are kept.
    assert run_tau(tmp_path, "--seeds", "0,1", "--extend") == 0
    extended = table(tmp_path)
    assert len(extended) == 4 and set(first["trial_id"]) <= set(extended["trial_id"])
    assert sorted(extended["runtime.seed"]) == [0, 0, 1, 1]
    assert (extended["status"] == "TERMINATED").all()
    meta = json.loads(meta_path.read_text())
    assert meta["experiments"] == ["taus/tune", "taus/tune-ext1"] and meta["seeds"] == [0, 1]
    # ... and the extended request is now the stored one: the same command resumes.
    assert run_tau(tmp_path, "--seeds", "0,1") == 0
    assert sorted(table(tmp_path)["trial_id"]) == sorted(extended["trial_id"])

    # --restart discards the stored trials and runs the new request afresh.
    assert run_tau(tmp_path, "--seeds", "0", "--loss", "focal", "--restart") == 0
    fresh = table(tmp_path)
    assert len(fresh) == 2 and not set(fresh["trial_id"]) & set(extended["trial_id"])
    assert fresh["loss.name"].eq("focal").all()
    assert json.loads(meta_path.read_text())["experiments"] == ["taus/tune"]
    assert not (tmp_path / "ray" / "taus" / "tune-ext1").exists()


def test_the_calling_command_is_recorded(tmp_path, monkeypatch):
    from lfm_ray.commands.study_flags import script_command

    monkeypatch.setattr(sys, "argv", ["studies/run_all.py", "tau_sweep"])
    command, caller = script_command(str(ROOT / "studies" / "tau_sweep.py"), ["--restart"])
    assert command[-1] == "--restart" and command[1].endswith("tau_sweep.py")
    assert caller[1:] == ["studies/run_all.py", "tau_sweep"]
    monkeypatch.setattr(sys, "argv", [str(ROOT / "studies" / "tau_sweep.py"), "--smoke"])
    command, caller = script_command(str(ROOT / "studies" / "tau_sweep.py"), None)
    assert command[2:] == ["--smoke"] and caller is None


def test_the_recorded_commit_is_dirty_only_for_code_changes(tmp_path):
    """study.json's commit gets "+dirty" when a tracked file outside results/ changed; the
    demo outputs under results/, which run_all rewrites as it runs, do not count."""
    import subprocess

    from lfm_ray.study.record import git_commit

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "trials.csv").write_text("a\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = git("rev-parse", "HEAD")
    assert git_commit(tmp_path) == head
    (tmp_path / "results" / "trials.csv").write_text("b\n")
    (tmp_path / "untracked.txt").write_text("new\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == head + "+dirty"


@pytest.mark.slow
def test_python_api_runs_a_study(tmp_path, local_ray):
    from ray.tune import ResultGrid

    from lfm_ray import RunConfig, Study, StudyResults, load_study, run_study, write_report
    from lfm_ray.config import DataConfig

    base = RunConfig(data=DataConfig("digits-lt")).override({"stage1.epochs": 1, "stage2.epochs": 1,
                                 "runtime.max_steps_per_epoch": 2, "runtime.num_workers": 0,
                                 "data.cache_dir": str(tmp_path / "cache")})
    study = Study(name="api", base=base, grid={"mix.tau": [0.05]}, seeds=[0, 1],
                  storage_path=str(tmp_path / "ray"), results_dir=str(tmp_path / "results"),
                  trackers=["tensorboard", "mlflow"])
    trials = run_study(study)
    assert len(trials) == 2 and (trials["status"] == "TERMINATED").all()
    assert isinstance(study.result_grid, ResultGrid)
    # Tune's trial config holds the swept values only; trial folders are named after them.
    for result in study.result_grid:
        assert set(result.config) <= {"params", "point"}
        assert Path(result.path).name.startswith("api_mix.tau=0.05_seed=")
    loaded = load_study(tmp_path / "results" / "api")
    assert isinstance(loaded, StudyResults) and len(loaded.trials) == 2
    assert not loaded.epochs.empty
    report = write_report(tmp_path / "results" / "api", png=False)
    assert Path(report).is_file()
    # Tracker files: TensorBoard events under the storage path, MLflow's SQLite store there.
    events = list((tmp_path / "ray" / "api").rglob("events.out.tfevents*"))
    assert len(events) == 2
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'ray' / 'api' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("api")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and all("acc_all" in r.data.metrics for r in runs)


@pytest.mark.slow
def test_stock_torch_trainer_when_rays_private_modules_move(tmp_path, monkeypatch, local_ray):
    import builtins

    from ray.train.torch import TorchTrainer

    from lfm_ray.config import DataConfig, RunConfig
    from lfm_ray.driver.launch import _lean_trainer_class, fit_run

    real_import = builtins.__import__

    def moved(name, globals=None, *args, **kwargs):
        # As if a later Ray had moved the private modules lfm-ray reaches for (Ray's own
        # imports of them still work).
        if name.startswith("ray.train.v2._internal") and \
                (globals or {}).get("__name__") == "lfm_ray.driver.launch":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, globals, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", moved)
    assert _lean_trainer_class() is TorchTrainer
    cfg = RunConfig(data=DataConfig("digits-lt")).override({"stage1.epochs": 1, "stage2.epochs": 1,
                                "runtime.max_steps_per_epoch": 2,
                                "data.cache_dir": str(tmp_path / "cache")})
    final = fit_run(cfg, tmp_path / "run")
    assert final["epoch"] == 2 and (tmp_path / "run" / "metrics.json").is_file()


@pytest.mark.slow
def test_a_shared_stage1_study_branches_stage2_and_equals_full_runs(tmp_path, local_ray):
    """The paper's ablation protocol: one stage 1 per seed, each τ swept in stage 2 from its
    checkpoint; each branch ends exactly where a full two-stage run of its config ends."""
    from lfm_ray import RunConfig, Study, run_study
    from lfm_ray.config import DataConfig

    base = RunConfig(data=DataConfig("digits-lt")).override({"stage1.epochs": 2, "stage2.epochs": 1,
                                 "runtime.max_steps_per_epoch": 2, "runtime.num_workers": 0,
                                 "mix.tau": 0.05, "data.cache_dir": str(tmp_path / "cache")})

    def study(name: str, share: bool) -> Study:
        return Study(name=name, base=base, grid={"stage2.tau": [0.01, 1.25]}, seeds=[0],
                     share_stage1=share, storage_path=str(tmp_path / "ray"),
                     results_dir=str(tmp_path / "results"))

    shared = run_study(study("shared", True)).set_index("stage2.tau")
    full = run_study(study("full", False)).set_index("stage2.tau")
    assert (shared["status"] == "TERMINATED").all() and len(shared) == 2
    for tau in (0.01, 1.25):
        for key in ("acc_all", "acc_few", "acc_many", "train_loss"):
            assert shared.loc[tau, key] == pytest.approx(full.loc[tau, key], abs=1e-9), key
        assert shared.loc[tau, "epoch"] == full.loc[tau, "epoch"] == 3
    meta = json.loads((tmp_path / "results" / "shared" / "study.json").read_text())
    assert meta["share_stage1"] and len(meta["stage1_checkpoints"]) == 1  # one seed, one stage 1
    stage1_runs = [p for p in (tmp_path / "ray" / "shared" / "stage1").iterdir() if p.is_dir()]
    assert len(stage1_runs) == 1


def test_a_branch_without_its_stage1_checkpoint_fails_clearly(tmp_path):
    from lfm_ray import RunConfig, Study
    from lfm_ray.config import DataConfig
    from lfm_ray.errors import LfmError
    from lfm_ray.study import TrialPlan

    study = Study(name="s", base=RunConfig(data=DataConfig("digits-lt")), grid={"stage2.tau": [0.01]}, share_stage1=True)
    plan = TrialPlan.of(study, stage1_checkpoints={})
    with pytest.raises(LfmError, match="shared stage-1 checkpoint of this trial .* is missing"):
        plan.stage_extra(plan.config_for({"stage2.tau": 0.01, "runtime.seed": 0}))
    assert TrialPlan.of(study, stage="stage1").stage_extra(RunConfig(data=DataConfig("digits-lt"))) == \
        {"stop_after_stage1": True}
