"""A grid study as a trade-off front in two metrics (`lfm-ray report NAME --front
acc_many,acc_few`): the α sweep's many- against few-shot accuracy as one figure.

Each configuration (the swept values, seeds pooled) is a point at its two means over seeds,
with the 95 % t-interval of each mean as its error bars. The front by means (no other
configuration at least as good in both metrics and better in one) is drawn as a line. A
configuration is *named* as non-dominated only where the seeds allow it: against every
other configuration it must be better at 95 % in at least one of the two metrics (by the
report's own rule, `better_than_rest`: the paired t-interval over shared seeds, else
non-overlapping intervals), so that no other configuration can be at least as good in both.
A front point that fails this is drawn but not named, and the caption says so.
"""

from __future__ import annotations

from typing import Any, Sequence

import plotly.graph_objects as go

from lfm_ray.analysis.figures import describe
from lfm_ray.analysis.load import StudyResults, better_than_rest, seed_values, t_interval
from lfm_ray.errors import LfmError
from lfm_ray.study.seed_stats import non_dominated


def parse_front(text: str, study: StudyResults) -> tuple[str, str]:
    """"acc_many,acc_few" -> two metrics the study's finished trials have; one LfmError
    otherwise."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    known = [c for c in study.finished.columns if c.startswith(("acc_", "val_acc_"))]
    if len(parts) != 2 or parts[0] == parts[1]:
        raise LfmError(f"--front {text!r}: give two different metrics, e.g. acc_many,acc_few")
    for p in parts:
        if p not in known:
            raise LfmError(f"--front: study {study.name!r} has no metric {p!r}; it has "
                           f"{', '.join(known) or 'none'}")
    return parts[0], parts[1]


def front_points(study: StudyResults, x: str, y: str, params: Sequence[str]
                 ) -> list[dict[str, Any]]:
    """Per configuration of `params`: its label, means and intervals (%), seeds, whether it
    is on the front by means, and whether it is named (non-dominated at 95 %)."""
    sign = -1.0 if study.mode == "min" else 1.0
    by = list(params)
    vx, sx = seed_values(study.finished, by, x)
    vy, sy = seed_values(study.finished, by, y)
    points = []
    for key in vx:
        ix, iy = t_interval(vx[key]), t_interval(vy[key])
        points.append({"key": key, "label": describe(dict(zip(by, key)), 3) or "all trials",
                       "x": ix[0] * 100, "x_low": ix[1] * 100, "x_high": ix[2] * 100,
                       "y": iy[0] * 100, "y_low": iy[1] * 100, "y_high": iy[2] * 100,
                       "n": len(vx[key])})
    front = set(non_dominated({i: (p["x"], p["y"]) for i, p in enumerate(points)}, sign))
    for i, p in enumerate(points):
        p["front"] = i in front
        p["named"], p["against"] = False, None
    if study.incomplete:
        return points  # an interrupted study names nothing
    for p in points:
        if not p["front"]:
            continue
        for q in points:
            if q is p:
                continue
            wins = []
            for values, seeds in ((vx, sx), (vy, sy)):
                sep = better_than_rest({"p": values[p["key"]], "q": values[q["key"]]},
                                       {"p": seeds[p["key"]], "q": seeds[q["key"]]},
                                       mode=study.mode)
                wins.append(sep.best == "p" and sep.separated)
            if not any(wins):
                p["against"] = q["label"]
                break
        else:
            p["named"] = len(points) > 1
    return points


def front_view(study: StudyResults, x: str, y: str, params: Sequence[str]
               ) -> tuple[go.Figure, str]:
    """The figure and its caption."""
    points = front_points(study, x, y, params)
    fig = go.Figure()
    err = {"type": "data", "visible": True}
    fig.add_trace(go.Scatter(
        x=[p["x"] for p in points], y=[p["y"] for p in points], mode="markers",
        name="configuration (mean over seeds)", marker={"size": 10, "color": "#1f77b4"},
        error_x={**err, "array": [p["x_high"] - p["x"] for p in points],
                 "arrayminus": [p["x"] - p["x_low"] for p in points]},
        error_y={**err, "array": [p["y_high"] - p["y"] for p in points],
                 "arrayminus": [p["y"] - p["y_low"] for p in points]},
        text=[p["label"] for p in points],
        customdata=[[p["n"]] for p in points],
        hovertemplate=f"%{{text}}<br>{x} %{{x:.2f}} %<br>{y} %{{y:.2f}} %<br>"
                      "%{customdata[0]} seeds<extra></extra>"))
    front = sorted((p for p in points if p["front"]), key=lambda p: p["x"])
    fig.add_trace(go.Scatter(x=[p["x"] for p in front], y=[p["y"] for p in front],
                             mode="lines", line={"dash": "dash", "color": "#888"},
                             name="front of the means", hoverinfo="skip"))
    named = [p for p in front if p["named"]]
    if named:
        fig.add_trace(go.Scatter(
            x=[p["x"] for p in named], y=[p["y"] for p in named], mode="markers+text",
            text=[p["label"] for p in named], textposition="top center",
            marker={"symbol": "star", "size": 16, "color": "black"},
            name="non-dominated at 95 %", hoverinfo="skip"))
    seeds = sorted({p["n"] for p in points})
    n_text = f"{seeds[0]} seeds" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]} seeds"
    fig.update_layout(
        title=f"{study.name}: {y} against {x} (%), each configuration's mean over {n_text}, "
              "error bars the 95 % t-interval",
        xaxis_title=f"{x} (%)", yaxis_title=f"{y} (%)", template="plotly_white")
    unnamed = [p for p in front if not p["named"]]
    if study.incomplete:
        caption = ("The study is INCOMPLETE: the points are the trials that finished, and no "
                   "configuration is named non-dominated.")
    elif max(seeds) < 2:
        caption = ("One seed per configuration: no interval, so no configuration is named "
                   "non-dominated; the dashed line joins the non-dominated means.")
    else:
        caption = ("Stars: non-dominated at 95 % (against every other configuration, better "
                   "in at least one of the two metrics by the paired t-interval over shared "
                   "seeds). Dashed: the front of the means.")
        if unnamed:
            caption += " On the front of the means but not named: " + "; ".join(
                f"{p['label']} (not separated from {p['against']} in either metric)"
                for p in unnamed) + "."
    return fig, caption


__all__ = ["front_points", "front_view", "parse_front"]
