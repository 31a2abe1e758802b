"""One self-contained HTML report per study, and a PNG of each headline figure beside it.

`write_report(study_dir)` is what `lfm-ray report` and every studies/ script call at the end.
The page embeds plotly.js once, so it opens with no network. It starts with the study's
record (what was selected on which split, the grid or search space, seeds, trials, time,
machine, versions), then the best configuration and whether it is better than the others
at the seeds run, the results table, the figures that fit the study (ablation curves for
swept numbers, the comparison table and bars for swept categories, Optuna's views for
Optuna and random searches, per-class accuracy of the best configuration, the sampling
matrix P beside a confusion matrix, γ′ against a swept α or τ, learning curves), and the
failed trials, every trial, and the configuration with the fields the study set.

Per-trial data comes from the study's copies (`results/<name>/trials/<id>/`) first, so a
results folder renders the same wherever it is; no absolute path is printed.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from lfm_ray.analysis.figures import (
    NO_BEST, ablation_figure, comparison_figure, comparison_html, comparison_table,
    comparison_table_figure, describe, effective_imbalance_figure, facet_of, fmt_value,
    only_facets,
    learning_curves_figure, param_label, per_class_figure, sampling_confusion_figure,
    seeds_text, selection_metric, selection_text, separation, setting, table_caption,
    verdict_text,
)
from lfm_ray.analysis.load import (
    DONE, METRICS, SEED, VAL_METRICS, StudyResults, aggregate, best_row, config_key,
    is_numeric_param, load_study, shown_path, trial_confusion, trial_result,
)
from lfm_ray.analysis.power import detectable_text
from lfm_ray.config import flatten
from lfm_ray.errors import LfmError

CHROMES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
# Figures not exported as PNG (they are for exploring in the page, not for a slide).
NOT_HEADLINE = ("learning_curves",)
# Figures only written as PNG (the page shows the same as an HTML table).
PNG_ONLY = ("comparison_table",)
TITLES = {
    "comparison_table": "Comparison table", "comparison": "Accuracy per configuration",
    "learning_curves": "Learning curves", "per_class": "Per-class accuracy against training count",
    "sampling_confusion": "Sampling matrix P beside a confusion matrix",
    "optuna_history": "Optimisation history", "optuna_importance": "Parameter importance",
    "optuna_parallel": "Parallel coordinates", "optuna_pareto": "Pareto front",
}
# α and τ parameters whose sweep gets a γ′ figure (lfm_ray.effective).
GAMMA_PARAMS = ("mix.alpha", "mix.tau", "stage1.alpha", "stage1.tau", "stage2.alpha",
                "stage2.tau")
TOP_K = 10


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


def varying_params(study: StudyResults) -> list[str]:
    """The swept parameters (seed excluded) that take more than one value among the
    finished trials: what defines a configuration."""
    done = study.finished
    return [p for p in study.params if done[p].nunique(dropna=False) > 1]


@dataclass
class Best:
    """The best configuration by the selection metric: its values, finished trials and
    whether it is better than the rest (Separation)."""

    keys: dict[str, Any]
    rows: pd.DataFrame
    separation: Any
    metric: str

    @property
    def label(self) -> str:
        return describe(self.keys, 3) or "the one configuration"

    def label_without(self, facet: str | None) -> str:
        return describe({k: v for k, v in self.keys.items() if k != facet}, 3) or self.label

    @property
    def seeds(self) -> list[Any]:
        if SEED not in self.rows.columns:
            return []
        return sorted(int(s) if float(s).is_integer() else s
                      for s in self.rows[SEED].dropna().unique())


def runs_text(rows: pd.DataFrame) -> str:
    """"seeds 0, 1, 2", or "trial <id>" for trials without a seed (a search's)."""
    seeds = rows[SEED].dropna().tolist() if SEED in rows.columns else []
    if len(seeds) == len(rows) and seeds:
        return seeds_text(sorted(int(s) if float(s).is_integer() else s for s in seeds))
    ids = rows["trial_id"].astype(str).tolist()
    return ("trial " if len(ids) == 1 else "trials ") + ", ".join(ids)


def wrap(text: str, width: int = 95) -> str:
    """A long title line broken at ", " into lines of about `width` characters (<br>)."""
    lines, line = [], ""
    for part in text.split(", "):
        if line and len(line) + len(part) + 2 > width:
            lines.append(line + ",")
            line = part
        else:
            line = f"{line}, {part}" if line else part
    return "<br>".join([*lines, line])


def study_facet(study: StudyResults) -> str | None:
    """The parameter (imbalance factor, data set) whose values are never compared with
    each other: each has its own best configuration (a study that varies nothing else has
    one configuration per value)."""
    if study.search != "grid":
        return None
    params = varying_params(study)
    return facet_of(params) or (params[0] if len(params) == 1 and only_facets(params) else None)


def facet_values(study: StudyResults) -> list[Any]:
    """The facet's values in the study's declared order ([None] without a facet)."""
    facet = study_facet(study)
    if facet is None:
        return [None]
    seen = list(dict.fromkeys(study.finished[facet].tolist()))
    declared = study.declared_values(facet) or []
    return sorted(seen, key=lambda v: next((i for i, d in enumerate(declared)
                                            if fmt_value(d) == fmt_value(v)), len(declared)))


def _where(rows: pd.DataFrame, keys: dict[str, Any]) -> pd.DataFrame:
    for p, v in keys.items():
        rows = rows[rows[p].isna()] if pd.isna(v) else rows[rows[p] == v]
    return rows


def best_configuration(study: StudyResults, metric: str | None = None,
                       facet_value: Any = None) -> Best:
    """The configuration with the best mean of `metric` (default: the selection metric)
    over its seeds, within one value of the study's facet (imbalance factor, data set; the
    first when not given), and whether better_than_rest separates it from every other
    configuration there."""
    done = study.require_finished()
    metric = metric or selection_metric(study)
    params = varying_params(study)
    facet = study_facet(study)
    cache_key = ("best_configuration", metric, facet_value, id(study.trials), len(study.trials))
    if cache_key not in study.computed:
        study.computed[cache_key] = _best_configuration(study, done, metric, params, facet,
                                                        facet_value)
    return study.computed[cache_key]


def _best_configuration(study: StudyResults, done: pd.DataFrame, metric: str,
                        params: list[str], facet: str | None, facet_value: Any) -> Best:
    if facet is not None:
        value = facet_values(study)[0] if facet_value is None else facet_value
        done = _where(done, {facet: value})
    agg = aggregate(done, params, metrics=[metric], sort=False)
    best = agg.iloc[best_row(agg, metric, study.mode)]
    keys = {p: best[p] for p in params}
    return Best(keys, _where(done, keys), separation(study, done, params, metric), metric)


@dataclass
class Figures:
    """The report's figures by name, and a caption for each (what it shows, which trials)."""

    figs: dict[str, go.Figure] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)  # section titles beyond TITLES


