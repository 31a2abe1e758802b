"""One self-contained HTML report per study, and a PNG of each headline figure beside it.

`write_report(study_dir)` is what `lfm-ray report` and every studies/ script call at the end.
The page embeds plotly.js once, so it opens with no network; its figures are the ones that
fit the study (ablation curves for swept numbers, comparison table and bars for swept
categories, Optuna's views for Optuna and random searches, learning curves, per-class
accuracy of the best trial), followed by the failed trials, every trial, the command, the
configuration, and the machine and package versions.
"""

from __future__ import annotations

import html
import json
import math
import os
import platform
import re
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from lfm_ray.analysis.figures import (
    ablation_figure, comparison_figure, comparison_html, comparison_table,
    comparison_table_figure, fmt_value, headline_metric, learning_curves_figure,
    per_class_figure,
)
from lfm_ray.analysis.load import (
    StudyResults, aggregate, best_row, is_numeric_param, load_checkpoint_result, load_study,
)
from lfm_ray.errors import LfmError

CHROMES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
# Figures not exported as PNG (they are for exploring in the page, not for a slide).
NOT_HEADLINE = ("learning_curves",)
TITLES = {
    "comparison_table": "Comparison table", "comparison": "Accuracy per method",
    "learning_curves": "Learning curves", "per_class": "Per-class accuracy against training count",
    "optuna_history": "Optimisation history", "optuna_importance": "Parameter importance",
    "optuna_parallel": "Parallel coordinates", "optuna_pareto": "Pareto front",
}


# ---- which figures fit a study ------------------------------------------------------------
def kinds_of_params(study: StudyResults) -> tuple[list[str], list[str]]:
    """(numeric, categorical) swept parameters that vary among the finished trials."""
    done = study.finished
    numeric, categorical = [], []
    for p in study.params:
        if done[p].nunique(dropna=False) < 2:
            continue
        (numeric if is_numeric_param(done[p]) else categorical).append(p)
    return numeric, categorical


def study_figures(study: StudyResults, params: Sequence[str] | None = None,
                  band: str = "auto") -> dict[str, go.Figure]:
    """Every figure that fits the study, headline figures first. `params`: the parameters
    to draw ablation curves for (default: every swept number of a grid study)."""
    done = study.require_finished()
    for p in params or []:
        study.require_param(p)
    figs: dict[str, go.Figure] = {}
    numeric, categorical = kinds_of_params(study)
    if params:
        for p in params:
            figs[f"ablation_{p}"] = ablation_figure(study, p, band=band)
    elif study.search in ("optuna", "random"):
        from lfm_ray.analysis.optuna_views import optuna_figures

        figs.update({f"optuna_{k}": v for k, v in optuna_figures(study).items()})
    elif categorical:
        # Methods, losses, data sets (× imbalance factor): the paper's tables and bars.
        figs["comparison"] = comparison_figure(study)
        figs["comparison_table"] = comparison_table_figure(
            comparison_table(study), study.mode,
            title=f"{study.name}: top-1 accuracy (%), mean ± std over seeds")
    else:
        for p in numeric:
            figs[f"ablation_{p}"] = ablation_figure(study, p, band=band)
    if not study.epochs.empty and study.epochs["trial_id"].isin(done["trial_id"]).any():
        figs["learning_curves"] = learning_curves_figure(study)
    per_class = per_class_results(study)
    if per_class:
        figs["per_class"] = per_class_figure(
            per_class, title=f"{study.name}: per-class accuracy against training count")
    return figs


def _trial_of_best(study: StudyResults, keys: dict[str, Any]) -> pd.Series | None:
    """The finished trial of a configuration with the best metric and a reachable
    checkpoint holding per-class accuracy."""
    done = study.finished
    for name, value in keys.items():
        same = done[name].isna() if pd.isna(value) else done[name] == value
        done = done[same]
    metric = headline_metric(study)
    done = done.sort_values(metric, ascending=study.mode == "min")
    for _, row in done.iterrows():
        path = row.get("checkpoint_path")
        if isinstance(path, str) and load_checkpoint_result(path) is not None:
            return row
    return None


