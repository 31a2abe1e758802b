"""Study results → tidy pandas frames → interactive Plotly figures and one HTML report.

    from lfm_ray.analysis import load_study, aggregate, ablation_figure, write_report

    study = load_study("results/tau_sweep")        # or a Tune experiment dir, or a trials CSV
    aggregate(study.finished, ["mix.tau"])         # mean, std, n, 95% t-interval over seeds
    better_than_rest({"a": [.61, .63], "b": [.55, .56]}, {"a": [0, 1], "b": [0, 1]})
    ablation_figure(study, "mix.tau").show()
    write_report("results/tau_sweep")              # results/tau_sweep/report.html + PNGs

Modules: `load` (reading and aggregation), `figures` (ablation, comparison, learning curves,
per-class accuracy), `optuna_views` (Optuna's own plots), `report` (the HTML page), `tsne`
(3-D t-SNE of a checkpoint's image features).
"""

from lfm_ray.analysis.figures import (
    ablation_figure, comparison_figure, comparison_html, comparison_table,
    comparison_table_figure, learning_curves_figure, per_class_figure,
)
from lfm_ray.analysis.load import (
    GROUPS, METRICS, Separation, StudyResults, aggregate, better_than_rest, history_epochs,
    load_checkpoint_result, load_study, read_tune_experiment, trial_result, tune_epochs,
)
from lfm_ray.analysis.optuna_views import optuna_figures, optuna_study, rebuild_optuna_study
from lfm_ray.analysis.report import study_figures, write_pngs, write_report

__all__ = [
    "GROUPS", "METRICS", "Separation", "StudyResults", "ablation_figure", "aggregate",
    "better_than_rest", "trial_result",
    "comparison_figure", "comparison_html", "comparison_table", "comparison_table_figure",
    "history_epochs", "learning_curves_figure", "load_checkpoint_result", "load_study",
    "optuna_figures", "optuna_study", "per_class_figure", "read_tune_experiment",
    "rebuild_optuna_study", "study_figures", "tune_epochs", "write_pngs", "write_report",
]
