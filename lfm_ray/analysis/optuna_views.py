"""Optuna's own views of a search: optimisation history, parameter importance (PED-ANOVA,
with a caveat below IMPORTANCE_MIN_TRIALS complete trials), parallel coordinates, and the
Pareto front of a multi-objective search; parameters named by their symbols.

The Optuna study comes from its storage when the study recorded one (study.json
"optuna_journal", the journal file under the storage path, or "optuna_storage", a database
URL), else it is rebuilt from the trials
table with `optuna.trial.create_trial`: distributions from the study's declared search space
where it has one, otherwise inferred from the table (numbers: a float or int range, log when
the values span more than 1.5 decades; anything else: categorical).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from lfm_ray.analysis.figures import param_label, use_log_axis
from lfm_ray.analysis.load import DONE, FAILED, StudyResults

# Below this many complete trials an importance ranking moves from one search to the next.
IMPORTANCE_MIN_TRIALS = 50
IMPORTANCE_EVALUATOR = "PED-ANOVA"  # optuna.importance.PedAnovaImportanceEvaluator
# Optuna draws one line per trial in its parallel coordinates: above this many complete
# trials the figure draws a seeded sample of them (PARALLEL_SAMPLE_SEED) and says so.
PARALLEL_MAX_TRIALS = 1000
PARALLEL_SAMPLE_SEED = 0
from lfm_ray.errors import LfmError


@contextlib.contextmanager
def _quiet_optuna():
    """No "A new study created in memory" line for the in-memory studies the views build."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def declared_distribution(dim: dict[str, Any]):
    """An Optuna distribution from one dimension of study.json "space"."""
    from optuna.distributions import (
        CategoricalDistribution, FloatDistribution, IntDistribution,
    )

    kind = dim.get("kind")
    if kind == "choice":
        return CategoricalDistribution([_plain(c) for c in dim["choices"]])
    if kind == "int":
        return IntDistribution(int(dim["low"]), int(dim["high"]))
    if kind in ("uniform", "loguniform"):
        return FloatDistribution(float(dim["low"]), float(dim["high"]),
                                 log=kind == "loguniform")
    raise LfmError(f"search-space kind {kind!r} is not known; expected choice, int, "
                   "uniform or loguniform")


def inferred_distribution(values: pd.Series):
    """An Optuna distribution covering the values a parameter took in the table."""
    from optuna.distributions import (
        CategoricalDistribution, FloatDistribution, IntDistribution,
    )

    values = values.dropna()
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        x = pd.to_numeric(values).to_numpy(float)
        if pd.api.types.is_integer_dtype(values):
            return IntDistribution(int(x.min()), int(x.max()))
        return FloatDistribution(float(x.min()), float(x.max()),
                                 log=use_log_axis([x.min(), x.max()]))
    return CategoricalDistribution([_plain(v) for v in dict.fromkeys(values.tolist())])


def search_distributions(study: StudyResults) -> dict[str, Any]:
    """Every searched parameter's distribution, declared or inferred."""
    space = study.meta.get("space") or {}
    out = {}
    for name in study.params:
        if name in space:
            out[name] = declared_distribution(space[name])
        elif name in study.trials.columns and study.trials[name].notna().any():
            out[name] = inferred_distribution(study.trials[name])
    if not out:
        raise LfmError(f"study {study.name!r} searched no parameter; there is no Optuna view")
    return out


def _directions(study: StudyResults) -> tuple[list[str], list[str]]:
    metrics = study.objectives if len(study.objectives) > 1 else [study.metric]
    direction = "minimize" if study.mode == "min" else "maximize"
    return metrics, [direction] * len(metrics)