def study_figures(study: StudyResults, params: Sequence[str] | None = None,
                  band: str = "auto") -> dict[str, go.Figure]:
    """Every figure that fits the study, headline figures first. `params`: the parameters
    to draw ablation curves for (default: every swept number of a grid study)."""
    return build_figures(study, params, band).figs


def build_figures(study: StudyResults, params: Sequence[str] | None = None,
                  band: str = "auto") -> Figures:
    """study_figures with each figure's caption."""
    done = study.require_finished()
    for p in params or []:
        study.require_param(p)
    out = Figures()
    numeric, categorical = kinds_of_params(study)
    if params:
        for p in params:
            out.figs[f"ablation_{p}"] = ablation_figure(study, p, band=band)
    elif study.search in ("optuna", "random"):
        from lfm_ray.analysis.optuna_views import importance_caveat, optuna_figures

        out.figs.update({f"optuna_{k}": v for k, v in optuna_figures(study).items()})
        if "optuna_importance" in out.figs:
            out.captions["optuna_importance"] = importance_caveat(study)
        axes = search_front_axes(study)
        if axes:
            from lfm_ray.analysis.front import front_view

            out.figs["front"], out.captions["front"] = front_view(study, *axes,
                                                                 varying_params(study))
            out.titles["front"] = f"Trade-off front: {axes[1]} against {axes[0]}"
    elif categorical:
        # Methods, losses, data sets (× imbalance factor): the paper's tables and bars.
        table = comparison_table(study)
        out.figs["comparison"] = comparison_figure(study)
        out.figs["comparison_table"] = comparison_table_figure(
            table, study.mode, title=f"{study.name}: top-1 test accuracy (%)")
    else:
        for p in numeric:
            out.figs[f"ablation_{p}"] = ablation_figure(study, p, band=band)
    for name, (fig, caption, title) in per_class_views(study).items():
        out.figs[name], out.captions[name], out.titles[name] = fig, caption, title
    confusion = confusion_view(study)
    if confusion is not None:
        out.figs["sampling_confusion"], out.captions["sampling_confusion"] = confusion
    gamma = [*numeric, *(params or [])] if study.search == "grid" else []
    for p in gamma:
        if p in GAMMA_PARAMS and f"gamma_{p}" not in out.figs:
            fig, caption = effective_imbalance_view(study, p)
            if fig is not None:
                out.figs[f"gamma_{p}"] = fig
            out.captions[f"gamma_{p}"] = caption
    if not study.epochs.empty and study.epochs["trial_id"].isin(done["trial_id"]).any():
        out.figs["learning_curves"] = learning_curves_figure(study)
    return out


def search_front_axes(study: StudyResults) -> tuple[str, str] | None:
    """A search's two objectives, drawn as its trade-off front (lfm_ray.analysis.front) when
    both are accuracies the trials report; None otherwise (one objective, or more than two:
    Optuna's own Pareto view stands alone then)."""
    objectives = study.objectives
    done = study.finished
    if study.search == "grid" or len(objectives) != 2:
        return None
    if not all(o.startswith(("acc_", "val_acc_")) and o in done.columns for o in objectives):
        return None
    return objectives[0], objectives[1]


# ---- per-class accuracy of the best configuration -----------------------------------------
def config_results(study: StudyResults, rows: pd.DataFrame) -> dict[Any, dict[str, Any]]:
    """seed → the trial's final result (per-class accuracy) for each finished trial of
    `rows` whose copy or checkpoint is reachable."""
    out: dict[Any, dict[str, Any]] = {}
    for _, row in rows.sort_values(SEED if SEED in rows.columns else "trial_id").iterrows():
        result = trial_result(study, row)
        if result is None:
            continue
        seed = row.get(SEED)
        key = row["trial_id"] if seed is None or pd.isna(seed) else \
            (int(seed) if float(seed).is_integer() else seed)
        out[key] = result
    return out


def per_class_views(study: StudyResults) -> dict[str, tuple[go.Figure, str, str]]:
    """name → (figure, caption, section title): per-class accuracy of the best
    configuration by the selection metric with every seed; one figure per imbalance factor
    or data set (their classes and counts differ), each named after it."""
    out = {}
    facet = study_facet(study)
    for value in facet_values(study):
        view = per_class_view(study, value)
        if view is None:
            continue
        if facet is None:
            out["per_class"] = (*view, TITLES["per_class"])
        else:
            out[f"per_class_{fmt_value(value)}"] = (
                *view, f"{TITLES['per_class']}, {setting(facet, value)}")
    return out


def per_class_view(study: StudyResults, facet_value: Any = None
                   ) -> tuple[go.Figure, str] | None:
    """Per-class accuracy of the best configuration (within `facet_value`), every seed."""
    best = best_configuration(study, facet_value=facet_value)
    runs = config_results(study, best.rows)
    if not runs:
        return None
    shown = best.rows[best.rows["trial_id"].isin(
        [r for r in best.rows["trial_id"] if _has_result(study, best.rows, r)])]
    who = runs_text(shown)
    how = "; mean over seeds with the seeds' range, each seed a small point" \
        if len(runs) > 1 else ""
    facet = study_facet(study)
    among = f" among the {setting(facet, facet_value)} runs" if facet else ""
    if study.search != "grid" and len(shown) == 1:  # a search: one trial per configuration
        name = f"trial {shown['trial_id'].iloc[0]}"
        chosen = f"the best trial by {selection_text(study)}"
        sub = f"{chosen}: {best.label}"
        said = f"{name}, {chosen} ({best.label})"
    else:
        name = best.label
        chosen = f"the highest mean {selection_text(study)}{among}"
        sub = f"{chosen}; {who}{how}"
        said = f"{name}, {chosen} over its seeds; {who}"
    title = (f"{study.name}: per-class test accuracy of {name}<br><sup>"
             + wrap(sub, 150) + "</sup>")
    reference, ref_label = None, ""
    _, categorical = kinds_of_params(study)
    params = varying_params(study)
    if categorical and study.search == "grid" and params:
        table = comparison_table(study, params)
        if facet:
            table = table[[fmt_value(v) == fmt_value(best.keys[facet]) for v in table[facet]]]
        first = {p: table[p].iloc[0] for p in params}
        if config_key(first, params) != config_key(best.keys, params):
            rows = _where(study.finished, first)
            reference = config_results(study, rows) or None
            if reference:
                ref_label = f"{describe(first, 3)} (first row of the table), mean of " \
                            f"{runs_text(rows)}"
    try:
        fig = per_class_figure(runs, title=title, reference=reference,
                               reference_label=ref_label)
    except LfmError as exc:
        study.notes.append(f"per-class accuracy not drawn: {exc}")
        return None
    fig.update_layout(margin={"t": 100 + 32 * title.split("<sup>")[1].count("<br>")})
    caption = (f"Shown: {said}. "
               + ("It is better than every other configuration at 95 %. "
                  if best.separation.separated else
                  f"Note: {NO_BEST}; it is shown as the highest value, not as a winner. "
                  + (f"Against the runner-up, {power}. " if (power := detectable_text(
                      best.separation)) else "")))
    if reference:
        caption += f"Grey diamonds: {ref_label}."
    return fig, caption


