"""Analysis: loading (results dir, trials CSV, a real Tune experiment through Tune's reader),
aggregation against a direct computation, figure contents, comparison tables, Optuna views,
the report file, t-SNE of a checkpoint, and one clear message per bad input."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from lfm_ray.analysis import (
    ablation_figure, aggregate, comparison_figure, comparison_html, comparison_table,
    comparison_table_figure, learning_curves_figure, load_study, optuna_figures, optuna_study,
    per_class_figure, study_figures, write_report,
)
from lfm_ray.cli import main
from lfm_ray.config import RunConfig
from lfm_ray.errors import LfmError

GROUPS = ("many", "medium", "few", "all")
COUNTS = [124, 96, 74, 57, 44, 34, 26, 20, 16, 12]  # digits-lt's training counts
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
E1, E2 = 2, 2  # epochs of the two stages in the fabricated studies


def tau_accuracy(params: dict[str, Any], seed: int) -> dict[str, float]:
    """A peak at τ = 0.05 plus seed noise, so the best value is known."""
    rng = np.random.default_rng(1000 * seed + int(1e4 * float(params.get("mix.tau", 1))))
    peak = -abs(math.log10(float(params.get("mix.tau", 0.05))) - math.log10(0.05))
    bonus = 0.05 * float(params.get("mix.alpha", 0))
    return {f"acc_{g}": float(np.clip(0.6 + 0.1 * peak + bonus + (0.1 if g == "many" else 0)
                                      + rng.normal(0, 0.02), 0, 1)) for g in GROUPS}


def make_study(root: Path, name: str, grid: dict[str, list], seeds=(0, 1),
               acc: Callable[[dict, int], dict] = tau_accuracy, failed: int = 0,
               stopped: tuple[int, ...] = (), search: str = "grid",
               meta: dict | None = None) -> Path:
    """A results directory in the formats lfm_ray.study writes: trials.csv, study.json, and
    each trial's last checkpoint directory with result.json (per-class accuracy) and
    history.json (every epoch), as the trainer leaves them."""
    keys = list(grid)
    rows = []
    combos = list(itertools.product(*grid.values())) if keys else [()]
    for i, (values, seed) in enumerate(itertools.product(combos, seeds)):
        params = dict(zip(keys, values))
        final = acc(params, seed)
        early = i in stopped
        last = 2 if early else E1 + E2
        ckpt = root / "ray" / f"{name}_train" / f"train_{i:05d}" / f"epoch_{last:04d}"
        ckpt.mkdir(parents=True)
        history = [{"epoch": e, "stage": 1 if e <= E1 else 2, "train_loss": 2.0 / e,
                    **{k: v * e / (E1 + E2) for k, v in final.items()}} for e in range(1, last + 1)]
        per_class = [float(np.clip(final["acc_all"] + 0.002 * (c - 50), 0, 1)) for c in COUNTS]
        (ckpt / "result.json").write_text(json.dumps({
            **history[-1], "per_class_acc": per_class, "class_counts": COUNTS,
            "class_names": NAMES}))
        (ckpt / "history.json").write_text(json.dumps(history))
        rows.append({"trial_id": f"{name[:3]}_{i:05d}", "status": "TERMINATED", "error": "",
                     **params, "runtime.seed": seed, "data.name": "digits-lt",
                     "model.name": "tiny", "loss.name": params.get("loss.name", "ce"),
                     "mix.method": params.get("mix.method", "lfm"), "epoch": last,
                     "stage": 1 if last <= E1 else 2, "train_loss": 2.0 / last,
                     **history[-1], "wall_time_s": 30.0 + i, "train_time_s": 8.0,
                     "gpu_hours": 0.0, "stopped_early": early, "checkpoint_path": str(ckpt),
                     "node_id": "n0"})
    for j in range(failed):
        rows.append({"trial_id": f"bad_{j}", "status": "ERROR",
                     "error": "RuntimeError: CUDA out of memory", **dict(zip(keys, combos[0])),
                     "runtime.seed": 99, "data.name": "digits-lt", "model.name": "tiny"})
    d = root / name
    d.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(d / "trials.csv", index=False)
    base = RunConfig().override({"stage1.epochs": E1, "stage2.epochs": E2}).to_dict()
    swept = [*keys, "runtime.seed"] if search == "grid" else keys
    (d / "study.json").write_text(json.dumps({
        "name": name, "command": ["python", f"studies/{name}.py"], "search": search,
        "swept": swept, "grid": grid if search == "grid" else {}, "space": {},
        "variants": {}, "seeds": list(seeds), "metric": "acc_all", "mode": "max",
        "objectives": [], "scheduler": "none", "optuna_storage": None,
        "experiment_path": str(root / "ray" / "not_there"), "base_config": base,
        "machine": {"platform": "Linux-test", "cpus": 2, "python": "3.11"},
        "versions": {"ray": "2.60.0", "plotly": "7"}, **(meta or {})}))
    return d


TAUS = [0.002, 0.05, 1.25]


@pytest.fixture()
def tau_study(tmp_path) -> Path:
    return make_study(tmp_path, "tau_sweep", {"mix.tau": TAUS}, stopped=(1,), failed=1)


# ---- loading ------------------------------------------------------------------------------
def test_results_dir_loads_trials_epochs_and_meta(tau_study):
    study = load_study(tau_study)
    assert study.name == "tau_sweep" and study.swept == ["mix.tau", "runtime.seed"]
    assert len(study.trials) == 7 and len(study.finished) == 6 and len(study.failed) == 1
    assert study.trials["stopped_early"].dtype == bool and study.trials["stopped_early"].sum() == 1
    # The Tune experiment is not reachable: the curves come from each checkpoint's history.
    assert len(study.epochs) == 5 * (E1 + E2) + 2
    first = study.epochs[study.epochs["trial_id"] == "tau_00000"]
    assert list(first["epoch"]) == [1, 2, 3, 4] and list(first["stage"]) == [1, 1, 2, 2]
    assert study.meta["command"] == ["python", "studies/tau_sweep.py"]


def test_trials_csv_loads_alone_and_with_its_study_json(tau_study, tmp_path):
    beside = load_study(tau_study / "trials.csv")
    assert beside.name == "tau_sweep" and len(beside.trials) == 7
    bare = tmp_path / "mine.csv"
    pd.read_csv(tau_study / "trials.csv").drop(columns=["status", "error"]).to_csv(bare, index=False)
    study = load_study(bare)
    assert study.name == "mine"
    # No status column: a row with metrics counts as finished, one without as failed.
    assert len(study.finished) == 6 and len(study.failed) == 1
    assert "mix.tau" in study.swept and "runtime.seed" in study.swept


# ---- aggregation --------------------------------------------------------------------------
def test_aggregate_matches_a_direct_computation(tau_study):
    study = load_study(tau_study)
    agg = aggregate(study.trials, ["mix.tau"])
    assert list(agg["mix.tau"]) == TAUS
    done = study.trials[study.trials["status"] == "TERMINATED"]
    for _, row in agg.iterrows():
        for m in ("acc_all", "acc_few"):
            v = done.loc[done["mix.tau"] == row["mix.tau"], m].to_numpy(float)
            n, mean, std = len(v), v.sum() / len(v), math.sqrt(((v - v.mean()) ** 2).sum() / (len(v) - 1))
            half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)
            assert row[f"{m}_n"] == n == 2  # the failed trial does not count
            assert row[f"{m}_mean"] == pytest.approx(mean)
            assert row[f"{m}_std"] == pytest.approx(std)
            assert row[f"{m}_ci_low"] == pytest.approx(mean - half)
            assert row[f"{m}_ci_high"] == pytest.approx(mean + half)
    # Over all six trials, at 90%: t quantile with 5 degrees of freedom.
    pooled = aggregate(done, [], metrics=["acc_all"], confidence=0.9).iloc[0]
    v = done["acc_all"].to_numpy(float)
    assert pooled["acc_all_ci"] == pytest.approx(2.015048 * v.std(ddof=1) / math.sqrt(6), rel=1e-5)
    single = aggregate(done[done["runtime.seed"] == 0], ["mix.tau"])
    assert single["acc_all_n"].eq(1).all() and single["acc_all_std"].isna().all()


# ---- ablation curves ----------------------------------------------------------------------
def _lines(fig):
    return {t.name: t for t in fig.data if t.mode == "lines+markers"}


def test_ablation_figure_contents(tau_study):
    study = load_study(tau_study)
    fig = ablation_figure(study, "mix.tau", band="std")
    assert len(fig.data) == 4 + 4 + 1  # a band and a line per shot group, the best marker
    lines = _lines(fig)
    assert list(lines) == list(GROUPS)
    assert list(lines["all"].x) == TAUS
    agg = aggregate(study.trials, ["mix.tau"])
    assert np.allclose(lines["few"].y, agg["acc_few_mean"] * 100)
    band = next(t for t in fig.data if t.name == "all ± std")
    upper = np.clip((agg["acc_all_mean"] + agg["acc_all_std"]) * 100, 0, 100)
    assert np.allclose(np.asarray(band.y)[:3], upper)
    assert fig.layout.xaxis.type == "log"  # 0.002 .. 1.25 spans 2.8 decades
    star = fig.data[-1]
    assert star.marker.symbol == "star"
    assert star.x[0] == TAUS[int(np.argmax(agg["acc_all_mean"]))] == 0.05
    assert star.y[0] == pytest.approx(agg["acc_all_mean"].max() * 100)


def test_ablation_band_is_the_t_interval_with_three_seeds(tmp_path):
    study = load_study(make_study(tmp_path, "s3", {"mix.tau": TAUS}, seeds=(0, 1, 2)))
    fig = ablation_figure(study, "mix.tau")  # auto: 3 seeds → 95% interval
    band = next(t for t in fig.data if t.name == "many 95% CI")
    agg = aggregate(study.trials, ["mix.tau"])
    lower = np.clip((agg["acc_many_mean"] - agg["acc_many_ci"]) * 100, 0, 100)
    assert np.allclose(np.asarray(band.y)[3:][::-1], lower)
    assert "95% CI" in fig.layout.title.text


def test_ablation_axis_is_linear_for_alpha_and_other_params_held_at_best(tmp_path):
    d = make_study(tmp_path, "grid2", {"mix.alpha": [0.0, 0.5, 1.0, 2.0], "mix.tau": [0.05, 1.25]})
    study = load_study(d)
    fig = ablation_figure(study, "mix.alpha")
    assert fig.layout.xaxis.type != "log"  # zero is on the axis
    assert list(_lines(fig)["all"].x) == [0.0, 0.5, 1.0, 2.0]
    assert "mix.tau (best)=0.05" in fig.layout.title.text
    held = ablation_figure(study, "mix.alpha", where={"mix.tau": 1.25})
    at = study.finished[study.finished["mix.tau"] == 1.25]
    expect = aggregate(at, ["mix.alpha"])["acc_all_mean"] * 100
    assert np.allclose(_lines(held)["all"].y, expect)
    narrow = load_study(make_study(tmp_path, "narrow", {"mix.tau": [0.5, 1.0, 2.0]}))
    assert ablation_figure(narrow, "mix.tau").layout.xaxis.type != "log"


# ---- comparisons --------------------------------------------------------------------------
def method_accuracy(params, seed):
    base = {"CE": 0.40, "LFM + CE": 0.50, "LFM + MMS": 0.55, "BalCE": 0.45}[params["method"]]
    base -= 0.001 * float(params.get("data.imbalance_factor", 0))
    few = {"CE": 0.1, "LFM + CE": 0.3, "LFM + MMS": 0.25, "BalCE": 0.2}[params["method"]]
    return {"acc_many": 0.9 - base / 10 + 0.01 * seed, "acc_medium": base + 0.01 * seed,
            "acc_few": few + 0.01 * seed, "acc_all": base + 0.005 * seed}


def test_comparison_table_keeps_declared_order_and_bolds_the_best(tmp_path):
    methods = ["CE", "BalCE", "LFM + CE", "LFM + MMS"]
    study = load_study(make_study(tmp_path, "cmp", {"method": methods}, acc=method_accuracy))
    table = comparison_table(study)
    assert list(table["label"]) == methods
    # Means over seeds 0 and 1 (see method_accuracy).
    assert np.allclose(table["all_mean"], [40.25, 45.25, 50.25, 55.25])
    assert np.allclose(table["few_mean"], [10.5, 20.5, 30.5, 25.5])
    page = comparison_html(table)
    rows = page.split("<tr>")[2:]
    bold = [re.findall(r"<td><b>([^<]*)</b></td>", r) for r in rows]
    # many: CE; medium and all: LFM + MMS; few: LFM + CE; BalCE nowhere.
    assert [len(b) for b in bold] == [1, 0, 1, 2]
    assert bold[0][0].startswith("86.50 ± ") and bold[2][0].startswith("30.50 ± ")
    assert bold[3][0].startswith("55.50 ± ") and bold[3][1].startswith("55.25 ± ")
    fig = comparison_table_figure(table)
    cells = fig.data[0].cells.values
    assert list(cells[0]) == methods and cells[3][2].startswith("<b>30.50")
    assert sum(c.startswith("<b>") for col in cells[1:5] for c in col) == 4
    lowest = [re.findall(r"<td><b>([^<]*)</b></td>", r) for r in
              comparison_html(table, mode="min").split("<tr>")[2:]]
    assert [len(b) for b in lowest] == [3, 0, 0, 1]  # CE lowest but for many


def test_comparison_bars_split_imbalance_factor_into_panels(tmp_path):
    study = load_study(make_study(tmp_path, "imb", {"data.imbalance_factor": [10, 50, 100],
                                                    "method": ["CE", "LFM + MMS"]},
                                  seeds=(0,), acc=method_accuracy))
    fig = comparison_figure(study)
    assert len(fig.data) == 3 * 4  # three panels, a bar per shot group in each
    assert [a.text for a in fig.layout.annotations] == [
        "data.imbalance_factor=10", "data.imbalance_factor=50", "data.imbalance_factor=100"]
    assert sum(bool(t.showlegend) for t in fig.data) == 4
    assert list(fig.data[3].x) == ["CE", "LFM + MMS"] and fig.data[3].name == "all"
    assert fig.data[3].y[1] == pytest.approx((0.55 - 0.01) * 100)
    assert not fig.data[0].error_y.visible  # one seed: no spread to show
    figs = study_figures(study)
    assert "comparison" in figs and "comparison_table" in figs and "ablation_mix.tau" not in figs


# ---- learning curves and per-class accuracy -----------------------------------------------
def test_learning_curves_mark_stage_boundary_and_stopped_trials(tau_study):
    study = load_study(tau_study)
    fig = learning_curves_figure(study)
    curves = [t for t in fig.data if not t.name.endswith(": stopped")]
    assert len(curves) == 6
    stopped = [t for t in curves if t.line.dash == "dash"]
    assert len(stopped) == 1 and "stopped early" in stopped[0].name
    marker = [t for t in fig.data if t.name.endswith(": stopped")]
    assert len(marker) == 1 and marker[0].text[0] == "stopped at epoch 2"
    assert [s.x0 for s in fig.layout.shapes] == [E1 + 0.5]
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["all", "many", "medium", "few", "train loss"]
    few = buttons[3].args[0]["y"]
    e = study.epochs[study.epochs["trial_id"] == "tau_00000"]
    assert np.allclose(few[0], e["acc_few"] * 100)
    assert np.allclose(buttons[4].args[0]["y"][0], e["train_loss"])


def test_per_class_figure_against_training_count():
    result = {"per_class_acc": [0.9, 0.6, 0.1], "class_counts": [500, 50, 5],
              "class_names": ["a", "b", "c"]}
    fig = per_class_figure(result)
    assert fig.layout.xaxis.type == "log"
    assert [(t.name, list(t.x)) for t in fig.data] == [
        ("many (1)", [500.0]), ("medium (1)", [50.0]), ("few (1)", [5.0])]
    assert np.allclose([t.y[0] for t in fig.data], [90, 60, 10])
    two = per_class_figure({"CE": result, "LFM": {**result, "per_class_acc": [0.9, 0.7, 0.4]}})
    assert [t.name for t in two.data] == ["CE", "LFM"] and np.allclose(two.data[1].y, [90, 70, 40])


def test_sampling_matrix_beside_the_confusion_matrix():
    from lfm_ray.analysis.figures import sampling_confusion_figure

    P = np.array([[0.0, 0.7, 0.3], [0.5, 0.0, 0.5], [0.2, 0.8, 0.0]])
    counts = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 0]])  # no test image of class c
    fig = sampling_confusion_figure(P, counts, ["a", "b", "c"], run="tau_00001", split="test",
                                    tau=0.05, epoch=4)
    p_map, c_map = fig.data
    assert np.array_equal(np.asarray(p_map.z), P)
    assert np.array_equal(np.asarray(c_map.customdata), counts)
    shown = np.asarray(c_map.z, dtype=float)
    assert np.allclose(shown[:2], [[0.8, 0.2, 0.0], [0.25, 0.75, 0.0]])
    assert np.isnan(shown[2]).all()  # a row without images has no fractions
    assert "tau_00001" in fig.layout.title.text and "test confusion" in fig.layout.title.text
    assert "epoch 4" in fig.layout.title.text
    assert "τ = 0.05" in fig.layout.annotations[0].text
    assert list(fig.layout.xaxis.ticktext) == ["a", "b", "c"]
    assert list(fig.layout.yaxis2.ticktext) == ["a", "b", "c"]
    assert fig.layout.yaxis.autorange == "reversed"
    raw = sampling_confusion_figure(P, counts, ["a", "b", "c"], run="r", normalize=False)
    assert np.array_equal(np.asarray(raw.data[1].z), counts)
    with pytest.raises(LfmError, match="must both be 3×3"):
        sampling_confusion_figure(P[:2, :2], counts, ["a", "b", "c"], run="r")


def test_confusion_figure_of_a_saved_run(tmp_path):
    from lfm_ray import confusion
    from lfm_ray.analysis.figures import run_confusion_figure

    run = tmp_path / "zero-shot"
    run.mkdir()
    counts = np.array([[5, 1], [2, 4]])
    P = np.array([[0.0, 1.0], [1.0, 0.0]])
    confusion.write(run / confusion.CONFUSION_FILE, counts, P, class_names=["cat", "dog"],
                    split="test", epoch=0, tau=1.0)
    fig = run_confusion_figure(run)
    assert np.array_equal(np.asarray(fig.data[1].customdata), counts)
    assert np.array_equal(np.asarray(fig.data[0].z), P)
    assert fig.layout.title.text.startswith("zero-shot: ")
    with pytest.raises(LfmError, match="does not exist"):
        run_confusion_figure(tmp_path)


def test_effective_imbalance_figure():
    from lfm_ray.analysis.figures import effective_imbalance_figure

    taus = [0.002, 0.05, 1.25, 31.25]
    fig = effective_imbalance_figure("mix.tau", taus, [40.0, 12.5, 30.1, 33.0], imbalance=100)
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.title.text == "mix.tau"
    assert list(fig.data[0].x) == taus and list(fig.data[0].y) == [40.0, 12.5, 30.1, 33.0]
    assert fig.layout.shapes[0].y0 == 100 and "γ = 100" in fig.layout.annotations[0].text
    two = effective_imbalance_figure("mix.alpha", [0, 1, 2], {"CIFAR-10-LT": [10, 5, 3],
                                                              "CIFAR-100-LT": [100, 40, 20]})
    assert two.layout.xaxis.type == "linear"
    assert [t.name for t in two.data] == ["CIFAR-10-LT", "CIFAR-100-LT"]
    assert list(two.data[1].y) == [100, 40, 20] and "mix.alpha" in two.layout.title.text
    with pytest.raises(LfmError, match="has 2 values for 3 mix.alpha values"):
        effective_imbalance_figure("mix.alpha", [0, 1, 2], [1, 2])


# ---- Optuna -------------------------------------------------------------------------------
def optuna_table(root: Path, objectives: list[str], storage: str | None = None) -> Path:
    rng = np.random.default_rng(3)
    d = root / "opt"
    d.mkdir()
    rows = []
    for i in range(12):
        loss = ["ce", "mms", "focal"][i % 3]
        rows.append({"trial_id": f"o{i}", "status": "TERMINATED" if i != 5 else "ERROR",
                     "error": "" if i != 5 else "ValueError: nan loss",
                     "stage1.tau": float(10 ** rng.uniform(-2.7, 1.5)), "stage1.lr": float(rng.uniform(1e-4, 1e-3)),
                     "loss.name": loss, "loss.focal_gamma": 2.0 if loss == "focal" else None,
                     **({f"acc_{g}": float(rng.uniform(0.2, 0.9)) for g in GROUPS} if i != 5 else {})})
    pd.DataFrame(rows).to_csv(d / "trials.csv", index=False)
    (d / "study.json").write_text(json.dumps({
        "name": "opt", "search": "optuna", "metric": "acc_all", "mode": "max",
        "swept": ["stage1.tau", "stage1.lr", "loss.name", "loss.focal_gamma"],
        "objectives": objectives, "optuna_storage": storage, "command": ["lfm-ray", "study"]}))
    return d


def test_optuna_study_rebuilt_with_distributions_inferred_from_the_table(tmp_path):
    import optuna

    study = load_study(optuna_table(tmp_path, []))
    ost = optuna_study(study)
    done = ost.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(ost.trials) == 12 and len(done) == 11
    dists = done[0].distributions
    assert isinstance(dists["stage1.tau"], optuna.distributions.FloatDistribution)
    assert dists["stage1.tau"].log and not dists["stage1.lr"].log  # 4 decades vs 1
    assert set(dists["loss.name"].choices) == {"ce", "mms", "focal"}
    assert ost.best_value == pytest.approx(study.finished["acc_all"].max())
    focal = [t for t in done if t.params["loss.name"] == "focal"]
    assert all("loss.focal_gamma" in t.params for t in focal)
    assert all("loss.focal_gamma" not in t.params for t in done if t not in focal)
    figs = optuna_figures(study)
    assert {"history", "parallel", "importance"} <= set(figs) and "pareto" not in figs
    assert len(figs["history"].data[0].x) == 11
    assert set(figs["importance"].data[0].y) == {"stage1.tau", "stage1.lr", "loss.name",
                                                 "loss.focal_gamma"}


def test_pareto_front_of_a_multi_objective_search(tmp_path):
    study = load_study(optuna_table(tmp_path, ["acc_few", "acc_many"]))
    figs = optuna_figures(study)
    assert "pareto" in figs
    done = study.finished
    pts = done[["acc_few", "acc_many"]].to_numpy()
    front = {i for i, p in enumerate(pts)
             if not any((q >= p).all() and (q > p).any() for q in pts)}
    traces = figs["pareto"].data
    assert sum(len(t.x) for t in traces) == len(pts) == 11
    assert sorted(pts[sorted(front), 0]) in [sorted(t.x) for t in traces]  # the front drawn
    names = [t.name for t in figs["importance"].data]
    assert names == ["acc_few", "acc_many"]


def test_optuna_views_load_the_recorded_storage(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    stored = optuna.create_study(study_name="opt", storage=url, direction="maximize")
    stored.optimize(lambda t: t.suggest_float("params/stage1.tau", 0.01, 1, log=True), n_trials=4)
    study = load_study(optuna_table(tmp_path, [], storage=url))
    ost = optuna_study(study)
    assert len(ost.trials) == 4 and "params/stage1.tau" in ost.trials[0].params  # not rebuilt
    assert not [n for n in study.notes if "Optuna" in n]


# ---- the report ---------------------------------------------------------------------------
def test_report_is_self_contained_and_lists_failures(tau_study, capsys):
    path = write_report(tau_study)
    assert path == tau_study / "report.html"
    page = path.read_text()
    from plotly.offline import get_plotlyjs

    assert get_plotlyjs()[:2000] in page  # plotly.js itself is embedded
    assert not re.search(r"<script[^>]+src=", page)
    assert not re.search(r"<(link|img|iframe)[^>]+(src|href)=['\"]?https?:", page)
    for section in ("Best configuration", "Results", "Ablation: accuracy against mix.tau",
                    "Learning curves", "Per-class accuracy against training count",
                    "Failed trials", "All trials",
                    "Command and configuration", "Machine and versions"):
        assert f">{section}</h2>" in page, section
    assert "CUDA out of memory" in page and "bad_0" in page
    assert "python studies/tau_sweep.py" in page and "Linux-test" in page
    assert page.count("Plotly.newPlot") == 3  # ablation, learning curves, per class
    pngs = sorted(p.name for p in tau_study.glob("*.png"))
    warned = "warning: no PNGs" in capsys.readouterr().out
    assert pngs == ["ablation_mix.tau.png", "per_class.png"] or warned


def test_report_without_a_browser_warns_once_and_still_writes(tau_study, monkeypatch, capsys):
    monkeypatch.setenv("BROWSER_PATH", str(tau_study / "no-such-chrome"))
    path = write_report(tau_study, out=tau_study / "sub" / "r.html")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1 and "Chrome or Chromium" in lines[0] and "BROWSER_PATH" in lines[0]
    assert path.is_file() and "no PNGs" in path.read_text()
    assert not list((tau_study / "sub").glob("*.png"))


def test_report_command(tau_study, tmp_path, capsys):
    out = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(tau_study), "--out", str(out), "--no-png", "--band", "std"]) == 0
    assert out.is_file() and f"wrote {out}" in capsys.readouterr().out
    page = out.read_text()
    assert "band ± std" in page or "band \\u00b1 std" in page  # the figure's JSON escapes ±


# ---- bad input ----------------------------------------------------------------------------
def test_bad_input_gives_one_clear_message(tau_study, tmp_path, capsys):
    with pytest.raises(LfmError, match="is not a study: it holds no study.json"):
        load_study(tmp_path / "ray")
    with pytest.raises(LfmError, match="does not exist"):
        load_study(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(LfmError, match="must be a trials CSV"):
        load_study(tmp_path / "notes.txt")
    early = tmp_path / "early"
    early.mkdir()
    (early / "study.json").write_text(json.dumps({"name": "early"}))
    with pytest.raises(LfmError, match="'early'.*has no trials.csv yet"):
        load_study(early)
    study = load_study(tau_study)
    with pytest.raises(LfmError, match=r"'stage1.lr' was not swept in study 'tau_sweep'; "
                                       r"swept: mix.tau, runtime.seed"):
        ablation_figure(study, "stage1.lr")
    with pytest.raises(LfmError, match="'stage1.lr' was not swept"):
        write_report(tau_study, params=["stage1.lr"])
    methods = load_study(make_study(tmp_path, "m", {"method": ["CE", "LFM + CE"]},
                                    acc=method_accuracy))
    with pytest.raises(LfmError, match="'method' .* is not numeric"):
        ablation_figure(methods, "method")
    table = pd.read_csv(tau_study / "trials.csv")
    table.assign(status="ERROR").to_csv(tau_study / "trials.csv", index=False)
    with pytest.raises(LfmError, match=r"'tau_sweep' has no finished trials to report \(7 ERROR\)"):
        write_report(tau_study)
    assert main(["report", str(tau_study)]) == 2
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert main(["report", str(tau_study), "--param", "stage1.lr"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(ln.startswith("lfm-ray report: error: ") for ln in err)
    assert "Traceback" not in "".join(err)


# ---- a real Tune experiment, read with Tune's reader --------------------------------------
TUNE_TAUS = [0.01, 0.1, 10.0]


@pytest.fixture(scope="module")
def tune_experiment(tmp_path_factory) -> Path:
    """A real, tiny Tune experiment: mix.tau × runtime.seed, each trial reporting the
    trainer's metric keys for up to three epochs over two stages; one trial fails after its
    first epoch and one stops after two (as ASHA would)."""
    import ray
    from ray import tune

    root = tmp_path_factory.mktemp("tune")

    def trainable(config):
        tau, seed = config["params"]["mix.tau"], config["params"]["runtime.seed"]
        for epoch in (1, 2, 3):
            acc = 0.2 + 0.1 * epoch - 0.05 * abs(math.log10(tau) + 1) + 0.01 * seed
            tune.report({"epoch": epoch, "stage": 1 if epoch <= 2 else 2, "train_loss": 1 / epoch,
                         "acc_many": acc + 0.1, "acc_medium": acc, "acc_few": acc / 2,
                         "acc_all": acc, "lr": 0.01, "train_time_s": 0.1})
            if tau == 10.0 and seed == 1:
                raise RuntimeError("diverged at tau=10")
            if tau == 0.01 and seed == 1 and epoch == 2:
                return

    base = RunConfig().override({"stage1.epochs": 2, "stage2.epochs": 1}).to_dict()
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tune.Tuner(trainable, param_space={"base": base, "params": {
            "mix.tau": tune.grid_search(TUNE_TAUS), "runtime.seed": tune.grid_search([0, 1])}},
            tune_config=tune.TuneConfig(reuse_actors=True),
            run_config=tune.RunConfig(name="exp", storage_path=str(root), verbose=0)).fit()
    finally:
        if started:
            ray.shutdown()
    return root / "exp"


def test_tune_experiment_is_read_with_tunes_reader(tune_experiment):
    study = load_study(tune_experiment)
    t = study.trials.set_index(["mix.tau", "runtime.seed"]).sort_index()
    assert len(t) == 6 and study.swept == ["mix.tau", "runtime.seed"]
    assert t.loc[(10.0, 1), "status"] == "ERROR"
    assert "diverged at tau=10" in t.loc[(10.0, 1), "error"]
    assert bool(t.loc[(0.01, 1), "stopped_early"]) and not t["stopped_early"].drop((0.01, 1)).any()
    assert t.loc[(0.1, 0), "acc_all"] == pytest.approx(0.5)
    assert (t["data.name"] == "digits-lt").all() and (t["gpu_hours"] == 0).all()
    assert t.loc[(0.1, 0), "wall_time_s"] > 0
    assert len(study.epochs) == 4 * 3 + 2 + 1
    assert sorted(study.epochs["epoch"].unique()) == [1, 2, 3]
    fig = ablation_figure(study, "mix.tau")
    assert fig.layout.xaxis.type == "log" and list(_lines(fig)["all"].x) == TUNE_TAUS
    assert fig.data[-1].x[0] == 0.1
    curves = learning_curves_figure(study)
    assert [s.x0 for s in curves.layout.shapes] == [2.5]
    assert sum(t.line.dash == "dash" for t in curves.data if t.mode != "markers+text") == 1


def test_report_of_a_tune_experiment_lists_its_failed_trial(tune_experiment, tmp_path):
    page = write_report(tune_experiment, out=tmp_path / "r.html", png=False).read_text()
    assert ">Failed trials</h2>" in page and "diverged at tau=10" in page
    assert ">Learning curves</h2>" in page and "Ablation: accuracy against mix.tau" in page


# ---- t-SNE of a checkpoint ----------------------------------------------------------------
def _array(value) -> np.ndarray:
    """A data array of plotly's JSON: a list, or a typed array {"dtype", "bdata"}."""
    if isinstance(value, dict):
        import base64

        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
    return np.asarray(value)