def _optuna_rows(study: StudyResults, metrics: list[str]) -> list[dict[str, Any]]:
    """What the searcher was told, one dict per Optuna trial: each ended trial of the table;
    in a search over seeds each sampled configuration, with its objectives' means over its
    seeds, failed where a seed failed (as lfm_ray.study.seed_search tells Optuna)."""
    from lfm_ray.analysis.load import SEED

    ended = study.trials[study.trials["status"].isin((DONE, FAILED))]  # not running ones
    if SEED not in study.swept or not study.params:
        return [row.to_dict() for _, row in ended.iterrows()]
    out = []
    for _, rows in ended.groupby(study.params, dropna=False, sort=False):
        row = rows.iloc[0].to_dict()
        for m in metrics:
            row[m] = pd.to_numeric(rows[m], errors="coerce").mean()
        row["status"] = DONE if (rows["status"] == DONE).all() else FAILED
        row["trial_id"] = ",".join(map(str, rows["trial_id"]))
        out.append(row)
    return out


def rebuild_optuna_study(study: StudyResults):
    """An in-memory Optuna study holding every finished and failed trial of the table (in a
    search over seeds, every sampled configuration with its means over seeds)."""
    import optuna
    from optuna.trial import TrialState

    dists = search_distributions(study)
    metrics, directions = _directions(study)
    missing = [m for m in metrics if m not in study.trials.columns]
    if missing:
        raise LfmError(f"the trials table of {study.name!r} has no column {missing[0]!r} "
                       "to rebuild its Optuna study from")
    with _quiet_optuna():
        ost = optuna.create_study(study_name=study.name, directions=directions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ost.set_metric_names(metrics)  # the axis titles of Optuna's plots
    trials = []
    for row in _optuna_rows(study, metrics):
        params, used = {}, {}
        for name, dist in dists.items():
            value = row.get(name)
            if _missing(value):
                continue  # a conditional dimension this trial did not draw
            value = _plain(value)
            if isinstance(dist, optuna.distributions.IntDistribution):
                value = int(value)
            elif isinstance(dist, optuna.distributions.FloatDistribution):
                value = float(value)
            params[name], used[name] = value, dist
        values = [row.get(m) for m in metrics]
        ok = row["status"] == DONE and not any(_missing(v) for v in values)
        trials.append(optuna.trial.create_trial(
            state=TrialState.COMPLETE if ok else TrialState.FAIL, params=params,
            distributions=used, values=[float(v) for v in values] if ok else None,
            user_attrs={"trial_id": str(row["trial_id"])}))
    ost.add_trials(trials)
    return ost


def optuna_study(study: StudyResults):
    """The study's Optuna study: from its storage when recorded (its journal file where the
    storage path is on this machine, or the database URL given), else rebuilt."""
    import optuna

    from lfm_ray.analysis.load import storage_roots
    from lfm_ray.study.optuna_storage import open_journal, recorded_journal

    journal = recorded_journal(study.meta, storage_roots(study))
    if journal is not None:
        try:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            return optuna.load_study(study_name=study.name, storage=open_journal(journal))
        except Exception as exc:  # noqa: BLE001 - the table holds the same trials
            study.notes.append(f"Optuna journal {journal.name} could not be read "
                               f"({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                               "the Optuna views are rebuilt from the trials table")
            return rebuild_optuna_study(study)
    storage = study.meta.get("optuna_storage")
    if storage and "://" in str(storage):
        try:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            return optuna.load_study(study_name=study.name, storage=storage)
        except Exception as exc:  # noqa: BLE001 - the table holds the same trials
            from lfm_ray.analysis.load import shown_path

            shown = "sqlite:///" + shown_path(str(storage).removeprefix("sqlite:///"),
                                              study.path) \
                if str(storage).startswith("sqlite:///") else storage
            study.notes.append(f"Optuna storage {shown} could not be read "
                               f"({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                               "the Optuna views are rebuilt from the trials table")
    return rebuild_optuna_study(study)


def optuna_figures(study: StudyResults) -> dict[str, go.Figure]:
    """history, parallel, importance (when Optuna can assess it) and, for several
    objectives, pareto; accuracies in percent, parameters by their symbols. The parallel
    coordinates show the parameters every trial drew; conditional ones are named in its
    title instead of drawn at a "None" tick."""
    import optuna
    import optuna.visualization as vis
    from optuna.trial import TrialState

    study.require_finished()
    metrics, directions = _directions(study)
    stored = optuna_study(study)
    names = list(stored.metric_names or metrics)
    ost, shown = in_percent(stored, names)
    complete = ost.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise LfmError(f"the Optuna study of {study.name!r} has no complete trial")
    multi = len(ost.directions) > 1
    common = [p for p in dict.fromkeys(p for t in complete for p in t.params)
              if all(p in t.params for t in complete)]
    conditional = [p for p in dict.fromkeys(p for t in complete for p in t.params)
                   if p not in common]
    figs: dict[str, go.Figure] = {}
    first = (lambda t: t.values[0]) if multi else None  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if multi:
            figs["pareto"] = vis.plot_pareto_front(ost, target_names=shown)
        figs["history"] = vis.plot_optimization_history(ost, target=first,
                                                        target_name=shown[0])
        drawn = parallel_sample(ost, complete)
        figs["parallel"] = vis.plot_parallel_coordinate(drawn, params=common, target=first,
                                                        target_name=shown[0])
        importance = _importance_figure(ost, shown, study)
        if importance is not None:
            figs["importance"] = importance
    for key, fig in figs.items():
        title = fig.layout.title.text or key
        fig.update_layout(title=f"{study.name}: {title}", template="plotly_white")
        _relabel(fig, study)
    if "importance" in figs and len(complete) < IMPORTANCE_MIN_TRIALS:
        figs["importance"].update_layout(
            title=f"{figs['importance'].layout.title.text}<br><sup>{IMPORTANCE_EVALUATOR} "
                  f"over {len(complete)} trials: below about {IMPORTANCE_MIN_TRIALS}, a hint, "
                  "not a finding</sup>", margin={"t": 90})
    if drawn is not ost:
        figs["parallel"].update_layout(
            title=f"{figs['parallel'].layout.title.text}<br><sup>a sample of "
                  f"{PARALLEL_MAX_TRIALS:,} of the {len(complete):,} complete trials (seeded "
                  f"{PARALLEL_SAMPLE_SEED}): one line per trial is not readable beyond "
                  "that</sup>", margin={"t": 90})
    if conditional:
        labels = ", ".join(param_label(p.removeprefix("params/")) for p in conditional)
        figs["parallel"].update_layout(
            title=f"{figs['parallel'].layout.title.text}<br><sup>not drawn: {labels} "
                  "(conditional: only some trials draw them)</sup>", margin={"t": 90})
    return figs


def parallel_sample(ost, complete: list[Any]):
    """`ost` itself, or above PARALLEL_MAX_TRIALS complete trials an in-memory study of a
    seeded sample of them (same directions and objective names) for the parallel
    coordinates."""
    import random

    import optuna

    if len(complete) <= PARALLEL_MAX_TRIALS:
        return ost
    picked = random.Random(PARALLEL_SAMPLE_SEED).sample(range(len(complete)),
                                                        PARALLEL_MAX_TRIALS)
    with _quiet_optuna():
        sample = optuna.create_study(study_name=ost.study_name, directions=ost.directions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if ost.metric_names:
            sample.set_metric_names(list(ost.metric_names))
    sample.add_trials([complete[i] for i in sorted(picked)])
    return sample


def in_percent(ost, names: list[str]):
    """(an Optuna study whose accuracy objectives are in percent, the objectives' names
    with their unit): a copy of `ost` for the figures; the stored study is left alone."""
    import optuna
    from optuna.trial import TrialState

    from lfm_ray.analysis.load import METRICS, VAL_METRICS

    scale = [100.0 if n in (*METRICS, *VAL_METRICS) else 1.0 for n in names]
    shown = [f"{n} (%)" if k == 100.0 else n for n, k in zip(names, scale)]
    with _quiet_optuna():
        copy = optuna.create_study(study_name=ost.study_name, directions=ost.directions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        copy.set_metric_names(shown)
    trials = []
    for t in ost.get_trials(deepcopy=False):
        if t.state not in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED):
            continue  # still running: no value yet
        values = [v * k for v, k in zip(t.values, scale)] \
            if t.state == TrialState.COMPLETE and t.values is not None else None
        trials.append(optuna.trial.create_trial(
            state=t.state, params=t.params, distributions=t.distributions, values=values,
            user_attrs=t.user_attrs))
    copy.add_trials(trials)
    return copy, shown


def _relabel(fig: go.Figure, study: StudyResults) -> None:
    """Parameters by their symbols ("τ (stage 1)") on the axes, dimensions and bars of
    Optuna's figures, whose own labels are the dotted names (or "params/<name>")."""
    names = {}
    for p in study.params:
        names[p] = names[f"params/{p}"] = param_label(p)
    for trace in fig.data:
        if trace.type == "parcoords":
            trace.dimensions = [{**d.to_plotly_json(), "label": names.get(d.label, d.label)}
                                for d in trace.dimensions]
        elif trace.type == "bar" and trace.orientation == "h" and trace.y is not None:
            trace.y = [names.get(str(y), y) for y in trace.y]
    layout = fig.layout
    for axis in [a for a in dir(layout) if a.startswith(("xaxis", "yaxis"))]:
        obj = getattr(layout, axis, None)
        if obj is None:
            continue
        if obj.title is not None and obj.title.text in names:
            obj.title.text = names[obj.title.text]
        if obj.ticktext is not None:  # parallel coordinates: one tick per dimension
            obj.ticktext = [names.get(str(t), t) for t in obj.ticktext]
    for note in layout.annotations or ():
        if note.text in names:
            note.text = names[note.text]


def importance_caveat(study: StudyResults) -> str:
    """What the importance figure rests on, and a caveat below IMPORTANCE_MIN_TRIALS."""
    from lfm_ray.analysis.load import SEED

    done = study.trials[study.trials["status"] == DONE]
    if SEED in study.swept and study.params:  # Optuna's trials: configurations, seeds pooled
        n = int(done.groupby(study.params, dropna=False).ngroups)
        what = "complete configuration(s), each its mean over its seeds"
    else:
        n, what = len(done), "complete trial(s)"
    text = (f"Parameter importance by Optuna's {IMPORTANCE_EVALUATOR} evaluator from {n} "
            f"{what}: the share of the objective's variation each parameter explains among "
            "these.")
    if n < IMPORTANCE_MIN_TRIALS:
        text += (f" Caveat: fewer than about {IMPORTANCE_MIN_TRIALS} trials stand behind it, "
                 "so the ranking can change with more trials or another sampler seed; read "
                 "it as a hint, not a finding.")
    return text


def _importance_figure(ost, names: list[str], study: StudyResults) -> go.Figure | None:
    """Importance by PED-ANOVA (Optuna's default evaluator, named so a later default does
    not change what the caveat says), per objective. The evaluator ranks parameters by how
    they reach *low* target values when given a target, so maximised objectives are handed
    to it negated."""
    import optuna
    import optuna.visualization as vis
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.study import StudyDirection

    try:
        if len(ost.directions) == 1:
            with warnings.catch_warnings():
                # Few trials per regime is the normal state of a small search.
                warnings.simplefilter("ignore", UserWarning)
                return vis.plot_param_importances(
                    ost, evaluator=PedAnovaImportanceEvaluator(), target_name=names[0])
        fig = None
        for i, (name, direction) in enumerate(zip(names, ost.directions)):
            sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                part = vis.plot_param_importances(
                    ost, evaluator=PedAnovaImportanceEvaluator(),
                    target=lambda t, i=i, sign=sign: sign * t.values[i], target_name=name)
            if fig is None:
                fig = part
            else:
                for trace in part.data:
                    fig.add_trace(trace)
        fig.update_layout(barmode="group", showlegend=True)
        return fig
    except (ValueError, RuntimeError, ZeroDivisionError, optuna.exceptions.OptunaError) as exc:
        study.notes.append(f"parameter importance not assessed: {str(exc).splitlines()[0]}")
        return None
