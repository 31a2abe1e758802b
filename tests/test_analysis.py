"""Analysis: loading (results dir, Tune experiment via Tune's reader, CSV), aggregation against
numpy, figure contents, the comparison table, the report file, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from lfm_ray.analysis import (
    StudyData, ablation_figure, aggregate, comparison_html, comparison_table, load_study,
    optuna_figures, per_class_figure, study_figures, write_report,
)
from lfm_ray.cli import main
from lfm_ray.errors import LfmError


def fake_study(tmp_path, values=(0.002, 0.05, 1.25), seeds=(0, 1), failed=False, name="taus"):
    rng = np.random.default_rng(0)
    rows = []
    for i, (tau, seed) in enumerate((t, s) for t in values for s in seeds):
        peak = -abs(math.log10(tau) + 1.3)  # best near τ = 0.05
        accs = {f"acc_{g}": float(np.clip(0.5 + 0.1 * peak + rng.normal(0, 0.02), 0, 1))
                for g in ("many", "medium", "few", "all")}
        rows.append({"trial_id": f"t{i}", "status": "TERMINATED", "error": "", "mix.tau": tau,
                     "runtime.seed": seed, "loss.name": "ce", "epoch": 4, "stage": 2,
                     "wall_time_s": 10.0, "stopped_early": False, **accs})
    if failed:
        rows.append({"trial_id": "bad", "status": "ERROR", "error": "RuntimeError: boom",
                     "mix.tau": values[0], "runtime.seed": 9})
    d = tmp_path / name
    d.mkdir()
    pd.DataFrame(rows).to_csv(d / "trials.csv", index=False)
    (d / "study.json").write_text(json.dumps({
        "name": name, "search": "grid", "swept": ["mix.tau", "runtime.seed"],
        "command": ["python", "studies/tau_sweep.py"], "metric": "acc_all",
        "base_config": {"stage1": {"epochs": 2}}, "experiment_path": str(tmp_path / "none")}))
    return d


def test_aggregate_against_numpy(tmp_path):
    study = load_study(fake_study(tmp_path))
    agg = aggregate(study.trials, ["mix.tau"])
    for _, row in agg.iterrows():
        v = study.trials.loc[study.trials["mix.tau"] == row["mix.tau"], "acc_all"].to_numpy()
        half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
        assert row["acc_all_mean"] == pytest.approx(v.mean())
        assert row["acc_all_std"] == pytest.approx(v.std(ddof=1))
        assert row["acc_all_ci_low"] == pytest.approx(v.mean() - half)
        assert row["acc_all_ci_high"] == pytest.approx(v.mean() + half)
        assert row["acc_all_n"] == 2


def test_ablation_figure_log_axis_and_best_marker(tmp_path):
    study = load_study(fake_study(tmp_path))
    fig = ablation_figure(study, "mix.tau")
    assert fig.layout.xaxis.type == "log"
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == ["many", "medium", "few", "all"]
    assert list(lines[0].x) == [0.002, 0.05, 1.25]
    star = [t for t in fig.data if t.name.startswith("best")][0]
    means = aggregate(study.trials, ["mix.tau"]).sort_values("mix.tau")
    assert star.x[0] == means["mix.tau"].iloc[int(np.argmax(means["acc_all_mean"]))]
    linear = load_study(fake_study(tmp_path, values=(0.5, 1.0, 2.0), name="alphas"))
    assert ablation_figure(linear, "mix.tau").layout.xaxis.type != "log"


def test_comparison_table_bolds_the_best(tmp_path):
    study = load_study(fake_study(tmp_path))
    table = comparison_table(study)
    assert list(table["method"]) == ["0.002", "0.05", "1.25"]
    page = comparison_html(table)
    best_all = f"{table['all_mean'].max():.2f}"
    assert f"<b>{best_all}" in page
    assert page.count("<b>") == 4  # one per column


def test_bad_input_messages(tmp_path):
    with pytest.raises(LfmError, match="is not a study"):
        load_study(tmp_path)
    study = load_study(fake_study(tmp_path))
    with pytest.raises(LfmError, match="'stage1.lr' was not swept.*mix.tau"):
        ablation_figure(study, "stage1.lr")
    none_done = StudyData(trials=study.trials.assign(status="ERROR"), epochs=pd.DataFrame(),
                          meta={"name": "x", "swept": ["mix.tau"]})
    with pytest.raises(LfmError, match="no finished trials"):
        study_figures(none_done)
    assert main(["report", str(tmp_path / "nowhere")]) == 2


def test_report_is_self_contained_and_lists_failures(tmp_path):
    d = fake_study(tmp_path, failed=True)
    path = write_report(d)
    page = path.read_text()
    assert "plotly.js" in page or "Plotly" in page
    assert "<script src=" not in page  # no external script: plotly.js is embedded
    assert len(page) > 3_000_000
    assert "Failed trials" in page and "boom" in page
    assert "studies/tau_sweep.py" in page


def test_per_class_figure_uses_a_log_count_axis():
    fig = per_class_figure({"class_counts": [100, 10, 1], "per_class_acc": [0.9, 0.5, 0.1],
                            "class_names": ["a", "b", "c"]})
    assert fig.layout.xaxis.type == "log" and list(fig.data[0].y) == [90.0, 50.0, 10.0]


def test_optuna_views_from_a_rebuilt_study(tmp_path):
    d = tmp_path / "opt"
    d.mkdir()
    rng = np.random.default_rng(1)
    rows = [{"trial_id": f"o{i}", "status": "TERMINATED", "stage1.tau": float(rng.uniform(0.01, 1)),
             "loss.name": ["ce", "mms"][i % 2], "acc_all": float(rng.uniform()),
             "acc_few": float(rng.uniform()), "acc_many": float(rng.uniform())} for i in range(6)]
    pd.DataFrame(rows).to_csv(d / "trials.csv", index=False)
    (d / "study.json").write_text(json.dumps({
        "name": "opt", "search": "optuna", "swept": ["stage1.tau", "loss.name"],
        "metric": "acc_all", "objectives": ["acc_few", "acc_many"],
        "space": {"stage1.tau": {"kind": "loguniform", "low": 0.01, "high": 1.0, "choices": []},
                  "loss.name": {"kind": "choice", "low": None, "high": None,
                                "choices": ["ce", "mms"]}}}))
    figs = optuna_figures(load_study(d))
    assert {"pareto", "history", "parallel", "importance"} <= set(figs)
    assert len(figs["pareto"].data) >= 1


@pytest.fixture(scope="module")
def tune_experiment(tmp_path_factory):
    """A real, tiny Tune experiment reporting the trainer's metric keys."""
    import ray
    from ray import tune

    root = tmp_path_factory.mktemp("tune")

    def trainable(config):
        for epoch in (1, 2, 3):
            acc = 0.1 * epoch + 0.01 * config["params"]["runtime.seed"]
            tune.report({"epoch": epoch, "stage": 1 if epoch < 3 else 2, "train_loss": 1.0 / epoch,
                         "acc_many": acc, "acc_medium": acc, "acc_few": acc / 2, "acc_all": acc})

    ray.init(num_cpus=2, include_dashboard=False)
    tuner = tune.Tuner(trainable, param_space={"params": {
        "mix.tau": tune.grid_search([0.01, 0.1]), "runtime.seed": tune.grid_search([0, 1])}},
        run_config=tune.RunConfig(name="exp", storage_path=str(root), verbose=0))
    tuner.fit()
    ray.shutdown()
    return root / "exp"