def per_class_results(study: StudyResults) -> dict[str, dict[str, Any]]:
    """label → checkpoint result: the best configuration's trial and, in a comparison
    study, the first declared method (the baseline) next to it."""
    done = study.finished
    if done.empty or "checkpoint_path" not in done.columns:
        return {}
    params = [p for p in study.params if done[p].nunique(dropna=False) > 1]
    metric = headline_metric(study)
    if not params:
        row = _trial_of_best(study, {})
        return {"best trial": load_checkpoint_result(row["checkpoint_path"])} \
            if row is not None else {}
    agg = aggregate(done, params, metrics=[metric], sort=False)
    best = agg.iloc[best_row(agg, metric, study.mode)]
    best_keys = {p: best[p] for p in params}
    out: dict[str, dict[str, Any]] = {}
    row = _trial_of_best(study, best_keys)
    if row is None:
        return {}
    out[f"best: {_keys_label(best_keys)}"] = load_checkpoint_result(row["checkpoint_path"])
    _, categorical = kinds_of_params(study)
    if categorical and study.search == "grid":
        table = comparison_table(study, params)
        first = {p: table[p].iloc[0] for p in params}
        if _keys_label(first) != _keys_label(best_keys):
            base = _trial_of_best(study, first)
            if base is not None:
                out[_keys_label(first)] = load_checkpoint_result(base["checkpoint_path"])
    if len(out) == 1:  # one run: the figure colours it by shot group
        return next(iter(out.values()))
    return out


def _keys_label(keys: dict[str, Any]) -> str:
    return ", ".join(fmt_value(v) if k == "method" else f"{k}={fmt_value(v)}"
                     for k, v in keys.items())


# ---- PNGs ---------------------------------------------------------------------------------
def _png_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".png"


def find_chrome() -> str | None:
    return next((c for c in CHROMES if os.path.exists(c)), None) \
        or shutil.which("chromium") or shutil.which("google-chrome")


def png_blocker() -> str | None:
    """What PNG export lacks on this machine, named, or None: kaleido (a dependency) renders
    through a Chrome or Chromium that pip cannot bring."""
    import importlib.util

    if importlib.util.find_spec("kaleido") is None:
        return "kaleido is not installed (pip install kaleido)"
    given = os.environ.get("BROWSER_PATH")
    if given and not os.path.exists(given):
        return f"kaleido needs Chrome or Chromium and BROWSER_PATH={given} does not exist"
    if not given and find_chrome() is None:
        return ("kaleido needs Chrome or Chromium and none was found (Debian/Ubuntu: "
                "apt-get install chromium; or set BROWSER_PATH)")
    return None


def write_pngs(figs: dict[str, go.Figure], folder: Path) -> tuple[list[Path], str | None]:
    """A PNG of each figure through kaleido and the system's Chromium, in one browser
    session. Returns (written files, None) or ([], the reason PNG export is impossible)."""
    if not figs:
        return [], None
    missing = png_blocker()
    if missing:
        return [], missing
    if not os.environ.get("BROWSER_PATH"):
        os.environ["BROWSER_PATH"] = find_chrome()  # where kaleido's choreographer looks first
    paths = [folder / _png_name(name) for name in figs]
    try:
        pio.write_images(list(figs.values()), paths, width=1100, height=620, scale=1)
    except Exception as exc:  # noqa: BLE001 - the HTML report stands without PNGs
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        return [], reason
    return [p for p in paths if p.is_file()], None


# ---- the page -----------------------------------------------------------------------------
STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
     max-width:1200px;padding:0 16px;color:#222}
