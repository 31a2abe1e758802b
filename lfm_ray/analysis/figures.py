"""Interactive Plotly figures of a study: ablation curves, comparison tables and bars,
learning curves, per-class accuracy against training count, the sampling matrix beside a
confusion matrix, and the effective imbalance γ′.

Accuracies are stored as fractions and shown in percent. Every figure names what it shows:
parameters by their symbol and axis scale (PARAM_LABELS), a per-trial figure by its
configuration and seeds, a spread by what it is (± std, 95 % t-interval, the seeds' range).
A "best" mark (the ablation's star, a table's bold cell) appears only where
`better_than_rest` finds the best configuration better than every other one at the seeds
the study ran; otherwise the figure says that none is.
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
    GROUPS, METRICS, SEED, Separation, StudyResults, aggregate, best_row, better_than_rest,
    config_key, is_numeric_param, seed_values,
)
from lfm_ray.analysis.power import Design, detectable_difference, detectable_text
from lfm_ray.errors import LfmError

COLORS = {"many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728", "all": "#2ca02c"}
BANDS = ("auto", "ci", "std")
# τ-like parameters (spanning more than this many decades) get a log axis.
LOG_DECADES = 1.5
TEMPLATE = "plotly_white"
NO_BEST = "no configuration is better than the others at these seeds"
PERCENT = "top-1 accuracy (%)"

# What a parameter is called on an axis, in a table header and in a legend: (name, short).
# Parameters not listed keep their dotted name.
PARAM_LABELS: dict[str, tuple[str, str]] = {
    "mix.tau": ("τ", "τ"), "stage1.tau": ("τ (stage 1)", "τ₁"),
    "stage2.tau": ("τ (stage 2)", "τ₂"),
    "mix.alpha": ("α", "α"), "stage1.alpha": ("α (stage 1)", "α₁"),
    "stage2.alpha": ("α (stage 2)", "α₂"),
    "mix.beta": ("β of λ ~ Beta(β, β)", "β"), "stage1.beta": ("β (stage 1)", "β₁"),
    "stage2.beta": ("β (stage 2)", "β₂"),
    "stage1.lr": ("learning rate (stage 1)", "lr₁"),
    "stage2.lr": ("learning rate (stage 2)", "lr₂"),
    "stage1.min_lr": ("minimum learning rate (stage 1)", "min lr₁"),
    "stage2.min_lr": ("minimum learning rate (stage 2)", "min lr₂"),
    "stage1.epochs": ("epochs (stage 1)", "epochs₁"),
    "stage2.epochs": ("epochs (stage 2)", "epochs₂"),
    "data.imbalance_factor": ("imbalance factor γ", "γ"), "data.name": ("data set", "data"),
    "model.name": ("model", "model"), "model.logit_scale": ("logit scale s", "s"),
    "loss.name": ("loss", "loss"), "loss.focal_gamma": ("focal γ", "focal γ"),
    "loss.mms_margin": ("MMS margin", "MMS margin"),
    "loss.ldam_max_margin": ("LDAM maximum margin", "LDAM margin"),
    "mix.method": ("mixing method", "mixing"), "method": ("method", "method"),
    "mix.remix_kappa": ("Remix κ", "κ"), "mix.remix_tau": ("Remix τ_r", "τ_r"),
    "mix.concutmix_omega": ("ConCutMix ω", "ω"), "mix.concutmix_topk": ("ConCutMix k", "k"),
    "runtime.batch_size": ("batch size", "batch"), SEED: ("seed", "seed"),
}


def param_label(name: str) -> str:
    """A parameter's name for a reader: its symbol ("τ (stage 2)"), else its dotted name."""
    return PARAM_LABELS.get(name, (name, name))[0]


def param_short(name: str) -> str:
    """The short symbol of a parameter, for legends ("τ₂", "lr₁")."""
    return PARAM_LABELS.get(name, (name, name.rsplit(".", 1)[-1]))[1]


def axis_title(name: str, log: bool) -> str:
    """A parameter axis: its symbol and scale, "τ (log scale)"."""
    return param_label(name) + (" (log scale)" if log else "")


def _rgba(hex_color: str, a: float = 0.13) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{a})"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def fmt_value(value: Any, digits: int | None = None) -> str:
    """A parameter value as a label: numbers short (0.05, 1e-05; `digits` significant
    digits when given), NaN as 'unset'."""
    if _missing(value):
        return "unset"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}g}" if digits else f"{float(value):g}"
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def setting(name: str, value: Any, digits: int | None = None) -> str:
    """"τ = 0.05", "method CE": a parameter and its value as a reader reads it."""
    if name in ("method", "mix.method", "loss.name", "data.name", "model.name"):
        return f"{param_label(name)} {fmt_value(value, digits)}"
    return f"{param_label(name)} = {fmt_value(value, digits)}"


def describe(keys: Mapping[str, Any], digits: int | None = None) -> str:
    """A configuration as text: "τ = 0.05, α = 1"."""
    return ", ".join(setting(k, v, digits) for k, v in keys.items() if not _missing(v))


def seeds_text(seeds: Sequence[Any]) -> str:
    """"seed 0" or "seeds 0, 1, 2"."""
    shown = [fmt_value(int(s) if isinstance(s, (float, np.floating)) and float(s).is_integer()
                       else s) for s in seeds]
    return ("seed " if len(shown) == 1 else "seeds ") + ", ".join(shown)


def use_log_axis(x: Sequence[float]) -> bool:
    """Log x when every value is positive and they span more than LOG_DECADES decades."""
    x = np.asarray(x, dtype=float)
    return bool(len(x) > 1 and (x > 0).all() and math.log10(x.max() / x.min()) > LOG_DECADES)


def value_ticks(x: Sequence[float]) -> dict[str, Any]:
    """Ticks at the swept values, written out (0.002, not Plotly's log-axis "2")."""
    values = sorted(set(float(v) for v in x))
    return {"tickmode": "array", "tickvals": values, "ticktext": [fmt_value(v) for v in values]}


