"""Study results → tidy pandas frames → interactive Plotly figures and one HTML report.

`load_study(path)` reads a results directory (results/<name>/ with study.json and
trials.csv), a Tune experiment directory (through Tune's own `ExperimentAnalysis`) or a
trials CSV, and returns a `StudyData` with one row per trial (`trials`) and one row per
trial per epoch (`epochs`). `write_report(path)` writes a self-contained report.html (plotly.js
embedded, opens with no network) and a PNG of each headline figure beside it.
"""

from __future__ import annotations

import html
import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lfm_ray.errors import LfmError

GROUPS = ("many", "medium", "few", "all")
METRICS = tuple(f"acc_{g}" for g in GROUPS)
COLORS = {"many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728", "all": "#2ca02c"}
SEED = "runtime.seed"
DONE = "TERMINATED"


# ---- loading -------------------------------------------------------------------------------
@dataclass
class StudyData:
    trials: pd.DataFrame                       # one row per trial
    epochs: pd.DataFrame                       # one row per trial per epoch
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or (self.path.name if self.path else "study"))

    @property
    def swept(self) -> list[str]:
        if self.meta.get("swept"):
            return [p for p in self.meta["swept"] if p in self.trials.columns]
        skip = {"trial_id", "status", "error", "checkpoint_path", "node_id", "stopped_early",
                *METRICS, "epoch", "stage", "train_loss", "wall_time_s", "train_time_s", "gpu_hours"}
        return [c for c in self.trials.columns if c not in skip and self.trials[c].nunique() > 1]

    @property
    def finished(self) -> pd.DataFrame:
        return self.trials[self.trials["status"] == DONE]

    @property
    def failed(self) -> pd.DataFrame:
        return self.trials[self.trials["status"] == "ERROR"]


def load_study(path: str | os.PathLike) -> StudyData:
    """A results directory, a Tune experiment directory, or a trials CSV."""
    p = Path(path)
    if p.is_file() and p.suffix == ".csv":
        return StudyData(trials=pd.read_csv(p), epochs=pd.DataFrame(), path=p.parent)
    if not p.is_dir():
        raise LfmError(f"{str(p)!r} is neither a study directory nor a trials CSV")
    if (p / "study.json").is_file() and (p / "trials.csv").is_file():
        meta = json.loads((p / "study.json").read_text())
        trials = pd.read_csv(p / "trials.csv")
        epochs = pd.DataFrame()
        exp = meta.get("experiment_path")
        if exp and _is_tune_experiment(exp):
            epochs = tune_epochs(exp)
        return StudyData(trials=trials, epochs=epochs, meta=meta, path=p)
    if _is_tune_experiment(str(p)):
        trials, epochs = read_tune_experiment(str(p))
        return StudyData(trials=trials, epochs=epochs, meta={"name": p.name}, path=p)
    raise LfmError(f"{str(p)!r} is not a study: expected study.json and trials.csv "
                   "(results/<name>/), a Tune experiment directory, or a trials CSV")


def _is_tune_experiment(path: str) -> bool:
    return "://" in path or any(Path(path).glob("experiment_state*.json"))


def _analysis(path: str):
    from ray.tune import ExperimentAnalysis

    return ExperimentAnalysis(path)