def _has_result(study: StudyResults, rows: pd.DataFrame, trial_id: str) -> bool:
    row = rows[rows["trial_id"] == trial_id].iloc[0]
    return trial_result(study, row) is not None


# ---- the sampling matrix P beside a confusion matrix --------------------------------------
def zero_shot_rows(study: StudyResults) -> pd.DataFrame:
    """The finished zero-shot trials (runtime.zero_shot, or a method whose variant sets it)."""
    done = study.finished
    if "runtime.zero_shot" in done.columns:
        return done[done["runtime.zero_shot"].map(lambda v: str(v).lower() in ("true", "1"))]
    if "method" in done.columns:
        variants = study.meta.get("variants") or {}
        zero = [m for m, v in variants.items() if (v or {}).get("runtime.zero_shot")]
        return done[done["method"].isin(zero)]
    return done.iloc[0:0]


def confusion_view(study: StudyResults) -> tuple[go.Figure, str] | None:
    """P beside the zero-shot run's confusion matrix where the study has a zero-shot trial
    (the paper's Fig. 7), else beside the best configuration's, its first seed."""
    zero = zero_shot_rows(study)
    params = varying_params(study)
    if not zero.empty:
        rows, which = zero, "the zero-shot run"
        keys = {p: zero.iloc[0][p] for p in params}
    else:
        best = best_configuration(study)
        rows, keys = best.rows, best.keys
        which = "the best configuration" + (
            f" among the {setting(study_facet(study), best.keys[study_facet(study)])} runs"
            if study_facet(study) else "")
    sort = SEED if SEED in rows.columns else "trial_id"
    for _, row in rows.sort_values(sort).iterrows():
        path = trial_confusion(study, row)
        if path is None:
            continue
        from lfm_ray import confusion

        try:
            saved = confusion.read(path)
        except (LfmError, OSError, ValueError, KeyError) as exc:
            study.notes.append(f"confusion matrix of trial {row['trial_id']} not read: {exc}")
            continue
        one = rows[rows["trial_id"] == row["trial_id"]]
        seed_part = runs_text(one) if runs_text(one).startswith("seed") else ""
        run = (describe(keys, 3) or "the one configuration") + f", {runs_text(one)}"
        if study.search != "grid":  # the parameters are in the caption
            which, run = f"the best trial by {selection_text(study)}", f"trial {row['trial_id']}"
        fig = sampling_confusion_figure(
            saved["sampling_matrix"], saved["counts"], saved["class_names"],
            run=wrap(f"{study.name}: {which} ({run})", 110),
            split=saved["split"], tau=saved["tau"], epoch=saved["epoch"])
        caption = (f"Left: LFM's sampling matrix P of {p_source_text(saved.get('source'))} "
                   "at the run's "
                   f"stage-1 τ = {saved['tau']:g} (row: the first image's class, column: "
                   f"the partner's). Right: the {saved['split']} confusion matrix of "
                   f"{which} ({', '.join(t for t in (describe(keys, 3), seed_part) if t)}"
                   f"{', ' if describe(keys, 3) or seed_part else ''}trial {row['trial_id']}, "
                   f"epoch {saved['epoch']}), each "
                   "row divided by its class's test images.")
        return fig, caption
    return None


def p_source_text(source: str | None) -> str:
    """What a confusion.npz's P was computed from, in words (its `source`: mix.similarity
    as the run resolved it; absent from files of earlier lfm-ray versions)."""
    if not source:
        return "the run's class similarity (its source is not recorded in confusion.npz)"
    kind, _, rest = source.partition(":")
    if kind == "text":
        return f"the text features of {rest}" if rest else "the text features"
    return {"uniform": "uniform partners (mix.similarity uniform)",
            "image-prototypes": "the image prototypes",
            "taxonomy": f"the taxonomy{' ' + shown_path(rest) if rest else ''}",
            "file": f"the similarity file {shown_path(rest)}"}.get(kind, source)