def log_ticks(low: float, high: float) -> dict[str, Any]:
    """Ticks 1, 2, 5, 10, 20, 50, ... between low and high on a log axis, written out."""
    out = []
    for e in range(math.floor(math.log10(max(low, 1e-12))) - 1, math.ceil(math.log10(high)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0 ** e
            if low / 1.5 <= v <= high * 1.5:
                out.append(v)
    return {"tickmode": "array", "tickvals": out, "ticktext": [fmt_value(v) for v in out]}


def epoch_ticks(last_epoch: float) -> dict[str, Any]:
    """Whole-number epoch ticks, at most about 15 of them."""
    step = max(1, math.ceil(float(last_epoch) / 15))
    return {"tickmode": "linear", "tick0": 0, "dtick": step, "tickformat": "d"}


def _same(series: pd.Series, value: Any) -> pd.Series:
    """Rows equal to `value`, NaN matching NaN (a conditional parameter a trial lacks)."""
    if _missing(value):
        return series.isna()
    return series == value


def headline_metric(study: StudyResults) -> str:
    """The test accuracy that goes with the study's selection metric (val_acc_few → acc_few)."""
    m = study.metric.removeprefix("val_")
    return m if m in METRICS else "acc_all"


def selection_metric(study: StudyResults) -> str:
    """The metric "best" is decided on: the study's selection metric where the table has
    it, else the test accuracy that goes with it."""
    m = study.metric
    if m in study.trials.columns and pd.to_numeric(study.trials[m], errors="coerce").notna().any():
        return m
    return headline_metric(study)


def selection_text(study: StudyResults) -> str:
    """"acc_all (test split)": the metric best is decided on and its split."""
    m = selection_metric(study)
    return f"{m} ({'validation' if m.startswith('val_') else 'test'} split)"


def separation(study: StudyResults, rows: pd.DataFrame, by: Sequence[str],
               metric: str | None = None) -> Separation:
    """better_than_rest over the configurations of `by` among `rows` (keys: config_key)."""
    values, seeds = seed_values(rows, list(by), metric or selection_metric(study))
    return better_than_rest(values, seeds, mode=study.mode)


def verdict_text(sep: Separation, label: Mapping[Any, str] | None = None,
                 unit: float = 100.0) -> str:
    """One sentence: which configuration is better than the rest and by how much, or that
    none is."""
    names = label or {}
    name = names.get(sep.best, str(sep.best))
    other = names.get(sep.runner_up, str(sep.runner_up))
    if sep.runner_up is None:
        return "one configuration: nothing to compare"
    if not sep.separated:
        against = names.get(sep.against, str(sep.against))
        why = f" ({name} against {against}: {sep.reason})" if sep.reason else ""
        power = detectable_text(sep, unit)
        return NO_BEST + why + (f"; {name} against the runner-up {other}: {power}"
                                if power else "")
    if sep.test == "paired":
        return (f"{name} is better than every other configuration at 95 %: over the "
                f"{sep.n} seeds it shares with the runner-up {other}, the mean paired "
                f"difference is {sep.diff * unit:+.2f} points, 95 % t-interval "
                f"[{sep.low * unit:+.2f}, {sep.high * unit:+.2f}]")
    return (f"{name} is better than every other configuration at 95 %: its mean is "
            f"{sep.diff * unit:+.2f} points from the runner-up {other}, and the 95 % "
            "t-intervals of the means do not overlap")


# ---- ablation curves ----------------------------------------------------------------------
def ablation_figure(study: StudyResults, param: str, band: str = "auto",
                    where: Mapping[str, Any] | None = None) -> go.Figure:
    """Many / medium / few / all test accuracy against a swept numeric parameter (paper
    Fig. 9 and 10): the mean over seeds as a line, each seed as a point beside it, and
    error bars of the 95 % t-interval of the mean (`band="ci"`) or ± one standard deviation
    (`band="std"`); `"auto"` takes the interval with three or more seeds per point and
    ± std with two (the 95 % interval of two seeds is ± 12.7 std/√2), none with one. The
    y axis is 0-100 %: a bar reaching past it is cut there and flagged with a triangle. The
    x axis is the parameter's symbol and scale, ticks at the swept values. The best value
    of the selection metric is starred only when better_than_rest separates it from every
    other value; otherwise the figure says no value is better. Other swept parameters are
    held at `where`, or else at the best configuration's values."""
    rows, fixed, agg = _ablation_rows(study, param, band, where)
    x = agg[param].to_numpy(float)
    log = use_log_axis(x)
    seeds_per_point = agg["acc_all_n"].to_numpy(int)
    fewest, most = int(seeds_per_point.min()), int(seeds_per_point.max())
    if band == "auto":
        band = "ci" if fewest >= 3 else "std"
    spread = {"ci": "95 % t-interval of the mean", "std": "± 1 std over seeds"}[band]
    fig = go.Figure()
    clipped_any = False
    for k, g in enumerate(GROUPS):
        clipped_any |= _add_ablation_group(fig, agg, rows, param, x, log, k, g, band, spread,
                                           most)
    _mark_ablation_best(fig, study, rows, param, agg, x, most)
    if most == 1:
        what = "one seed per value (no spread)"
    else:
        n = f"{fewest}" if fewest == most else f"{fewest}-{most}"
        what = f"mean of {n} seeds (line), each seed (points), error bars {spread}"
        if fewest == 1:
            what += " (none where one seed)"
    title = f"{study.name}: test accuracy against {param_label(param)}<br><sup>{what}"
    if clipped_any:
        title += "; ▲▼ an interval cut at 0 or 100 %"
    if fixed:
        title += f"<br>{html.escape(fixed, quote=False)}"
    title += "</sup>"
    fig.update_layout(title=title, yaxis_title=f"test {PERCENT}", template=TEMPLATE,
                      legend_title="shot group", margin={"t": 110})
    fig.update_yaxes(range=[-2, 102], ticksuffix="")
    fig.update_xaxes(title=axis_title(param, log), type="log" if log else "linear",
                     **value_ticks(x))
    return fig


def _ablation_rows(study: StudyResults, param: str, band: str,
                   where: Mapping[str, Any] | None) -> tuple[pd.DataFrame, str, pd.DataFrame]:
    """(the trials at the held values of the other parameters, what they are held at, their
    aggregate per value of `param` in order); LfmError where there is nothing to plot."""
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
    rows = rows.assign(**{param: pd.to_numeric(rows[param])})
    agg = aggregate(rows, [param])
    agg = agg.dropna(subset=[param]).sort_values(param).reset_index(drop=True)
    if len(agg) < 2:
        raise LfmError(f"parameter {param!r} has fewer than two finished values"
                       f"{' (' + fixed + ')' if fixed else ''}; nothing to plot")
    return rows, fixed, agg


def _add_ablation_group(fig: go.Figure, agg: pd.DataFrame, rows: pd.DataFrame, param: str,
                        x: np.ndarray, log: bool, k: int, g: str, band: str, spread: str,
                        most: int) -> bool:
    """Shot group `g`'s traces: its mean line, and with several seeds its error bars and
    seed points beside it and triangles where a bar is cut at the axis; True when one is."""
    clipped = False
    m = f"acc_{g}"
    mean = agg[f"{m}_mean"].to_numpy(float) * 100
    half = agg[f"{m}_{band}"].to_numpy(float) * 100
    half = np.where(np.isnan(half), 0.0, half)  # one seed: no spread to draw
    upper, lower = mean + half, mean - half
    top, bottom = np.minimum(upper, 100.0), np.maximum(lower, 0.0)
    low, high = agg[f"{m}_ci_low"] * 100, agg[f"{m}_ci_high"] * 100
    cut = np.where((low < 0) | (high > 100), " cut at 0 and 100 %", "")
    custom = np.empty((len(agg), 5), dtype=object)  # numbers, and the cut's note
    for j, column in enumerate([agg[f"{m}_std"] * 100, low.clip(lower=0),
                                high.clip(upper=100), agg[f"{m}_n"], cut]):
        custom[:, j] = list(column)
    dodge = _dodge(x, log, k)
    fig.add_trace(go.Scatter(
        x=x, y=mean, mode="lines+markers", name=g, legendgroup=g,
        line={"color": COLORS[g], "width": 2.5}, marker={"size": 8},
        customdata=custom,
        hovertemplate=f"{html.escape(param_label(param))} = %{{x}}<br>{g}: mean "
                      "%{y:.2f} %, std %{customdata[0]:.2f}<br>95 % t-interval "
                      "[%{customdata[1]:.2f}, %{customdata[2]:.2f}]%{customdata[4]}<br>seeds: "
                      "%{customdata[3]}<extra></extra>"))
    if most > 1:
        # The spread beside the line, each group's a little to the side, so four
        # groups' bars never pile up on one vertical line.
        fig.add_trace(go.Scatter(
            x=dodge, y=mean, mode="markers", name=f"{g}: {spread}", legendgroup=g,
            showlegend=False, marker={"size": 1, "color": COLORS[g]},
            error_y={"type": "data", "symmetric": False, "array": top - mean,
                     "arrayminus": mean - bottom, "thickness": 1.2, "width": 3,
                     "color": COLORS[g]}, hoverinfo="skip"))
        seeds_x, seeds_y, seeds_t = _seed_points(rows, param, m, dict(zip(x, dodge)))
        fig.add_trace(go.Scatter(
            x=seeds_x, y=seeds_y, mode="markers", name=f"{g}: seeds",
            legendgroup=g, showlegend=False, text=seeds_t,
            marker={"color": COLORS[g], "size": 5, "opacity": 0.6, "line": {"width": 0}},
            hovertemplate=f"{g}, %{{text}}: %{{y:.2f}} %<extra></extra>"))
    above, below = upper > 100.0 + 1e-9, lower < -1e-9
    if most > 1 and (above.any() or below.any()):
        clipped = True
        fx = np.concatenate([dodge[above], dodge[below]])
        fy = np.concatenate([np.full(above.sum(), 100.0), np.zeros(below.sum())])
        bounds = np.concatenate([np.stack([lower, upper], axis=1)[above],
                                 np.stack([lower, upper], axis=1)[below]])
        fig.add_trace(go.Scatter(
            x=fx, y=fy, mode="markers", legendgroup=g, showlegend=False,
            name=f"{g}: interval cut at the axis",
            marker={"symbol": ["triangle-up"] * int(above.sum())
                    + ["triangle-down"] * int(below.sum()),
                    "size": 9, "color": COLORS[g], "line": {"color": "black", "width": 1}},
            customdata=bounds,
            hovertemplate=f"{g}: the interval [%{{customdata[0]:.1f}}, "
                          "%{customdata[1]:.1f}] % reaches past the axis and is cut"
                          "<extra></extra>"))
    return clipped


def _mark_ablation_best(fig: go.Figure, study: StudyResults, rows: pd.DataFrame, param: str,
                        agg: pd.DataFrame, x: np.ndarray, most: int) -> None:
    """A star on the best value where better_than_rest separates it, else a note saying why
    there is none (with the difference these seeds could have detected)."""
    metric = selection_metric(study)
    sep = separation(study, rows, [param], metric)
    group = metric.removeprefix("val_").removeprefix("acc_")
    group = group if group in GROUPS else "all"
    if param in FACETS:
        pass  # an imbalance factor or data set is a setting, not a choice: no best to mark
    elif sep.separated:
        best_x = float(sep.best[0])
        best_y = agg.loc[np.isclose(x, best_x), f"acc_{group}_mean"].iloc[0] * 100
        fig.add_trace(go.Scatter(
            x=[best_x], y=[best_y], mode="markers",
            name=f"best {setting(param, best_x)} (by {metric})",
            marker={"symbol": "star", "size": 18, "color": "black"},
            hovertemplate=html.escape(verdict_text(sep, {sep.best: setting(param, best_x)}))
                          + "<extra></extra>"))
    else:
        why = f"{NO_BEST} ({metric}): no star" if most > 1 else \
            "one seed: no interval to tell the values apart, no star"
        mdd = detectable_difference(sep.sd, sep.n, Design(paired=sep.test == "paired"))
        if most > 1 and sep.test and math.isfinite(mdd):
            why += (f"<br>these seeds could have detected {mdd * 100:.2f} points "
                    f"({'paired' if sep.test == 'paired' else 'two-sample'} t-test power, "
                    "95 %, 80 %; see the report's best table)")
        fig.add_annotation(text=why, xref="paper", yref="paper",
                           x=0.0, y=1.0, xanchor="left", yanchor="bottom", showarrow=False,
                           font={"size": 12, "color": "#7a5b00"})


def _dodge(x: np.ndarray, log: bool, k: int) -> np.ndarray:
    """x moved a little to the side for shot group k (of four): 1.5 % of the axis per step."""
    span = (math.log10(x.max()) - math.log10(x.min())) if log else float(x.max() - x.min())
    step = 0.015 * span * (k - 1.5)
    return x * 10 ** step if log else x + step


def _seed_points(rows: pd.DataFrame, param: str, metric: str,
                 where: Mapping[float, float]) -> tuple[list[float], list[float], list[str]]:
    """Each finished trial's value of `metric` (percent) at its value's dodged x."""
    xs, ys, texts = [], [], []
    for _, r in rows.iterrows():
        v = pd.to_numeric(pd.Series([r[metric]]), errors="coerce").iloc[0]
        if np.isnan(v):
            continue
        xs.append(where[float(r[param])])
        ys.append(float(v) * 100)
        seed = r.get(SEED)
        texts.append(seeds_text([seed]) if not _missing(seed) else str(r["trial_id"]))
    return xs, ys, texts


def _hold_others(study: StudyResults, done: pd.DataFrame, param: str,
                 where: Mapping[str, Any] | None) -> tuple[pd.DataFrame, str]:
    """The trials with every other varying parameter at one value: `where`, else the best
    configuration's; and a sentence saying which."""
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
    metric = selection_metric(study)
    if rest and not rows.empty:
        agg = aggregate(rows, rest, metrics=[metric])
        best = agg.iloc[best_row(agg, metric, study.mode)]
        for name in rest:
            fixed[name] = best[name]
            rows = rows[_same(rows[name], best[name])]
    if rows.empty:
        raise LfmError(f"no finished trial of study {study.name!r} has {describe(where)}")
    held = describe({k: v for k, v in fixed.items() if k in where})
    best = describe({k: v for k, v in fixed.items() if k not in where})
    text = "; ".join(t for t in (f"at {held}" if held else "",
                                 f"other parameters at the best configuration's {best}"
                                 if best else "") if t)
    return rows, text


# ---- comparison tables and bars -----------------------------------------------------------
# A compared parameter that splits a comparison into column groups (paper Table 2) and bar
# panels, never compared across: the first of these a study sweeps beside another one.
FACETS = ("data.imbalance_factor", "data.name", "model.name")


def _declared_rank(study: StudyResults, param: str, value: Any, seen: list[Any]) -> tuple[int, int]:
    declared = study.declared_values(param) or []
    for i, v in enumerate(declared):
        if v == value or (fmt_value(v) == fmt_value(value)):
            return (0, i)
    return (1, seen.index(value) if value in seen else len(seen))


def facet_of(params: Sequence[str]) -> str | None:
    """The parameter a comparison is split by (imbalance factor, data set), if any."""
    if len(params) < 2:
        return None
    return next((f for f in FACETS if f in params), None)


def only_facets(params: Sequence[str]) -> bool:
    """Every compared parameter is a setting (imbalance factor, data set): nothing is best."""
    return bool(params) and all(p in FACETS for p in params)


def comparison_table(study: StudyResults, params: Sequence[str] | None = None) -> pd.DataFrame:
    """The paper's table layout (Tables 1, 2, 5): one row per configuration of the
    compared parameters (seeds pooled) in the study's declared order; columns `label` (the
    row's values), the parameters, `<g>_mean`, `<g>_std`, `<g>_ci` in percent and
    `<g>_values` (seed → value in percent) for g in many/medium/few/all, and `seeds`.
    `table.attrs` holds `params` and `facet` (the parameter the table is split by)."""
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
        values, seeds = seed_values(done, params, f"acc_{g}")
        table[f"{g}_values"] = [
            {s: v * 100 for s, v in zip(seeds.get(config_key(r, params), []),
                                        values.get(config_key(r, params), []))
             if not np.isnan(v)} for _, r in agg.iterrows()]
    table["seeds"] = agg["acc_all_n"].to_numpy(int)
    table.attrs["params"] = params
    table.attrs["facet"] = facet_of(params)
    table.attrs["no_best"] = only_facets(params)
    return table


def _row_label(row: pd.Series, params: Sequence[str]) -> str:
    if len(params) == 1:
        return fmt_value(row[params[0]])
    return " · ".join(fmt_value(row[p]) if p in ("method", "mix.method", "loss.name")
                      else setting(p, row[p]) for p in params if not _missing(row[p]))


def best_cells(table: pd.DataFrame, mode: str = "max") -> dict[str, np.ndarray]:
    """Per shot group, the row better than every other row of its column (within its
    facet: an imbalance factor is never compared with another) by better_than_rest over
    the seeds; no row where none is."""
    facet = table.attrs.get("facet")
    parts = [np.flatnonzero(_same(table[facet], v).to_numpy())
             for v in dict.fromkeys(table[facet].tolist())] if facet else [np.arange(len(table))]
    out = {g: np.zeros(len(table), dtype=bool) for g in GROUPS}
    if table.attrs.get("no_best"):
        return out
    for g in GROUPS:
        for idx in parts:
            values = {int(i): list(table[f"{g}_values"].iloc[i].values()) for i in idx
                      if table[f"{g}_values"].iloc[i]}
            seeds = {int(i): list(table[f"{g}_values"].iloc[i].keys()) for i in values}
            if len(values) < 2:
                continue
            sep = better_than_rest(values, seeds, mode=mode)
            if sep.separated:
                out[g][sep.best] = True
    return out


def _cell(row: pd.Series, g: str, seeds: int) -> str:
    mean = row[f"{g}_mean"]
    if _missing(mean):
        return "n/a"
    text = f"{mean:.2f}"
    if row["seeds"] > 1 and not _missing(row[f"{g}_std"]):
        text += f" ± {row[f'{g}_std']:.2f}"
    if int(row["seeds"]) != seeds:
        text += f" (n={int(row['seeds'])})"
    return text


def table_caption(table: pd.DataFrame, mode: str = "max") -> str:
    """What the table's numbers and bold cells are."""
    n = int(table["seeds"].max()) if len(table) else 0
    spread = "one seed" if n <= 1 else f"mean ± std over {n} seeds"
    bold = best_cells(table, mode)
    facet = table.attrs.get("facet")
    where = f" within its {param_label(facet)}" if facet else ""
    if table.attrs.get("no_best"):
        settings = " and ".join(map(param_label, table.attrs["params"]))
        marks = f"no cell is marked best: each {settings} is a setting of its own, not compared"
    elif n <= 1:
        marks = "no cell is marked best: with one seed there is no interval to compare"
    elif any(b.any() for b in bold.values()):
        marks = (f"bold: better than every other row of its column{where} at 95 % (paired "
                 "t-interval over the seeds both ran)")
    else:
        marks = f"no cell is bold: {NO_BEST}"
        column = {int(i): v for i, v in enumerate(table["all_values"]) if v}
        if not facet and len(column) > 1:
            sep = better_than_rest({i: list(v.values()) for i, v in column.items()},
                                   {i: list(v.keys()) for i, v in column.items()}, mode=mode)
            power = detectable_text(sep, unit=1.0)  # the table's values are in percent
            marks += f"; in column all, the highest mean against the runner-up: {power}" \
                if power else ""
    return f"Top-1 test accuracy (%), {spread}; {marks}."


def _first_columns(table: pd.DataFrame) -> list[str]:
    params = list(table.attrs.get("params") or [])
    facet = table.attrs.get("facet")
    return [p for p in params if p != facet] or ["label"]


def comparison_html(table: pd.DataFrame, mode: str = "max") -> str:
    """The comparison table as HTML: a column per compared parameter named by its symbol,
    then many/medium/few/all (top-1 %, mean ± std over seeds); a facet (imbalance factor)
    becomes column groups, as the paper's Table 2. Bold: see best_cells."""
    bold = best_cells(table, mode)
    n = int(table["seeds"].max()) if len(table) else 0
    facet = table.attrs.get("facet")
    firsts = _first_columns(table)
    heads = [param_label(p) if p != "label" else "configuration" for p in firsts]
    if not facet:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in heads) + \
            "".join(f"<th>{g} (%)</th>" for g in GROUPS)
        body = []
        for i, (_, row) in enumerate(table.iterrows()):
            tds = [f"<td class='name'>{html.escape(fmt_value(row[p]) if p != 'label' else row[p])}"
                   "</td>" for p in firsts]
            for g in GROUPS:
                text = _cell(row, g, n)
                tds.append(f"<td><b>{text}</b></td>" if bold[g][i] else f"<td>{text}</td>")
            body.append("<tr>" + "".join(tds) + "</tr>")
        return (f"<table class='cmp'><thead><tr>{head}</tr></thead>"
                f"<tbody>{''.join(body)}</tbody></table>")
    facet_values = list(dict.fromkeys(table[facet].tolist()))
    top = "".join(f"<th rowspan='2'>{html.escape(h)}</th>" for h in heads) + "".join(
        f"<th colspan='4' class='group'>{html.escape(setting(facet, v))}</th>"
        for v in facet_values)
    sub = "".join(f"<th>{g} (%)</th>" for _ in facet_values for g in GROUPS)
    body = []
    rows = list(dict.fromkeys(tuple(config_key(r, firsts)) for _, r in table.iterrows()))
    for key in rows:
        tds = [f"<td class='name'>{html.escape(fmt_value(v))}</td>" for v in key]
        for fv in facet_values:
            match = [i for i, (_, r) in enumerate(table.iterrows())
                     if config_key(r, firsts) == key and _same(pd.Series([r[facet]]), fv).iloc[0]]
            for g in GROUPS:
                if not match:
                    tds.append("<td>n/a</td>")
                    continue
                i = match[0]
                text = _cell(table.iloc[i], g, n)
                cls = " class='gstart'" if g == GROUPS[0] else ""
                text = f"<b>{text}</b>" if bold[g][i] else text
                tds.append(f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return (f"<table class='cmp'><thead><tr>{top}</tr><tr>{sub}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def comparison_table_figure(table: pd.DataFrame, mode: str = "max",
                            title: str = "") -> go.Figure:
    """The comparison table as a Plotly table (for its PNG), laid out and marked as
    comparison_html."""
    bold = best_cells(table, mode)
    n = int(table["seeds"].max()) if len(table) else 0
    facet = table.attrs.get("facet")
    firsts = _first_columns(table)
    headers = [param_label(p) if p != "label" else "configuration" for p in firsts]
    keys = list(dict.fromkeys(tuple(config_key(r, firsts)) for _, r in table.iterrows()))
    columns: list[list[str]] = [[html.escape(fmt_value(k[j])) for k in keys]
                                for j in range(len(firsts))]
    facet_values = list(dict.fromkeys(table[facet].tolist())) if facet else [None]
    for fv in facet_values:
        for g in GROUPS:
            headers.append(f"{param_short(facet)} = {fmt_value(fv)}<br>{g} (%)" if facet
                           else f"{g} (%)")
            col = []
            for key in keys:
                match = [i for i, (_, r) in enumerate(table.iterrows())
                         if config_key(r, firsts) == key and
                         (fv is None or _same(pd.Series([r[facet]]), fv).iloc[0])]
                if not match:
                    col.append("n/a")
                    continue
                text = _cell(table.iloc[match[0]], g, n)
                col.append(f"<b>{text}</b>" if bold[g][match[0]] else text)
            columns.append(col)
    fig = go.Figure(go.Table(
        header={"values": [f"<b>{h}</b>" for h in headers], "fill_color": "#e8eef7",
                "height": 44 if facet else 28,
                "align": ["left"] * len(firsts) + ["right"] * (len(headers) - len(firsts))},
        cells={"values": columns, "height": 26,
               "align": ["left"] * len(firsts) + ["right"] * (len(headers) - len(firsts))}))
    caption = table_caption(table, mode)
    fig.update_layout(title=(title or "comparison") + f"<br><sup>{html.escape(caption)}</sup>",
                      template=TEMPLATE, height=170 + 28 * len(keys) + (24 if facet else 0),
                      width=max(800, 170 * len(firsts) + 115 * (len(headers) - len(firsts))),
                      margin={"t": 80, "b": 10, "l": 10, "r": 10})
    return fig


def comparison_figure(study: StudyResults, params: Sequence[str] | None = None,
                      error: str = "std") -> go.Figure:
    """Grouped bars: one group per configuration, one bar per shot group, error bars over
    seeds (± std, or the 95 % interval with `error="ci"`) where there are two or more. A
    facet (imbalance factor, data set) splits the figure into panels. A bar at 0 % is
    labelled "0", a missing value "n/a", so the two are told apart."""
    if error not in ("ci", "std"):
        raise LfmError(f"error {error!r} is not known; expected ci or std")
    table = comparison_table(study, params)
    params = table.attrs["params"]
    facet = table.attrs["facet"]
    panels: list[tuple[str, pd.DataFrame]]
    if facet:
        rest = [p for p in params if p != facet]
        panels = []
        for v in dict.fromkeys(table[facet].tolist()):
            part = table[_same(table[facet], v)].copy()
            part["label"] = [_row_label(r, rest) for _, r in part.iterrows()]
            panels.append((setting(facet, v), part))
    else:
        panels = [("", table)]
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True,
                        subplot_titles=[t for t, _ in panels] if len(panels) > 1 else None,
                        horizontal_spacing=0.03)
    n = int(table["seeds"].max())
    show_errors = n > 1
    cut = False
    for col, (_, part) in enumerate(panels, start=1):
        for g in GROUPS:
            y = part[f"{g}_mean"].to_numpy(float)
            err = part[f"{g}_{error}"].fillna(0.0).to_numpy(float)
            # An accuracy's bar stops at 0 and 100 %; the subtitle says where one was cut.
            up, down = np.minimum(err, 100 - np.nan_to_num(y)), np.minimum(err, np.nan_to_num(y))
            cut = cut or bool(show_errors and ((up < err - 1e-9) | (down < err - 1e-9)).any())
            text = ["n/a" if np.isnan(v) else ("0" if abs(v) < 0.005 else "") for v in y]
            fig.add_trace(go.Bar(
                name=g, x=part["label"].tolist(), y=np.nan_to_num(y, nan=0.0),
                error_y={"type": "data", "symmetric": False, "array": up, "arrayminus": down,
                         "visible": show_errors},
                text=text, textposition="outside", textfont={"size": 10, "color": COLORS[g]},
                cliponaxis=False, marker_color=COLORS[g], legendgroup=g, showlegend=col == 1,
                customdata=np.where(np.isnan(y), "missing", np.round(y, 2).astype(str)),
                hovertemplate=f"%{{x}}<br>{g}: %{{customdata}} %<extra></extra>"),
                row=1, col=col)
    spread = ("error bars ± 1 std over seeds" if error == "std" else
              "error bars 95 % t-interval of the mean") if show_errors else "one seed, no spread"
    if cut:
        spread += " (cut at 0 and 100 %)"
    name = param_label(params[0]) if len(params) == 1 else \
        " × ".join(param_label(p) for p in params if p != facet)
    fig.update_layout(barmode="group", template=TEMPLATE, legend_title="shot group",
                      title=f"{study.name}: test accuracy per {name}<br><sup>"
                            f"{'mean of ' + str(n) + ' seeds, ' if n > 1 else ''}{spread}; "
                            "\"0\" marks a bar at 0 %, \"n/a\" a missing value</sup>",
                      margin={"t": 100})
    fig.update_yaxes(title_text=f"test {PERCENT}", row=1, col=1)
    fig.update_yaxes(range=[0, 105])
    return fig


# ---- learning curves ----------------------------------------------------------------------
CURVE_METRICS = ("acc_all", "acc_many", "acc_medium", "acc_few", "val_acc_all", "train_loss")
SEED_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
# Above this many trials the learning curves are drawn as a summary (median and a band per
# epoch, and the best trial's curve): thousands of curves are neither readable nor small.
MAX_CURVES = 200
CURVE_BAND = (10, 90)  # percentiles of the summary's band


def trial_labels(study: StudyResults, digits: int | None = 3) -> dict[str, str]:
    """A short label per trial: its swept values without names, in the order of
    `curve_legend_title` (`digits` significant digits, None: as declared; a conditional
    parameter the trial did not draw shown as "–"); the seed is left out (curves show it
    by line style)."""
    params = study.params
    out = {}
    for _, r in study.trials.iterrows():
        parts = ["–" if _missing(r[p]) else fmt_value(r[p], digits) for p in params]
        out[str(r["trial_id"])] = " · ".join(parts) or str(r["trial_id"])
    return out


def curve_legend_title(study: StudyResults) -> str:
    return " · ".join(param_short(p) for p in study.params) or "trial"


def _curve_y(df: pd.DataFrame, metric: str) -> np.ndarray:
    if metric not in df.columns:
        return np.full(len(df), np.nan)
    y = pd.to_numeric(df[metric], errors="coerce").to_numpy(float)
    return y if metric == "train_loss" else y * 100


def _curve_axis_title(metric: str) -> str:
    if metric == "train_loss":
        return "training loss"
    split = "validation" if metric.startswith("val_") else "test"
    return f"{split} top-1 accuracy, {metric.removeprefix('val_').removeprefix('acc_')} (%)"


def stage_boundaries(epochs: pd.DataFrame) -> list[float]:
    """Where stage 2 starts (between the last stage-1 and first stage-2 epoch), per
    distinct boundary among the trials."""
    if epochs.empty or "stage" not in epochs.columns:
        return []
    last1 = epochs[epochs["stage"] == 1].groupby("trial_id")["epoch"].max()
    has2 = set(epochs.loc[epochs["stage"] == 2, "trial_id"])
    return sorted({float(e) + 0.5 for t, e in last1.items() if t in has2})


def learning_curves_figure(study: StudyResults, metric: str = "acc_all") -> go.Figure:
    """Every trial's curve across both stages against the global epoch: a colour per
    configuration (legend: its swept values), a line style per seed; the stage boundary
    dotted; a trial ASHA stopped early ends in an ✕ saying where. A menu switches between
    accuracies (all/many/medium/few, the validation split's where there is one) and the
    training loss. Epoch ticks are whole numbers."""
    epochs = study.epochs
    if epochs is None or epochs.empty:
        raise LfmError(f"study {study.name!r} has no per-epoch results (neither copies of "
                       "its trials nor its Tune experiment or checkpoints are reachable)")
    if metric not in CURVE_METRICS:
        raise LfmError(f"metric {metric!r} is not known; expected one of "
                       f"{', '.join(CURVE_METRICS)}")
    trials = study.trials.set_index("trial_id")
    present_ids = set(epochs["trial_id"]) & set(trials.index)
    if len(present_ids) > MAX_CURVES:
        return learning_curves_summary(study, metric)
    stopped = set(trials.index[trials["stopped_early"].fillna(False).astype(bool)]) \
        if "stopped_early" in trials.columns else set()
    labels = trial_labels(study, digits=None if study.search == "grid" else 3)
    present = [t for t in epochs["trial_id"].unique() if t in trials.index]
    keys, configs, seeds = _curve_groups(study, trials, present)
    dash = {s: SEED_DASHES[i % len(SEED_DASHES)] for i, s in enumerate(seeds)}
    palette = _palette(len(configs))
    colour = {c: palette[i] for i, c in enumerate(configs)}
    metrics = [m for m in CURVE_METRICS if m in epochs.columns and
               pd.to_numeric(epochs[m], errors="coerce").notna().any()]
    fig = go.Figure()
    ys: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    shown_configs: set[tuple] = set()
    order = sorted(present, key=lambda t: (configs.index(keys[t]),
                                           _seed_order(_seed_of(trials.loc[t]))))
    for trial_id in order:
        df = epochs[epochs["trial_id"] == trial_id].sort_values("epoch")
        key, seed = keys[trial_id], _seed_of(trials.loc[trial_id])
        early = trial_id in stopped
        label = labels.get(trial_id, trial_id)
        full = label + (f", {seeds_text([seed])}" if len(seeds) > 1 and seed is not None else "")
        full += " (stopped early)" if early else ""
        fig.add_trace(go.Scatter(
            x=df["epoch"].to_numpy(), y=_curve_y(df, metric),
            mode="lines+markers" if len(df) == 1 else "lines",
            line={"dash": dash.get(seed, "solid"), "color": colour[key], "width": 2},
            name=label, legendgroup=str(key), showlegend=key not in shown_configs,
            hovertemplate=f"{html.escape(full)}<br>epoch %{{x}}: %{{y:.2f}}<extra></extra>"))
        shown_configs.add(key)
        for m in metrics:
            ys[m].append(_curve_y(df, m))
        if early:
            last = df.iloc[[-1]]
            fig.add_trace(go.Scatter(
                x=last["epoch"].to_numpy(), y=_curve_y(last, metric), mode="markers+text",
                marker={"symbol": "x", "size": 11, "color": colour[key]},
                text=[f"stopped at epoch {int(last['epoch'].iloc[0])}"],
                textposition="top center", showlegend=False, legendgroup=str(key),
                name=f"{full}: stopped", hoverinfo="skip"))
            for m in metrics:
                ys[m].append(_curve_y(last, m))
    if len(seeds) > 1:
        _add_seed_styles(fig, seeds, dash, metrics, ys)
    _mark_stage_boundaries(fig, study, epochs)
    legend = _curve_legend(fig, study, labels, present, len(configs), seeds)
    buttons = [{"label": _button_label(m), "method": "update",
                "args": [{"y": ys[m]}, {"yaxis.title.text": _curve_axis_title(m)}]}
               for m in metrics]
    last_epoch = float(pd.to_numeric(epochs["epoch"], errors="coerce").max())
    n_cfg = f"{len(configs)} configuration{'s' if len(configs) != 1 else ''}"
    fig.update_layout(
        title=f"{study.name}: learning curves over both stages<br><sup>{n_cfg}"
              + (f" × {len(seeds)} seeds" if len(seeds) > 1 else "")
              + (f"; {len(stopped)} stopped early by ASHA (✕)" if stopped else "") + "</sup>",
        xaxis_title="epoch (stage 1, then stage 2)", yaxis_title=_curve_axis_title(metric),
        template=TEMPLATE, legend=legend, margin={"t": 90},
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "xanchor": "right",
                      "y": 1.02, "yanchor": "bottom", "showactive": True,
                      "active": metrics.index(metric) if metric in metrics else 0}])
    fig.update_xaxes(**epoch_ticks(last_epoch))
    return fig


