"""Study engine: checks before trials start, grid and Optuna smoke studies on the real engine."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lfm_ray.config import DataConfig, RunConfig
from lfm_ray.errors import LfmError
from lfm_ray.study import Dim, Study, best_configs, parse_dim, validate



def smoke_base(tmp_path) -> RunConfig:
    return RunConfig(data=DataConfig("digits-lt")).override({
        "stage1.epochs": 1, "stage2.epochs": 1, "runtime.max_steps_per_epoch": 2,
        "runtime.batch_size": 16, "data.cache_dir": str(tmp_path / "cache"),
    })


def study_in(tmp_path, **kw) -> Study:
    kw.setdefault("base", smoke_base(tmp_path))
    return Study(storage_path=str(tmp_path / "ray"), results_dir=str(tmp_path / "results"), **kw)


# ---- checks before any trial ----------------------------------------------------------------
def test_unknown_parameter_is_named(tmp_path):
    with pytest.raises(LfmError, match="unknown study parameter 'mix.temperature'"):
        validate(study_in(tmp_path, name="s", grid={"mix.temperature": [1.0]}))


def test_empty_grid_and_empty_values(tmp_path):
    with pytest.raises(LfmError, match="grid is empty"):
        validate(study_in(tmp_path, name="s", grid={}))
    with pytest.raises(LfmError, match="'mix.tau' has no values"):
        validate(study_in(tmp_path, name="s", grid={"mix.tau": []}))


def test_bad_grid_value_fails_before_trials(tmp_path):
    # named as the grid gives it (mix.tau), not as the stage field it sets
    with pytest.raises(LfmError, match=r"mix\.tau=0\.0 is not valid"):
        validate(study_in(tmp_path, name="s", grid={"mix.tau": [0.05, 0.0]}))
    with pytest.raises(LfmError, match="unknown loss 'hinge'"):
        validate(study_in(tmp_path, name="s", grid={"loss.name": ["ce", "hinge"]}))


def test_unwritable_storage_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    study = Study(name="s", base=smoke_base(tmp_path), grid={"mix.tau": [0.05]},
                  storage_path=str(blocker / "ray"), results_dir=str(tmp_path / "r"))
    with pytest.raises(LfmError, match="storage path .* cannot be written"):
        validate(study)


def test_unknown_method_and_conditional_space(tmp_path):
    with pytest.raises(LfmError, match="unknown method 'LFM'"):
        validate(study_in(tmp_path, name="s", grid={"method": ["LFM"]},
                          variants={"CE": {"loss.name": "ce"}}))
    with pytest.raises(LfmError, match="needs low < high"):
        validate(study_in(tmp_path, name="s", search="optuna",
                          space={"stage1.lr": Dim.loguniform(1e-2, 1e-4)}))


def test_parse_dim_forms():
    assert parse_dim("loguniform:0.002:31.25") == Dim("loguniform", 0.002, 31.25)
    assert parse_dim("choice:ce,mms").choices == ("ce", "mms")
    with pytest.raises(LfmError, match="not valid"):
        parse_dim("normal:0")


def test_best_config_averages_over_seeds(tmp_path):
    study = study_in(tmp_path, name="s", grid={"mix.tau": [0.01, 0.05]}, seeds=[0, 1])
    table = pd.DataFrame({
        "trial_id": ["a", "b", "c", "d"], "status": ["TERMINATED"] * 4,
        "mix.tau": [0.01, 0.01, 0.05, 0.05], "runtime.seed": [0, 1, 0, 1],
        "acc_all": [0.9, 0.1, 0.6, 0.6], "acc_few": [0.1, 0.2, 0.3, 0.4],
        "acc_many": [0.5, 0.5, 0.5, 0.5],
    })
    best = best_configs(study, table)
    # τ = 0.01 has the single best trial, but τ = 0.05 the best mean over seeds.
    assert best["acc_all"]["params"] == {"mix.tau": 0.05}
    assert best["acc_all"]["value"] == pytest.approx(0.6)
    assert sorted(best["acc_all"]["trial_ids"]) == ["c", "d"]


def test_script_reports_a_bad_seed_list_with_exit_2(tmp_path, capsys):
    from lfm_ray.commands.catalog import tau_sweep

    code = tau_sweep.main(["--seeds", "a,b", "--storage-path", str(tmp_path / "ray"),
                           "--results-dir", str(tmp_path / "results"), "--no-report"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--seeds 'a,b' is not valid" in err and "Traceback" not in err


# ---- the real engine (one Ray instance for the module) ----------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    import ray

    from lfm_ray.driver.launch import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_grid_smoke_study_writes_tables(tmp_path, local_ray):
    from lfm_ray.commands.catalog import tau_sweep

    code = tau_sweep.main(["--smoke", "--seeds", "0", "--name", "taus", "--dataset", "digits-lt",
                           "--storage-path", str(tmp_path / "ray"),
                           "--results-dir", str(tmp_path / "results"), "--no-report"])
    assert code == 0
    table = pd.read_csv(tmp_path / "results" / "taus" / "trials.csv")
    assert sorted(table["mix.tau"]) == [0.002, 0.01]
    assert (table["status"] == "TERMINATED").all()
    assert (table["epoch"] == 2).all()  # one epoch per stage, on one timeline
    assert table["acc_all"].between(0, 1).all()
    best = json.loads((tmp_path / "results" / "taus" / "best.json").read_text())
    assert best["acc_all"]["params"]["mix.tau"] in (0.002, 0.01)
    meta = json.loads((tmp_path / "results" / "taus" / "study.json").read_text())
    assert meta["swept"] == ["mix.tau", "runtime.seed"]


class SavePeriodSeen:
    """A Tune callback noting the experiment-state save period its controller was started
    with (Tune reads TUNE_GLOBAL_CHECKPOINT_S as the controller starts)."""

    def __new__(cls):
        from ray import tune

        class Seen(tune.Callback):
            seen: list = []

            def on_step_begin(self, iteration, trials, **info):
                import os

                Seen.seen.append(os.environ.get("TUNE_GLOBAL_CHECKPOINT_S"))

        return Seen()


@pytest.mark.slow
def test_tunes_state_is_saved_every_second_in_a_small_study_and_the_setting_goes(tmp_path,
                                                                                local_ray):
    import os

    from lfm_ray.config import SMOKE, RunConfig
    from lfm_ray.study import Study, run_study

    seen = SavePeriodSeen()
    study = Study(name="period", base=RunConfig().override({**SMOKE, "data.name": "digits-lt"}),
                  grid={"mix.tau": [0.01, 0.1]}, storage_path=str(tmp_path / "ray"),
                  results_dir=str(tmp_path / "results"), callbacks=[seen])
    run_study(study)
    assert seen.seen and set(seen.seen) == {"1"}
    assert "TUNE_GLOBAL_CHECKPOINT_S" not in os.environ


@pytest.mark.slow
def test_optuna_smoke_study_with_conditional_parameters(tmp_path, local_ray):
    study = study_in(
        tmp_path, name="opt", search="optuna", num_samples=2, max_concurrent=2,
        space={"stage1.tau": Dim.loguniform(0.01, 1.0),
               "loss.name": Dim.choice(["ce", "focal"]),
               "loss.focal_gamma": Dim.uniform(0.5, 3.0, when={"loss.name": "focal"})},
        optuna_storage=f"sqlite:///{tmp_path / 'optuna.db'}",
    )
    from lfm_ray.study import run_study

    table = run_study(study)
    assert len(table) == 2 and (table["status"] == "TERMINATED").all()
    for _, row in table.iterrows():
        # Focal's γ exists only in focal trials (define-by-run).
        if row["loss.name"] != "focal":
            assert pd.isna(row["loss.focal_gamma"]) or row["loss.focal_gamma"] is None
    import optuna

    stored = optuna.load_study(study_name="opt", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(stored.trials) == 2


def test_best_config_matches_trials_lacking_a_conditional_dimension(tmp_path):
    study = study_in(tmp_path, name="s", search="optuna",
                     space={"loss.name": Dim.choice(["ce", "focal"]),
                            "loss.focal_gamma": Dim.uniform(0.5, 3, when={"loss.name": "focal"})})
    table = pd.DataFrame({"trial_id": ["a", "b"], "status": ["TERMINATED"] * 2,
                          "loss.name": ["ce", "focal"], "loss.focal_gamma": [None, 2.0],
                          "acc_all": [0.7, 0.5], "acc_few": [0.1, 0.2], "acc_many": [0.5, 0.5]})
    best = best_configs(study, table)
    assert best["acc_all"]["trial_ids"] == ["a"]
    assert best["acc_all"]["params"] == {"loss.name": "ce", "loss.focal_gamma": None}


def test_address_with_no_cluster_is_one_clear_error(tmp_path):
    import time

    from lfm_ray.study import run_study

    study = study_in(tmp_path, name="s", grid={"mix.tau": [0.05]}, address="127.0.0.1:9")
    start = time.time()
    with pytest.raises(LfmError, match="no Ray cluster answers at address '127.0.0.1:9'"):
        run_study(study)
    assert time.time() - start < 10


@pytest.mark.slow
def test_a_failing_trial_is_marked_failed_while_the_study_goes_on(tmp_path, local_ray):
    from lfm_ray.analysis import load_study
    from lfm_ray.study import run_study

    # γ = 1000 leaves the rarest digit no training image: that trial fails inside its worker.
    study = study_in(tmp_path, name="fails", grid={"data.imbalance_factor": [10, 1000]},
                     max_failures=0, prepare_data=False)
    table = run_study(study).set_index("data.imbalance_factor")
    assert table.loc[10, "status"] == "TERMINATED"
    assert table.loc[1000, "status"] == "ERROR"
    assert "no training images" in table.loc[1000, "error"]
    assert len(load_study(tmp_path / "results" / "fails").failed) == 1


# ---- where a trial trains: its own process (local mode) or a worker group ---------------------
def test_trial_resources_follow_where_the_trial_trains(tmp_path):
    from lfm_ray.study import trial_resources

    in_trial = study_in(tmp_path, name="s", base=smoke_base(tmp_path).override(
        {"runtime.num_workers": 0, "runtime.cpus_per_worker": 2, "runtime.gpus_per_worker": 0.25}))
    assert trial_resources(in_trial) == {"cpu": 2, "gpu": 0.25}
    group = study_in(tmp_path, name="s", base=smoke_base(tmp_path).override(
        {"runtime.num_workers": 2}))
    assert trial_resources(group) == {"cpu": 0, "memory": 1024}


def test_default_trial_workers(monkeypatch):
    from lfm_ray.driver.launch import default_trial_workers

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert default_trial_workers(None, 0.0) == 0
    assert default_trial_workers(None, 0.25) == 1
    assert default_trial_workers("auto", 0.0) == 1
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert default_trial_workers(None, 0.0) == 1


def test_script_num_workers_flag(tmp_path, capsys):
    from lfm_ray.commands.catalog import tau_sweep

    code = tau_sweep.main(["--num-workers", "-1", "--storage-path", str(tmp_path / "ray"),
                           "--results-dir", str(tmp_path / "results")])
    assert code == 2
    assert "runtime.num_workers=-1 is not valid" in capsys.readouterr().err


def test_lean_trainer_drops_only_the_unused_run_actors(tmp_path, monkeypatch):
    from ray.train.v2._internal.callbacks import BackendSetupCallback
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )

    from lfm_ray.driver.launch import LOCAL_FLAG, make_trainer

    def kinds(local: bool) -> set[type]:
        monkeypatch.setenv(LOCAL_FLAG, "1" if local else "0")
        trainer = make_trainer(smoke_base(tmp_path), name="t", storage_path=str(tmp_path))
        return {type(cb) for cb in trainer._create_default_callbacks()}

    local, cluster = kinds(True), kinds(False)
    assert DatasetsCallback not in local and DatasetsCallback not in cluster
    assert PlacementGroupCleanerCallback not in local
    assert PlacementGroupCleanerCallback in cluster  # a cluster keeps the cleaner
    assert BackendSetupCallback in local and BackendSetupCallback in cluster


@pytest.mark.slow
def test_a_trial_in_its_own_process_matches_a_worker_group_trial(tmp_path, local_ray):
    """Same config and seed: training in the trial's process (Ray Train local mode, reports
    straight to Tune) gives the worker group's numbers, epoch by epoch."""
    from lfm_ray.study import run_study

    tables = {}
    for workers in (0, 1):
        base = smoke_base(tmp_path).override({"runtime.num_workers": workers})
        tables[workers] = run_study(study_in(tmp_path, name=f"w{workers}", base=base,
                                             grid={"mix.tau": [0.05]}))
    in_trial, group = tables[0].iloc[0], tables[1].iloc[0]
    assert in_trial["status"] == group["status"] == "TERMINATED"
    assert in_trial["epoch"] == group["epoch"] == 2
    for key in ("acc_all", "acc_many", "acc_medium", "acc_few", "train_loss"):
        assert in_trial[key] == pytest.approx(group[key], abs=1e-6), key
    # The in-process trial's checkpoint is Tune's own (stored relative to the storage path),
    # with the run's state and history; its small files are copied beside the tables.
    ckpt = tmp_path / "ray" / in_trial["checkpoint_path"]
    assert not Path(in_trial["checkpoint_path"]).is_absolute()
    assert ckpt.is_dir() and {"result.json", "history.json"} <= {p.name for p in ckpt.iterdir()}
    copied = tmp_path / "results" / "w0" / in_trial["artifacts"]
    assert {"result.json", "history.json", "confusion.npz"} <= {p.name for p in copied.iterdir()}
    history = json.loads((copied / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]


@pytest.mark.slow
def test_asha_stops_in_process_trials_cleanly(tmp_path, local_ray):
    """ASHA stops in-process trials between epochs; the reused trial process goes on to
    the next trial. One trial at a time, in grid order, on the training loss: from the same
    seed (same initial weights, same batches and partners) a trial that learns has a lower
    loss at every rung than one whose learning rate leaves it where it started, so the second
    trial falls behind the first by construction, not by chance, and the third, which learns,
    trains on past that rung in the process the second left."""
    from lfm_ray.study import run_study

    base = smoke_base(tmp_path).override({"runtime.num_workers": 0, "stage1.epochs": 6,
                                          "stage2.epochs": 2, "runtime.batch_size": 64,
                                          "runtime.max_steps_per_epoch": None,
                                          "stage1.min_lr": 1e-10})
    table = run_study(study_in(tmp_path, name="asha", base=base, scheduler="asha",
                               max_concurrent=1, metric="train_loss", mode="min",
                               grid={"stage1.lr": [2e-3, 1e-9, 2.2e-3]}))
    table = table.sort_values("trial_id")  # grid order
    assert (table["status"] == "TERMINATED").all()
    assert table["epoch"].max() == 8
    assert table["stopped_early"].any()
    assert (table["stopped_early"] == (table["epoch"] < 8)).all()
    assert not table.iloc[0]["stopped_early"]  # the first has nothing to lose against
    assert table.iloc[1]["stopped_early"]  # the one that does not learn
    # A trial after a stopped one trained in the reused process, at least to the first rung.
    stopped = [i for i in range(len(table)) if table.iloc[i]["stopped_early"]]
    assert all(table.iloc[i + 1]["epoch"] >= 2 for i in stopped if i + 1 < len(table))