# ---- γ′ against a swept α or τ -----------------------------------------------------------
def effective_imbalance_view(study: StudyResults, param: str
                             ) -> tuple[go.Figure | None, str]:
    """γ′ (lfm_ray.effective) against the swept α or τ, from the class features of the
    study's text encoder (lfm_ray.text) built as the trainer builds it (torch.manual_seed(runtime.seed) first,
    which decides a randomly initialised model's text tower: one curve per seed then), the
    other parameters at the best configuration's values. (None, why) where the model's
    weights or the class counts are not at hand."""
    from lfm_ray.config import MIX_BETA, RunConfig
    from lfm_ray.effective import effective_imbalance_sweep, imbalance_factor
    from lfm_ray.text import CLIP, describe, resolve_text, standalone_features

    done = study.finished
    values = sorted(pd.to_numeric(done[param], errors="coerce").dropna().unique().tolist())
    result = next((r for r in (trial_result(study, row) for _, row in done.iterrows()) if r),
                  None)
    if result is None or not result.get("class_names"):
        return None, (f"γ′ against {param_label(param)} is not drawn: no trial's class counts "
                      "and names are at hand (result.json)")
    if not study.meta.get("base_config"):
        return None, (f"γ′ against {param_label(param)} is not drawn: study.json has no "
                      "base_config")
    best = best_configuration(study)
    others = {k: v for k, v in best.keys.items() if k != param and not pd.isna(v)}
    try:
        cfg = RunConfig.from_dict(study.meta["base_config"]).override(
            {k: (v.item() if isinstance(v, np.generic) else v) for k, v in others.items()
             if k != "method"})
    except (LfmError, KeyError, TypeError, ValueError) as exc:
        return None, f"γ′ against {param_label(param)} is not drawn: {exc}"
    stage = cfg.stage2 if param.startswith("stage2.") else cfg.stage1
    beta = stage.beta if stage.beta is not None else MIX_BETA["lfm"]
    try:
        text = resolve_text(cfg.model)
    except LfmError as exc:
        return None, f"γ′ against {param_label(param)} is not drawn: {exc}"
    source = describe(cfg.model)
    seeds = best.seeds or [cfg.runtime.seed]
    random_tower = text == CLIP and not cfg.model.pretrained
    if not random_tower:
        seeds = seeds[:1]  # pretrained class features do not depend on the seed
    counts, names = result["class_counts"], result["class_names"]
    curves: dict[str, list[float]] = {}
    for seed in seeds:
        try:
            feats = standalone_features(cfg.model, names, int(seed))
        except LfmError as exc:
            # The first clause: what is missing, without this machine's cache folders.
            return None, (f"γ′ against {param_label(param)} is not drawn: the {source} "
                          f"are not at hand on this machine "
                          f"({str(exc).split(';')[0]}; a report never downloads weights)")
        if feats is None:
            return None, (f"γ′ against {param_label(param)} is not drawn: the model has no "
                          "class text features (model.text none)")
        label = f"{seeds_text([seed])} (random-init text tower)" if random_tower else source
        curves[label] = effective_imbalance_sweep(
            counts, feats, param, values, alpha=stage.alpha, tau=stage.tau, beta=beta)
    fixed = "α" if param.endswith("tau") else "τ"
    held = stage.alpha if fixed == "α" else stage.tau
    which = "stage 2" if param.startswith("stage2.") else "stage 1"
    title = (f"{study.name}: effective imbalance γ′ against {param_label(param)}<br><sup>"
             f"{which}: {fixed} = {held:g}, λ ~ Beta({beta:g}, {beta:g}); {source}</sup>")
    fig = effective_imbalance_figure(param, values, curves,
                                     imbalance=imbalance_factor(counts), title=title)
    caption = (f"γ′: the largest over the smallest expected label mass a class receives per "
               f"drawn sample after local sampling (P at τ) and the label shift (α), "
               f"computed exactly (lfm_ray.effective) for the {which} settings of the best "
               f"configuration ({fixed} = {held:g}); dashed: the training counts' own γ.")
    return fig, caption


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
    session, at the figure's own size where it sets one (1100 × 620 otherwise). Returns
    (written files, None) or ([], the reason PNG export is impossible)."""
    if not figs:
        return [], None
    missing = png_blocker()
    if missing:
        return [], missing
    if not os.environ.get("BROWSER_PATH"):
        os.environ["BROWSER_PATH"] = find_chrome()  # where kaleido's choreographer looks first
    paths = [folder / _png_name(name) for name in figs]
    widths = [int(f.layout.width or 1100) for f in figs.values()]
    heights = [int(f.layout.height or 620) for f in figs.values()]
    try:
        pio.write_images(list(figs.values()), paths, width=widths, height=heights, scale=1)
    except Exception as exc:  # noqa: BLE001 - the HTML report stands without PNGs
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        return [], reason
    return [p for p in paths if p.is_file()], None


# ---- the page: the study's record ---------------------------------------------------------
STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
     max-width:1200px;padding:0 16px;color:#222}
h1{margin-bottom:4px} h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:14px;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 8px} th{background:#f2f5fa}
table.cmp{font-size:13px} table.cmp td{text-align:right;white-space:nowrap}
table.cmp td.name{text-align:left}
table.cmp th.group{text-align:center} table.cmp td.gstart{border-left:2px solid #999}
table.record th{text-align:left;vertical-align:top;width:190px} table.record td{vertical-align:top}
table.config td.set{font-weight:bold;background:#fff4d6}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:6px 0}
.verdict{background:#eef6ee;border-left:4px solid #2ca02c;padding:6px 10px;margin:6px 0}
.caption{color:#444;font-size:14px;margin:4px 0 8px 0}
.summary{color:#444} pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:13px}
nav a{margin-right:12px} .fig{margin:8px 0 24px 0} .scroll{overflow-x:auto}
.box{max-height:520px;overflow:auto;border:1px solid #ddd}
.box table{margin:0} .box th{position:sticky;top:0;z-index:1}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.incomplete{background:#fde8e8;border:3px solid #c62828;color:#8e0000;padding:10px 14px;
     margin:10px 0;font-size:17px} .incomplete b{font-size:26px;letter-spacing:1px}
"""


MISSING = "n/a"  # a value a table has not got, in every table of the report


def _pct(value: float) -> str:
    """A percentage to two places, or n/a."""
    return MISSING if value is None or not math.isfinite(float(value)) else f"{value:.2f}"


def interval_text(low: float, high: float) -> str:
    """A 95 % interval of a percentage, cut at 0 and 100 % (and said so where it is)."""
    cut = low < 0 or high > 100
    text = f"[{max(low, 0.0):.2f}, {min(high, 100.0):.2f}]"
    return text + (" cut at 0 and 100 %" if cut else "")


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def _space_text(study: StudyResults) -> str:
    """The grid or the search space, parameter by parameter, with symbols."""
    meta = study.meta
    lines = []
    if meta.get("grid"):
        for p, values in meta["grid"].items():
            lines.append(f"{param_label(p)}: {', '.join(fmt_value(v) for v in values)}")
    space = meta.get("space") or {}
    order = [p for p in study.swept if p in space] + [p for p in space if p not in study.swept]
    for p, dim in ((p, space[p]) for p in order):
        kind = dim.get("kind")
        if kind == "choice":
            text = "one of " + ", ".join(fmt_value(c) for c in dim.get("choices") or [])
        else:
            scale = {"loguniform": "log-uniform", "uniform": "uniform", "int": "integer"}.get(
                kind, str(kind))
            text = f"{scale} in [{fmt_value(dim.get('low'))}, {fmt_value(dim.get('high'))}]"
        when = dim.get("when")
        if when:
            text += " — only where " + ", ".join(f"{param_label(k)} is {fmt_value(v)}"
                                                 for k, v in when.items())
        lines.append(f"{param_label(p)}: {text}")
    if not lines and study.params:
        lines = [f"{param_label(p)}: "
                 + ", ".join(fmt_value(v) for v in dict.fromkeys(study.trials[p].dropna()))
                 for p in study.params]
    return "<br>".join(_esc(ln) for ln in lines) or "nothing swept"


def _record_html(study: StudyResults) -> str:
    """The header: what was selected on which split, what was searched, with which seeds,
    how many trials for how long, and where and with what it ran."""
    rows = [*_selection_rows(study), *_search_rows(study), *_trial_rows(study),
            *_provenance_rows(study)]
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table class='record'>{body}</table>"


def _selection_rows(study: StudyResults) -> list[tuple[str, str]]:
    """What was selected on which split, and the objectives of a multi-objective study."""
    selection = study.meta.get("selection") or (
        f"selected on {study.metric} ({study.selection_split} split)")
    rows = [("selection", _esc(f"{selection}; {'higher' if study.mode == 'max' else 'lower'}"
                                " is better"))]
    if len(study.objectives) > 1:
        rows.append(("objectives", _esc(", ".join(study.objectives))))
    return rows