def _curve_groups(study: StudyResults, trials: pd.DataFrame, present: list
                  ) -> tuple[dict[Any, tuple], list[tuple], list]:
    """(each trial's configuration key, the configurations in the study's order, the seeds
    in order): a colour goes to each configuration, a line style to each seed."""
    params = study.params
    keys = {t: config_key(trials.loc[t], params) for t in present}
    configs: list[tuple] = []
    for t in sorted(present, key=lambda t: _sort_key(study, trials.loc[t], params)):
        if keys[t] not in configs:
            configs.append(keys[t])
    seeds = sorted({_seed_of(trials.loc[t]) for t in present}, key=_seed_order)
    return keys, configs, seeds


def _add_seed_styles(fig: go.Figure, seeds: list, dash: dict, metrics: list[str],
                     ys: dict[str, list[np.ndarray]]) -> None:
    """The line style of each seed, once, as a legend entry (no data: a menu's y is NaN)."""
    for s in seeds:
        fig.add_trace(go.Scatter(
            x=[None], y=[None], mode="lines", name=seeds_text([s]),
            line={"dash": dash[s], "color": "#555", "width": 2},
            legendgroup=f"seed {s}", showlegend=True, hoverinfo="skip"))
        for m in metrics:
            ys[m].append(np.array([np.nan]))


