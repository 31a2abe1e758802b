"""Several studies side by side: the configurations they share, each one's metric with its
seed interval per study, and what differs between the studies' base configurations.

    from lfm_ray.analysis.compare import write_comparison
    html_path, text = write_comparison(["results/tau_sweep", "results/tau_sweep_vitb16"])

A configuration is the values of every parameter any of the studies swept (the seed left
out); a study that did not sweep a parameter ran its base configuration's value (study.json
`base_config`), so "τ = 0.05" of a τ sweep at α = 1 is the same configuration as
"τ = 0.05, α = 1" of a τ × α grid. A configuration is shared when every study ran it.
Intervals are the two-sided 95 % Student-t interval of the mean over the configuration's
finished seeds, as in the single-study report. An interrupted study is compared like the
single-study report shows it: marked INCOMPLETE, with only its finished trials.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from lfm_ray.analysis.figures import describe, fmt_value
from lfm_ray.analysis.load import SEED, StudyResults, config_key, load_study, t_interval
from lfm_ray.analysis.report import STYLE, interval_text, varying_params
from lfm_ray.errors import LfmError

# What a reader asks first of two studies: the fields shown in every comparison, by label.
HEADLINE = {"data set": "data.name", "backbone": "model.name", "preset": "layers.preset",
            "commit": "versions.git_commit", "search": "search", "seeds": "seeds",
            "selection metric": "metric"}


@dataclass
class Comparison:
    """The studies, the parameters that define a configuration, per study per
    configuration (mean, low, high, n) of `metric` in percent, and the base differences."""

    studies: list[StudyResults]
    params: list[str]
    metric: str
    cells: dict[tuple, list[tuple[float, float, float, int] | None]]
    shared: list[tuple]
    headline: pd.DataFrame      # rows: HEADLINE labels; columns: study names
    differences: pd.DataFrame   # rows: dotted base-config fields that differ


def _flat(meta: dict[str, Any]) -> dict[str, Any]:
    """study.json as dotted keys (base_config's fields by their own dotted names)."""
    flat = pd.json_normalize({k: v for k, v in meta.items() if k != "base_config"},
                             sep=".").iloc[0].to_dict() if meta else {}
    base = pd.json_normalize(meta.get("base_config") or {}, sep=".")
    if len(base.columns):
        flat.update({f"base.{k}": v for k, v in base.iloc[0].to_dict().items()})
        flat.setdefault("data.name", flat.get("base.data.name"))
        flat.setdefault("model.name", flat.get("base.model.name"))
    return flat


def _shown(value: Any, unset: str = "not recorded") -> str:
    """A study.json value as text; `unset` for a field recorded as null."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return unset
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt_value(v) for v in value)
    return fmt_value(value)


def _load(path: str | os.PathLike) -> StudyResults:
    if not Path(os.fspath(path)).expanduser().exists() and "://" not in os.fspath(path):
        raise LfmError(f"no study at {os.fspath(path)!r}: expected results/<name>/ "
                       "(study.json + trials.csv), a Tune experiment directory or a trials CSV")
    study = load_study(path)
    study.require_finished()
    return study


def compare_studies(paths: Sequence[str | os.PathLike], metric: str | None = None
                    ) -> Comparison:
    """Load the studies (each must exist and have finished trials) and line them up."""
    if len(paths) < 2:
        raise LfmError("give two or more studies to compare")
    studies = [_load(p) for p in paths]
    names = [s.name for s in studies]
    if len(set(names)) < len(names):
        names = [f"{s.name} ({Path(str(s.path)).parent.name})" for s in studies]
        for s, n in zip(studies, names):
            s.name = n
    metric = metric or _common_metric(studies)
    for s in studies:
        if metric not in s.finished.columns:
            raise LfmError(f"study {s.name!r} has no metric {metric!r}; give --metric with one "
                           "every study has (acc_all, acc_many, acc_medium, acc_few)")
    params = list(dict.fromkeys(p for s in studies for p in varying_params(s) if p != SEED))
    flats = [_flat(s.meta) for s in studies]
    cells: dict[tuple, list[tuple[float, float, float, int] | None]] = {}
    for i, (s, flat) in enumerate(zip(studies, flats)):
        done = s.finished.copy()
        for p in params:
            if p not in done.columns:  # not swept: its base configuration's value
                done[p] = flat.get(f"base.{p}")
        groups: dict[tuple, list[int]] = {}
        for j, (_, row) in enumerate(done.iterrows()):
            groups.setdefault(config_key(row, params), []).append(j)
        for key, idx in groups.items():
            values = pd.to_numeric(done[metric].iloc[idx], errors="coerce").dropna()
            values = values.to_numpy(float) * 100
            if not len(values):
                continue
            mean, low, high = t_interval(values)
            cells.setdefault(key, [None] * len(studies))[i] = (mean, low, high, len(values))
    shared = [k for k, v in cells.items() if all(c is not None for c in v)]
    headline = pd.DataFrame({n: [_shown(f.get(field), "none" if field in f else "not recorded")
                                 for field in HEADLINE.values()]
                             for n, f in zip(names, flats)}, index=list(HEADLINE))
    keys = sorted({k for f in flats for k in f if k.startswith("base.")})
    diff_rows = {k.removeprefix("base."): [_shown(f.get(k)) for f in flats] for k in keys
                 if len({_shown(f.get(k)) for f in flats}) > 1}
    differences = pd.DataFrame(diff_rows, index=names).T if diff_rows else \
        pd.DataFrame(columns=names)
    return Comparison(studies, params, metric, cells, shared, headline, differences)


def _common_metric(studies: list[StudyResults]) -> str:
    """The selection metric when every study selected on the same one, else acc_all (test),
    which every study reports."""
    chosen = {s.metric for s in studies}
    return chosen.pop() if len(chosen) == 1 else "acc_all"


def label(comp: Comparison, key: tuple) -> str:
    return describe(dict(zip(comp.params, key)), 3) or "the one configuration"


def _cell_text(cell: tuple[float, float, float, int] | None) -> str:
    if cell is None:
        return "not run"
    mean, low, high, n = cell
    if n < 2:
        return f"{mean:.2f} (one seed, no interval)"
    return f"{mean:.2f}, 95 % t-interval {interval_text(low, high)} (n={n})"


def _state(study: StudyResults) -> str:
    return " — INCOMPLETE" if study.incomplete else ""


def summary_text(comp: Comparison) -> str:
    """The comparison as plain lines (what `lfm-ray compare` prints)."""
    names = [s.name + _state(s) for s in comp.studies]
    lines = [f"Comparing {len(names)} studies on {comp.metric} (%, mean over seeds, 95 % "
             "t-interval): " + "; ".join(names)]
    for s in comp.studies:
        if s.incomplete:
            lines.append(f"INCOMPLETE: {s.name} has {len(s.incomplete)} unfinished trial(s); "
                         "its figures are from the trials that finished")
    lines.append("Base configurations:")
    for row, values in comp.headline.iterrows():
        same = len(set(values)) == 1
        lines.append(f"  {row}: " + (f"{values.iloc[0]} (all)" if same else
                                     "; ".join(f"{n}: {v}" for n, v in values.items())))
    n_diff = len(comp.differences)
    lines.append(f"  {n_diff} base-configuration field(s) differ" +
                 (": " + ", ".join(comp.differences.index[:12]) +
                  (" ..." if n_diff > 12 else "") if n_diff else ""))
    if not comp.shared:
        lines.append("No configuration is shared by every study.")
    else:
        lines.append(f"{len(comp.shared)} shared configuration(s):")
        for key in comp.shared:
            lines.append(f"  {label(comp, key)}: " + "; ".join(
                f"{s.name} {_cell_text(c)}" for s, c in zip(comp.studies, comp.cells[key])))
    only = len(comp.cells) - len(comp.shared)
    if only:
        lines.append(f"{only} configuration(s) ran in some studies only (in the HTML table).")
    return "\n".join(lines)


def comparison_figure(comp: Comparison) -> go.Figure:
    """Per shared configuration, each study's mean with its 95 % t-interval."""
    fig = go.Figure()
    keys = comp.shared or list(comp.cells)
    x = [label(comp, k) for k in keys]
    for i, s in enumerate(comp.studies):
        cells = [comp.cells[k][i] for k in keys]
        y = [c[0] if c else None for c in cells]
        plus = [c[2] - c[0] if c and c[3] > 1 else None for c in cells]
        minus = [c[0] - c[1] if c and c[3] > 1 else None for c in cells]
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="markers", name=s.name + _state(s),
            marker={"size": 11}, offsetgroup=str(i),
            error_y={"type": "data", "array": plus, "arrayminus": minus, "visible": True},
            customdata=[[c[3] if c else 0] for c in cells],
            hovertemplate="%{x}<br>%{y:.2f} %, %{customdata[0]} seeds<extra>" +
                          html.escape(s.name) + "</extra>"))
    what = "shared configurations" if comp.shared else \
        "configurations (none is shared by every study)"
    fig.update_layout(
        title=f"{comp.metric} (%) per study, {what}: mean over seeds, error bars the 95 % "
              "t-interval (none with one seed)",
        scattermode="group", yaxis_title=f"{comp.metric} (%)", template="plotly_white",
        legend_title="study")
    return fig