def test_tune_experiment_is_read_with_tunes_reader(tune_experiment):
    study = load_study(tune_experiment)
    assert len(study.trials) == 4 and set(study.trials["mix.tau"]) == {0.01, 0.1}
    assert len(study.epochs) == 12
    assert sorted(study.epochs["epoch"].unique()) == [1, 2, 3]
    figs = study_figures(study)
    assert "learning_curves" in figs


def test_tsne_of_a_trained_checkpoint(tmp_path):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from lfm_ray.config import RunConfig
    from lfm_ray.train import train_loop_per_worker
    from lfm_ray.tsne import write_tsne

    cfg = RunConfig().override({"stage1.epochs": 1, "stage2.epochs": 0,
                                "runtime.max_steps_per_epoch": 2,
                                "data.cache_dir": str(tmp_path / "cache")})
    TorchTrainer(train_loop_per_worker,
                 train_loop_config={"run": cfg.to_dict(), "checkpoint_dir": str(tmp_path / "ck")},
                 scaling_config=ScalingConfig(num_workers=0)).fit()
    out = write_tsne(tmp_path / "ck" / "epoch_0001", [0, 9], out=tmp_path / "t.html", per_class=20)
    page = out.read_text()
    assert "scatter3d" in page and "zero (n=124 training images)" in page
    assert main(["report", "--tsne", str(tmp_path / "ck" / "epoch_0001"), "--classes", "0,99"]) == 2