def _mark_stage_boundaries(fig: go.Figure, study: StudyResults, epochs: pd.DataFrame) -> None:
    """A dotted line where stage 2 starts (from the epochs, else from the base config)."""
    bounds = stage_boundaries(epochs)
    if not bounds:
        e1 = (study.meta.get("base_config") or {}).get("stage1", {}).get("epochs")
        bounds = [float(e1) + 0.5] if e1 else []
    for b in bounds:
        fig.add_vline(x=b, line_dash="dot", line_color="gray",
                      annotation_text="stage 1 | stage 2" if len(bounds) == 1
                      else f"stage 2 from epoch {int(b + 0.5)}",
                      annotation_position="top")


def _curve_legend(fig: go.Figure, study: StudyResults, labels: dict, present: list,
                  n_configs: int, seeds: list) -> dict[str, Any]:
    """The legend's layout: beside the plot, or below it in columns (a taller figure) when
    its entries are many or long."""
    legend_title = curve_legend_title(study) + \
        (" (colour); seed (line style)" if len(seeds) > 1 else "")
    legend: dict[str, Any] = {"title": {"text": legend_title}}
    entries = n_configs + (len(seeds) if len(seeds) > 1 else 0)
    if entries > 9 or max((len(labels.get(t, t)) for t in present), default=0) > 28:
        # Many or long entries go below the plot, in columns, not beside it.
        legend.update({"orientation": "h", "yanchor": "top", "y": -0.16, "xanchor": "left",
                       "x": 0})
        fig.update_layout(height=520 + 24 * math.ceil(entries / 5))
    return legend


