"""The labelling rules of a report, on fabricated studies: a "best" mark only where the
best configuration is better than the rest at the seeds run (better_than_rest, checked
against scipy.stats.t), every per-trial figure naming its configuration and seeds, percent
units, parameter symbols and scales, the imbalance sweep as the paper's Table 2, Optuna's
top-k with blank conditional parameters and an importance caveat, the run's record in the
header, and no absolute path anywhere in the page."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from lfm_ray.analysis import better_than_rest, load_study, write_report
from lfm_ray.analysis.figures import NO_BEST, ablation_figure, comparison_table, best_cells
from lfm_ray.analysis.report import build_figures, trials_table
from lfm_ray.errors import LfmError

from study_fixtures import (  # noqa: E402  (tests/ is on sys.path, see pyproject.toml)
    COUNTS, GROUPS, TAUS, make_study, separated_accuracy,
)


# ---- the significance rule -------------------------------------------------------------------
def _paired_interval(a, b):
    d = np.asarray(a, float) - np.asarray(b, float)
    n = len(d)
    half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
    return d.mean(), d.mean() - half, d.mean() + half


def test_better_than_rest_paired_over_shared_seeds_matches_scipy():
    values = {"a": [0.70, 0.74, 0.69, 0.73], "b": [0.65, 0.66, 0.66, 0.64],
              "c": [0.50, 0.52, 0.49, 0.55]}
    seeds = {k: [0, 1, 2, 3] for k in values}
    sep = better_than_rest(values, seeds)
    mean, low, high = _paired_interval(values["a"], values["b"])
    assert sep.best == "a" and sep.runner_up == "b" and sep.test == "paired" and sep.n == 4
    assert (sep.diff, sep.low, sep.high) == pytest.approx((mean, low, high))
    assert low > 0 and sep.separated is True
    # Only the seeds both ran are paired: b's seed 9 has no partner in a.
    seeds_b = {**seeds, "b": [0, 1, 2, 9]}
    sep = better_than_rest(values, seeds_b)
    mean, low, high = _paired_interval(values["a"][:3], values["b"][:3])
    assert sep.n == 3 and (sep.low, sep.high) == pytest.approx((low, high))
    # Noisy differences: the interval includes 0, no claim.
    noisy = {"a": [0.70, 0.60, 0.75], "b": [0.62, 0.66, 0.64]}
    sep = better_than_rest(noisy, {"a": [0, 1, 2], "b": [0, 1, 2]})
    _, low, high = _paired_interval(noisy["a"], noisy["b"])
    assert low < 0 < high and not sep.separated and sep.against == "b"
    assert "includes 0" in sep.reason


def test_better_than_rest_must_beat_every_other_configuration():
    # a is clearly above the runner-up b (a constant paired difference), but c, lower on
    # average, is too noisy to be told from a: no claim, and it names c.
    values = {"a": [10.0, 11.0, 12.0], "b": [8.5, 9.5, 10.5], "c": [-5.0, 9.0, 20.0]}
    sep = better_than_rest(values, {k: [0, 1, 2] for k in values})
    assert sep.best == "a" and sep.runner_up == "b"
    assert sep.diff == pytest.approx(1.5) and sep.low == pytest.approx(1.5)
    assert not sep.separated and sep.against == "c"


def test_better_than_rest_without_shared_seeds_compares_the_intervals_of_the_means():
    a, b = [0.80, 0.82, 0.81], [0.60, 0.65, 0.62]
    sep = better_than_rest({"a": a, "b": b}, {"a": [0, 1, 2], "b": [3, 4, 5]})

    def interval(v):
        v = np.asarray(v)
        half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
        return v.mean() - half, v.mean() + half

    assert interval(a)[0] > interval(b)[1]
    assert sep.test == "unpaired" and sep.separated is True
    close = better_than_rest({"a": [0.80, 0.60, 0.70], "b": [0.65, 0.70, 0.60]},
                             {"a": [0, 1, 2], "b": [3, 4, 5]})
    assert not close.separated and "overlap" in close.reason
    # No seeds given: unpaired.
    assert better_than_rest({"a": a, "b": b}).test == "unpaired"


def test_better_than_rest_makes_no_claim_below_two_seeds_or_with_one_configuration():
    one_seed = better_than_rest({"a": [0.9], "b": [0.1]}, {"a": [0], "b": [0]})
    assert one_seed.best == "a" and not one_seed.separated and "fewer than two" in one_seed.reason
    alone = better_than_rest({"a": [0.9, 0.8]}, {"a": [0, 1]})
    assert alone.runner_up is None and not alone.separated
    low = better_than_rest({"a": [0.3, 0.31, 0.29], "b": [0.5, 0.52, 0.49]},
                           {k: [0, 1, 2] for k in "ab"}, mode="min")
    assert low.best == "a" and low.separated and low.high < 0
    nan = better_than_rest({"a": [0.9, float("nan"), 0.92], "b": [0.5, 0.6, 0.55]},
                           {k: [0, 1, 2] for k in "ab"})
    assert nan.n == 2  # the NaN seed is left out of the pairs
    with pytest.raises(LfmError, match="3 values but 2 seeds"):
        better_than_rest({"a": [1, 2, 3]}, {"a": [0, 1]})


# ---- fabricated studies ------------------------------------------------------------------------
separated = separated_accuracy


def overlapping(params, seed):
    """Means a few points apart, seeds scattered by ± 10 points in every direction."""
    jitter = {0: 0.10, 1: -0.10, 2: 0.0}[seed] * (1 if params["mix.tau"] != 0.05 else -1)
    b = {0.002: 0.50, 0.05: 0.53, 1.25: 0.51}[float(params["mix.tau"])] + jitter
    return {f"acc_{g}": b for g in GROUPS}


def _star(fig):
    return [t for t in fig.data if getattr(t.marker, "symbol", None) == "star"]


def test_clearly_separated_seeds_get_a_star_bold_cells_and_a_verdict(tmp_path):
    d = make_study(tmp_path, "sep", {"mix.tau": TAUS}, seeds=(0, 1, 2), acc=separated)
    study = load_study(d)
    fig = ablation_figure(study, "mix.tau")
    star = _star(fig)
    assert len(star) == 1 and star[0].x[0] == 0.05 and star[0].y[0] == pytest.approx(60)
    assert star[0].name == "best τ = 0.05 (by acc_all)"
    table = comparison_table(study)
    assert all(best_cells(table)[g].tolist() == [False, True, False] for g in GROUPS)
    page = write_report(d, png=False).read_text()
    assert "τ = 0.05 is better than every other configuration at 95 %" in page
    assert page.count("<td><b>") == 4 and NO_BEST not in page


def test_overlapping_seeds_get_no_star_no_bold_and_say_so(tmp_path):
    d = make_study(tmp_path, "ovl", {"mix.tau": TAUS}, seeds=(0, 1, 2), acc=overlapping)
    study = load_study(d)
    fig = ablation_figure(study, "mix.tau")
    assert not _star(fig)
    assert any(NO_BEST in (a.text or "") for a in fig.layout.annotations)
    assert not any(b.any() for b in best_cells(comparison_table(study)).values())
    page = write_report(d, png=False).read_text()
    assert "<b>" not in page.split(">Results</h2>")[1].split("</table>")[0]
    assert f"no cell is bold: {NO_BEST}" in page
    best = page.split(">Best configuration</h2>")[1].split("</table>")[0]
    assert NO_BEST in best and "better than every other" not in best
    # The per-class figure still shows the highest mean, and says it is no winner.
    assert "it is shown as the highest value, not as a winner" in page


def test_one_seed_prints_no_spread_and_claims_nothing(tmp_path):
    d = make_study(tmp_path, "one", {"mix.tau": TAUS}, seeds=(0,), acc=separated)
    study = load_study(d)
    fig = ablation_figure(study, "mix.tau")
    assert not _star(fig) and "one seed per value (no spread)" in fig.layout.title.text
    assert not [t for t in fig.data if "interval" in (t.name or "") or "std" in (t.name or "")]
    page = write_report(d, png=False).read_text()
    results = page.split(">Results</h2>")[1].split("</table>")[0]
    assert "mean ± std" not in page and "± " not in results
    assert "Top-1 test accuracy (%), one seed; no cell is marked best" in page
    assert "one seed per configuration gives no interval" in page
    assert "(one seed: no spread, no claim that one configuration is better)" in page


# ---- what each figure shows ----------------------------------------------------------------------
def test_the_per_class_figure_shows_the_best_configuration_with_every_seed(tmp_path):
    # τ = 0.05 has the best mean; the single best trial is τ = 1.25 seed 2 (the trap the
    # old "best trial" figure fell into).
    def acc(params, seed):
        tau = float(params["mix.tau"])
        b = {0.002: [0.30, 0.31, 0.29], 0.05: [0.60, 0.62, 0.58], 1.25: [0.40, 0.41, 0.70]}[tau]
        return {f"acc_{g}": b[seed] for g in GROUPS}

    d = make_study(tmp_path, "pc", {"mix.tau": TAUS}, seeds=(0, 1, 2), acc=acc)
    study = load_study(d)
    figs = build_figures(study)
    fig = figs.figs["per_class"]
    assert "per-class test accuracy of τ = 0.05" in fig.layout.title.text
    assert "seeds 0, 1, 2" in fig.layout.title.text
    rows = study.finished[study.finished["mix.tau"] == 0.05]
    per_class = np.array([json.loads((d / a / "result.json").read_text())["per_class_acc"]
                          for a in rows["artifacts"]]) * 100
    shown = {}
    for t in fig.data:
        if t.name and ": " in t.name and not t.name.endswith("seeds"):
            for x, y in zip(t.x, t.y):
                shown[int(x)] = y
    assert [shown[c] for c in COUNTS] == pytest.approx(per_class.mean(axis=0).tolist())
    names = [t.name for t in fig.data if t.showlegend is not False]
    assert names == ["many: 1 class (n > 100)", "medium: 7 classes (20 ≤ n ≤ 100)",
                     "few: 2 classes (n < 20)"]
    assert "seeds 0, 1, 2" in figs.captions["per_class"]


def test_the_confusion_figure_names_its_run(tmp_path):
    variants = {"zero-shot": {"runtime.zero_shot": True, "mix.method": "none"},
                "CE": {"mix.method": "none"}, "LFM + CE": {"mix.method": "lfm"}}

    def acc(params, seed):
        b = {"zero-shot": 0.1, "CE": 0.4, "LFM + CE": 0.5}[params["method"]]
        return {f"acc_{g}": b + 0.01 * seed for g in GROUPS}

    d = make_study(tmp_path, "loss", {"method": list(variants)}, seeds=(0, 1), acc=acc,
                   variants=variants)
    figs = build_figures(load_study(d))
    title = figs.figs["sampling_confusion"].layout.title.text
    assert "the zero-shot run (method zero-shot, seed 0)" in title
    assert "trial los_00000" in figs.captions["sampling_confusion"]
    # Without a zero-shot trial: the best configuration's, and it says so.
    d2 = make_study(tmp_path, "tau", {"mix.tau": TAUS}, seeds=(0, 1), acc=separated)
    title = build_figures(load_study(d2)).figs["sampling_confusion"].layout.title.text
    assert "the best configuration (τ = 0.05, seed 0)" in title


def test_gamma_figure_of_a_tau_sweep_matches_a_direct_computation(tmp_path):
    import torch

    from lfm_ray.effective import effective_imbalance_sweep
    from lfm_ray.model import build_clip, text_features
    from study_fixtures import NAMES

    d = make_study(tmp_path, "g", {"mix.tau": TAUS}, seeds=(0, 1), acc=separated)
    study = load_study(d)
    figs = build_figures(study)
    fig = figs.figs["gamma_mix.tau"]
    assert fig.layout.xaxis.title.text == "τ (log scale)"
    assert [t.name for t in fig.data] == ["seed 0 (random-init text tower)",
                                          "seed 1 (random-init text tower)"]
    torch.manual_seed(1)
    clip, _ = build_clip("tiny")
    feats = text_features(clip, NAMES, ["a photo of a {}"])
    expect = effective_imbalance_sweep(COUNTS, feats, "mix.tau", TAUS, alpha=1.0, tau=0.05,
                                       beta=0.2)
    assert np.allclose(fig.data[1].y, expect)
    # Weights that are not on this machine: a note instead of the figure.
    meta = json.loads((d / "study.json").read_text())
    meta["base_config"]["model"].update({"name": "ViT-B-32", "pretrained": "openai",
                                         "cache_dir": str(tmp_path / "no-weights")})
    (d / "study.json").write_text(json.dumps(meta))
    figs = build_figures(load_study(d))
    assert "gamma_mix.tau" not in figs.figs
    assert "not at hand on this machine" in figs.captions["gamma_mix.tau"]
    assert str(tmp_path) not in figs.captions["gamma_mix.tau"]


# ---- tables --------------------------------------------------------------------------------------
def test_the_imbalance_sweep_is_laid_out_as_table_2_and_never_compared_across_factors(tmp_path):
    def acc(params, seed):
        # At γ = 10 LFM + CE leads, at γ = 100 CE does; every γ = 100 figure is below every
        # γ = 10 one, so a comparison across factors would bold γ = 10 only.
        table = {(10, "CE"): 0.70, (10, "LFM + CE"): 0.80, (100, "CE"): 0.40,
                 (100, "LFM + CE"): 0.30}
        b = table[(int(params["data.imbalance_factor"]), params["method"])] + 0.01 * seed
        return {f"acc_{g}": b for g in GROUPS}

    d = make_study(tmp_path, "imb", {"data.imbalance_factor": [10, 100],
                                     "method": ["CE", "LFM + CE"]}, seeds=(0, 1, 2), acc=acc)
    page = write_report(d, png=False).read_text()
    results = page.split(">Results</h2>")[1].split("</table>")[0]
    assert "<th rowspan='2'>method</th>" in results
    assert "<th colspan='4' class='group'>imbalance factor γ = 10</th>" in results
    assert "<th colspan='4' class='group'>imbalance factor γ = 100</th>" in results
    rows = results.split("<tbody>")[1].split("<tr>")[1:]
    assert [re.findall(r"class='name'>([^<]*)<", r)[0] for r in rows] == ["CE", "LFM + CE"]
    bold = [len(re.findall(r"<b>", r)) for r in rows]
    assert bold == [4, 4]  # CE best within γ = 100, LFM + CE within γ = 10
    ce = rows[0].split("</td>")
    assert "<b>" not in "".join(ce[1:5]) and "<b>" in "".join(ce[5:9])
    assert "bold: better than every other row of its column within its imbalance factor γ" in page
    # The best configuration, and the per-class figure, per imbalance factor.
    best = page.split(">Best configuration</h2>")[1].split("</table>")[0]
    lines = best.split("<tbody>")[1].split("<tr>")[1:]
    assert [re.findall(r"<td>([^<]*)</td>", r)[1:3] for r in lines] == [
        ["imbalance factor γ = 10", "method LFM + CE"], ["imbalance factor γ = 100", "method CE"]]
    assert "method LFM + CE is better than every other configuration" in lines[0]
    assert "method CE is better than every other configuration" in lines[1]
    for factor in (10, 100):
        assert f">Per-class accuracy against training count, imbalance factor γ = {factor}</h2>" \
            in page


def test_the_first_column_is_named_after_what_it_holds(tmp_path):
    tau = write_report(make_study(tmp_path, "t", {"mix.tau": TAUS}, acc=separated),
                       png=False).read_text()
    assert "<thead><tr><th>τ</th><th>many (%)</th>" in tau
    mix = write_report(make_study(tmp_path, "m", {"mix.method": ["none", "lfm"]},
                                  acc=lambda p, s: {f"acc_{g}": 0.5 for g in GROUPS}),
                       png=False).read_text()
    assert "<thead><tr><th>mixing method</th><th>many (%)</th>" in mix


def test_the_trials_table_is_in_percent_drops_single_values_and_scrolls(tmp_path):
    d = make_study(tmp_path, "pct", {"mix.tau": TAUS}, seeds=(0, 1), acc=separated, failed=1)
    study = load_study(d)
    table, constant = trials_table(study)
    assert "acc_all (%)" in table.columns and "acc_all" not in table.columns
    done = study.trials["status"] == "TERMINATED"
    assert np.allclose(table.loc[done, "acc_few (%)"], study.trials.loc[done, "acc_few"] * 100)
    assert "τ" in table.columns and "mix.tau" not in table.columns
    # One value in every trial (the failed one lacks it): listed once, not as a column.
    assert constant["data.name"] == "digits-lt" and "data.name" not in table.columns
    assert "checkpoint_path" not in table.columns and "artifacts" not in table.columns
    page = write_report(d, png=False).read_text()
    trials = page.split(">All trials</h2>")[1].split("</table>")[0]
    assert "<div class='box'>" in trials and "acc_all (%)" in trials
    assert "The same in every trial: data set digits-lt" in trials
    first = study.trials.iloc[0]
    assert f"{first['acc_all'] * 100:.2f}" in trials and f">{first['acc_all']:.4g}<" not in trials
    assert ".box{max-height:520px;overflow:auto" in page


def test_optuna_top_k_is_rounded_with_blank_conditional_parameters_and_a_caveat(tmp_path):
    rng = np.random.default_rng(5)
    d = tmp_path / "results" / "opt"
    d.mkdir(parents=True)
    rows = []
    for i in range(14):
        loss = ["ce", "focal", "mms"][i % 3]
        rows.append({"trial_id": f"o{i}", "status": "TERMINATED", "error": "",
                     "stage1.tau": float(10 ** rng.uniform(-2.7, 1.5)),
                     "stage1.lr": float(10 ** rng.uniform(-4, -2)), "loss.name": loss,
                     "loss.focal_gamma": float(rng.uniform(0.5, 4)) if loss == "focal" else None,
                     "loss.mms_margin": float(rng.uniform(0.1, 0.5)) if loss == "mms" else None,
                     **{f"acc_{g}": float(rng.uniform(0.2, 0.9)) for g in GROUPS},
                     "wall_time_s": 20.0})
    pd.DataFrame(rows).to_csv(d / "trials.csv", index=False)
    space = {"stage1.tau": {"kind": "loguniform", "low": 0.002, "high": 31.25},
             "stage1.lr": {"kind": "loguniform", "low": 1e-4, "high": 1e-2},
             "loss.name": {"kind": "choice", "choices": ["ce", "focal", "mms"]},
             "loss.focal_gamma": {"kind": "uniform", "low": 0.5, "high": 4.0,
                                  "when": {"loss.name": "focal"}},
             "loss.mms_margin": {"kind": "uniform", "low": 0.1, "high": 0.5,
                                 "when": {"loss.name": "mms"}}}
    (d / "study.json").write_text(json.dumps({
        "name": "opt", "search": "optuna", "metric": "acc_all", "mode": "max",
        "swept": list(space), "space": space, "num_samples": 14, "sampler": "tpe",
        "objectives": [], "command": ["lfm-ray", "study"]}))
    page = write_report(d, png=False).read_text()
    top = page.split(">Results</h2>")[1].split("</table>")[0]
    assert "nan" not in top.lower() and "None" not in top
    cells = re.findall(r"<td>([^<]*)</td>", top)
    assert "" in cells  # a conditional parameter a trial did not draw is blank
    header = re.findall(r"<th>([^<]*)</th>", top)
    assert header[:7] == ["trial", "τ (stage 1)", "learning rate (stage 1)", "loss", "focal γ",
                          "MMS margin", "acc_many (%)"]
    best = max(rows, key=lambda r: r["acc_all"])
    assert f"{best['stage1.tau']:.3g}" in top and f"{best['acc_all'] * 100:.2f}" in top
    assert repr(best["stage1.tau"]) not in top  # rounded, not every digit
    assert "fewer than about 50 trials stand behind it" in page
    assert "τ (stage 1): log-uniform in [0.002, 31.25]" in page
    assert "focal γ: uniform in [0.5, 4] — only where loss is focal" in page


# ---- the run's record ----------------------------------------------------------------------------
def test_the_header_states_the_record_and_the_configuration_marks_what_was_set(tmp_path):
    d = make_study(tmp_path, "rec", {"mix.tau": TAUS}, seeds=(0, 1, 2), acc=separated)
    page = write_report(d, png=False).read_text()
    header = page.split("<nav>")[0]
    for text in ("selected on acc_all (test): selected on test: this data set has no "
                 "validation split", "τ: 0.002, 0.05, 1.25", "0, 1, 2", "9 trials, 9 finished",
                 "of trial time in all", "Test CPU 9000, 2 cores; 24.0 GiB RAM; "
                 "1 × NVIDIA H200, CUDA 13.0", "git_commit abc1234", "lfm-ray 0.1.0",
                 "python studies/rec.py --seeds 0,1,2", "studies/run_all.py"):
        assert text in header, text
    config = page.split(">Configuration</h2>")[1]
    assert "<td class='set'>stage1.epochs</td><td>2</td><td>command-line flag</td>" in config
    assert "<td class='set'>mix.method</td><td>&quot;lfm&quot;</td><td>the study script</td>" \
        in config
    assert "<td class='set'>stage1.tau</td><td>0.05</td><td>swept</td>" in config  # by mix.tau
    assert "<td>loss.name</td>" in config  # left at its default: not marked


def test_val_selection_names_its_split(tmp_path):
    d = make_study(tmp_path, "val", {"mix.tau": TAUS}, seeds=(0, 1, 2), acc=separated, val=True)
    page = write_report(d, png=False).read_text()
    assert "selected on val_acc_all (the validation split)" in page
    assert "val_acc_all (%)" in page


# ---- no absolute path ----------------------------------------------------------------------------
def test_no_absolute_path_in_the_report(tmp_path):
    d = make_study(tmp_path, "paths", {"mix.tau": TAUS}, seeds=(0, 1), acc=separated,
                   copies=False)
    meta = json.loads((d / "study.json").read_text())
    meta["experiment_path"] = str(tmp_path / "results" / "ray" / "paths")  # an older record
    (d / "study.json").write_text(json.dumps(meta))
    page = write_report(d, png=False).read_text()
    assert str(tmp_path) not in page and str(Path(tmp_path).resolve()) not in page
    assert ">Per-class accuracy against training count</h2>" in page  # read from the checkpoints


def test_an_imbalance_factor_alone_is_never_called_best(tmp_path):
    def acc(params, seed):
        b = {10: 0.8, 50: 0.6, 100: 0.4}[int(params["data.imbalance_factor"])] + 0.01 * seed
        return {f"acc_{g}": b for g in GROUPS}

    d = make_study(tmp_path, "gam", {"data.imbalance_factor": [10, 50, 100]}, seeds=(0, 1, 2),
                   acc=acc)
    study = load_study(d)
    fig = ablation_figure(study, "data.imbalance_factor")
    assert not _star(fig) and not fig.layout.annotations  # a setting, not a choice
    assert fig.layout.xaxis.title.text == "imbalance factor γ"  # one decade: linear
    page = write_report(d, png=False).read_text()
    best = page.split(">Best configuration</h2>")[1].split("</table>")[0]
    assert best.count("one configuration: nothing to compare") == 3
    assert "better than every other" not in page