h1{margin-bottom:4px} h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:14px;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 8px} th{background:#f2f5fa}
table.cmp td{text-align:right} table.cmp td.name{text-align:left}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:6px 0}
.summary{color:#444} pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:13px}
nav a{margin-right:12px} .fig{margin:8px 0 24px 0} .scroll{overflow-x:auto}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _summary(study: StudyResults) -> str:
    t = study.trials
    counts = t["status"].astype(str).value_counts().to_dict()
    parts = [f"{len(t)} trials", f"{counts.get('TERMINATED', 0)} finished"]
    parts += [f"{n} {s.lower()}" for s, n in counts.items() if s != "TERMINATED"]
    if "stopped_early" in t.columns and t["stopped_early"].fillna(False).astype(bool).any():
        parts.append(f"{int(t['stopped_early'].fillna(False).astype(bool).sum())} stopped early")
    wall = pd.to_numeric(t.get("wall_time_s"), errors="coerce") if "wall_time_s" in t else None
    if wall is not None and wall.notna().any():
        parts.append(f"{wall.sum() / 60:.1f} trial-minutes")
    gpu = pd.to_numeric(t.get("gpu_hours"), errors="coerce") if "gpu_hours" in t else None
    if gpu is not None and gpu.notna().any():
        parts.append(f"{gpu.sum():.3f} GPU-hours")
    base = study.meta.get("base_config") or {}
    data = (base.get("data") or {}).get("name") or _one(t, "data.name")
    model = (base.get("model") or {}).get("name") or _one(t, "model.name")
    what = [f"search <b>{_esc(study.search)}</b>",
            f"metric <b>{_esc(study.metric)}</b> ({_esc(study.mode)})"]
    if len(study.objectives) > 1:
        what.append(f"objectives {_esc(', '.join(study.objectives))}")
    if study.meta.get("scheduler") and study.meta["scheduler"] != "none":
        what.append(f"scheduler {_esc(study.meta['scheduler'])}")
    if data:
        what.append(f"data {_esc(data)}")
    if model:
        what.append(f"model {_esc(model)}")
    what.append(f"swept {_esc(', '.join(study.swept) or 'nothing')}")
    return (f"<p class='summary'>{'; '.join(what)}.<br>{_esc(', '.join(parts))}.</p>")


def _one(t: pd.DataFrame, col: str) -> str | None:
    if col in t.columns and t[col].nunique() == 1:
        return str(t[col].iloc[0])
    return None


def _best_html(study: StudyResults) -> str:
    """The best configuration per objective, the mean over seeds deciding."""
    done = study.finished
    params = [p for p in study.params if done[p].nunique(dropna=False) > 1]
    rows = []
    for metric in dict.fromkeys([study.metric, *study.objectives, "acc_all", "acc_few"]):
        if metric not in done.columns or done[metric].isna().all():
            continue
        agg = aggregate(done, params, metrics=[metric], sort=False)
        best = agg.iloc[best_row(agg, metric, study.mode)]
        spread = "" if best[f"{metric}_n"] < 2 else \
            f" ± {best[f'{metric}_std'] * 100:.2f} (95% CI ± {best[f'{metric}_ci'] * 100:.2f})"
        keys = ", ".join(f"{p}={fmt_value(best[p])}" for p in params) or "(one configuration)"
        rows.append(f"<tr><td>{_esc(metric)}</td><td>{best[f'{metric}_mean'] * 100:.2f}"
                    f"{spread}</td><td>{int(best[f'{metric}_n'])}</td><td>{_esc(keys)}</td></tr>")
    return ("<table><thead><tr><th>objective</th><th>best mean (%)</th><th>seeds</th>"
            f"<th>configuration</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


# LIFT's figures over the classes, and what each stage trained (trials.csv columns of runs
# that report them), shown beside the accuracy table of a grid study.
CLASS_METRICS = {"macro_f1": "macro-F1 (%)", "acc_hmean": "harmonic mean (%)",
                 "acc_worst": "worst class (%)"}
PARAM_COUNTS = {"trained_params_stage1": "trained in stage 1",
                "trained_params_stage2": "trained in stage 2"}


def _class_metrics_html(study: StudyResults, params: Sequence[str]) -> str:
    """Per configuration, the mean over seeds of macro-F1, the harmonic mean and the worst
    class's accuracy, and the parameter counts; empty for studies without those columns."""
    done = study.finished
    metrics = [m for m in (*CLASS_METRICS, *PARAM_COUNTS) if m in done.columns
               and not done[m].isna().all()]
    if not metrics or not params:
        return ""
    agg = aggregate(done, list(params), metrics=metrics, sort=False)
    frame = agg[list(params)].copy()
    for m in metrics:
        values = agg[f"{m}_mean"]
        frame[CLASS_METRICS.get(m) or PARAM_COUNTS[m]] = \
            values * 100 if m in CLASS_METRICS else values.round().astype("Int64")
    return ("<p>LIFT's figures over the classes (macro-F1, the harmonic mean of the per-class "
            "accuracies, the worst class's accuracy; mean over seeds) and the number of values "
            "each stage trained.</p>" + _frame_html(frame))


def _results_html(study: StudyResults) -> str:
    numeric, categorical = kinds_of_params(study)
    if study.search == "grid" and (numeric or categorical):
        return ("<p>Top-1 accuracy (%) per configuration, mean ± std over seeds; the best "
                "of each column in bold.</p>" + comparison_html(comparison_table(study),
                                                               study.mode)
                + _class_metrics_html(study, [*numeric, *categorical]))
    metric = headline_metric(study)
    top = study.finished.sort_values(metric, ascending=study.mode == "min").head(10)
    cols = ["trial_id", *study.params, "acc_many", "acc_medium", "acc_few", "acc_all",
            *CLASS_METRICS]
    return (f"<p>The ten best trials by {_esc(metric)}.</p>"
            + _frame_html(top[[c for c in cols if c in top.columns]]))


def _frame_html(df: pd.DataFrame) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    return "<div class='scroll'>" + df.to_html(index=False, escape=True, na_rep="",
                                               formatters={c: fmt for c in df.columns}) + "</div>"


def _failed_html(study: StudyResults) -> str:
    failed = study.failed
    cols = ["trial_id", *study.swept, "error"]
    return (f"<p>{len(failed)} trial(s) failed; the figures and tables above use the "
            "finished trials only.</p>" + _frame_html(failed[[c for c in cols
                                                             if c in failed.columns]]))


def _versions_now() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("lfm-ray", "plotly", "optuna", "pandas", "scikit-learn", "kaleido", "ray"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def _json_block(value: Any) -> str:
    return "<pre>" + _esc(json.dumps(value, indent=2, sort_keys=True, default=str)) + "</pre>"


def _figure_html(name: str, fig: go.Figure) -> str:
    # plotly.js is in the page's head once; each figure is a div and a call to it.
    return "<div class='fig'>" + pio.to_html(
        fig, full_html=False, include_plotlyjs=False, div_id=f"fig-{_png_name(name)[:-4]}",
        config={"displaylogo": False, "responsive": True}) + "</div>"


def render_page(study: StudyResults, figs: dict[str, go.Figure], pngs: Sequence[Path],
                notes: Sequence[str]) -> str:
    """The report's HTML (self-contained: plotly.js inlined)."""
    from plotly.offline import get_plotlyjs

    sections: list[tuple[str, str, str]] = []  # (anchor, title, body)
    sections.append(("best", "Best configuration", _best_html(study)))
    sections.append(("results", "Results", _results_html(study)))
    for name, fig in figs.items():
        title = TITLES.get(name) or (f"Ablation: accuracy against {name[9:]}"
                                     if name.startswith("ablation_") else name)
        sections.append((f"sec-{_png_name(name)[:-4]}", title, _figure_html(name, fig)))
    if len(study.failed):
        sections.append(("failed", "Failed trials", _failed_html(study)))
    shown = study.trials.drop(columns=["checkpoint_path", "node_id"], errors="ignore")
    sections.append(("trials", "All trials", _frame_html(shown)))
    meta = study.meta
    command = " ".join(map(str, meta.get("command") or [])) or "(not recorded)"
    config = {k: meta[k] for k in ("grid", "space", "variants", "seeds", "num_samples",
                                   "scheduler", "sampler", "optuna_storage", "storage_path",
                                   "experiment_path", "started") if meta.get(k) not in (None, {}, [])}
    sections.append(("command", "Command and configuration",
                     f"<p><code>{_esc(command)}</code></p><h3>Study</h3>{_json_block(config)}"
                     + (f"<h3>Base run configuration</h3>{_json_block(meta['base_config'])}"
                        if meta.get("base_config") else "")))
    sections.append(("machine", "Machine and versions",
                     f"<h3>Where the study ran</h3>{_json_block(meta.get('machine') or 'not recorded')}"
                     f"{_json_block(meta.get('versions') or {})}"
                     f"<h3>Where this report was made</h3>{_json_block(_versions_now())}"))
    nav = "".join(f"<a href='#{a}'>{_esc(t)}</a>" for a, t, _ in sections)
    note_html = "".join(f"<div class='note'>{_esc(n)}</div>" for n in notes)
    png_html = ("<p>PNG files beside this report: "
                + ", ".join(_esc(p.name) for p in pngs) + "</p>") if pngs else ""
    body = "".join(f"<h2 id='{a}'>{_esc(t)}</h2>{b}" for a, t, b in sections)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>lfm-ray study {_esc(study.name)}</title><style>{STYLE}</style>"
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
        f"<h1>lfm-ray study: {_esc(study.name)}</h1>{_summary(study)}"
        f"<p class='summary'>Report written {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>"
        f"<nav>{nav}</nav>{note_html}{png_html}{body}</body></html>"
    )


def write_report(study_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                 params: Sequence[str] | None = None, band: str = "auto",
                 png: bool = True) -> Path:
    """Write report.html for a study (a results directory, a Tune experiment or a trials
    CSV) and a PNG of each headline figure beside it; returns the HTML's path. PNG export
    that is impossible (no Chromium) is one warning line, never an error."""
    study = load_study(study_dir)
    study.require_finished()
    if out:
        target = Path(out)
    elif study.path is not None and study.path.is_dir():
        target = study.path / "report.html"
    else:
        target = Path.cwd() / f"report_{study.name}.html"
    if target.suffix.lower() not in (".html", ".htm"):
        raise LfmError(f"--out {str(target)!r} must name an .html file")
    target.parent.mkdir(parents=True, exist_ok=True)
    figs = study_figures(study, params=params, band=band)
    notes = list(study.notes)
    pngs: list[Path] = []
    if png:
        headline = {k: v for k, v in figs.items() if k not in NOT_HEADLINE}
        pngs, reason = write_pngs(headline, target.parent)
        if reason:
            line = f"warning: no PNGs: {reason}; the HTML report is complete"
            print(line, flush=True)
            notes.append(line.removeprefix("warning: "))
    page = render_page(study, figs, pngs, notes)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)  # a reader never sees half a report
    return target