def learning_curves_summary(study: StudyResults, metric: str = "acc_all") -> go.Figure:
    """The learning curves of a study of many trials: per global epoch the median over the
    trials that reached it and the band between CURVE_BAND's percentiles, beside the curve
    of the best trial by the selection metric; the same menu of metrics. The title says
    that it is a summary and of how many trials."""
    epochs = study.epochs
    done = study.finished
    epochs = epochs[epochs["trial_id"].isin(set(done["trial_id"]))]
    metrics = [m for m in CURVE_METRICS if m in epochs.columns and
               pd.to_numeric(epochs[m], errors="coerce").notna().any()]
    by_epoch = {m: pd.DataFrame({"epoch": pd.to_numeric(epochs["epoch"], errors="coerce"),
                                 "y": _curve_y(epochs, m)}).groupby("epoch")["y"]
                for m in metrics}
    x = np.array(sorted(pd.to_numeric(epochs["epoch"], errors="coerce").dropna().unique()))
    low, high = CURVE_BAND
    sel = selection_metric(study)
    values = pd.to_numeric(done[sel], errors="coerce") if sel in done.columns else None
    best_id = None
    if values is not None and values.notna().any():
        best_id = done.loc[values.idxmin() if study.mode == "min" else values.idxmax(),
                           "trial_id"]
    best = epochs[epochs["trial_id"] == best_id].sort_values("epoch")

    def traces(m: str) -> list[np.ndarray]:
        g = by_epoch[m]
        return [g.quantile(low / 100).reindex(x).to_numpy(float),
                g.quantile(high / 100).reindex(x).to_numpy(float),
                g.median().reindex(x).to_numpy(float), _curve_y(best, m)]

    ys = {m: traces(m) for m in metrics}
    first = ys.get(metric) or traces(metrics[0])
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=first[0], mode="lines", line={"width": 0},
                             showlegend=False, hoverinfo="skip", name=f"{low}th percentile"))
    fig.add_trace(go.Scatter(x=x, y=first[1], mode="lines", line={"width": 0}, fill="tonexty",
                             fillcolor=_rgba(COLORS["many"], 0.2),
                             name=f"{low}th-{high}th percentile of the trials"))
    fig.add_trace(go.Scatter(x=x, y=first[2], mode="lines+markers",
                             line={"color": COLORS["many"], "width": 2},
                             name="median of the trials"))
    if best_id is not None:
        fig.add_trace(go.Scatter(x=best["epoch"].to_numpy(), y=first[3], mode="lines+markers",
                                 line={"color": "#d62728", "width": 2},
                                 name=f"best trial by {sel} ({best_id})"))
    for b in stage_boundaries(epochs):
        fig.add_vline(x=b, line_dash="dot", line_color="gray", annotation_position="top",
                      annotation_text=f"stage 2 from epoch {int(b + 0.5)}")
    n = done["trial_id"].isin(set(epochs["trial_id"])).sum()
    buttons = [{"label": _button_label(m), "method": "update",
                "args": [{"y": ys[m][:4 if best_id is not None else 3]},
                         {"yaxis.title.text": _curve_axis_title(m)}]} for m in metrics]
    fig.update_layout(
        title=f"{study.name}: learning curves over both stages<br><sup>a summary of {n} "
              f"trials (over {MAX_CURVES}: one curve each would not be readable): the median "
              f"per epoch and the band from the {low}th to the {high}th percentile, with the "
              "best trial's curve</sup>",
        xaxis_title="epoch (stage 1, then stage 2)", yaxis_title=_curve_axis_title(metric),
        template=TEMPLATE, margin={"t": 90},
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "xanchor": "right",
                      "y": 1.02, "yanchor": "bottom", "showactive": True,
                      "active": metrics.index(metric) if metric in metrics else 0}])
    fig.update_xaxes(**epoch_ticks(float(x.max()) if len(x) else 1.0))
    return fig


