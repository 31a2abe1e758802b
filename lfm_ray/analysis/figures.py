"""Interactive Plotly figures of a study: ablation curves, comparison tables and bars,
learning curves, per-class accuracy against training count.

Accuracies are stored as fractions and shown in percent.
"""

from __future__ import annotations

import html
import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lfm_ray.analysis.load import (
    GROUPS, METRICS, SEED, StudyResults, aggregate, best_row, is_numeric_param,
)
from lfm_ray.errors import LfmError

COLORS = {"many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728", "all": "#2ca02c"}
BANDS = ("auto", "ci", "std")
# τ-like parameters (spanning more than this many decades) get a log axis.
LOG_DECADES = 1.5
TEMPLATE = "plotly_white"


def _rgba(hex_color: str, a: float = 0.13) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{a})"


def fmt_value(value: Any) -> str:
    """A parameter value as a label: numbers short (0.05, 1e-05), NaN as 'unset'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "unset"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def use_log_axis(x: Sequence[float]) -> bool:
    """Log x when every value is positive and they span more than LOG_DECADES decades."""
    x = np.asarray(x, dtype=float)
    return bool(len(x) > 1 and (x > 0).all() and math.log10(x.max() / x.min()) > LOG_DECADES)


def _same(series: pd.Series, value: Any) -> pd.Series:
    """Rows equal to `value`, NaN matching NaN (a conditional parameter a trial lacks)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return series.isna()
    return series == value


def headline_metric(study: StudyResults) -> str:
    """The accuracy the study optimised, when it is one of many/medium/few/all."""
    return study.metric if study.metric in METRICS else "acc_all"


# ---- ablation curves ----------------------------------------------------------------------
def ablation_figure(study: StudyResults, param: str, band: str = "auto",
                    where: Mapping[str, Any] | None = None) -> go.Figure:
    """Many / medium / few / all accuracy against a swept numeric parameter (paper Fig. 9
    and 10): the mean over seeds, a band of the 95% t-interval of the mean (`band="ci"`)
    or ± one standard deviation (`band="std"`), a log x axis when the values span more than
    1.5 decades, and the best value of the study's metric starred. `band="auto"` draws the
    interval when every point has at least 3 seeds and ± std otherwise (with 2 seeds the
    95% interval is ±12.7 std/√2 and fills the whole axis). Other swept parameters are held
    at `where`, or else at the best configuration's values."""
    if band not in BANDS:
        raise LfmError(f"band {band!r} is not known; expected one of {', '.join(BANDS)}")
    study.require_param(param)
    done = study.require_finished()
    if param == SEED:
        raise LfmError(f"{SEED} is what the curves average over; plot one of "
                       f"{', '.join(study.params) or 'no other parameter'}")
    if not is_numeric_param(done[param]):
        raise LfmError(f"parameter {param!r} of study {study.name!r} is not numeric (values "
                       f"{', '.join(map(fmt_value, done[param].unique()[:6]))}); compare it "
                       "with comparison_figure / the comparison table instead")
    rows, fixed = _hold_others(study, done, param, where)
    agg = aggregate(rows, [param])
    agg[param] = pd.to_numeric(agg[param])
    agg = agg.dropna(subset=[param]).sort_values(param).reset_index(drop=True)
    if len(agg) < 2:
        raise LfmError(f"parameter {param!r} has fewer than two finished values "
                       f"{'at ' + _describe(fixed) if fixed else ''}; nothing to plot")
    x = agg[param].to_numpy(float)
    if band == "auto":
        band = "ci" if (agg[[f"{m}_n" for m in METRICS]] >= 3).all(axis=None) else "std"
    label = "95% CI" if band == "ci" else "± std"
    fig = go.Figure()
    for g in GROUPS:
        m = f"acc_{g}"
        mean = agg[f"{m}_mean"].to_numpy(float) * 100
        half = agg[f"{m}_{band}"].to_numpy(float) * 100
        half = np.where(np.isnan(half), 0.0, half)  # one seed: no spread to draw
        upper, lower = np.clip(mean + half, 0, 100), np.clip(mean - half, 0, 100)
        fig.add_trace(go.Scatter(
            x=np.concatenate([x, x[::-1]]), y=np.concatenate([upper, lower[::-1]]),
            mode="lines", fill="toself", fillcolor=_rgba(COLORS[g]), line={"width": 0},
            hoverinfo="skip", showlegend=False, legendgroup=g, name=f"{g} {label}"))
        custom = np.stack([agg[f"{m}_std"] * 100, agg[f"{m}_ci_low"] * 100,
                           agg[f"{m}_ci_high"] * 100, agg[f"{m}_n"]], axis=1)
        fig.add_trace(go.Scatter(
            x=x, y=mean, mode="lines+markers", name=g, legendgroup=g,
            line={"color": COLORS[g]}, customdata=custom,
            hovertemplate=f"{param}=%{{x}}<br>{g}: %{{y:.2f}}%  std %{{customdata[0]:.2f}}"
                          "<br>95% CI [%{customdata[1]:.2f}, %{customdata[2]:.2f}]"
                          "<br>seeds: %{customdata[3]}<extra></extra>"))
    metric = headline_metric(study)
    best = best_row(agg, metric, study.mode)
    best_y = agg[f"{metric}_mean"].iloc[best] * 100
    fig.add_trace(go.Scatter(
        x=[x[best]], y=[best_y], mode="markers", name=f"best {param}={x[best]:g}",
        marker={"symbol": "star", "size": 18, "color": "black"},
        hovertemplate=f"best {metric}: %{{y:.2f}}% at {param}=%{{x}}<extra></extra>"))
    seeds = int(agg[f"{metric}_n"].max())
    title = f"{study.name}: accuracy against {param} (mean of {seeds} seed(s), band {label})"
    if fixed:
        title += f"<br><sup>{html.escape(_describe(fixed))}</sup>"
    fig.update_layout(title=title, xaxis_title=param, yaxis_title="top-1 accuracy (%)",
                      template=TEMPLATE, legend_title="shot group")
    if use_log_axis(x):
        fig.update_xaxes(type="log")
    return fig