def _table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr><th>" + html.escape(str(i)) + "</th>" + "".join(
        f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for i, row in df.iterrows())
    return f"<div class='scroll'><table><tr><th></th>{head}</tr>{body}</table></div>"


def render_comparison(comp: Comparison) -> str:
    names = [s.name for s in comp.studies]
    banners = "".join(
        f"<div class='incomplete'><b>INCOMPLETE</b> — study {html.escape(s.name)} has "
        f"{len(s.incomplete)} unfinished trial(s); its values are from the trials that "
        "finished, not from the study it set out to be.</div>" for s in comp.studies
        if s.incomplete)
    rows = {label(comp, k) + ("" if k in comp.shared else " (not in every study)"):
            [_cell_text(c) for c in comp.cells[k]]
            for k in [*comp.shared, *[k for k in comp.cells if k not in comp.shared]]}
    per_config = pd.DataFrame(rows, index=[n + _state(s) for n, s in
                                           zip(names, comp.studies)]).T
    fig = pio.to_html(comparison_figure(comp), include_plotlyjs=True, full_html=False)
    diffs = (_table(comp.differences) if len(comp.differences) else
             "<p>The base configurations are the same.</p>")
    text = html.escape(summary_text(comp))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Comparison: "
            f"{html.escape(', '.join(names))}</title><style>{STYLE}</style></head><body>"
            f"<h1>Comparison: {html.escape(' · '.join(names))}</h1>{banners}"
            f"<h2>What differs between the studies</h2>{_table(comp.headline)}"
            f"<p class='caption'>Every base-configuration field that differs:</p>{diffs}"
            f"<h2>{html.escape(comp.metric)} per configuration</h2>"
            f"<div class='fig'>{fig}</div>{_table(per_config)}"
            f"<p class='caption'>Values in %: mean over the configuration's finished seeds "
            "and its two-sided 95 % Student-t interval. A parameter a study did not sweep "
            "takes its base configuration's value.</p>"
            f"<h2>Summary</h2><pre>{text}</pre></body></html>")


def write_comparison(paths: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
                     metric: str | None = None) -> tuple[Path, str]:
    """Write the comparison's HTML (default compare.html here) and its text summary beside it
    (.txt); returns (HTML path, summary)."""
    comp = compare_studies(paths, metric)
    target = Path(out) if out else Path.cwd() / "compare.html"
    if target.suffix.lower() not in (".html", ".htm"):
        raise LfmError(f"--out {str(target)!r} must name an .html file")
    target.parent.mkdir(parents=True, exist_ok=True)
    text = summary_text(comp)
    for path, content in ((target, render_comparison(comp)),
                          (target.with_suffix(".txt"), text + "\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    return target, text


__all__ = ["Comparison", "compare_studies", "comparison_figure", "summary_text",
           "write_comparison"]