def _button_label(metric: str) -> str:
    if metric == "train_loss":
        return "train loss"
    group = metric.removeprefix("val_").removeprefix("acc_")
    return f"{group} (val)" if metric.startswith("val_") else group


def _seed_of(row: pd.Series) -> Any:
    v = row.get(SEED) if SEED in row.index else None
    if _missing(v):
        return None
    return int(v) if isinstance(v, (float, np.floating)) and float(v).is_integer() else v


def _seed_order(seed: Any) -> tuple[int, str]:
    return (0, f"{seed:012d}") if isinstance(seed, int) else (1, str(seed))


def _sort_key(study: StudyResults, row: pd.Series, params: Sequence[str]) -> tuple:
    out = []
    for p in params:
        declared = study.declared_values(p) or []
        v = row[p]
        hit = next((i for i, d in enumerate(declared) if fmt_value(d) == fmt_value(v)), None)
        if hit is not None:
            out.append((0, hit, ""))
        elif isinstance(v, (int, float, np.number)) and not _missing(v):
            out.append((1, float(v), ""))
        else:
            out.append((2, 0, str(v)))
    return tuple(out)


def _palette(n: int) -> list[str]:
    import plotly.colors as pc

    base = pc.qualitative.Plotly + pc.qualitative.D3 + pc.qualitative.Set2
    if n > len(pc.qualitative.Plotly):
        base = pc.qualitative.Dark24 + pc.qualitative.Light24
    return [base[i % len(base)] for i in range(n)]