def _describe(fixed: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={fmt_value(v)}" for k, v in fixed.items())


def _hold_others(study: StudyResults, done: pd.DataFrame, param: str,
                 where: Mapping[str, Any] | None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The trials with every other varying parameter at one value: `where`, else the best."""
    where = dict(where or {})
    for name in where:
        study.require_param(name)
    others = [p for p in study.params
              if p != param and done[p].nunique(dropna=False) > 1]
    rows = done
    for name, value in where.items():
        rows = rows[_same(rows[name], value)]
    rest = [p for p in others if p not in where]
    fixed = dict(where)
    if rest and not rows.empty:
        agg = aggregate(rows, rest, metrics=[headline_metric(study)])
        best = agg.iloc[best_row(agg, headline_metric(study), study.mode)]
        for name in rest:
            fixed[name] = best[name]
            rows = rows[_same(rows[name], best[name])]
    if rows.empty:
        raise LfmError(f"no finished trial of study {study.name!r} has {_describe(where)}")
    if fixed and any(k not in where for k in fixed):
        fixed = {**{k: v for k, v in fixed.items() if k in where},
                 **{f"{k} (best)": v for k, v in fixed.items() if k not in where}}
    return rows, fixed


# ---- comparison tables and bars -----------------------------------------------------------
def _declared_rank(study: StudyResults, param: str, value: Any, seen: list[Any]) -> tuple[int, int]:
    declared = study.declared_values(param) or []
    for i, v in enumerate(declared):
        if v == value or (fmt_value(v) == fmt_value(value)):
            return (0, i)
    return (1, seen.index(value) if value in seen else len(seen))


def comparison_table(study: StudyResults, params: Sequence[str] | None = None) -> pd.DataFrame:
    """The paper's table layout (Tables 1, 2, 5): one row per method (configuration of the
    swept parameters, seeds pooled) in the study's declared order; columns `label` (the
    row's name), the parameters, `<g>_mean`,
    `<g>_std`, `<g>_ci` in percent for g in many/medium/few/all, and `seeds`."""
    done = study.require_finished()
    params = list(params) if params else study.params
    if not params:
        raise LfmError(f"study {study.name!r} swept no parameter besides the seed; "
                       "there is nothing to compare")
    for p in params:
        study.require_param(p)
        if p == SEED:
            raise LfmError(f"{SEED} is pooled over in a comparison; compare other parameters")
    agg = aggregate(done, params, sort=False)
    seen = {p: list(dict.fromkeys(done[p].tolist())) for p in params}
    order = sorted(range(len(agg)), key=lambda i: tuple(
        _declared_rank(study, p, agg[p].iloc[i], seen[p]) for p in params))
    agg = agg.iloc[order].reset_index(drop=True)
    table = agg[params].copy()
    table.insert(0, "label", [_row_label(agg.iloc[i], params) for i in range(len(agg))])
    for g in GROUPS:
        for stat in ("mean", "std", "ci"):
            table[f"{g}_{stat}"] = agg[f"acc_{g}_{stat}"].to_numpy(float) * 100
    table["seeds"] = agg["acc_all_n"].to_numpy(int)
    return table


def _row_label(row: pd.Series, params: Sequence[str]) -> str:
    if len(params) == 1:
        return fmt_value(row[params[0]])
    parts = []
    for p in params:
        short = p.rsplit(".", 1)[-1]
        parts.append(fmt_value(row[p]) if p == "method" else f"{short}={fmt_value(row[p])}")
    return " · ".join(parts)


def best_cells(table: pd.DataFrame, mode: str = "max") -> dict[str, np.ndarray]:
    """Per shot group, which rows hold the best mean (ties all count)."""
    out = {}
    for g in GROUPS:
        values = table[f"{g}_mean"].to_numpy(float)
        best = np.nanmin(values) if mode == "min" else np.nanmax(values)
        out[g] = np.isclose(values, best, rtol=0, atol=1e-9)
    return out


def _cell_texts(table: pd.DataFrame, mode: str) -> dict[str, list[tuple[str, bool]]]:
    bold = best_cells(table, mode)
    out: dict[str, list[tuple[str, bool]]] = {}
    for g in GROUPS:
        cells = []
        for i, (_, row) in enumerate(table.iterrows()):
            text = f"{row[f'{g}_mean']:.2f}"
            if row["seeds"] > 1 and not math.isnan(row[f"{g}_std"]):
                text += f" ± {row[f'{g}_std']:.2f}"
            cells.append((text, bool(bold[g][i])))
        out[g] = cells
    return out


def comparison_html(table: pd.DataFrame, mode: str = "max") -> str:
    """The comparison table as HTML (top-1 %, mean ± std over seeds), best of each column
    in bold."""
    cells = _cell_texts(table, mode)
    head = "".join(f"<th>{h}</th>" for h in ("method", *GROUPS, "seeds"))
    body = []
    for i, (_, row) in enumerate(table.iterrows()):
        tds = [f"<td class='name'>{html.escape(str(row['label']))}</td>"]
        for g in GROUPS:
            text, bold = cells[g][i]
            tds.append(f"<td><b>{text}</b></td>" if bold else f"<td>{text}</td>")
        tds.append(f"<td>{int(row['seeds'])}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return (f"<table class='cmp'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def comparison_table_figure(table: pd.DataFrame, mode: str = "max",
                            title: str = "") -> go.Figure:
    """The comparison table as a Plotly table, best of each column in bold."""
    cells = _cell_texts(table, mode)
    columns = [[html.escape(str(m)) for m in table["label"]]]
    for g in GROUPS:
        columns.append([f"<b>{t}</b>" if b else t for t, b in cells[g]])
    columns.append([str(int(s)) for s in table["seeds"]])
    fig = go.Figure(go.Table(
        header={"values": [f"<b>{h}</b>" for h in ("method", *GROUPS, "seeds")],
                "fill_color": "#e8eef7", "align": ["left", *["right"] * 5]},
        cells={"values": columns, "align": ["left", *["right"] * 5], "height": 26}))
    fig.update_layout(title=title or "top-1 accuracy (%), mean ± std over seeds",
                      template=TEMPLATE, height=120 + 28 * len(table),
                      margin={"t": 50, "b": 10})
    return fig


def comparison_figure(study: StudyResults, params: Sequence[str] | None = None,
                      error: str = "std") -> go.Figure:
    """Grouped bars: one group per method, one bar per shot group, error bars over seeds
    (± std, or the 95% interval with `error="ci"`). With two or more compared parameters
    (imbalance factor × method) the first one splits the figure into panels."""
    if error not in ("ci", "std"):
        raise LfmError(f"error {error!r} is not known; expected ci or std")
    params = list(params) if params else study.params
    table = comparison_table(study, params)
    panels: list[tuple[str, pd.DataFrame]]
    if len(params) >= 2:
        facet, rest = params[0], params[1:]
        values = list(dict.fromkeys(table[facet].tolist()))
        panels = []
        for v in values:
            part = table[_same(table[facet], v)].copy()
            part["label"] = [_row_label(r, rest) for _, r in part.iterrows()]
            panels.append((f"{facet}={fmt_value(v)}", part))
    else:
        panels = [("", table)]
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True,
                        subplot_titles=[t for t, _ in panels] if len(panels) > 1 else None,
                        horizontal_spacing=0.03)
    show_errors = bool((table["seeds"] > 1).any())
    for col, (_, part) in enumerate(panels, start=1):
        for g in GROUPS:
            err = part[f"{g}_{error}"].fillna(0.0).to_numpy(float)
            fig.add_trace(go.Bar(
                name=g, x=part["label"].tolist(), y=part[f"{g}_mean"].to_numpy(float),
                error_y={"type": "data", "array": err, "visible": show_errors},
                marker_color=COLORS[g], legendgroup=g, showlegend=col == 1,
                hovertemplate=f"%{{x}}<br>{g}: %{{y:.2f}}%<extra></extra>"), row=1, col=col)
    spread = ("± std" if error == "std" else "95% CI") if show_errors else "one seed"
    fig.update_layout(barmode="group", template=TEMPLATE, legend_title="shot group",
                      title=f"{study.name}: top-1 accuracy per method ({spread})")
    fig.update_yaxes(title_text="top-1 accuracy (%)", row=1, col=1)
    return fig


# ---- learning curves ----------------------------------------------------------------------
CURVE_METRICS = ("acc_all", "acc_many", "acc_medium", "acc_few", "train_loss")


def trial_labels(study: StudyResults) -> dict[str, str]:
    """A short label per trial: its swept values (3 significant digits; a conditional
    parameter the trial did not draw left out)."""
    shorts = [p.rsplit(".", 1)[-1] for p in study.swept]
    # The field name alone, unless two swept parameters share it (stage1.lr, stage2.lr).
    label = {p: (s if shorts.count(s) == 1 else p) for p, s in zip(study.swept, shorts)}
    out = {}
    for _, r in study.trials.iterrows():
        parts = []
        for p in study.swept:
            v = r[p]
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            text = f"{float(v):.3g}" if isinstance(v, (float, np.floating)) else fmt_value(v)
            parts.append(text if p == "method" else f"{label[p]}={text}")
        out[str(r["trial_id"])] = ", ".join(parts) or str(r["trial_id"])
    return out


def _curve_y(df: pd.DataFrame, metric: str) -> np.ndarray:
    if metric not in df.columns:
        return np.full(len(df), np.nan)
    y = pd.to_numeric(df[metric], errors="coerce").to_numpy(float)
    return y if metric == "train_loss" else y * 100


def _axis_title(metric: str) -> str:
    return "training loss" if metric == "train_loss" else \
        f"top-1 accuracy, {metric.removeprefix('acc_')} (%)"


def stage_boundaries(epochs: pd.DataFrame) -> list[float]:
    """Where stage 2 starts (between the last stage-1 and first stage-2 epoch), per
    distinct boundary among the trials."""
    if epochs.empty or "stage" not in epochs.columns:
        return []
    out = set()
    for _, df in epochs.groupby("trial_id"):
        s1, s2 = df[df["stage"] == 1]["epoch"], df[df["stage"] == 2]["epoch"]
        if len(s1) and len(s2):
            out.add(float(s1.max()) + 0.5)
    return sorted(out)


def learning_curves_figure(study: StudyResults, metric: str = "acc_all") -> go.Figure:
    """Every trial's curve across both stages against the global epoch; the stage boundary
    dotted; trials ASHA stopped early dashed and ended with an ✕ saying where. A menu
    switches between accuracies (all/many/medium/few) and the training loss."""
    epochs = study.epochs
    if epochs is None or epochs.empty:
        raise LfmError(f"study {study.name!r} has no per-epoch results (neither its Tune "
                       "experiment directory nor its checkpoints are reachable)")
    if metric not in CURVE_METRICS:
        raise LfmError(f"metric {metric!r} is not known; expected one of "
                       f"{', '.join(CURVE_METRICS)}")
    trials = study.trials.set_index("trial_id")
    stopped = set(trials.index[trials["stopped_early"].fillna(False).astype(bool)]) \
        if "stopped_early" in trials.columns else set()
    labels = trial_labels(study)
    order = sorted(epochs["trial_id"].unique(), key=lambda t: (labels.get(t, t), t))
    metrics = [m for m in CURVE_METRICS if m in epochs.columns]
    fig = go.Figure()
    ys: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    palette = _palette(len(order))
    for k, trial_id in enumerate(order):
        df = epochs[epochs["trial_id"] == trial_id].sort_values("epoch")
        early = trial_id in stopped
        name = labels.get(trial_id, trial_id) + (" (stopped early)" if early else "")
        fig.add_trace(go.Scatter(
            x=df["epoch"].to_numpy(), y=_curve_y(df, metric),
            mode="lines+markers" if len(df) == 1 else "lines",
            line={"dash": "dash" if early else "solid", "color": palette[k]},
            name=name, legendgroup=trial_id,
            hovertemplate=f"{html.escape(name)}<br>epoch %{{x}}: %{{y:.3f}}<extra></extra>"))
        for m in metrics:
            ys[m].append(_curve_y(df, m))
        if early:
            last = df.iloc[[-1]]
            fig.add_trace(go.Scatter(
                x=last["epoch"].to_numpy(), y=_curve_y(last, metric), mode="markers+text",
                marker={"symbol": "x", "size": 11, "color": palette[k]},
                text=[f"stopped at epoch {int(last['epoch'].iloc[0])}"],
                textposition="top center", showlegend=False, legendgroup=trial_id,
                name=f"{name}: stopped", hoverinfo="skip"))
            for m in metrics:
                ys[m].append(_curve_y(last, m))
    bounds = stage_boundaries(epochs)
    if not bounds:
        e1 = (study.meta.get("base_config") or {}).get("stage1", {}).get("epochs")
        bounds = [float(e1) + 0.5] if e1 else []
    for b in bounds:
        fig.add_vline(x=b, line_dash="dot", line_color="gray",
                      annotation_text="stage 1 | stage 2" if len(bounds) == 1
                      else f"stage 2 from epoch {int(b + 0.5)}",
                      annotation_position="top")
    if max((len(labels.get(t, t)) for t in order), default=0) > 40:
        # Long labels (many searched parameters) go below the plot, not beside it.
        fig.update_layout(legend={"orientation": "h", "yanchor": "top", "y": -0.18,
                                  "xanchor": "left", "x": 0},
                          height=480 + 22 * len(order))
    buttons = [{"label": m.removeprefix("acc_") if m != "train_loss" else "train loss",
                "method": "update",
                "args": [{"y": ys[m]}, {"yaxis.title.text": _axis_title(m)}]} for m in metrics]
    fig.update_layout(
        title=f"{study.name}: learning curves over both stages"
              + (f" ({len(stopped)} stopped early by ASHA, dashed)" if stopped else ""),
        xaxis_title="epoch (stage 1, then stage 2)", yaxis_title=_axis_title(metric),
        template=TEMPLATE,
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "xanchor": "right",
                      "y": 1.02, "yanchor": "bottom", "showactive": True,
                      "active": metrics.index(metric) if metric in metrics else 0}])
    return fig


def _palette(n: int) -> list[str]:
    import plotly.colors as pc

    base = pc.qualitative.Plotly + pc.qualitative.D3 + pc.qualitative.Set2
    return [base[i % len(base)] for i in range(n)]


# ---- per-class accuracy -------------------------------------------------------------------
SHOT_EDGES = (19.5, 100.5)  # few n < 20 ≤ medium ≤ 100 < many


def _shot_group(n: float) -> str:
    return "many" if n > 100 else ("medium" if n >= 20 else "few")


def per_class_figure(results: Mapping[str, Any], title: str = "per-class accuracy") -> go.Figure:
    """Per-class top-1 accuracy against the class's training count (log x), which shows
    where the tail gains are. `results`: one checkpoint result (per_class_acc,
    class_counts, optional class_names), or a mapping label → result to compare runs."""
    runs = {"": results} if "per_class_acc" in results else dict(results)
    if not runs:
        raise LfmError("per_class_figure needs at least one result with per_class_acc")
    fig = go.Figure()
    palette = _palette(len(runs))
    for k, (label, result) in enumerate(runs.items()):
        counts = np.asarray(result["class_counts"], dtype=float)
        acc = np.asarray(result["per_class_acc"], dtype=float) * 100
        if len(counts) != len(acc):
            raise LfmError(f"per-class accuracy has {len(acc)} classes but the class counts "
                           f"{len(counts)}")
        names = list(result.get("class_names") or [str(i) for i in range(len(counts))])
        if label == "":  # one run: colour by shot group
            for g in ("many", "medium", "few"):
                m = np.array([_shot_group(n) == g for n in counts])
                if m.any():
                    fig.add_trace(go.Scatter(
                        x=counts[m], y=acc[m], mode="markers", name=f"{g} ({int(m.sum())})",
                        marker={"color": COLORS[g], "size": 9},
                        text=[names[i] for i in np.flatnonzero(m)],
                        hovertemplate="%{text}: %{y:.1f}% (n=%{x})<extra></extra>"))
        else:
            fig.add_trace(go.Scatter(
                x=counts, y=acc, mode="markers", name=label, text=names,
                marker={"color": palette[k], "size": 9, "opacity": 0.8},
                hovertemplate=f"{html.escape(label)}<br>%{{text}}: %{{y:.1f}}% (n=%{{x}})"
                              "<extra></extra>"))
    for edge, text in zip(SHOT_EDGES, ("few | medium", "medium | many")):
        # Shapes take data coordinates, annotations on a log axis take log10 of them.
        fig.add_vline(x=edge, line_dash="dot", line_color="gray")
        fig.add_annotation(x=math.log10(edge), xref="x", y=1.0, yref="paper", text=text,
                           showarrow=False, yanchor="bottom")
    fig.update_xaxes(type="log", title="training images of the class (log)")
    fig.update_layout(title=title, yaxis_title="top-1 accuracy (%)", template=TEMPLATE,
                      yaxis_range=[-3, 103])
    return fig


# ---- the sampling matrix beside the confusion matrix (paper Fig. 7) ------------------------
NAMED_TICKS = 60  # up to this many classes every one is named on the axes; above, on hover


def _class_axis(names: Sequence[str]) -> dict[str, Any]:
    if len(names) <= NAMED_TICKS:
        return {"tickmode": "array", "tickvals": list(range(len(names))),
                "ticktext": list(names)}
    return {"tickmode": "auto"}


def sampling_confusion_figure(sampling_matrix: Any, counts: Any, class_names: Sequence[str], *,
                              run: str, split: str = "test", tau: float | None = None,
                              epoch: int | None = None, normalize: bool = True) -> go.Figure:
    """LFM's sampling matrix P (row: the first image's class i, column: the partner class j,
    P[i, j] = softmax_j(f_T[i]·f_T[j] / τ), zero diagonal) beside the confusion matrix of
    `split` (row: true class, column: predicted class): where the text features send
    partners against where the model errs (paper Fig. 7, there beside zero-shot CLIP's).

    With `normalize` each confusion row is divided by its class's image count (the fraction
    of class i's images predicted as j); the counts are on hover either way. Classes are
    indexed on the axes, named where there are at most NAMED_TICKS and on hover always.
    """
    P = np.asarray(sampling_matrix, dtype=float)
    n = np.asarray(counts, dtype=float)
    names = [str(c) for c in class_names]
    C = len(names)
    if P.shape != (C, C) or n.shape != (C, C):
        raise LfmError(f"P {P.shape} and the confusion counts {n.shape} must both be "
                       f"{C}×{C} for {C} class names")
    rows = n.sum(axis=1, keepdims=True)
    shown = np.divide(n, rows, out=np.full_like(n, np.nan), where=rows > 0) if normalize else n
    idx = list(range(C))
    pair_names = np.array([[f"{names[i]} → {names[j]}" for j in idx] for i in idx])
    tau_text = f" (τ = {tau:g})" if tau is not None else ""
    when = f", epoch {epoch}" if epoch is not None else ""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.14, subplot_titles=(
        f"sampling matrix P{tau_text}",
        f"{split} confusion ({'fraction of the row' if normalize else 'images'})"))
    fig.add_trace(go.Heatmap(
        z=P, x=idx, y=idx, colorscale="Blues", text=pair_names, name="P",
        colorbar={"x": 0.43, "len": 0.9, "title": "P"},
        hovertemplate="%{text}: P = %{z:.4f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Heatmap(
        z=shown, x=idx, y=idx, colorscale="Reds", text=pair_names, customdata=n,
        name="confusion", colorbar={"x": 1.0, "len": 0.9,
                                    "title": "fraction" if normalize else "images"},
        hovertemplate="%{text}: %{customdata:.0f} images"
                      + (" (%{z:.3f} of the row)" if normalize else "") + "<extra></extra>"),
        row=1, col=2)
    axis = _class_axis(names)
    fig.update_xaxes(**axis, tickangle=-60)
    fig.update_yaxes(**axis, autorange="reversed")  # row 0 at the top, as a matrix is read
    fig.update_xaxes(title_text="partner class j", row=1, col=1)
    fig.update_yaxes(title_text="first class i", row=1, col=1)
    fig.update_xaxes(title_text="predicted class", row=1, col=2)
    fig.update_yaxes(title_text="true class", row=1, col=2)
    fig.update_layout(
        title=f"{run}: sampling matrix P beside the {split} confusion matrix{when}",
        template=TEMPLATE, height=max(520, min(1400, 260 + 14 * C)),
        width=max(1000, min(2400, 380 + 28 * C)))
    return fig


def run_confusion_figure(path: Any, run: str | None = None, normalize: bool = True) -> go.Figure:
    """sampling_confusion_figure of a run's (or a checkpoint's) confusion.npz; `run`
    labels the title (default: the folder's name)."""
    from pathlib import Path

    from lfm_ray import confusion

    saved = confusion.read(path)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    return sampling_confusion_figure(
        saved["sampling_matrix"], saved["counts"], saved["class_names"],
        run=run or folder.name, split=saved["split"], tau=saved["tau"], epoch=saved["epoch"],
        normalize=normalize)


# ---- effective imbalance γ′ -----------------------------------------------------------------
def effective_imbalance_figure(param: str, values: Sequence[float],
                               gammas: Sequence[float] | Mapping[str, Sequence[float]], *,
                               imbalance: float | None = None,
                               title: str | None = None) -> go.Figure:
    """LFM's effective imbalance factor γ′ (lfm_ray.effective) against a swept α or τ:
    one curve, or one per label of a mapping (data sets, the other parameter's values);
    a log x axis where the values span decades (τ); the training counts' own γ dashed."""
    curves = dict(gammas) if isinstance(gammas, Mapping) else {"γ′": gammas}
    x = np.asarray(values, dtype=float)
    if len(x) == 0 or not curves:
        raise LfmError("effective_imbalance_figure needs at least one value and one curve")
    fig = go.Figure()
    palette = _palette(len(curves))
    for k, (label, ys) in enumerate(curves.items()):
        y = np.asarray(ys, dtype=float)
        if y.shape != x.shape:
            raise LfmError(f"curve {label!r} has {len(y)} values for {len(x)} {param} values")
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="lines+markers", name=str(label), line={"color": palette[k]},
            hovertemplate=f"{html.escape(str(label))}<br>{html.escape(param)} = %{{x:g}}: "
                          "γ′ = %{y:.2f}<extra></extra>"))
    if imbalance is not None:
        fig.add_hline(y=float(imbalance), line_dash="dash", line_color="gray",
                      annotation_text=f"training counts: γ = {float(imbalance):.1f}",
                      annotation_position="top left")
    fig.update_xaxes(title=param, type="log" if use_log_axis(x) else "linear")
    fig.update_layout(
        title=title or f"effective imbalance factor γ′ against {param}",
        yaxis_title="effective imbalance factor γ′ (max/min label mass)",
        template=TEMPLATE, showlegend=len(curves) > 1)
    return fig