def _search_rows(study: StudyResults) -> list[tuple[str, str]]:
    """The search and its space, the seeds and the protocol."""
    meta, t = study.meta, study.trials
    rows: list[tuple[str, str]] = []
    search = study.search
    if search in ("optuna", "random"):
        sampler = f", sampler {meta['sampler']}" if search == "optuna" and meta.get("sampler") \
            else ""
        search += f" ({meta.get('num_samples') or len(t)} samples{sampler})"
    if meta.get("scheduler") and meta["scheduler"] != "none":
        search += f"; scheduler {meta['scheduler']}"
    rows.append(("search", _esc(search)))
    rows.append(("grid" if meta.get("grid") else "search space", _space_text(study)))
    seeds = meta.get("seeds") or (sorted(t[SEED].dropna().unique().tolist())
                                  if SEED in t.columns else [])
    rows.append(("seeds", _esc(", ".join(fmt_value(s) for s in seeds) or "not recorded")
                 + (" (one seed: no spread, no claim that one configuration is better)"
                    if len(seeds) == 1 else "")))
    protocol = meta.get("protocol")
    if protocol:
        rows.append(("protocol", _esc(
            "branch: one stage 1 per seed, the swept value applied in stage 2 from its "
            "checkpoint" if protocol == "branch" else
            "full: both stages trained for every configuration")))
    return rows


def _trial_rows(study: StudyResults) -> list[tuple[str, str]]:
    """How many trials ended how, for how long they ran and what they cost."""
    meta, t = study.meta, study.trials
    counts = t["status"].astype(str).value_counts().to_dict()
    parts = [f"{len(t)} trials", f"{counts.get(DONE, 0)} finished"]
    parts += [f"{n} {s.lower()}" for s, n in counts.items() if s != DONE]
    if "stopped_early" in t.columns and t["stopped_early"].fillna(False).astype(bool).any():
        parts.append(f"{int(t['stopped_early'].fillna(False).astype(bool).sum())} stopped early")
    rows = [("trials", _esc(", ".join(parts)))]
    wall = pd.to_numeric(t["wall_time_s"], errors="coerce") if "wall_time_s" in t else None
    if wall is not None and wall.notna().any():
        time_text = f"{_duration(float(wall.sum()))} of trial time in all"
        train = pd.to_numeric(t["train_time_s"], errors="coerce") if "train_time_s" in t \
            else None
        if train is not None and train.notna().any():
            time_text += f" ({_duration(float(train.sum()))} training)"
        gpu = pd.to_numeric(t["gpu_hours"], errors="coerce") if "gpu_hours" in t else None
        time_text += f"; measured cost {wall.sum() / 60:.1f} trial-minutes"
        time_text += f", {gpu.fillna(0).sum():.3f} GPU-hours" if gpu is not None else ""
        budget, unit = meta.get("budget_hours"), meta.get("budget_unit") or "hours"
        if budget is not None:
            time_text += (f"; stopped by its budget of {budget:g} {unit}" if
                          meta.get("status") == "stopped_by_budget" else
                          f"; budget {budget:g} {unit}")
        rows.append(("time", _esc(time_text)))
    return rows


def _provenance_rows(study: StudyResults) -> list[tuple[str, str]]:
    """Data and model, the machine, the versions and the command it ran with."""
    meta, t = study.meta, study.trials
    rows: list[tuple[str, str]] = []
    base = meta.get("base_config") or {}
    data = (base.get("data") or {}).get("name") or _one(t, "data.name")
    model = (base.get("model") or {}).get("name") or _one(t, "model.name")
    pretrained = (base.get("model") or {}).get("pretrained")
    if data or model:
        rows.append(("data and model", _esc(
            f"{data or '?'}; {model or '?'}"
            + (f" with weights {pretrained}" if pretrained else
               " (random init)" if model else ""))))
    rows.append(("machine", _esc(_machine_text(meta.get("machine") or {}))))
    versions = meta.get("versions") or {}
    if versions:
        rows.append(("versions", _esc(", ".join(f"{k} {v}" for k, v in versions.items()))))
    command = " ".join(map(str, meta.get("command") or [])) or "(not recorded)"
    called = meta.get("called_by")
    called_text = " ".join(map(str, called)) if isinstance(called, (list, tuple)) else called
    rows.append(("command", f"<code>{_esc(command)}</code>"
                 + (f" (called by <code>{_esc(called_text)}</code>)" if called_text else "")
                 + (f"; started {_esc(meta['started'])}" if meta.get("started") else "")))
    return rows


def _machine_text(machine: dict[str, Any]) -> str:
    if not machine:
        return "not recorded"
    parts = []
    cpu = machine.get("cpu_model") or machine.get("processor")
    cores = machine.get("cpus")
    parts.append(f"{cpu or 'CPU'}" + (f", {cores} cores" if cores else ""))
    if machine.get("memory_gib"):
        parts.append(f"{machine['memory_gib']} GiB RAM")
    gpus = machine.get("gpus")
    if gpus:
        names = list(dict.fromkeys(gpus))
        parts.append(", ".join(f"{gpus.count(n)} × {n}" for n in names)
                     + (f", CUDA {machine['cuda']}" if machine.get("cuda") else ""))
    else:
        parts.append("no GPU")
    if machine.get("platform"):
        parts.append(str(machine["platform"]))
    if machine.get("python"):
        parts.append(f"Python {machine['python']}")
    return "; ".join(parts)


def _one(t: pd.DataFrame, col: str) -> str | None:
    if col in t.columns and t[col].nunique() == 1:
        return str(t[col].iloc[0])
    return None