# ---- per-class accuracy -------------------------------------------------------------------
SHOT_EDGES = (19.5, 100.5)  # few n < 20 ≤ medium ≤ 100 < many
SHOT_RULES = {"many": "n > 100", "medium": "20 ≤ n ≤ 100", "few": "n < 20"}


def per_class_figure(results: Mapping[Any, Any], title: str = "per-class test accuracy",
                     reference: Mapping[Any, Any] | None = None,
                     reference_label: str = "reference") -> go.Figure:
    """Per-class top-1 accuracy against the class's training count (log x): where the tail
    gains are. `results`: one result (per_class_acc, class_counts, optional class_names),
    or a mapping seed → result of one configuration. Classes are coloured by shot group
    with the group's class count in the legend; with several seeds each class shows the
    mean over seeds with the seeds' range as a bar and each seed as a small point.
    `reference` (same forms) is drawn as grey diamonds: its mean per class."""
    runs = _runs(results)
    counts, names, acc = _per_class_matrix(runs)
    from lfm_ray.data.counts import shot_groups

    mean = np.nanmean(acc, axis=0) if len(runs) > 1 else acc[0]
    low, high = np.nanmin(acc, axis=0), np.nanmax(acc, axis=0)
    fig = go.Figure()
    seeds = list(runs)
    for g, idx in shot_groups(counts).items():
        if not len(idx):
            continue
        k = len(idx)
        fig.add_trace(go.Scatter(
            x=counts[idx], y=mean[idx], mode="markers",
            name=f"{g}: {k} class{'es' if k != 1 else ''} ({SHOT_RULES[g]})",
            legendgroup=g, marker={"color": COLORS[g], "size": 10,
                                   "line": {"color": "white", "width": 1}},
            error_y={"type": "data", "symmetric": False, "array": high[idx] - mean[idx],
                     "arrayminus": mean[idx] - low[idx], "visible": len(runs) > 1,
                     "color": COLORS[g], "thickness": 1.2, "width": 3},
            text=[names[i] for i in idx],
            hovertemplate="%{text}: %{y:.1f} %" + (" (mean over seeds)" if len(runs) > 1 else "")
                          + " (n=%{x})<extra></extra>"))
        if len(runs) > 1:
            xs = np.tile(counts[idx], len(runs))
            fig.add_trace(go.Scatter(
                x=xs * 1.04, y=acc[:, idx].reshape(-1), mode="markers", legendgroup=g,
                showlegend=False, name=f"{g}: seeds",
                marker={"color": COLORS[g], "size": 4, "opacity": 0.6},
                text=[f"{names[i]}, {seeds_text([s])}" for s in seeds for i in idx],
                hovertemplate="%{text}: %{y:.1f} %<extra></extra>"))
    if reference:
        ref_runs = _runs(reference)
        ref_counts, _, ref_acc = _per_class_matrix(ref_runs)
        if len(ref_counts) == len(counts):
            fig.add_trace(go.Scatter(
                x=ref_counts * 0.96, y=np.nanmean(ref_acc, axis=0), mode="markers",
                name=reference_label, text=names,
                marker={"symbol": "diamond-open", "color": "#666", "size": 9},
                hovertemplate=f"{html.escape(reference_label)}<br>%{{text}}: %{{y:.1f}} %"
                              "<extra></extra>"))
    for edge, text in zip(SHOT_EDGES, ("few | medium", "medium | many")):
        # Shapes take data coordinates, annotations on a log axis take log10 of them.
        if counts.min() < edge < counts.max() * 1.5 or counts.min() / 1.5 < edge < counts.max():
            fig.add_vline(x=edge, line_dash="dot", line_color="gray")
            fig.add_annotation(x=math.log10(edge), xref="x", y=1.0, yref="paper", text=text,
                               showarrow=False, yanchor="bottom")
    low, high = float(counts.min()) / 1.3, float(counts.max()) * 1.3
    fig.update_xaxes(type="log", title="training images of the class (log scale)",
                     range=[math.log10(low), math.log10(high)], **log_ticks(low, high))
    fig.update_layout(title=title, yaxis_title=f"test {PERCENT}", template=TEMPLATE,
                      yaxis_range=[-3, 103], legend_title="shot group", margin={"t": 100})
    return fig


