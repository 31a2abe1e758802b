"""Warm starts: an Optuna search that begins with an earlier study's best configurations.

`--warm-start STUDY[:K]` reads the earlier study's study.json (its selection rule: metric,
mode, objectives) and trials.csv, takes its K best configurations by the mean over seeds of
its selection metric (a multi-objective study: its Pareto set of those means, at most K when
K is given), checks that each lies in this study's space, and hands them to Optuna as its
first trials (OptunaSearch's points_to_evaluate, which Optuna enqueues). study.json records
which study, its id and commit, and the points.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lfm_ray.config import same_value
from lfm_ray.errors import LfmError
from lfm_ray.study.seed_stats import non_dominated
from lfm_ray.study.spec import SEED, Dim, Study

DEFAULT_K = 1  # a single-objective study's best; a multi-objective one gives its Pareto set


def parse_warm_start(text: str) -> tuple[str, int | None]:
    """`STUDY` or `STUDY:K` -> (study name or path, K or None)."""
    ref, sep, tail = text.rpartition(":")
    if not sep or not tail.strip().lstrip("-").isdigit():
        return text, None
    k = int(tail)
    if k < 1:
        raise LfmError(f"--warm-start {text!r}: K must be an integer >= 1, got {k}")
    if not ref:
        raise LfmError(f"--warm-start {text!r} names no study; expected STUDY or STUDY:K")
    return ref, k


def earlier_folder(study: Study, ref: str) -> Path:
    """The earlier study's results folder: a name in the same results folder, or a path."""
    by_name = Path(study.results_dir) / ref
    if (by_name / "study.json").is_file():
        return by_name
    as_path = Path(ref).expanduser()
    if (as_path / "study.json").is_file():
        return as_path
    raise LfmError(f"--warm-start {ref!r}: no earlier study there ({by_name / 'study.json'} "
                   "does not exist); give the name of a study in --results-dir or its folder")


def best_points(meta: dict[str, Any], table: Any, k: int | None) -> tuple[list[dict[str, Any]],
                                                                         str]:
    """The earlier study's best configurations by its own selection rule, best first, each
    with the mean (over seeds) of the metrics it was chosen on under "values"; and the rule
    in words. Only finished trials count."""
    import pandas as pd

    done = table[table["status"] == "TERMINATED"] if "status" in table else table
    names = [c for c in (meta.get("swept") or []) if c != SEED and c in done.columns]
    mode = meta.get("mode") or "max"
    objectives = [o for o in (meta.get("objectives") or []) if o in done.columns]
    metrics = objectives if len(objectives) > 1 else [meta.get("metric") or "acc_all"]
    for m in metrics:
        if m not in done.columns:
            raise LfmError(f"its trials.csv has no column {m!r} (its selection metric)")
    done = done.dropna(subset=metrics, how="any")
    if done.empty:
        return [], ""
    if names:
        means = done.groupby(names, dropna=False, sort=False)[metrics].mean().reset_index()
    else:
        means = pd.DataFrame([done[metrics].mean()])
    sign = 1.0 if mode == "max" else -1.0
    rows = means.to_dict("records")
    if len(metrics) == 1:
        rows.sort(key=lambda r: -sign * r[metrics[0]])
        chosen = rows[:k or DEFAULT_K]
        rule = f"the {len(chosen)} best by mean {metrics[0]} over seeds ({mode})"
    else:
        keep = non_dominated({i: [r[m] for m in metrics] for i, r in enumerate(rows)}, sign)
        front = [rows[i] for i in keep]
        front.sort(key=lambda r: -sign * r[metrics[0]])
        chosen = front[:k] if k else front
        rule = (f"the Pareto set of mean {', '.join(metrics)} over seeds ({mode})"
                + (f", its first {k} by {metrics[0]}" if k and len(front) > k else ""))
    points = [{"params": {n: _plain(r[n]) for n in names if not _missing(r[n])},
               "values": {m: float(r[m]) for m in metrics}} for r in chosen]
    return points, rule


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def in_space(name: str, value: Any, dim: Dim) -> Any:
    """`value` as this study's dimension holds it (the choice itself, an int, a float), or
    None when it lies outside the dimension."""
    if dim.kind == "choice":
        return next((c for c in dim.choices if same_value(c, value)), None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not dim.low <= float(value) <= dim.high:
        return None
    if dim.kind == "int":
        return int(value) if float(value).is_integer() else None
    return float(value)


def _dim_text(dim: Dim) -> str:
    if dim.kind == "choice":
        return "choice of " + ", ".join(map(str, dim.choices))
    return f"{dim.kind} in [{dim.low:g}, {dim.high:g}]"


def check_warm_search(study: Study) -> None:
    """A warm start is for an Optuna search only."""
    if study.warm_start is not None and study.search != "optuna":
        raise LfmError(f"--warm-start seeds an Optuna search's sampler; a {study.search} "
                       "study has no searcher to start (its trials are "
                       + ("its listed grid points)" if study.search == "grid" else
                          "drawn independently)") + "; use --search optuna")


def resolve_warm_start(study: Study) -> None:
    """Check the study's --warm-start and set `study.warm_points` (Optuna's first trials) and
    `study.warm_record` (what study.json keeps); one clear error for anything amiss, before
    anything is written."""
    import pandas as pd

    if study.warm_start is None:
        return
    check_warm_search(study)
    ref, k = parse_warm_start(study.warm_start)
    folder = earlier_folder(study, ref)
    if folder.resolve() == study.result_dir.resolve():
        raise LfmError(f"--warm-start {ref!r} is this study itself; name an earlier study")
    meta = json.loads((folder / "study.json").read_text())
    trials_csv = folder / "trials.csv"
    table = pd.read_csv(trials_csv) if trials_csv.is_file() else pd.DataFrame()
    try:
        points, rule = best_points(meta, table, k) if len(table) else ([], "")
    except LfmError as exc:
        raise LfmError(f"--warm-start {ref!r}: {exc}") from None
    if not points:
        raise LfmError(f"--warm-start {ref!r}: study {meta.get('name', ref)!r} has no finished "
                       f"trials to start from ({trials_csv})")
    theirs = [c for c in (meta.get("swept") or []) if c != SEED]
    for name in theirs:
        if name not in study.space:
            raise LfmError(f"--warm-start {ref!r}: its parameter {name} is not in this study's "
                           f"space ({', '.join(study.space)}); a warm start needs the same "
                           "swept names")
    for name in study.space:
        if name not in theirs:
            raise LfmError(f"--warm-start {ref!r}: this study's parameter {name} was not swept "
                           f"by it ({', '.join(theirs) or 'nothing'}); a warm start needs the "
                           "same swept names")
    if len(points) > study.num_samples:
        raise LfmError(f"--warm-start {study.warm_start!r} gives {len(points)} starting points, "
                       f"more than the study's {study.num_samples} trials; raise --num-samples "
                       "or give a smaller K")
    for point in points:
        for name, value in point["params"].items():
            held = in_space(name, value, study.space[name])
            if held is None:
                raise LfmError(f"--warm-start {ref!r}: its point {name}={value!r} lies outside "
                               f"this study's space ({name}: {_dim_text(study.space[name])})")
            point["params"][name] = held
    study.warm_points = [p["params"] for p in points]
    versions = meta.get("versions") or {}
    study.warm_record = {
        "study": meta.get("name", ref), "folder": str(folder), "study_id": meta.get("study_id"),
        "commit": versions.get("git_commit"), "started": meta.get("started"),
        "status": meta.get("status"), "rule": rule, "points": points}
