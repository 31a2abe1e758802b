"""An Optuna search's storage: Optuna's journal file by default, written by two drivers at
once without a failure or a lost trial; a database URL checked before anything runs; the
kind recorded in study.json and a resume into another kind refused."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from lfm_ray.config import DataConfig, RunConfig
from lfm_ray.errors import LfmError
from lfm_ray.study import Study
from lfm_ray.study.optuna_storage import (
    JOURNAL_FILE, check_storage_choice, journal_path, open_journal, storage_kind,
    storage_record,
)
from lfm_ray.study.record import plan_rerun, request
from lfm_ray.study.spec import Dim

TRIALS_EACH = 25


def optuna_study(tmp: str, name: str = "opt", **kw) -> Study:
    base = RunConfig(data=DataConfig("digits-lt")).override({
        "stage1.epochs": 1, "stage2.epochs": 1, "runtime.max_steps_per_epoch": 2,
        "runtime.batch_size": 16, "data.cache_dir": str(Path(tmp) / "cache")})
    kw.setdefault("num_samples", 4)
    return Study(name=name, base=base, search="optuna", metric="acc_all", mode="max",
                 storage_path=str(Path(tmp) / "ray"),
                 results_dir=str(Path(tmp) / "results"),
                 space={"mix.tau": Dim.loguniform(0.01, 1.0),
                        "loss.name": Dim.choice(["ce", "focal"]),
                        "loss.focal_gamma": Dim.uniform(0.5, 3.0, when={"loss.name": "focal"})},
                 **kw)


def driver(tmp: str, tag: str, barrier, name: str) -> None:
    """One driver: lfm-ray's searcher (Ray Tune's OptunaSearch on the study's storage) asks
    for a trial and is told its result, TRIALS_EACH times, as Tune does for each trial."""
    from lfm_ray.study.search import search_alg

    alg = search_alg(optuna_study(tmp, name))
    barrier.wait()  # both drivers start writing together
    for i in range(TRIALS_EACH):
        tid = f"{tag}_{i}"
        config = alg.suggest(tid)
        tau = config["params"]["mix.tau"]
        alg.on_trial_complete(tid, {"acc_all": 1.0 - abs(tau - 0.05), "epoch": 1})


def test_two_drivers_write_one_journal_at_once(tmp_path):
    """Two drivers of one study (two processes, as on two machines sharing the storage
    path) ask for and finish trials at the same time: no failure, every trial kept, one
    numbering with no number given twice."""
    import optuna

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=driver, args=(str(tmp_path), f"d{k}", barrier, "opt"))
             for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]
    storage = open_journal(journal_path(optuna_study(str(tmp_path))))
    trials = optuna.load_study(study_name="opt", storage=storage).trials
    assert len(trials) == 2 * TRIALS_EACH
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert all(0.01 <= t.params["params/mix.tau"] <= 1.0 for t in trials)
    assert sorted(t.number for t in trials) == list(range(2 * TRIALS_EACH))


def test_kinds_and_record(tmp_path):
    assert storage_kind(optuna_study(str(tmp_path))) == "journal"
    assert storage_record(optuna_study(str(tmp_path))) == {
        "optuna_storage_kind": "journal", "optuna_journal": f"opt/{JOURNAL_FILE}"}
    url = f"sqlite:///{tmp_path / 'o.db'}"
    assert storage_kind(optuna_study(str(tmp_path), optuna_storage=url)) == "rdb"
    cloud = optuna_study(str(tmp_path))
    cloud.storage_path = "s3://bucket/ray"
    assert storage_kind(cloud) == "memory"
    grid = Study(name="g", search="grid", grid={"mix.tau": [0.1]})
    assert storage_kind(grid) is None and request(grid)["optuna_storage_kind"] is None


def test_resume_with_another_storage_kind_is_refused(tmp_path):
    journal = optuna_study(str(tmp_path))
    stored = {"request": request(journal), "experiments": ["opt/tune"]}
    assert plan_rerun(journal, stored).kind == "resume"
    db = optuna_study(str(tmp_path), optuna_storage=f"sqlite:///{tmp_path / 'o.db'}")
    with pytest.raises(LfmError, match='optuna_storage_kind: "journal" -> "rdb"'):
        plan_rerun(db, stored)
    # Another URL of the same kind is the same kind of store: a resume, not a refusal.
    stored_db = {"request": request(db), "experiments": ["opt/tune"]}
    other = optuna_study(str(tmp_path), optuna_storage=f"sqlite:///{tmp_path / 'p.db'}")
    assert plan_rerun(other, stored_db).kind == "resume"


def test_a_bad_url_is_one_clear_error_and_writes_nothing(tmp_path):
    with pytest.raises(LfmError, match="is not a database URL Optuna can use"):
        check_storage_choice(optuna_study(str(tmp_path), optuna_storage="bogus://x"))
    with pytest.raises(LfmError, match="the database cannot be opened"):
        check_storage_choice(optuna_study(
            str(tmp_path), optuna_storage="postgresql://u@127.0.0.1:9/db"))
    grid = Study(name="g", search="grid", grid={"mix.tau": [0.1]},
                 optuna_storage=f"sqlite:///{tmp_path / 'o.db'}")
    with pytest.raises(LfmError, match="--optuna-storage is for --search optuna"):
        check_storage_choice(grid)
    assert not list(tmp_path.iterdir())


def test_optuna_smoke_study_writes_its_journal(tmp_path, local_ray):
    """A real Optuna search through run_study: the trials land in the journal file, which
    Optuna (and so optuna-dashboard) opens, and study.json names it."""
    import optuna

    from lfm_ray.study import run_study

    study = optuna_study(str(tmp_path), num_samples=2)
    study.max_concurrent = 2
    table = run_study(study)
    assert len(table) == 2 and (table["status"] == "TERMINATED").all()
    path = journal_path(study)
    assert path.is_file()
    stored = optuna.load_study(study_name="opt", storage=open_journal(path))
    assert len(stored.trials) == 2
    assert sorted(t.params["params/mix.tau"] for t in stored.trials) == \
        sorted(table["mix.tau"].tolist())
    meta = json.loads((tmp_path / "results" / "opt" / "study.json").read_text())
    assert meta["optuna_storage_kind"] == "journal"
    assert meta["optuna_journal"] == f"opt/{JOURNAL_FILE}"
    assert meta["request"]["optuna_storage_kind"] == "journal"
    # The report's Optuna views read the journal, not a rebuilt copy.
    from lfm_ray.analysis import load_study, optuna_study as views_study

    loaded = views_study(load_study(tmp_path / "results" / "opt"))
    assert len(loaded.trials) == 2 and loaded._storage.__class__.__name__ == "JournalStorage"


def test_dry_run_names_the_storage_kind(tmp_path):
    from lfm_ray.study.run import plan_study

    assert plan_study(optuna_study(str(tmp_path)))["optuna_storage"] == "journal"
    assert not (tmp_path / "ray").exists()  # a dry run writes nothing
