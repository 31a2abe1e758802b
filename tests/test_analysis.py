"""Analysis: loading (results dir, trials CSV, a real Tune experiment through Tune's reader),
aggregation against a direct computation, figure contents, comparison tables, Optuna views,
the report file, t-SNE of a checkpoint, and one clear message per bad input."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

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
from lfm_ray.config import DataConfig, RunConfig
from lfm_ray.errors import LfmError

from study_fixtures import (  # noqa: E402  (tests/ is on sys.path, see pyproject.toml)
    COUNTS, E1, E2, GROUPS, NAMES, TAUS, drop_ray_folders, make_study,
)


@pytest.fixture()
def tau_study(tmp_path) -> Path:
    return make_study(tmp_path, "tau_sweep", {"mix.tau": TAUS}, stopped=(1,), failed=1)


# ---- loading ------------------------------------------------------------------------------
def test_results_dir_loads_trials_epochs_and_meta(tau_study):
    study = load_study(tau_study)
    assert study.name == "tau_sweep" and study.swept == ["mix.tau", "runtime.seed"]
    assert len(study.trials) == 7 and len(study.finished) == 6 and len(study.failed) == 1
    assert study.trials["stopped_early"].dtype == bool and study.trials["stopped_early"].sum() == 1
    # No Tune experiment: the curves come from each trial's copied history.json.
    assert len(study.epochs) == 5 * (E1 + E2) + 2
    first = study.epochs[study.epochs["trial_id"] == "tau_00000"]
    assert list(first["epoch"]) == [1, 2, 3, 4] and list(first["stage"]) == [1, 1, 2, 2]
    assert study.meta["command"][:2] == ["python", "studies/tau_sweep.py"]
    assert study.selection_split == "test" and not study.notes


def _history_of(folder: Path) -> list[dict]:
    return json.loads((folder / "history.json").read_text())


def test_per_trial_files_come_from_the_copies_first(tmp_path):
    from lfm_ray.analysis.load import checkpoint_dir, copy_dir, trial_confusion, trial_result

    d = make_study(tmp_path, "s", {"mix.tau": TAUS}, seeds=(0,))
    study = load_study(d)
    row = study.trials.iloc[0]
    copy, ckpt = copy_dir(study, row), checkpoint_dir(study, row)
    assert copy == d / "trials" / "s_00000"
    # checkpoint_path is relative to the storage path ("results/ray", as typed): found from
    # the folder above the results folder.
    assert ckpt == tmp_path / "results" / "ray" / "s_train" / "train_00000" / "epoch_0004"
    # The copy wins: change the checkpoint's files and nothing the loader reads changes.
    (ckpt / "result.json").write_text(json.dumps({"per_class_acc": [0.0] * 10,
                                                  "class_counts": COUNTS}))
    assert trial_result(study, row)["per_class_acc"] == json.loads(
        (copy / "result.json").read_text())["per_class_acc"]
    assert trial_confusion(study, row) == copy / "confusion.npz"


def test_a_moved_results_folder_renders_fully_without_the_ray_folders(tmp_path):
    d = make_study(tmp_path / "cluster", "tau_sweep", {"mix.tau": TAUS}, seeds=(0, 1))
    moved = tmp_path / "laptop" / "tau_sweep"
    moved.parent.mkdir()
    d.rename(moved)
    drop_ray_folders(tmp_path / "cluster")
    study = load_study(moved)
    assert len(study.epochs) == 6 * (E1 + E2) and not study.notes
    page = write_report(moved, png=False).read_text()
    for section in ("Per-class accuracy against training count", "Learning curves",
                    "Sampling matrix P beside a confusion matrix"):
        assert f">{section}</h2>" in page, section
    assert str(tmp_path) not in page


def test_without_copies_the_checkpoints_are_read(tmp_path):
    d = make_study(tmp_path, "old", {"mix.tau": TAUS}, seeds=(0,), copies=False)
    study = load_study(d)
    assert len(study.epochs) == 3 * (E1 + E2) and not study.notes
    figs = study_figures(study)
    assert {"per_class", "sampling_confusion", "learning_curves"} <= set(figs)
    # An older table with absolute checkpoint paths reads the same, and prints none.
    table = pd.read_csv(d / "trials.csv").drop(columns=["artifacts"])
    table["checkpoint_path"] = [str(tmp_path / "results" / "ray" / p)
                                for p in table["checkpoint_path"]]
    table.to_csv(d / "trials.csv", index=False)
    study = load_study(d)
    assert len(study.epochs) == 3 * (E1 + E2)
    page = write_report(d, png=False).read_text()
    assert str(tmp_path) not in page and ">Per-class accuracy against training count</h2>" in page


def test_without_copies_or_checkpoints_the_report_says_what_is_missing(tmp_path):
    d = make_study(tmp_path, "bare", {"mix.tau": TAUS}, seeds=(0,), copies=False,
                   checkpoints=False)
    study = load_study(d)
    assert study.epochs.empty
    assert any("no per-epoch results" in n for n in study.notes)
    page = write_report(d, png=False).read_text()
    assert "no per-epoch results" in page and ">Learning curves</h2>" not in page
    assert str(tmp_path) not in page


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


def _trace(fig, name):
    return next(t for t in fig.data if t.name == name)


def test_ablation_figure_contents(tau_study):
    study = load_study(tau_study)
    fig = ablation_figure(study, "mix.tau", band="std")
    lines = _lines(fig)
    assert list(lines) == list(GROUPS)
    assert list(lines["all"].x) == TAUS
    agg = aggregate(study.trials, ["mix.tau"])
    assert np.allclose(lines["few"].y, agg["acc_few_mean"] * 100)
    # The spread: ± std as error bars beside the line, cut at 0 and 100 %.
    bars = _trace(fig, "all: ± 1 std over seeds")
    mean, std = agg["acc_all_mean"] * 100, agg["acc_all_std"] * 100
    assert np.allclose(bars.error_y.array, np.minimum(mean + std, 100) - mean)
    assert np.allclose(bars.error_y.arrayminus, mean - np.maximum(mean - std, 0))
    # Each seed is a point: the finished trials' values.
    seeds = _trace(fig, "few: seeds")
    assert sorted(seeds.y) == sorted(study.finished["acc_few"] * 100)
    assert fig.layout.xaxis.type == "log"  # 0.002 .. 1.25 spans 2.8 decades
    assert fig.layout.xaxis.title.text == "τ (log scale)"
    assert list(fig.layout.xaxis.tickvals) == TAUS
    assert list(fig.layout.xaxis.ticktext) == ["0.002", "0.05", "1.25"]
    assert list(fig.layout.yaxis.range) == [-2, 102]
    assert "mean of 2 seeds" in fig.layout.title.text and "± 1 std" in fig.layout.title.text


def test_ablation_band_is_the_t_interval_with_three_seeds(tmp_path):
    study = load_study(make_study(tmp_path, "s3", {"mix.tau": TAUS}, seeds=(0, 1, 2)))
    fig = ablation_figure(study, "mix.tau")  # auto: 3 seeds → 95% interval
    bars = _trace(fig, "many: 95 % t-interval of the mean")
    agg = aggregate(study.trials, ["mix.tau"])
    mean = agg["acc_many_mean"].to_numpy() * 100
    lower = np.maximum(mean - agg["acc_many_ci"].to_numpy() * 100, 0)
    assert np.allclose(bars.error_y.arrayminus, mean - lower)
    assert "95 % t-interval of the mean" in fig.layout.title.text


def test_ablation_intervals_past_the_axis_are_cut_and_flagged(tmp_path):
    def wide(params, seed):  # two seeds far apart: the 95 % interval spans past 0 and 100
        v = {0: 0.05, 1: 0.95}[seed] if params["mix.tau"] == 0.05 else 0.5 + 0.01 * seed
        return {f"acc_{g}": v for g in GROUPS}

    study = load_study(make_study(tmp_path, "w", {"mix.tau": TAUS}, seeds=(0, 1), acc=wide))
    fig = ablation_figure(study, "mix.tau", band="ci")
    bars = _trace(fig, "all: 95 % t-interval of the mean")
    top = np.asarray(bars.y) + np.asarray(bars.error_y.array)
    bottom = np.asarray(bars.y) - np.asarray(bars.error_y.arrayminus)
    assert top.max() == pytest.approx(100) and bottom.min() == pytest.approx(0)
    flags = _trace(fig, "all: interval cut at the axis")
    assert sorted(flags.y) == [0.0, 100.0]
    assert set(flags.marker.symbol) == {"triangle-up", "triangle-down"}
    assert "▲▼ an interval cut at 0 or 100 %" in fig.layout.title.text


def test_ablation_axis_is_linear_for_alpha_and_other_params_held_at_best(tmp_path):
    d = make_study(tmp_path, "grid2", {"mix.alpha": [0.0, 0.5, 1.0, 2.0], "mix.tau": [0.05, 1.25]})
    study = load_study(d)
    fig = ablation_figure(study, "mix.alpha")
    assert fig.layout.xaxis.type != "log"  # zero is on the axis
    assert fig.layout.xaxis.title.text == "α"
    assert list(_lines(fig)["all"].x) == [0.0, 0.5, 1.0, 2.0]
    assert "other parameters at the best configuration's τ = 0.05" in fig.layout.title.text
    held = ablation_figure(study, "mix.alpha", where={"mix.tau": 1.25})
    at = study.finished[study.finished["mix.tau"] == 1.25]
    expect = aggregate(at, ["mix.alpha"])["acc_all_mean"] * 100
    assert np.allclose(_lines(held)["all"].y, expect)
    assert "at τ = 1.25" in held.layout.title.text
    narrow = load_study(make_study(tmp_path, "narrow", {"mix.tau": [0.5, 1.0, 2.0]}))
    assert ablation_figure(narrow, "mix.tau").layout.xaxis.type != "log"
    stage2 = load_study(make_study(tmp_path, "branch", {"stage2.tau": TAUS}))
    assert ablation_figure(stage2, "stage2.tau").layout.xaxis.title.text == "τ (stage 2) (log scale)"


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
    assert table["few_values"].iloc[2] == pytest.approx({0: 30.0, 1: 31.0})
    page = comparison_html(table)
    assert "<th>method</th><th>many (%)</th>" in page  # the first column is named for what it holds
    rows = page.split("<tr>")[2:]
    bold = [re.findall(r"<td><b>([^<]*)</b></td>", r) for r in rows]
    # The seeds move every method alike (paired differences of zero spread): each column's
    # best is better than the rest. many: CE; medium and all: LFM + MMS; few: LFM + CE.
    assert [len(b) for b in bold] == [1, 0, 1, 2]
    assert bold[0][0].startswith("86.50 ± ") and bold[2][0].startswith("30.50 ± ")
    assert bold[3][0].startswith("55.50 ± ") and bold[3][1].startswith("55.25 ± ")
    fig = comparison_table_figure(table)
    cells = fig.data[0].cells.values
    assert list(cells[0]) == methods and cells[3][2].startswith("<b>30.50")
    assert sum(c.startswith("<b>") for col in cells[1:5] for c in col) == 4
    assert fig.data[0].header.values[0] == "<b>method</b>"
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
        "imbalance factor γ = 10", "imbalance factor γ = 50", "imbalance factor γ = 100"]
    assert sum(bool(t.showlegend) for t in fig.data) == 4
    assert list(fig.data[3].x) == ["CE", "LFM + MMS"] and fig.data[3].name == "all"
    assert fig.data[3].y[1] == pytest.approx((0.55 - 0.01) * 100)
    assert not fig.data[0].error_y.visible  # one seed: no spread to show
    assert "one seed, no spread" in fig.layout.title.text
    figs = study_figures(study)
    assert "comparison" in figs and "comparison_table" in figs and "ablation_mix.tau" not in figs


def test_a_bar_at_zero_is_told_apart_from_a_missing_one(tmp_path):
    def acc(params, seed):
        few = {"CE": 0.0, "LFM": float("nan")}[params["method"]]
        return {"acc_many": 0.9, "acc_medium": 0.5, "acc_few": few, "acc_all": 0.5}

    study = load_study(make_study(tmp_path, "z", {"method": ["CE", "LFM"]}, seeds=(0,), acc=acc))
    few = next(t for t in comparison_figure(study).data if t.name == "few")
    assert list(few.text) == ["0", "n/a"] and list(few.customdata) == ["0.0", "missing"]
    assert "n/a" in comparison_html(comparison_table(study))


def test_comparison_error_bars_stop_at_the_axis(tmp_path):
    def acc(params, seed):  # CE's many-shot: 0 % or 90 %, mean 45 ± 63.6 (std)
        many = {0: 0.0, 1: 0.9}[seed] if params["method"] == "CE" else 0.5 + 0.01 * seed
        return {"acc_many": many, "acc_medium": 0.5, "acc_few": 0.2, "acc_all": 0.5}

    study = load_study(make_study(tmp_path, "e", {"method": ["CE", "LFM"]}, acc=acc))
    fig = comparison_figure(study)
    many = next(t for t in fig.data if t.name == "many")
    assert np.std([0, 90], ddof=1) > 55  # the bar would reach past both ends
    assert np.allclose(many.error_y.array[0], 55) and np.allclose(many.error_y.arrayminus[0], 45)
    assert np.allclose(many.error_y.array[1], np.std([50, 51], ddof=1))  # LFM's: uncut
    assert "(cut at 0 and 100 %)" in fig.layout.title.text


# ---- learning curves and per-class accuracy -----------------------------------------------
def test_learning_curves_mark_stage_boundary_and_stopped_trials(tau_study):
    study = load_study(tau_study)
    fig = learning_curves_figure(study)
    curves = [t for t in fig.data if t.mode in ("lines", "lines+markers") and t.x[0] is not None]
    assert len(curves) == 6
    stopped = [t for t in fig.data if t.name.endswith(": stopped")]
    assert len(stopped) == 1 and stopped[0].text[0] == "stopped at epoch 2"
    assert "(stopped early)" in stopped[0].name
    assert [s.x0 for s in fig.layout.shapes] == [E1 + 0.5]
    assert fig.layout.xaxis.dtick == 1 and fig.layout.xaxis.tickformat == "d"
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["all", "many", "medium", "few", "train loss"]
    few = buttons[3].args[0]["y"]
    e = study.epochs[study.epochs["trial_id"] == "tau_00000"]
    assert np.allclose(few[0], e["acc_few"] * 100)
    assert np.allclose(buttons[4].args[0]["y"][0], e["train_loss"])


def test_learning_curves_stay_readable_with_sixteen_trials(tmp_path):
    taus = [0.002, 0.01, 0.05, 0.25, 1.25, 6.25, 31.25, 100.0]
    study = load_study(make_study(tmp_path, "t16", {"mix.tau": taus}, seeds=(0, 1)))
    fig = learning_curves_figure(study)
    curves = [t for t in fig.data if t.x[0] is not None]
    assert len(curves) == 16
    # A colour per configuration, a line style per seed; the legend names the values only.
    by_tau: dict[str, set] = {}
    for t in curves:
        by_tau.setdefault(t.name, set()).add(t.line.color)
    assert sorted(by_tau, key=float) == [f"{v:g}" for v in taus]
    assert all(len(c) == 1 for c in by_tau.values())
    assert len({next(iter(c)) for c in by_tau.values()}) == 8
    assert {t.line.dash for t in curves} == {"solid", "dash"}
    assert sum(bool(t.showlegend) for t in curves) == 8  # one entry per configuration
    seeds = [t for t in fig.data if t.x[0] is None]
    assert [(t.name, t.line.dash) for t in seeds] == [("seed 0", "solid"), ("seed 1", "dash")]
    assert fig.layout.legend.title.text == "τ (colour); seed (line style)"


def test_per_class_figure_against_training_count():
    result = {"per_class_acc": [0.9, 0.6, 0.1], "class_counts": [500, 50, 5],
              "class_names": ["a", "b", "c"]}
    fig = per_class_figure(result)
    assert fig.layout.xaxis.type == "log"
    assert fig.layout.xaxis.title.text == "training images of the class (log scale)"
    assert "5" in fig.layout.xaxis.ticktext and "500" in fig.layout.xaxis.ticktext
    assert [(t.name, list(t.x)) for t in fig.data] == [
        ("many: 1 class (n > 100)", [500.0]), ("medium: 1 class (20 ≤ n ≤ 100)", [50.0]),
        ("few: 1 class (n < 20)", [5.0])]
    assert np.allclose([t.y[0] for t in fig.data], [90, 60, 10])
    # Several seeds of one configuration: the mean, the seeds' range, each seed a point.
    seeds = per_class_figure({0: result, 1: {**result, "per_class_acc": [0.7, 0.8, 0.3]}})
    many = seeds.data[0]
    assert np.allclose(many.y, [80]) and np.allclose(many.error_y.array, [10])
    assert np.allclose(many.error_y.arrayminus, [10])
    points = next(t for t in seeds.data if t.name == "many: seeds")
    assert sorted(points.y) == [70, 90]
    ref = per_class_figure(result, reference={0: {**result, "per_class_acc": [0.5, 0.5, 0.5]}},
                           reference_label="CE")
    assert ref.data[-1].name == "CE" and np.allclose(ref.data[-1].y, [50, 50, 50])
    with pytest.raises(LfmError, match="must share their classes"):
        per_class_figure({0: result, 1: {**result, "per_class_acc": [0.5]}})


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
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.title.text == "τ (log scale)"
    assert list(fig.layout.xaxis.ticktext) == ["0.002", "0.05", "1.25", "31.25"]
    assert list(fig.data[0].x) == taus and list(fig.data[0].y) == [40.0, 12.5, 30.1, 33.0]
    assert fig.layout.shapes[0].y0 == 100 and "γ = 100" in fig.layout.annotations[0].text
    two = effective_imbalance_figure("mix.alpha", [0, 1, 2], {"CIFAR-10-LT": [10, 5, 3],
                                                              "CIFAR-100-LT": [100, 40, 20]})
    assert two.layout.xaxis.type == "linear"
    assert [t.name for t in two.data] == ["CIFAR-10-LT", "CIFAR-100-LT"]
    assert list(two.data[1].y) == [100, 40, 20] and "against α" in two.layout.title.text
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
    assert np.allclose(sorted(figs["history"].data[0].y), sorted(study.finished["acc_all"] * 100))
    assert figs["history"].layout.yaxis.title.text == "acc_all (%)"
    # Parameters by their symbols, on every view.
    assert set(figs["importance"].data[0].y) == {"τ (stage 1)", "learning rate (stage 1)",
                                                 "loss", "focal γ"}
    labels = set(figs["parallel"].layout.xaxis.ticktext)
    assert {"τ (stage 1)", "learning rate (stage 1)", "loss"} <= labels
    # focal γ is conditional: named in the title, not drawn at a "None" tick.
    assert "focal γ" not in labels and "not drawn: focal γ" in figs["parallel"].layout.title.text


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
    front_x = sorted(pts[sorted(front), 0] * 100)  # drawn in percent
    assert any(np.allclose(front_x, sorted(t.x)) for t in traces if len(t.x) == len(front_x))
    names = [t.name for t in figs["importance"].data]
    assert names == ["acc_few (%)", "acc_many (%)"]


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
    from lfm_ray.analysis.report import png_blocker

    path = write_report(tau_study)
    assert path == tau_study / "report.html"
    page = path.read_text()
    from plotly.offline import get_plotlyjs

    assert get_plotlyjs()[:2000] in page  # plotly.js itself is embedded
    assert not re.search(r"<script[^>]+src=", page)
    assert not re.search(r"<(link|img|iframe)[^>]+(src|href)=['\"]?https?:", page)
    for section in ("Best configuration", "Results", "Ablation: test accuracy against τ",
                    "Per-class accuracy against training count",
                    "Sampling matrix P beside a confusion matrix",
                    "Effective imbalance γ′ against τ", "Learning curves",
                    "Failed trials", "All trials", "Configuration", "Machine and versions"):
        assert f">{section}</h2>" in page, section
    assert "CUDA out of memory" in page and "bad_0" in page
    assert "python studies/tau_sweep.py" in page and "Linux-test" in page
    # ablation, per class, P beside the confusion matrix, γ′, learning curves
    assert page.count("Plotly.newPlot") == 5
    pngs = sorted(p.name for p in tau_study.glob("*.png"))
    out = capsys.readouterr().out
    if png_blocker() is None:  # kaleido and a Chromium are here: every headline PNG is written
        assert pngs == ["ablation_mix.tau.png", "gamma_mix.tau.png", "per_class.png",
                        "sampling_confusion.png"], out
        assert "PNG files beside this report: ablation_mix.tau.png" in page
    else:
        assert pngs == [] and "warning: no PNGs" in out


def test_report_without_a_browser_warns_once_and_still_writes(tau_study, monkeypatch, capsys):
    monkeypatch.setenv("BROWSER_PATH", str(tau_study / "no-such-chrome"))
    path = write_report(tau_study, out=tau_study / "sub" / "r.html")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1 and "Chrome or Chromium" in lines[0] and "BROWSER_PATH" in lines[0]
    assert path.is_file() and "no PNGs" in path.read_text()
    assert not list((tau_study / "sub").glob("*.png"))


def test_report_command(tau_study, tmp_path, capsys):
    out = tmp_path / "elsewhere" / "r.html"
    out.parent.mkdir()  # a missing folder is refused (test_bad_inputs)
    assert main(["report", str(tau_study), "--out", str(out), "--no-png", "--band", "std"]) == 0
    assert out.is_file() and f"wrote {out}" in capsys.readouterr().out
    page = out.read_text()
    assert "± 1 std over seeds" in page or "\\u00b1 1 std over seeds" in page  # JSON escapes ±


# ---- bad input ----------------------------------------------------------------------------
def test_bad_input_gives_one_clear_message(tau_study, tmp_path, capsys):
    with pytest.raises(LfmError, match="is not a study: it holds no study.json"):
        load_study(tmp_path / "results" / "ray")
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

    base = RunConfig(data=DataConfig("digits-lt")).override({"stage1.epochs": 2, "stage2.epochs": 1}).to_dict()
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
    # τ = 0.1 has the highest mean, but two seeds (one of them stopped early) cannot tell it
    # from τ = 0.01: no star.
    assert not [t for t in fig.data if t.marker.symbol == "star"]
    assert any("no configuration is better" in (a.text or "") for a in fig.layout.annotations)
    curves = learning_curves_figure(study)
    assert [s.x0 for s in curves.layout.shapes] == [2.5]
    assert sum((t.name or "").endswith(": stopped") for t in curves.data) == 1


def test_report_of_a_tune_experiment_lists_its_failed_trial(tune_experiment, tmp_path):
    page = write_report(tune_experiment, out=tmp_path / "r.html", png=False).read_text()
    assert ">Failed trials</h2>" in page and "diverged at tau=10" in page
    assert ">Learning curves</h2>" in page and "Ablation: test accuracy against τ" in page


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

    cfg = RunConfig(data=DataConfig("digits-lt")).override({"data.cache_dir": str(tmp_path / "cache")})
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