# ---- the page: results ---------------------------------------------------------------------
def _best_html(study: StudyResults) -> str:
    """The best configuration per objective (mean over seeds; within each imbalance factor
    or data set), its test figures, and whether it is better than the others at these
    seeds."""
    from lfm_ray.analysis.load import t_interval

    if study.incomplete:
        return ("<div class='incomplete'>No best configuration: the study is INCOMPLETE "
                "(see the top of this page), and a best among the trials that happened to "
                "finish would be a claim about another study.</div>")
    if search_front_axes(study):
        return _pareto_html(study)
    done = study.finished
    rows = []
    facet = study_facet(study)
    metrics = [selection_metric(study), *study.objectives]
    for metric in dict.fromkeys(metrics):
        if metric not in done.columns or pd.to_numeric(done[metric], errors="coerce").isna().all():
            continue
        for value in facet_values(study):
            best = best_configuration(study, metric, value)
            values = pd.to_numeric(best.rows[metric], errors="coerce").dropna() * 100
            n = len(values)
            mean = _pct(values.mean() if n else float("nan"))
            if n > 1:
                _, low, high = t_interval(values.to_numpy(float))
                mean += f" ± {values.std(ddof=1):.2f} (95 % t-interval {interval_text(low, high)})"
            test = " / ".join(_pct(pd.to_numeric(best.rows[m], errors="coerce").mean() * 100)
                              for m in METRICS)
            sep = best.separation
            names = {k: _key_label(study, k) for k in (sep.best, sep.runner_up, sep.against)}
            if sep.runner_up is None:
                verdict = "one configuration: nothing to compare"
            elif n < 2 and not sep.separated:
                verdict = f"{NO_BEST}: one seed per configuration gives no interval"
            else:
                verdict = verdict_text(sep, names)
            where = f"<td>{_esc(setting(facet, value))}</td>" if facet else ""
            rows.append(f"<tr><td>{_esc(metric)}</td>{where}"
                        f"<td>{_esc(best.label_without(facet))}</td>"
                        f"<td class='num'>{mean}</td><td class='num'>{n}</td>"
                        f"<td class='num'>{test}</td><td>{_esc(verdict)}</td></tr>")
    facet_head = f"<th>{_esc(param_label(facet))}</th>" if facet else ""
    note = (f"<p class='caption'>Each {_esc(param_label(facet))} has its own best "
            "configuration; configurations are compared only within one.</p>" if facet else "")
    return (note + "<div class='scroll'><table><thead><tr><th>selected on</th>"
            f"{facet_head}<th>highest mean</th><th>its mean (%)</th><th>seeds</th>"
            "<th>its test many / medium / few / all (%)</th><th>better than the others?</th>"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def _pareto_html(study: StudyResults) -> str:
    """A search with two objectives has no one best: its configurations on the front of
    the means (best.json's Pareto set), each with its means and 95 % t-intervals over the
    seeds, and whether the seeds name it non-dominated (lfm_ray.analysis.front)."""
    from lfm_ray.analysis.front import front_points

    x, y = search_front_axes(study)
    points = [p for p in front_points(study, x, y, varying_params(study)) if p["front"]]
    rows = []
    for p in sorted(points, key=lambda p: -p["x"]):
        cells = []
        for axis in ("x", "y"):
            text = _pct(p[axis])
            if p["n"] > 1:
                text += f" ({interval_text(p[axis + '_low'], p[axis + '_high'])})"
            cells.append(f"<td class='num'>{text}</td>")
        verdict = ("yes" if p["named"] else
                   "one seed: no interval" if p["n"] < 2 else
                   f"not separated from {p['against']}" if p["against"] else "not assessed")
        rows.append(f"<tr><td>{_esc(p['label'])}</td>{''.join(cells)}"
                    f"<td class='num'>{p['n']}</td><td>{_esc(verdict)}</td></tr>")
    return ("<p class='caption'>Several objectives: no single best. The Pareto set "
            "(best.json): the configurations no other beats in both objectives by their "
            "means over seeds; in brackets the 95 % t-interval of each mean. The last "
            "column says whether the seeds show each one non-dominated (better than every "
            "other configuration in at least one objective at 95 %).</p>"
            "<div class='scroll'><table><thead><tr><th>configuration</th>"
            f"<th>{_esc(x)} (%)</th><th>{_esc(y)} (%)</th><th>seeds</th>"
            "<th>non-dominated at 95 %?</th></tr></thead><tbody>"
            f"{''.join(rows)}</tbody></table></div>")


def _key_label(study: StudyResults, key: Any) -> str:
    """A configuration key (config_key over the varying parameters) as text; the facet,
    the same for every configuration compared, left out."""
    params = varying_params(study)
    if key is None:
        return ""
    facet = study_facet(study)
    return describe({p: v for p, v in zip(params, key) if p != facet}, 3) or str(key)


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
        table = comparison_table(study)
        return (f"<p class='caption'>{_esc(table_caption(table, study.mode))}</p>"
                "<div class='scroll'>" + comparison_html(table, study.mode) + "</div>"
                + _class_metrics_html(study, [*numeric, *categorical]))
    if study.search != "grid" and SEED in study.swept:
        return _top_configs_html(study)
    return _top_k_html(study)


def _top_configs_html(study: StudyResults, k: int = TOP_K) -> str:
    """A search over seeds: its k best sampled configurations by the mean of the selection
    metric over their seeds, each with the 95 % t-interval of that mean and its mean test
    figures (every seed's row is under "All trials")."""
    metric = selection_metric(study)
    params = study.params
    shown = [m for m in dict.fromkeys([metric, *study.objectives, *METRICS])
             if m in study.finished.columns and not study.finished[m].isna().all()]
    agg = aggregate(study.finished, params, metrics=shown, sort=False)
    agg = agg.sort_values(f"{metric}_mean", ascending=study.mode == "min").head(k)
    frame = pd.DataFrame({param_label(p): [_round_param(v) for v in agg[p]] for p in params})
    frame["seeds"] = agg[f"{metric}_n"].to_numpy(int)
    for m in shown:
        frame[f"{m} (%)"] = agg[f"{m}_mean"].to_numpy(float) * 100
        if m == metric or m in study.objectives:
            frame[f"{m}: 95 % interval (%)"] = [
                interval_text(lo * 100, hi * 100) if n > 1 else MISSING
                for lo, hi, n in zip(agg[f"{m}_ci_low"], agg[f"{m}_ci_high"], agg[f"{m}_n"])]
    return (f"<p class='caption'>The {len(agg)} best sampled configurations by "
            f"{_esc(selection_text(study))}, each the mean over its seeds with the 95 % "
            "Student-t interval of that mean; accuracies in percent, parameters to 3 "
            "significant digits; a blank cell is a parameter the configuration did not draw. "
            "Every seed's trial is listed under All trials.</p>" + _frame_html(frame))


def _top_k_html(study: StudyResults, k: int = TOP_K) -> str:
    """The k best trials of a search by the selection metric, rounded, in percent; a
    conditional parameter a trial did not draw left blank."""
    metric = selection_metric(study)
    top = study.finished.sort_values(metric, ascending=study.mode == "min").head(k)
    frame = pd.DataFrame({"trial": top["trial_id"].astype(str)})
    for p in study.params:
        frame[param_label(p)] = [_round_param(v) for v in top[p]]
    shown = [metric] if metric not in METRICS else []
    for m in [*shown, *METRICS, *CLASS_METRICS]:
        if m in top.columns and not top[m].isna().all():
            frame[f"{m} (%)"] = pd.to_numeric(top[m], errors="coerce") * 100
    return (f"<p class='caption'>The {len(top)} best trials by {_esc(selection_text(study))}; "
            "accuracies in percent, parameters to 3 significant digits; a blank cell is a "
            "parameter the trial did not draw (it applies to another choice).</p>"
            + _frame_html(frame))


def _round_param(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return fmt_value(value, 3)


def _frame_html(df: pd.DataFrame, box: bool = False) -> str:
    def fmt(v: Any) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            return MISSING
        if isinstance(v, (float, np.floating)):
            return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.3g}"
        return str(v)

    table = df.to_html(index=False, escape=True, na_rep=MISSING,
                       formatters={c: fmt for c in df.columns})
    return f"<div class='{'box' if box else 'scroll'}'>{table}</div>"


def _failed_html(study: StudyResults) -> str:
    failed = study.failed
    cols = [c for c in ["trial_id", *study.swept, "error"] if c in failed.columns]
    frame = pd.DataFrame({(param_label(c) if c in study.swept else c):
                          ([_round_param(v) for v in failed[c]] if c in study.swept
                           else failed[c]) for c in cols})
    return (f"<p>{len(failed)} trial(s) failed; the figures and tables above use the "
            "finished trials only.</p>" + _frame_html(frame))


# Columns of trials.csv that a reader does not need in the table (paths, bookkeeping).
HIDDEN_COLUMNS = ("checkpoint_path", "node_id", "artifacts", "experiment", "selection_split")


def trials_table(study: StudyResults) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Every trial as the report shows it: accuracies in percent (columns "<name> (%)"),
    parameters by their symbol, times in seconds; columns holding one value for every
    trial are left out and returned as {column: value}."""
    t = study.trials.drop(columns=[c for c in HIDDEN_COLUMNS if c in study.trials.columns])
    if "error" in t.columns and not t["error"].astype(str).str.strip().any():
        t = t.drop(columns=["error"])
    constant = {}
    finished = t["status"] == DONE if "status" in t.columns else pd.Series(True, t.index)
    for c in list(t.columns):
        if c in ("trial_id", "acc_all", "status"):
            continue
        values = t[c].dropna().astype(str).unique()
        # A failed trial lacks its metrics and config columns: one value among the rest
        # is still one value. A swept parameter some trials lack is a conditional one.
        gaps_ok = t[c].notna().all() or (c not in study.swept and t.loc[finished, c].notna().all())
        if len(t) > 1 and len(values) == 1 and gaps_ok:
            constant[c] = t[c].dropna().iloc[0]
            t = t.drop(columns=[c])
    out = pd.DataFrame(index=t.index)
    for c in t.columns:
        numbers = pd.to_numeric(t[c], errors="coerce") if t[c].dtype != object else None
        if c in METRICS or c in VAL_METRICS or c in CLASS_METRICS:
            out[f"{c} (%)"] = pd.to_numeric(t[c], errors="coerce") * 100
        elif c in ("wall_time_s", "train_time_s"):
            out[c.removesuffix("_s") + " (s)"] = pd.to_numeric(t[c], errors="coerce").round(1)
        elif c in study.swept:
            out[param_label(c)] = [_round_param(v) for v in t[c]]
        elif numbers is not None and numbers.notna().any() and \
                (numbers.dropna() % 1 == 0).all() and t[c].dtype != bool:
            out[c] = numbers.astype("Int64")  # epochs and stages are whole numbers
        else:
            out[c] = t[c]
    return out, constant


def _trials_html(study: StudyResults) -> str:
    table, constant = trials_table(study)
    same = "; ".join(f"{param_label(k) if k in study.swept or '.' in k else k} "
                     f"{_constant_text(k, v)}" for k, v in constant.items())
    return ((f"<p class='caption'>The same in every trial: {_esc(same)}.</p>" if same else "")
            + "<p class='caption'>Accuracies and LIFT's class figures in percent (acc_*: "
              "test split; val_acc_*: validation split); n/a: no value (a failed or "
              "interrupted trial).</p>" + _frame_html(table, box=True))


def _constant_text(name: str, value: Any) -> str:
    if name in METRICS or name in VAL_METRICS or name in CLASS_METRICS:
        return f"{float(value) * 100:.2f} %"
    return fmt_value(value)


# ---- the page: configuration ----------------------------------------------------------------
LAYER_NAMES = (("flags", "command-line flag"), ("smoke", "--smoke"),
               ("fixed", "the study script"), ("file", "--config file"))


def config_sources(study: StudyResults) -> dict[str, str]:
    """dotted field → what set it in this study (the preset, a --config file, the study
    script, --smoke, a flag, the method, or the sweep; each over the one before) for every
    field not left at its built-in default."""
    layers = study.meta.get("layers") or {}
    out: dict[str, str] = {}

    def put(field: str, source: str) -> None:
        out[field] = source
        short = field.split(".", 1)[1] if field.startswith("mix.") else ""
        if short in ("alpha", "tau", "beta"):  # the shorthand sets both stages' fields
            out[f"stage1.{short}"] = out[f"stage2.{short}"] = source

    preset = layers.get("preset")
    if preset and preset != "none":
        try:
            from lfm_ray.config import preset_values

            for k in preset_values(preset, layers.get("study")):
                put(k, f"preset {preset}")
        except LfmError:
            pass
    for key, name in reversed(LAYER_NAMES):
        for k in (layers.get(key) or {}):
            put(k, name)
    for variant in (study.meta.get("variants") or {}).values():
        for k in variant or {}:
            put(k, "swept (method)")
    for p in study.swept:
        put(p, "swept")
    return out


def _config_html(study: StudyResults) -> str:
    base = study.meta.get("base_config")
    if not base:
        return "<p>The base run configuration was not recorded.</p>"
    sources = config_sources(study)
    rows = []
    for name, value in sorted(flatten(base).items()):
        src = sources.get(name)
        cls = " class='set'" if src else ""
        rows.append(f"<tr><td{cls}>{_esc(name)}</td><td>{_esc(json.dumps(value, default=str))}"
                    f"</td><td>{_esc(src or '')}</td></tr>")
    layers = study.meta.get("layers") is not None
    note = ("Highlighted: the fields this study set (the preset, a --config file, the study "
            "script, --smoke, command-line flags) or swept; the others are the built-in "
            "defaults." if layers else
            "Highlighted: the fields this study swept (study.json does not record how the "
            "rest was made).")
    return (f"<p class='caption'>{_esc(note)}</p><div class='box'><table class='config'>"
            "<thead><tr><th>field</th><th>value</th><th>set by</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")


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


def _study_settings(study: StudyResults) -> dict[str, Any]:
    """study.json's settings for the page."""
    meta = study.meta
    out = {k: meta[k] for k in ("grid", "space", "variants", "seeds", "num_samples",
                                "scheduler", "sampler", "optuna_storage", "storage_path",
                                "experiments", "share_stage1", "protocol", "max_concurrent",
                                "max_failures", "trackers", "started")
           if meta.get(k) not in (None, {}, [])}
    # storage_path is as the user typed it (like the command); the Optuna database URL is
    # one the study may have made from it, so it is shown relative.
    url = out.get("optuna_storage")
    if isinstance(url, str) and url.startswith("sqlite:///"):
        out["optuna_storage"] = "sqlite:///" + shown_path(
            out["optuna_storage"].removeprefix("sqlite:///"), study.path)
    return out


def _figure_html(name: str, fig: go.Figure) -> str:
    # plotly.js is in the page's head once; each figure is a div and a call to it.
    return "<div class='fig'>" + pio.to_html(
        fig, full_html=False, include_plotlyjs=False, div_id=f"fig-{_png_name(name)[:-4]}",
        config={"displaylogo": False, "responsive": True}) + "</div>"


def _section_title(name: str) -> str:
    if name in TITLES:
        return TITLES[name]
    if name.startswith("ablation_"):
        return f"Ablation: test accuracy against {param_label(name[9:])}"
    if name.startswith("gamma_"):
        return f"Effective imbalance γ′ against {param_label(name[6:])}"
    return name


def render_page(study: StudyResults, figs: dict[str, go.Figure] | Figures,
                pngs: Sequence[Path], notes: Sequence[str]) -> str:
    """The report's HTML (self-contained: plotly.js inlined)."""
    from plotly.offline import get_plotlyjs

    built = figs if isinstance(figs, Figures) else Figures(dict(figs))
    sections: list[tuple[str, str, str]] = []  # (anchor, title, body)
    sections.append(("best", "Best configuration", _best_html(study)))
    sections.append(("results", "Results", _results_html(study)))
    for name, fig in built.figs.items():
        if name in PNG_ONLY:
            continue
        caption = built.captions.get(name)
        body = (f"<p class='caption'>{_esc(caption)}</p>" if caption else "") + \
            _figure_html(name, fig)
        sections.append((f"sec-{_png_name(name)[:-4]}",
                         built.titles.get(name) or _section_title(name), body))
    for name, caption in built.captions.items():
        if name not in built.figs:  # a figure that could not be drawn, and why
            sections.append((f"sec-{_png_name(name)[:-4]}", _section_title(name),
                             f"<div class='note'>{_esc(caption)}</div>"))
    if len(study.failed):
        sections.append(("failed", "Failed trials", _failed_html(study)))
    sections.append(("trials", "All trials", _trials_html(study)))
    sections.append(("config", "Configuration",
                     _config_html(study) + "<h3>Study settings</h3>"
                     + _json_block(_study_settings(study))))
    sections.append(("machine", "Machine and versions",
                     "<h3>Where the study ran</h3>"
                     f"{_json_block(study.meta.get('machine') or 'not recorded')}"
                     f"{_json_block(study.meta.get('versions') or {})}"
                     f"<h3>Where this report was made</h3>{_json_block(_versions_now())}"))
    nav = "".join(f"<a href='#{a}'>{_esc(t)}</a>" for a, t, _ in sections)
    note_html = "".join(f"<div class='note'>{_esc(n)}</div>" for n in notes)
    png_html = ("<p class='summary'>PNG files beside this report: "
                + ", ".join(_esc(p.name) for p in pngs) + "</p>") if pngs else ""
    body = "".join(f"<h2 id='{a}'>{_esc(t)}</h2>{b}" for a, t, b in sections)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{'INCOMPLETE ' if study.incomplete else ''}lfm-ray study "
        f"{_esc(study.name)}</title><style>{STYLE}</style>"
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
        f"<h1>lfm-ray study: {_esc(study.name)}</h1>{_incomplete_html(study)}"
        f"{_record_html(study)}"
        f"<p class='summary'>Report written {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>"
        f"<nav>{nav}</nav>{note_html}{png_html}{body}</body></html>"
    )