def _runs(results: Mapping[Any, Any]) -> dict[Any, Mapping[str, Any]]:
    runs = {None: results} if "per_class_acc" in results else dict(results)
    if not runs:
        raise LfmError("per_class_figure needs at least one result with per_class_acc")
    return runs


def _per_class_matrix(runs: Mapping[Any, Mapping[str, Any]]
                      ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(class counts, class names, accuracy in percent: one row per run)."""
    first = next(iter(runs.values()))
    counts = np.asarray(first["class_counts"], dtype=float)
    names = list(first.get("class_names") or [str(i) for i in range(len(counts))])
    rows = []
    for label, result in runs.items():
        acc = np.asarray(result["per_class_acc"], dtype=float) * 100
        if len(acc) != len(counts) or len(result["class_counts"]) != len(counts):
            raise LfmError(f"per-class accuracy of {label!r} has {len(acc)} classes but the "
                           f"class counts {len(counts)}; the runs of one figure must share "
                           "their classes")
        rows.append(acc)
    return counts, names, np.vstack(rows)


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
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.22, subplot_titles=(
        f"sampling matrix P{tau_text}",
        f"{split} confusion ({'fraction of the row' if normalize else 'images'})"))
    fig.add_trace(go.Heatmap(
        z=P, x=idx, y=idx, colorscale="Blues", text=pair_names, name="P",
        colorbar={"x": 0.40, "xanchor": "left", "len": 0.9, "thickness": 14, "title": "P"},
        hovertemplate="%{text}: P = %{z:.4f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Heatmap(
        z=shown, x=idx, y=idx, colorscale="Reds", text=pair_names, customdata=n,
        name="confusion", colorbar={"x": 1.0, "xanchor": "left", "len": 0.9, "thickness": 14,
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
        title=f"{run}:{'<br>' if len(run) > 45 else ' '}sampling matrix P beside the "
              f"{split} confusion matrix{when}",
        margin={"t": 100 + 24 * (run.count("<br>") + (len(run) > 45))}, template=TEMPLATE,
        height=max(520, min(1400, 260 + 14 * C)),
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
    one curve, or one per label of a mapping (data sets, seeds, the other parameter's
    values); the parameter's symbol and scale on x, ticks at its values (a log axis where
    they span decades, τ); the training counts' own γ dashed."""
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
            hovertemplate=f"{html.escape(str(label))}<br>{html.escape(param_label(param))} = "
                          "%{x:g}: γ′ = %{y:.2f}<extra></extra>"))
    if imbalance is not None:
        fig.add_hline(y=float(imbalance), line_dash="dash", line_color="gray",
                      annotation_text=f"training counts: γ = {float(imbalance):.1f}",
                      annotation_position="top left")
    log = use_log_axis(x)
    fig.update_xaxes(title=axis_title(param, log), type="log" if log else "linear",
                     **value_ticks(x))
    fig.update_layout(
        title=title or f"effective imbalance factor γ′ against {param_label(param)}",
        yaxis_title="effective imbalance factor γ′ (max/min label mass)",
        template=TEMPLATE, showlegend=len(curves) > 1)
    return fig
