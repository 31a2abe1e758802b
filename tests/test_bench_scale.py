"""The bench parts at scale (lfm_ray.commands.bench_scale) and the report's handling of
large studies: each computation against a direct one, at tiny sizes. The simulated cluster
and the study of many trials run real Ray and sit behind --slow."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from lfm_ray.commands import bench_scale


def _write_records(folder, trials):
    for i, reports in enumerate(trials):
        d = folder / f"trial_{i}"
        d.mkdir(parents=True)
        (d / "result.json").write_text("\n".join(json.dumps(r) for r in reports) + "\n")


def test_time_breakdown_adds_up_from_the_trial_records(tmp_path):
    # Two stage-2 trials of three epochs: 1 s training per epoch, 0.5 s evaluation and
    # checkpoint per epoch, and the first report also 4 s of start-up.
    reports = [{"time_this_iter_s": 1.5 + (4.0 if e == 0 else 0.0), "train_time_s": 1.0}
               for e in range(3)]
    _write_records(tmp_path / "tune", [reports, reports])
    _write_records(tmp_path / "stage1", [[{"time_this_iter_s": 10.0, "train_time_s": 8.0}]])
    out = bench_scale.time_breakdown({"stage1": tmp_path / "stage1",
                                      "stage2": tmp_path / "tune"}, wall_s=30.0, slots=2)
    assert out["branch_stage2_trials"] == 2
    assert out["branch_stage2_train_s"] == pytest.approx(6.0)
    assert out["branch_stage2_startup_s"] == pytest.approx(8.0)
    assert out["branch_stage2_eval_checkpoint_s"] == pytest.approx(3.0)
    assert out["branch_stage2_trial_s"] == pytest.approx(17.0)
    # One report only: its rest counts as start-up (nothing to tell evaluation apart by).
    assert out["branch_stage1_startup_s"] == pytest.approx(2.0)
    assert out["branch_outside_trials_s"] == pytest.approx(2 * 30.0 - 17.0 - 10.0)


def test_phase_spans_from_report_timestamps(tmp_path):
    _write_records(tmp_path / "stage1", [[{"timestamp": 110, "time_this_iter_s": 10.0},
                                          {"timestamp": 130, "time_this_iter_s": 20.0}]])
    _write_records(tmp_path / "tune", [[{"timestamp": 140, "time_this_iter_s": 5.0}],
                                       [{"timestamp": 150, "time_this_iter_s": 8.0}]])
    out = bench_scale.phase_spans({"stage1": tmp_path / "stage1", "stage2": tmp_path / "tune"})
    assert out == {"branch_stage1_span_s": 30.0, "branch_stage2_span_s": 15.0,
                   "branch_trials_span_s": 50.0}


def test_peak_per_node_counts_overlapping_trials():
    rows = [{"node": "a", "start": 0, "end": 2}, {"node": "a", "start": 1, "end": 3},
            {"node": "a", "start": 2, "end": 4},  # starts as the first ends: not three
            {"node": "b", "start": 0, "end": 1}]
    assert bench_scale._peak_per_node(rows) == {"a": 2, "b": 1}


def test_per_trial_windows():
    first, last = bench_scale._per_trial(0.0, [1.0, 2.0, 3.0, 5.0, 7.0, 9.0], window=2)
    assert (first, last) == (1.0, 2.0)


def test_memory_per_trial_from_the_window_to_the_end():
    rss = [100.0, 101.0, 102.0, 110.0, 120.0]  # MiB after each trial's end
    # From the end of trial 3 (102 MiB) to that of trial 5 (120 MiB): 18 MiB over 2 trials.
    assert bench_scale._rss_per_trial_kib(rss, window=3) == pytest.approx(18 * 1024 / 2)


def test_aggregate_in_one_pass_matches_a_direct_computation():
    from scipy import stats

    from lfm_ray.analysis.load import aggregate

    t = pd.DataFrame({"status": ["TERMINATED"] * 7 + ["ERROR"],
                      "mix.tau": [0.1, 0.1, 0.1, 0.5, np.nan, np.nan, 2.0, 0.1],
                      "acc_all": [0.5, 0.6, 0.8, 0.4, 0.3, "bad", np.nan, 0.99]})
    agg = aggregate(t, ["mix.tau"], metrics=["acc_all"], sort=False)
    assert agg["mix.tau"].tolist()[:2] == [0.1, 0.5] and math.isnan(agg["mix.tau"][2])
    v = np.array([0.5, 0.6, 0.8])
    half = stats.t.ppf(0.975, 2) * v.std(ddof=1) / math.sqrt(3)
    row = agg.iloc[0]
    assert row["acc_all_mean"] == pytest.approx(v.mean())
    assert row["acc_all_std"] == pytest.approx(v.std(ddof=1))
    assert row["acc_all_ci"] == pytest.approx(half) and row["acc_all_n"] == 3
    assert row["acc_all_ci_low"] == pytest.approx(v.mean() - half)
    one = agg.iloc[1]  # one value: no spread, no interval
    assert one["acc_all_mean"] == pytest.approx(0.4) and one["acc_all_n"] == 1
    assert math.isnan(one["acc_all_std"]) and math.isnan(one["acc_all_ci"])
    nan_group = agg.iloc[2]  # "bad" is not a number: one value left
    assert nan_group["acc_all_mean"] == pytest.approx(0.3) and nan_group["acc_all_n"] == 1
    none = agg.iloc[3]  # no number at all
    assert none["acc_all_n"] == 0 and math.isnan(none["acc_all_mean"])
    assert len(agg) == 4  # the failed trial is not counted
    assert aggregate(t[t["status"] == "x"], ["mix.tau"], metrics=["acc_all"]).empty


def test_a_large_study_gets_summary_curves_and_a_sampled_parallel_plot(tmp_path, monkeypatch):
    """Above the limits the report draws the learning curves as a median and band with the
    best trial, and Optuna's parallel coordinates on a seeded sample; both say so."""
    from lfm_ray.analysis import figures, load_study, optuna_views
    from lfm_ray.analysis.report import build_figures, write_report

    monkeypatch.setattr(figures, "MAX_CURVES", 20)
    monkeypatch.setattr(optuna_views, "PARALLEL_MAX_TRIALS", 25)
    folder = bench_scale.write_large_study(tmp_path / "search_40", 40)
    study = load_study(folder)
    assert len(study.trials) == 40 and study.search == "random"
    assert set(study.epochs["trial_id"]) == set(study.trials["trial_id"])
    built = build_figures(study)
    curves = built.figs["learning_curves"]
    assert "a summary of 40 trials" in curves.layout.title.text
    median = [t for t in curves.data if t.name == "median of the trials"][0]
    acc = pd.to_numeric(study.epochs["acc_all"]) * 100
    expect = acc.groupby(study.epochs["epoch"]).median().to_numpy()
    assert np.allclose(median.y, expect)
    best_id = study.trials.loc[study.trials["acc_all"].idxmax(), "trial_id"]
    assert any(str(best_id) in (t.name or "") for t in curves.data)
    parallel = built.figs["optuna_parallel"]
    assert "a sample of 25 of the 40 complete trials" in parallel.layout.title.text
    page = write_report(folder, png=False).read_text()
    assert "a summary of 40 trials" in page and "a sample of 25" in page


