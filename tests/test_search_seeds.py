"""Optuna and random searches over seeds: every sampled configuration trained on each seed,
the searcher told the mean over seeds, every seed's row kept, the report's intervals; the
Pareto set of a search with two objectives; ASHA refused with several seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from lfm_ray.cli import main
from lfm_ray.config import DataConfig, RunConfig
from lfm_ray.errors import LfmError
from lfm_ray.study import Dim, Study, best_configs, validate
from lfm_ray.study.seed_search import SeedRepeater
from lfm_ray.study.spec import SEED

QUICK = ["--stage1.epochs", "1", "--stage2.epochs", "1", "--runtime.max_steps_per_epoch", "2",
         "--runtime.batch_size", "16", "--num-workers", "0", "--max-concurrent", "2"]


def smoke_base(tmp_path) -> RunConfig:
    return RunConfig(data=DataConfig("digits-lt")).override({
        "stage1.epochs": 1, "stage2.epochs": 1, "runtime.max_steps_per_epoch": 2,
        "runtime.batch_size": 16, "runtime.num_workers": 0,
        "data.cache_dir": str(tmp_path / "cache"),
    })


def study_in(tmp_path, **kw) -> Study:
    kw.setdefault("base", smoke_base(tmp_path))
    return Study(storage_path=str(tmp_path / "ray"), results_dir=str(tmp_path / "results"), **kw)


# ---- the searcher wrapper, with a stand-in searcher -----------------------------------------
class Recorder:
    """A searcher that suggests tau = 1, 2, ... and records what it is told."""

    metric, mode = "acc_all", "max"

    def __init__(self):
        self.asked: list[str] = []
        self.told: list[tuple[str, dict | None, bool]] = []

    def set_search_properties(self, metric, mode, config, **spec):
        return True

    def suggest(self, trial_id):
        self.asked.append(trial_id)
        return {"params": {"mix.tau": float(len(self.asked))}}

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.told.append((trial_id, result, error))


def test_each_suggestion_runs_once_per_seed_and_the_searcher_hears_the_mean():
    inner = Recorder()
    rep = SeedRepeater(inner, seeds=[0, 1, 2], metrics=["acc_all", "acc_few"])
    configs = {f"t{i}": rep.suggest(f"t{i}") for i in range(6)}
    assert inner.asked == ["t0", "t3"]  # a new configuration only when the seeds are out
    assert [c["params"] for c in configs.values()] == [
        {"mix.tau": 1.0, SEED: 0}, {"mix.tau": 1.0, SEED: 1}, {"mix.tau": 1.0, SEED: 2},
        {"mix.tau": 2.0, SEED: 0}, {"mix.tau": 2.0, SEED: 1}, {"mix.tau": 2.0, SEED: 2}]
    results = {"t0": (0.5, 0.1), "t1": (0.7, 0.2), "t2": (0.6, 0.6)}
    for i, (trial, (acc, few)) in enumerate(results.items()):
        rep.on_trial_result(trial, {"acc_all": acc, "training_iteration": 1})
        rep.on_trial_complete(trial, {"acc_all": acc, "acc_few": few})
        assert len(inner.told) == (1 if i == 2 else 0)  # told once every seed has ended
    config_id, told, error = inner.told[0]
    assert config_id == "t0" and not error
    assert told["acc_all"] == pytest.approx((0.5 + 0.7 + 0.6) / 3)
    assert told["acc_few"] == pytest.approx((0.1 + 0.2 + 0.6) / 3)
    # A failed seed (or a seed without a value) fails the configuration for the searcher.
    rep.on_trial_complete("t3", {"acc_all": 0.5, "acc_few": 0.1})
    rep.on_trial_complete("t4", None, error=True)
    rep.on_trial_complete("t5", {"acc_all": 0.5, "acc_few": 0.1})
    assert inner.told[1] == ("t3", None, True)


def test_the_repeater_state_survives_tunes_save_and_restore():
    rep = SeedRepeater(Recorder(), seeds=[3, 4], metrics=["acc_all"])
    rep.suggest("a")
    state = rep.get_state()  # what Tune keeps of a wrapper (the searcher saves itself)
    assert "searcher" not in state
    back = SeedRepeater(Recorder(), seeds=[0], metrics=["x"])
    back.set_state(state)
    assert back.suggest("b")["params"] == {"mix.tau": 1.0, SEED: 4}
    back.on_trial_complete("a", {"acc_all": 0.2})
    back.on_trial_complete("b", {"acc_all": 0.4})
    assert back.searcher.told == [("a", {"acc_all": pytest.approx(0.3)}, False)]


# ---- best.json: the Pareto set ---------------------------------------------------------------
def test_best_json_of_two_objectives_is_the_pareto_set_of_the_seed_means(tmp_path):
    study = study_in(tmp_path, name="p", search="optuna", seeds=[0, 1],
                     objectives=["acc_many", "acc_few"],
                     space={"mix.tau": Dim.loguniform(0.01, 1)})
    values = {  # tau -> per seed (acc_many, acc_few)
        0.1: [(0.9, 0.2), (0.8, 0.3)],    # mean (0.85, 0.25): on the front
        0.2: [(0.6, 0.6), (0.7, 0.5)],    # mean (0.65, 0.55): on the front
        0.3: [(0.6, 0.4), (0.6, 0.5)],    # mean (0.6, 0.45): dominated by 0.2
        0.4: [(0.86, 0.1), (0.84, 0.2)],  # mean (0.85, 0.15): dominated by 0.1 (tie in one)
    }
    rows = [{"trial_id": f"{tau}_{s}", "status": "TERMINATED", "mix.tau": tau, SEED: s,
             "acc_many": m, "acc_few": f, "acc_all": (m + f) / 2, "acc_medium": 0.5}
            for tau, seeds in values.items() for s, (m, f) in enumerate(seeds)]
    rows.append({"trial_id": "bad", "status": "ERROR", "mix.tau": 0.5, SEED: 0})
    best = best_configs(study, pd.DataFrame(rows))
    assert best["objectives"] == ["acc_many", "acc_few"] and best["configurations"] == 4
    got = {p["params"]["mix.tau"]: p for p in best["pareto_set"]}
    assert sorted(got) == [0.1, 0.2]
    t = stats.t.ppf(0.975, 1)
    for tau, point in got.items():
        for j, m in enumerate(["acc_many", "acc_few"]):
            v = np.array([seed[j] for seed in values[tau]])
            half = t * v.std(ddof=1) / math.sqrt(2)
            assert point["objectives"][m]["mean"] == pytest.approx(v.mean())
            assert point["objectives"][m]["ci_low"] == pytest.approx(v.mean() - half)
            assert point["objectives"][m]["ci_high"] == pytest.approx(v.mean() + half)
        assert point["seeds"] == 2 and point["seed_values"] == [0, 1]
        assert point["trial_ids"] == [f"{tau}_0", f"{tau}_1"]


# ---- ASHA with seeds ---------------------------------------------------------------------------
def test_asha_with_several_seeds_in_a_search_is_refused(tmp_path):
    for search in ("optuna", "random"):
        with pytest.raises(LfmError, match="ASHA stops each trial on its own"):
            validate(study_in(tmp_path, name="s", search=search, seeds=[0, 1], scheduler="asha",
                              space={"stage1.lr": Dim.loguniform(1e-4, 1e-2)}))
    validate(study_in(tmp_path, name="s", search="optuna", seeds=[0], scheduler="asha",
                      space={"stage1.lr": Dim.loguniform(1e-4, 1e-2)}))
    validate(study_in(tmp_path, name="s", search="optuna", seeds=[0, 1],
                      space={"stage1.lr": Dim.loguniform(1e-4, 1e-2)}))


def test_asha_with_seeds_from_the_command_line_is_one_line_and_exit_2(tmp_path, capsys,
                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["study", "--name", "s", "--search", "optuna", "--space",
                 "mix.tau=loguniform:0.01:1", "--seeds", "0,1", "--scheduler", "asha",
                 "--storage-path", str(tmp_path / "ray"), "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "ASHA stops each trial on its own" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_dry_run_counts_one_trial_per_seed_of_each_sample(tmp_path):
    from lfm_ray.study.run import plan_study

    study = study_in(tmp_path, name="d", search="optuna", seeds=[0, 1, 2], num_samples=4,
                     space={"mix.tau": Dim.loguniform(0.01, 1)})
    assert plan_study(study)["trials"] == 12


# ---- real searches -------------------------------------------------------------------------
def optuna_trials(storage_root: Path, name: str):
    import optuna

    from lfm_ray.study.optuna_storage import JOURNAL_FILE, open_journal

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=open_journal(
        storage_root / name / JOURNAL_FILE)).trials


@pytest.mark.slow
def test_a_three_seed_optuna_search_from_the_command_line(tmp_path, local_ray):
    results, storage = tmp_path / "r", tmp_path / "ray"
    assert main(["study", "--name", "s3", "--dataset", "digits-lt", "--search", "optuna", "--space",
                 "mix.tau=loguniform:0.01:1", "--num-samples", "2", "--seeds", "0,1,2", *QUICK,
                 "--results-dir", str(results), "--storage-path", str(storage),
                 "--data.cache_dir", str(tmp_path / "cache")]) == 0
    table = pd.read_csv(results / "s3" / "trials.csv")
    assert len(table) == 6 and (table["status"] == "TERMINATED").all()
    by_config = table.groupby("mix.tau")
    assert len(by_config) == 2
    assert all(sorted(rows[SEED]) == [0, 1, 2] for _, rows in by_config)
    trials = optuna_trials(storage, "s3")
    assert len(trials) == 2  # one Optuna trial per configuration
    for t in trials:
        rows = table[table["mix.tau"] == t.params["params/mix.tau"]]
        assert len(rows) == 3
        assert t.value == pytest.approx(rows["acc_all"].mean(), abs=1e-12)
    best = json.loads((results / "s3" / "best.json").read_text())["acc_all"]
    assert best["seeds"] == 3
    page = (results / "s3" / "report.html").read_text()
    assert "sampled configurations by" in page and "95 % interval (%)" in page
    agg = table.groupby("mix.tau")["acc_all"]
    lo = agg.mean() - stats.t.ppf(0.975, 2) * agg.std(ddof=1) / math.sqrt(3)
    hi = agg.mean() + stats.t.ppf(0.975, 2) * agg.std(ddof=1) / math.sqrt(3)
    for tau in agg.mean().index:  # each configuration's interval, as the report prints it
        text = f"[{max(lo[tau] * 100, 0):.2f}, {min(hi[tau] * 100, 100):.2f}]"
        assert text in page


@pytest.mark.slow
def test_a_two_objective_search_over_seeds_writes_its_pareto_set(tmp_path, local_ray):
    from lfm_ray.analysis import write_report
    from lfm_ray.study import run_study

    study = study_in(tmp_path, name="mo", search="optuna", seeds=[0, 1], num_samples=2,
                     max_concurrent=2, objectives=["acc_many", "acc_few"],
                     space={"mix.tau": Dim.loguniform(0.01, 1.0)})
    table = run_study(study)
    assert len(table) == 4 and (table["status"] == "TERMINATED").all()
    means = table.groupby("mix.tau")[["acc_many", "acc_few"]].mean()
    front = [tau for tau in means.index if not any(
        (means.loc[o] >= means.loc[tau]).all() and (means.loc[o] > means.loc[tau]).any()
        for o in means.index if o != tau)]
    best = json.loads((tmp_path / "results" / "mo" / "best.json").read_text())
    assert sorted(p["params"]["mix.tau"] for p in best["pareto_set"]) == sorted(front)
    for p in best["pareto_set"]:
        for m in ("acc_many", "acc_few"):
            assert p["objectives"][m]["mean"] == pytest.approx(means.loc[p["params"]["mix.tau"], m])
    # Optuna was told each objective's mean over the seeds.
    for t in optuna_trials(tmp_path / "ray", "mo"):
        tau = t.params["params/mix.tau"]
        assert t.values == pytest.approx([means.loc[tau, "acc_many"], means.loc[tau, "acc_few"]])
    page = write_report(tmp_path / "results" / "mo", png=False).read_text()
    assert "Trade-off front: acc_few against acc_many" in page
    assert "Several objectives: no single best" in page


@pytest.mark.slow
def test_a_random_search_keeps_each_samples_values_over_its_seeds(tmp_path, local_ray):
    from lfm_ray.study import run_study

    table = run_study(study_in(tmp_path, name="rs", search="random", seeds=[0, 1],
                               num_samples=2, max_concurrent=2,
                               space={"mix.tau": Dim.loguniform(0.01, 1.0)}))
    assert len(table) == 4 and (table["status"] == "TERMINATED").all()
    by_config = table.groupby("mix.tau")[SEED].apply(sorted)
    assert len(by_config) == 2 and all(s == [0, 1] for s in by_config)


def test_the_optuna_script_runs_over_seeds_and_objectives(tmp_path, capsys):
    """studies/optuna_search.py searches over seeds 0-2 by default (one seed with --smoke);
    --objectives makes it a Pareto search (checked here as its dry run plans it)."""
    from lfm_ray.commands.catalog import optuna_search

    where = ["--dataset", "digits-lt", "--smoke", "--results-dir", str(tmp_path / "r"),
             "--storage-path", str(tmp_path / "ray"), "--dry-run"]
    assert optuna_search.main(where) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["seeds"] == [0] and plan["trials"] == 4
    full = [w for w in where if w != "--smoke"]
    assert optuna_search.main(full) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["seeds"] == [0, 1, 2] and plan["trials"] == 12 * 3
    assert optuna_search.main([*where, "--seeds", "0,1,2", "--objectives",
                               "acc_many,acc_few"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["seeds"] == [0, 1, 2] and plan["trials"] == 12
    assert plan["objectives"] == ["acc_many", "acc_few"]
    assert not (tmp_path / "r").exists()


# ---- the analysis of a search over seeds (fabricated results) -----------------------------
def seeded_search(root: Path, objectives: list[str]) -> Path:
    """A finished Optuna search over seeds 0-2: four values of τ, acc_* per seed."""
    rng = np.random.default_rng(5)
    d = root / "ss"
    d.mkdir()
    rows = []
    for i, tau in enumerate([0.02, 0.05, 0.2, 0.7]):
        for seed in range(3):
            accs = {f"acc_{g}": float(rng.uniform(0.3, 0.9))
                    for g in ("many", "medium", "few", "all")}
            rows.append({"trial_id": f"t{i}{seed}", "status": "TERMINATED", "mix.tau": tau,
                         SEED: seed, **accs})
    pd.DataFrame(rows).to_csv(d / "trials.csv", index=False)
    (d / "study.json").write_text(json.dumps({
        "name": "ss", "search": "optuna", "metric": "acc_all", "mode": "max",
        "swept": ["mix.tau", SEED], "seeds": [0, 1, 2], "num_samples": 4,
        "space": {"mix.tau": Dim.loguniform(0.01, 1).to_dict()},
        "objectives": objectives, "command": ["lfm-ray", "study"]}))
    return d


def test_the_rebuilt_optuna_study_of_a_search_over_seeds_holds_the_means(tmp_path):
    from lfm_ray.analysis import load_study, optuna_study

    study = load_study(seeded_search(tmp_path, []))
    ost = optuna_study(study)
    means = study.finished.groupby("mix.tau")["acc_all"].mean()
    assert len(ost.trials) == 4
    for t in ost.trials:
        assert t.value == pytest.approx(means[t.params["mix.tau"]])


def test_the_report_of_a_search_over_seeds_shows_intervals_and_the_front(tmp_path):
    from lfm_ray.analysis import write_report

    d = seeded_search(tmp_path, ["acc_many", "acc_few"])
    page = write_report(d, png=False).read_text()
    table = pd.read_csv(d / "trials.csv")
    agg = table.groupby("mix.tau")["acc_all"]
    half = stats.t.ppf(0.975, 2) * agg.std(ddof=1) / math.sqrt(3)
    for tau, mean in agg.mean().items():
        lo, hi = (mean - half[tau]) * 100, (mean + half[tau]) * 100
        assert f"[{max(lo, 0):.2f}, {min(hi, 100):.2f}]" in page
    assert "Trade-off front: acc_few against acc_many" in page
    assert "Several objectives: no single best" in page
    means = table.groupby("mix.tau")[["acc_many", "acc_few"]].mean()
    front = [tau for tau in means.index if not any(
        (means.loc[o] >= means.loc[tau]).all() and (means.loc[o] > means.loc[tau]).any()
        for o in means.index if o != tau)]
    pareto = page[page.index("Several objectives"):page.index("</table>",
                                                              page.index("Several objectives"))]
    assert pareto.count("<tr>") - 1 == len(front)  # a header row, then the front


@pytest.mark.slow
def test_an_interrupted_search_over_seeds_resumes_and_tells_optuna_each_mean_once(tmp_path,
                                                                                   local_ray):
    """Ctrl-C after the first seed's trial; the same request again resumes: the wrapper's
    state (which configuration's seeds are still to run, which have ended) comes back with
    Tune's experiment, so every configuration still gets all its seeds and Optuna one mean."""
    from test_interrupted_study import CtrlCAfterFirstTrial

    from lfm_ray.study import StudyInterrupted, run_study

    study = study_in(tmp_path, name="cut", search="optuna", seeds=[0, 1], num_samples=2,
                     max_concurrent=1, space={"mix.tau": Dim.loguniform(0.01, 1.0)},
                     callbacks=[CtrlCAfterFirstTrial(tmp_path / "sent")])
    with pytest.raises(StudyInterrupted):
        run_study(study)
    study.callbacks = []
    table = run_study(study)
    done = table[table["status"] == "TERMINATED"]
    assert len(done) == 4
    assert all(sorted(rows[SEED]) == [0, 1] for _, rows in done.groupby("mix.tau"))
    trials = optuna_trials(tmp_path / "ray", "cut")
    assert len(trials) == 2
    for t in trials:
        rows = done[done["mix.tau"] == t.params["params/mix.tau"]]
        assert t.value == pytest.approx(rows["acc_all"].mean(), abs=1e-12)