def tune_epochs(path: str) -> pd.DataFrame:
    """One row per trial per epoch, from Tune's per-trial result frames."""
    frames = []
    for trial_id, df in _analysis(path).trial_dataframes.items():
        if df is None or df.empty or "epoch" not in df:
            continue
        keep = [c for c in ("epoch", "stage", "train_loss", *METRICS) if c in df]
        frames.append(df[keep].assign(trial_id=trial_id))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def read_tune_experiment(path: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trials and epochs straight from a Tune experiment (no trials.csv needed)."""
    analysis = _analysis(path)
    rows = []
    for trial in analysis.trials:
        last = dict(trial.last_result or {})
        params = dict((trial.config or {}).get("params") or {})
        row = {"trial_id": trial.trial_id, "status": trial.status, **params}
        for key in ("epoch", "stage", "train_loss", *METRICS, "checkpoint_path"):
            row[key] = last.get(key)
        row["wall_time_s"] = last.get("time_total_s")
        rows.append(row)
    return pd.DataFrame(rows), tune_epochs(path)


# ---- aggregation ---------------------------------------------------------------------------
def aggregate(trials: pd.DataFrame, by: list[str], metrics=METRICS, sort: bool = True) -> pd.DataFrame:
    """Mean, std, count and a 95% t-interval per configuration (over seeds); `sort=False`
    keeps the order the study declared its settings in."""
    from scipy import stats

    done = trials[trials["status"] == DONE] if "status" in trials else trials
    rows = []
    for key, group in done.groupby(by, dropna=False, sort=sort):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        for m in metrics:
            values = group[m].dropna().astype(float).to_numpy()
            n = len(values)
            mean = float(values.mean()) if n else float("nan")
            std = float(values.std(ddof=1)) if n > 1 else 0.0
            half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else 0.0
            row.update({f"{m}_mean": mean, f"{m}_std": std, f"{m}_n": n,
                        f"{m}_ci_low": mean - half, f"{m}_ci_high": mean + half})
        rows.append(row)
    return pd.DataFrame(rows)


def _require_param(study: StudyData, param: str) -> None:
    if param not in study.trials.columns or param not in study.swept:
        raise LfmError(f"parameter {param!r} was not swept in study {study.name!r}; "
                       f"swept: {', '.join(study.swept) or 'none'}")


def _require_finished(study: StudyData) -> None:
    if study.finished.empty:
        raise LfmError(f"study {study.name!r} has no finished trials to report "
                       f"({len(study.trials)} trial(s), statuses: "
                       f"{', '.join(sorted(set(study.trials['status'].astype(str))))})")


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and series.dropna().nunique() > 1


# ---- figures -------------------------------------------------------------------------------
def ablation_figure(study: StudyData, param: str) -> go.Figure:
    """Many / medium / few / all accuracy against a swept parameter, mean with a ±1 std band
    over seeds; log x where the values span more than 1.5 decades; the best value starred."""
    _require_param(study, param)
    _require_finished(study)
    agg = aggregate(study.finished, [param]).sort_values(param)
    x = agg[param].astype(float).to_numpy()
    fig = go.Figure()
    for g in GROUPS:
        m = f"acc_{g}"
        mean, std = agg[f"{m}_mean"].to_numpy() * 100, agg[f"{m}_std"].to_numpy() * 100
        upper, lower = np.clip(mean + std, 0, 100), np.clip(mean - std, 0, 100)
        fig.add_trace(go.Scatter(x=np.concatenate([x, x[::-1]]), mode="lines",
                                 y=np.concatenate([upper, lower[::-1]]),
                                 fill="toself", fillcolor=_alpha(COLORS[g]), line={"width": 0},
                                 hoverinfo="skip", showlegend=False, name=f"{g} ± std"))
        fig.add_trace(go.Scatter(
            x=x, y=mean, mode="lines+markers", name=g, line={"color": COLORS[g]},
            customdata=np.stack([std, agg[f"{m}_ci_low"] * 100, agg[f"{m}_ci_high"] * 100,
                                 agg[f"{m}_n"]], axis=1),
            hovertemplate=f"{param}=%{{x}}<br>{g}: %{{y:.2f}}% ± %{{customdata[0]:.2f}}"
                          "<br>95% CI [%{customdata[1]:.2f}, %{customdata[2]:.2f}]"
                          "<br>seeds %{customdata[3]}<extra></extra>"))
    best = int(np.nanargmax(agg["acc_all_mean"].to_numpy()))
    fig.add_trace(go.Scatter(x=[x[best]], y=[agg["acc_all_mean"].iloc[best] * 100],
                             mode="markers", name=f"best {param}={x[best]:g}",
                             marker={"symbol": "star", "size": 16, "color": "black"}))
    positive = (x > 0).all()
    log = bool(positive and len(x) > 1 and x.max() / x.min() > 10 ** 1.5)
    fig.update_layout(title=f"{study.name}: accuracy against {param}",
                      xaxis_title=param, yaxis_title="top-1 accuracy (%)", template="plotly_white")
    if log:
        fig.update_xaxes(type="log")
    return fig


def _alpha(hex_color: str, a: float = 0.18) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{a})"


def _row_label(row: pd.Series, params: list[str]) -> str:
    return " · ".join(str(row[p]) if len(params) == 1 else f"{p}={row[p]}" for p in params)


def comparison_table(study: StudyData, params: list[str] | None = None) -> pd.DataFrame:
    """Rows = methods (the swept settings except the seed), columns many/medium/few/all."""
    _require_finished(study)
    params = params or [p for p in study.swept if p != SEED] or ["model.name"]
    agg = aggregate(study.finished, params, sort=False)
    table = pd.DataFrame({"method": [_row_label(r, params) for _, r in agg.iterrows()]})
    for g in GROUPS:
        table[f"{g}_mean"] = agg[f"acc_{g}_mean"].to_numpy() * 100
        table[f"{g}_std"] = agg[f"acc_{g}_std"].to_numpy() * 100
    table["seeds"] = agg["acc_all_n"].to_numpy()
    return table


def comparison_html(table: pd.DataFrame) -> str:
    """The paper's table layout, the best of each column in bold."""
    best = {g: table[f"{g}_mean"].max() for g in GROUPS}
    head = "".join(f"<th>{g}</th>" for g in ("method", *GROUPS, "seeds"))
    body = []
    for _, row in table.iterrows():
        cells = [f"<td>{html.escape(str(row['method']))}</td>"]
        for g in GROUPS:
            text = f"{row[f'{g}_mean']:.2f}"
            if row["seeds"] > 1:
                text += f" ± {row[f'{g}_std']:.2f}"
            bold = np.isclose(row[f"{g}_mean"], best[g])
            cells.append(f"<td>{'<b>' + text + '</b>' if bold else text}</td>")
        cells.append(f"<td>{int(row['seeds'])}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='cmp'><tr>{head}</tr>{''.join(body)}</table>"


def comparison_figure(study: StudyData, params: list[str] | None = None) -> go.Figure:
    """Grouped bars: one group per method, one bar per shot group."""
    table = comparison_table(study, params)
    fig = go.Figure()
    for g in GROUPS:
        fig.add_trace(go.Bar(name=g, x=table["method"], y=table[f"{g}_mean"],
                             error_y={"type": "data", "array": table[f"{g}_std"],
                                      "visible": bool((table["seeds"] > 1).any())},
                             marker_color=COLORS[g]))
    fig.update_layout(barmode="group", title=f"{study.name}: accuracy per method",
                      yaxis_title="top-1 accuracy (%)", template="plotly_white")
    return fig


def learning_curves_figure(study: StudyData) -> go.Figure:
    """acc_all per trial across both stages; the stage boundary marked; ASHA-stopped
    trials dashed."""
    if study.epochs.empty:
        raise LfmError(f"study {study.name!r} has no per-epoch results (its Tune experiment "
                       "directory is not reachable)")
    flags = study.trials["stopped_early"] if "stopped_early" in study.trials else \
        pd.Series(False, index=study.trials.index)
    stopped = set(study.trials.loc[flags.fillna(False).astype(bool), "trial_id"])
    labels = _trial_labels(study)
    fig = go.Figure()
    for trial_id, df in study.epochs.sort_values("epoch").groupby("trial_id"):
        dash = "dash" if trial_id in stopped else "solid"
        name = labels.get(trial_id, trial_id) + (" (stopped early)" if trial_id in stopped else "")
        fig.add_trace(go.Scatter(x=df["epoch"], y=df["acc_all"] * 100, mode="lines",
                                 line={"dash": dash}, name=name))
    e1 = study.meta.get("base_config", {}).get("stage1", {}).get("epochs")
    if e1:
        fig.add_vline(x=e1 + 0.5, line_dash="dot", annotation_text="stage 1 | stage 2")
    fig.update_layout(title=f"{study.name}: learning curves", xaxis_title="epoch (both stages)",
                      yaxis_title="top-1 accuracy, all (%)", template="plotly_white")
    return fig


def _trial_labels(study: StudyData) -> dict[str, str]:
    params = study.swept
    return {r["trial_id"]: ", ".join(f"{p}={r[p]}" for p in params) or r["trial_id"]
            for _, r in study.trials.iterrows()}


def per_class_figure(result: dict[str, Any], title: str = "per-class accuracy") -> go.Figure:
    """Per-class accuracy against training count (log x): where the tail gains are."""
    counts = np.asarray(result["class_counts"], dtype=float)
    acc = np.asarray(result["per_class_acc"], dtype=float) * 100
    names = result.get("class_names") or [str(i) for i in range(len(counts))]
    fig = go.Figure(go.Scatter(x=counts, y=acc, mode="markers", text=names,
                               hovertemplate="%{text}: %{y:.1f}% (n=%{x})<extra></extra>"))
    for edge in (20, 100):
        fig.add_vline(x=edge, line_dash="dot")
    fig.update_xaxes(type="log", title="training images of the class")
    fig.update_layout(title=title, yaxis_title="top-1 accuracy (%)", template="plotly_white")
    return fig


def optuna_study(study: StudyData):
    """The Optuna study: from its storage URL when recorded, else rebuilt from the table."""
    import optuna

    objectives = study.meta.get("objectives") or []
    multi = len(objectives) > 1
    storage = study.meta.get("optuna_storage")
    if storage and "://" in storage:
        try:
            return optuna.load_study(study_name=study.name, storage=storage)
        except Exception:  # noqa: BLE001 - fall back to the table
            pass
    metrics = objectives if multi else [study.meta.get("metric", "acc_all")]
    directions = ["maximize"] * len(metrics)
    rebuilt = optuna.create_study(directions=directions) if multi else \
        optuna.create_study(direction="maximize")
    space = study.meta.get("space") or {}
    for _, row in study.finished.iterrows():
        params, dists = {}, {}
        for name, dim in space.items():
            value = row.get(name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            dists[name] = _distribution(dim)
            params[name] = value if dim["kind"] == "choice" else float(value)
        values = [float(row[m]) for m in metrics]
        rebuilt.add_trial(optuna.trial.create_trial(
            params=params, distributions=dists,
            **({"values": values} if multi else {"value": values[0]})))
    return rebuilt


def _distribution(dim: dict[str, Any]):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if dim["kind"] == "choice":
        return CategoricalDistribution(list(dim["choices"]))
    if dim["kind"] == "int":
        return IntDistribution(int(dim["low"]), int(dim["high"]))
    return FloatDistribution(dim["low"], dim["high"], log=dim["kind"] == "loguniform")


def optuna_figures(study: StudyData) -> dict[str, go.Figure]:
    import optuna.visualization as vis

    ost = optuna_study(study)
    multi = len(study.meta.get("objectives") or []) > 1
    figs: dict[str, go.Figure] = {}
    if multi:
        names = list(study.meta["objectives"])
        figs["pareto"] = vis.plot_pareto_front(ost, target_names=names)
        target = lambda t: t.values[0]  # noqa: E731
        figs["history"] = vis.plot_optimization_history(ost, target=target, target_name=names[0])
        figs["parallel"] = vis.plot_parallel_coordinate(ost, target=target, target_name=names[0])
        if len(ost.trials) > 2:
            figs["importance"] = vis.plot_param_importances(ost, target=target, target_name=names[0])
    else:
        figs["history"] = vis.plot_optimization_history(ost)
        figs["parallel"] = vis.plot_parallel_coordinate(ost)
        if len(ost.trials) > 2 and len(ost.best_trial.params) > 0:
            figs["importance"] = vis.plot_param_importances(ost)
    return figs


# ---- the report ----------------------------------------------------------------------------
def _best_result(study: StudyData) -> dict[str, Any] | None:
    done = study.finished
    if done.empty or "checkpoint_path" not in done:
        return None
    best = done.sort_values("acc_all", ascending=False).iloc[0]
    path = best.get("checkpoint_path")
    if not isinstance(path, str) or not (Path(path) / "result.json").is_file():
        return None
    result = json.loads((Path(path) / "result.json").read_text())
    return result if "class_counts" in result and "per_class_acc" in result else None


def study_figures(study: StudyData) -> dict[str, go.Figure]:
    """Every figure that fits the study, headline figures first."""
    _require_finished(study)
    figs: dict[str, go.Figure] = {}
    params = [p for p in study.swept if p != SEED]
    numeric = [p for p in params if _is_numeric(study.finished[p])]
    if study.meta.get("search") in ("optuna", "random"):
        if study.meta.get("search") == "optuna":
            figs.update({f"optuna_{k}": v for k, v in optuna_figures(study).items()})
    elif len(params) == 1 and numeric:
        figs[f"ablation_{params[0]}"] = ablation_figure(study, params[0])
    elif params:
        figs["comparison"] = comparison_figure(study)
    if not study.epochs.empty:
        figs["learning_curves"] = learning_curves_figure(study)
    best = _best_result(study)
    if best is not None:
        figs["per_class"] = per_class_figure(best, "per-class accuracy of the best trial")
    return figs


def write_report(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """report.html (self-contained) and a PNG per headline figure beside it."""
    study = load_study(path)
    _require_finished(study)
    base = study.path if study.path and study.path.is_dir() else Path(".")
    out_path = Path(out) if out else base / "report.html"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figs = study_figures(study)
    parts = [f"<h1>lfm-ray study: {html.escape(study.name)}</h1>"]
    meta = study.meta
    if meta.get("command"):
        parts.append(f"<p><b>command</b> <code>{html.escape(' '.join(map(str, meta['command'])))}</code></p>")
    parts.append(f"<p>{len(study.trials)} trials, {len(study.finished)} finished, "
                 f"{len(study.failed)} failed; swept: {html.escape(', '.join(study.swept))}</p>")
    params = [p for p in study.swept if p != SEED]
    if params:
        parts.append("<h2>Results (top-1 %, mean ± std over seeds)</h2>")
        parts.append(comparison_html(comparison_table(study)))
    first = True
    for name, fig in figs.items():
        parts.append(f"<h2>{html.escape(name.replace('_', ' '))}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=True if first else False))
        first = False
    if len(study.failed):
        items = "".join(f"<li>{html.escape(str(r['trial_id']))}: {html.escape(str(r.get('error', '')))}</li>"
                        for _, r in study.failed.iterrows())
        parts.append(f"<h2>Failed trials</h2><ul>{items}</ul>")
    parts.append("<h2>Trials</h2>" + study.trials.drop(columns=["checkpoint_path"], errors="ignore")
                 .to_html(index=False, float_format=lambda v: f"{v:.4g}"))
    if meta.get("base_config"):
        parts.append("<h2>Configuration</h2><pre>" +
                     html.escape(json.dumps(meta["base_config"], indent=2)) + "</pre>")
    machine = meta.get("machine") or {"platform": platform.platform()}
    parts.append("<h2>Machine and versions</h2><pre>" + html.escape(json.dumps(
        {"machine": machine, "versions": meta.get("versions", {})}, indent=2)) + "</pre>")
    style = ("<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
             "table.cmp td{text-align:right}</style>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(study.name)}"
            f"</title>{style}</head><body>{''.join(parts)}</body></html>")
    tmp = out_path.with_suffix(".html.tmp")
    tmp.write_text(page)
    os.replace(tmp, out_path)
    write_pngs({k: v for k, v in figs.items() if not k.startswith("learning")}, out_path.parent)
    return out_path


def write_pngs(figs: dict[str, go.Figure], folder: Path) -> list[Path]:
    """PNG of each figure (kaleido with the system's Chromium); a warning line if impossible."""
    if not figs:
        return []
    chrome = next((c for c in ("/usr/bin/chromium", "/usr/bin/chromium-browser",
                               "/usr/bin/google-chrome") if os.path.exists(c)), None)
    if chrome and not os.environ.get("BROWSER_PATH"):
        os.environ["BROWSER_PATH"] = chrome
    written = []
    try:
        for name, fig in figs.items():
            path = folder / f"{name}.png"
            fig.write_image(str(path), width=1000, height=600)
            written.append(path)
    except Exception as exc:  # noqa: BLE001 - the HTML report stands without PNGs
        print(f"warning: PNG export unavailable ({str(exc).splitlines()[0][:120]}); "
              "the HTML report is complete", flush=True)
    return written