def test_tsne_of_a_checkpoint(tmp_path, capsys):
    import torch

    from lfm_ray.analysis.tsne import checkpoint_features, write_tsne
    from lfm_ray.model import build_classifier

    cfg = RunConfig().override({"data.cache_dir": str(tmp_path / "cache")})
    torch.manual_seed(0)
    model, _ = build_classifier(cfg.model, NAMES, cfg.logit_scale)
    with torch.no_grad():  # a trained W_I: not the identity
        model.proj.weight.add_(0.3 * torch.randn_like(model.proj.weight))
    ckpt = tmp_path / "train_0" / "epoch_0001"
    ckpt.mkdir(parents=True)
    torch.save({"visual": model.visual.state_dict(), "proj": model.proj.state_dict(),
                "config": cfg.to_dict()}, ckpt / "state.pt")
    got = checkpoint_features(ckpt, ["0", "nine"], per_class=5)
    assert got["classes"] == [0, 9] and list(got["labels"]) == [0] * 5 + [9] * 5
    from lfm_ray.data import load_arrays
    from lfm_ray.model import build_clip

    _, spec = build_clip("tiny")
    arrays = load_arrays("digits-lt", image=spec, cache_dir=str(tmp_path / "cache"))
    images, labels = arrays.split("test")
    first = np.flatnonzero(np.asarray(labels) == 0)[:5]
    x = torch.from_numpy(np.asarray(images)[first]).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        direct = torch.nn.functional.normalize(model.proj(model.visual(x)), dim=-1).numpy()
    assert np.allclose(got["features"][:5], direct, atol=1e-5)

    out = write_tsne(["zero-shot", ckpt], ["0", "nine"], out=tmp_path / "t.html", per_class=8)
    page = out.read_text()
    start = page.index("[", page.index("Plotly.newPlot("))
    traces, _ = json.JSONDecoder().raw_decode(page[start:])  # the figure's data, as drawn
    assert [t["type"] for t in traces] == ["scatter3d"] * 4  # two classes, two panels
    assert [t["scene"] for t in traces] == ["scene", "scene", "scene2", "scene2"]
    assert [t["name"] for t in traces[:2]] == ["zero (n=124 training, 8 shown)",
                                               "nine (n=12 training, 8 shown)"]
    assert all(len(_array(t["x"])) == len(_array(t["z"])) == 8 for t in traces)
    assert "zero-shot (pretrained, W_I = I)" in page and "<script src=" not in page
    assert main(["report", "--tsne", str(ckpt), "--classes", "0,99"]) == 2
    assert main(["report", "--tsne", str(tmp_path), "--classes", "0,1"]) == 2
    err = capsys.readouterr().err
    assert "class 99 is out of range" in err and "is not a checkpoint directory" in err