def _incomplete_html(study: StudyResults) -> str:
    """The banner of a study whose trials have not all ended (interrupted, or still
    running): which are missing, and that nothing here is the study's result."""
    missing = study.incomplete
    if not missing:
        return ""
    shown = "".join(f"<li>{_esc(m)}</li>" for m in missing[:50])
    more = f"<li>and {len(missing) - 50} more</li>" if len(missing) > 50 else ""
    state = (study.meta.get("status") or "interrupted").replace("_", " ")
    return (f"<div class='incomplete'><b>INCOMPLETE</b> — this study is {_esc(state)}: "
            f"{len(missing)} trial(s) have not finished, so the figures and tables below "
            "show only the trials that did and name no best configuration. Missing:"
            f"<ul>{shown}{more}</ul>Resume it with <code>"
            f"{_esc(study.meta.get('resume_command') or 'the command that ran it')}"
            "</code>.</div>")


def write_report(study_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                 params: Sequence[str] | None = None, band: str = "auto",
                 png: bool = True, front: str | None = None) -> Path:
    """Write report.html for a study (a results directory, a Tune experiment or a trials
    CSV) and a PNG of each headline figure beside it; returns the HTML's path. PNG export
    that is impossible (no Chromium) is one warning line, never an error. `front`
    ("acc_many,acc_few"): also the trade-off front in those two metrics
    (lfm_ray.analysis.front)."""
    from lfm_ray.analysis.front import front_view, parse_front

    study = load_study(study_dir)
    study.require_finished()
    axes = parse_front(front, study) if front else None
    if out:
        target = Path(out)
    elif study.path is not None and study.path.is_dir():
        target = study.path / "report.html"
    else:
        target = Path.cwd() / f"report_{study.name}.html"
    if target.suffix.lower() not in (".html", ".htm"):
        raise LfmError(f"--out {str(target)!r} must name an .html file")
    target.parent.mkdir(parents=True, exist_ok=True)
    built = build_figures(study, params=params, band=band)
    if axes:
        built.figs["front"], built.captions["front"] = front_view(
            study, *axes, varying_params(study))
        built.titles["front"] = f"Trade-off front: {axes[1]} against {axes[0]}"
    pngs: list[Path] = []
    png_note = None
    if png:
        headline = {k: v for k, v in built.figs.items() if k not in NOT_HEADLINE}
        pngs, reason = write_pngs(headline, target.parent)
        if reason:
            line = f"warning: no PNGs: {reason}; the HTML report is complete"
            print(line, flush=True)
            png_note = line.removeprefix("warning: ")
    notes = list(study.notes) + ([png_note] if png_note else [])
    page = render_page(study, built, pngs, notes)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)  # a reader never sees half a report
    return target