def test_report_scale_part_at_a_tiny_size(tmp_path):
    out = bench_scale.bench_report_scale(tmp_path, trials=12)
    assert out["report_scale_trials"] == 12
    assert out["report_scale_s"] > 0 and 4 < out["report_scale_html_mib"] < 20
    assert (tmp_path / "report_scale" / "search_12" / "report.html").is_file()


@pytest.mark.slow
@pytest.mark.cluster
def test_simulated_cluster_places_four_quarter_gpu_trials_per_gpu(tmp_path):
    out = bench_scale.bench_cluster(tmp_path, nodes=(1, 2), trials_per_slot=2, hold_s=3.0,
                                    work=1000)
    for n in (1, 2):
        assert out[f"cluster_n{n}_done"] == out[f"cluster_n{n}_trials"] == 8 * n
        assert out[f"cluster_n{n}_nodes_used"] == n
        assert out[f"cluster_n{n}_placed_per_gpu"] == pytest.approx(4.0)
        assert out[f"cluster_n{n}_first_trial_s"] > 0
    assert out["cluster_nodes_max"] == 2


@pytest.mark.slow
def test_study_scale_part_runs_both_sides(tmp_path):
    out = bench_scale.bench_study_scale(tmp_path, str(tmp_path / "cache"), trials=6, window=2)
    assert out["scale_trials"] == out["scale_plain_trials"] == out["scale_keys_trials"] == 6
    assert out["scale_trials_csv_rows"] == 6 and out["scale_data"] == "digits-lt"
    assert out["scale_rss_end_mib"] > 0 and out["scale_growth"] > 0
    assert out["scale_overhead_ratio"] > 0
    # A smoke trial reports twice (one epoch per stage), its accuracies among the numbers
    # plain Tune then reports as often.
    assert out["scale_keys_reports"] == 2 and out["scale_keys_reported"] >= 10
    # Trials run 2 at a time here: the wall per trial is at least half a trial's own time.
    assert 0 < out["scale_trial_s"] / 2 < out["scale_wall_s"] / 6
