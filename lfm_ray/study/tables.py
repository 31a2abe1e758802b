"""A study's tables: trials.csv (one row per trial) and best.json, kept current as trials end."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Sequence

import pandas as pd

from lfm_ray.config import RunConfig
from lfm_ray.study.spec import ALWAYS_COLUMNS, SEED, Study
from lfm_ray.contract import ACCURACY_KEYS, METRIC_KEYS, VAL_METRIC_KEYS# what epochs report

TRIALS_FILE = "trials.csv"
BEST_FILE = "best.json"


# Tune's statuses of a trial that ended; any other (RUNNING, PENDING, PAUSED) at the end of a
# run means the study was interrupted while the trial was on its way: INTERRUPTED in the table.
FINAL_STATUSES = ("TERMINATED", "ERROR")
INTERRUPTED = "INTERRUPTED"


class Rows:
    """The study's trial rows, kept portable and cheap as the study grows.

    A finished trial's row is built once (a study of a thousand trials rewrites its table
    after every trial); its final result, history and confusion matrix are copied from its
    checkpoint into results/<name>/trials/<trial_id>/ (`artifacts`), and its checkpoint
    path is stored relative to the storage path, so the results folder renders anywhere."""

    def __init__(self, study: Study):
        self.study = study
        self.done: dict[str, dict[str, Any]] = {}

    def rows(self, trials: list[Any], experiment: str | None = None,
             stopped: Collection[str] = ()) -> pd.DataFrame:
        """One row per trial. `stopped`: the trials that were on their way when the study
        was interrupted; Tune ends them TERMINATED, but one that has not trained all its
        epochs is INTERRUPTED here."""
        out = []
        for t in trials:
            key = f"{experiment}/{t.trial_id}"
            cut = t.trial_id in stopped and self.cut_short(t)
            if key in self.done and not cut:
                out.append(self.done[key])
                continue
            row = self._row(t, experiment, cut)
            if str(t.status) in FINAL_STATUSES and not cut:
                self.done[key] = row
            out.append(row)
        return pd.DataFrame(out)

    def cut_short(self, t: Any) -> bool:
        """Whether a trial's last report is before the end of its training."""
        cfg = self.study.config_for(dict((t.config or {}).get("params") or {}))
        total = 0 if cfg.runtime.zero_shot else cfg.stage1.epochs + cfg.stage2.epochs
        epoch = (t.last_result or {}).get("epoch")
        return epoch is None or int(epoch) < total

    def _row(self, t: Any, experiment: str | None, cut: bool = False) -> dict[str, Any]:
        study = self.study
        params = dict((t.config or {}).get("params") or {})
        status = str(t.status) if str(t.status) in FINAL_STATUSES and not cut else INTERRUPTED
        row = trial_row(t.trial_id, status, error_message(t), params, study.swept,
                        study.config_for(params), dict(t.last_result or {}),
                        getattr(t, "checkpoint", None))
        row["experiment"] = experiment or study.name
        row["error"] = portable_text(row.get("error") or "", study)
        source = row.get("checkpoint_path")
        row["artifacts"] = copy_artifacts(study, str(t.trial_id), source) if source else None
        row["checkpoint_path"] = relative_to_storage(study.storage_path, source)
        return row


def trial_rows(study: Study, trials: list[Any], experiment: str | None = None) -> pd.DataFrame:
    """One row per Tune trial: swept parameters, final metrics, status, costs."""
    return Rows(study).rows(trials, experiment)


ARTIFACTS_DIR = "trials"
ARTIFACT_FILES = ("result.json", "history.json", "confusion.npz")


def copy_artifacts(study: Study, trial_id: str, checkpoint: str) -> str | None:
    """Copy a trial checkpoint's small files (final result, history, confusion matrix; not
    the weights) into results/<name>/trials/<trial_id>/; returns that folder relative to
    the results folder, or None when the checkpoint is unreachable."""
    target = study.result_dir / ARTIFACTS_DIR / trial_id
    try:
        if "://" in checkpoint:
            import pyarrow.fs

            fs, inner = pyarrow.fs.FileSystem.from_uri(checkpoint)
            target.mkdir(parents=True, exist_ok=True)
            for name in ARTIFACT_FILES:
                source = f"{inner.rstrip('/')}/{name}"
                if fs.get_file_info(source).type == pyarrow.fs.FileType.File:
                    with fs.open_input_stream(source) as fh:
                        (target / name).write_bytes(fh.read())
        else:
            folder = Path(checkpoint)
            if not folder.is_dir():
                return None
            target.mkdir(parents=True, exist_ok=True)
            for name in ARTIFACT_FILES:
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, target / name)
        portable_result(target / ARTIFACT_FILES[0], study)
    except OSError:
        return None
    return f"{ARTIFACTS_DIR}/{trial_id}"


def portable_result(path: Path, study: Study) -> None:
    """A copied result.json names the shared stage-1 checkpoint a branch started from
    (`stage1_from`) relative to the storage path, as trials.csv names checkpoints."""
    if not path.is_file():
        return
    result = json.loads(path.read_text())
    if isinstance(result, dict) and isinstance(result.get("stage1_from"), str):
        result["stage1_from"] = relative_to_storage(study.storage_path, result["stage1_from"])
        path.write_text(json.dumps(result))


ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/])/(?:[^\s'\"`,;:()\[\]{}<>]+)")


def portable_text(text: str, study: Study) -> str:
    """A message with this machine's absolute paths made portable: relative to the storage
    path, the results folder or the working folder where they lie below one, else their
    last two parts (as reports show paths), so trials.csv names no folder of this machine."""
    roots = [Path(study.storage_path).expanduser().resolve()] if "://" not in study.storage_path \
        else []
    roots += [Path(study.results_dir).expanduser().resolve(), Path.cwd()]

    def shorter(match: re.Match) -> str:
        path = Path(match.group(0))
        for root in roots:
            try:
                return str(path.relative_to(root))
            except ValueError:
                continue
        return str(Path("…", *path.parts[-2:]))

    return ABSOLUTE_PATH.sub(shorter, text)


def relative_to_storage(storage_path: str, path: str | None) -> str | None:
    """A checkpoint path relative to the study's storage path (where every node reads it)."""
    if not path:
        return path
    if "://" in storage_path:
        root = storage_path.rstrip("/") + "/"
        return path[len(root):] if path.startswith(root) else path
    root = Path(storage_path).expanduser().resolve()
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return path


def trial_row(trial_id: str, status: str, error: str, params: dict[str, Any],
              swept: Sequence[str], cfg: RunConfig | None, last: dict[str, Any],
              checkpoint: Any = None) -> dict[str, Any]:
    """One row of the trials table (the study engine's and the analysis's).

    `swept` names the parameter columns (absent from `params`: a conditional dimension this
    trial lacks); `cfg` is the trial's RunConfig, None for a Tune trial that is not
    lfm-ray's (no config columns or costs then); `last` its last reported result.
    """
    row: dict[str, Any] = {"trial_id": trial_id, "status": status, "error": error}
    for name in swept:
        row[name] = params.get(name)
    if cfg is not None:
        for name in ALWAYS_COLUMNS:
            row.setdefault(name, cfg.get(name))
    for key in (*METRIC_KEYS, *VAL_METRIC_KEYS):
        if key in METRIC_KEYS or key in last:
            row[key] = last.get(key)
    wall = last.get("time_total_s")
    row["wall_time_s"] = wall
    row["train_time_s"] = last.get("train_time_total_s")
    if cfg is not None:
        rt = cfg.runtime
        row["gpu_hours"] = (wall or 0.0) * max(1, rt.num_workers) * rt.gpus_per_worker / 3600
        epochs = cfg.stage1.epochs + cfg.stage2.epochs
        row["stopped_early"] = bool(status == "TERMINATED" and not rt.zero_shot
                                    and last.get("epoch") is not None
                                    and int(last["epoch"]) < epochs)
    # Worker-group trials report Ray Train's checkpoint path; in-process trials'
    # checkpoints are Tune's own.
    row["checkpoint_path"] = last.get("checkpoint_path") or getattr(checkpoint, "path", None)
    row["node_id"] = last.get("node_id")
    return row


def last_line(text: str) -> str:
    """The line of a traceback that says what went wrong (its last)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "failed"


def error_message(trial: Any, failed: bool = False) -> str:
    """The line of a trial's error that says what went wrong; `failed`: the trial is known
    to have failed (Tune is retrying it), whatever its status says."""
    if getattr(trial, "error_text", ""):
        return trial.error_text[:500]
    path = getattr(trial, "error_file", None)
    if (trial.status != "ERROR" and not failed) or not path or not os.path.exists(path):
        return ""
    return last_line(Path(path).read_text(errors="replace"))[:500]


def best_configs(study: Study, table: pd.DataFrame) -> dict[str, Any]:
    """The best configuration by the study's selection metric, the mean over seeds deciding,
    with that configuration's mean test figures beside it; with several objectives, the
    Pareto set instead (pareto_set). Nothing is selected on the test split of a study that
    has a validation split."""
    done = table[table["status"] == "TERMINATED"]
    out: dict[str, Any] = {}
    if done.empty:
        return out
    keys = [c for c in study.swept if c != SEED and c in done.columns]
    if len(study.objectives) > 1:
        return pareto_set(study, done, keys)
    for metric in dict.fromkeys([study.metric or "acc_all", *study.objectives]):
        if metric not in done or done[metric].isna().all():
            continue
        if keys:
            means = done.groupby(keys, dropna=False)[metric].agg(["mean", "count"]).reset_index()
        else:
            means = pd.DataFrame({"mean": [done[metric].mean()], "count": [len(done)]})
        idx = means["mean"].idxmax() if study.mode == "max" else means["mean"].idxmin()
        best = means.loc[idx]
        params = {k: (None if pd.isna(best[k]) else _plain(best[k])) for k in keys}
        match = done
        for k in keys:  # a conditional dimension a trial lacks is NaN on both sides
            same = (match[k] == best[k]) | (match[k].isna() & pd.isna(best[k]))
            match = match[same]
        test = {k: float(pd.to_numeric(match[k], errors="coerce").mean())
                for k in ACCURACY_KEYS if k in match}
        out[metric] = {"mode": study.mode, "value": float(best["mean"]),
                       "seeds": int(best["count"]), "params": params,
                       "selection_split": study.selection_split or "test",
                       "test": test, "trial_ids": list(match["trial_id"])}
    return out


def pareto_set(study: Study, done: pd.DataFrame, keys: list[str]) -> dict[str, Any]:
    """best.json of a search with several objectives: no single best, but the configurations
    (the swept values, seeds pooled) that no other dominates by their means over seeds in
    every objective, each with its means, 95 % t-intervals over the seeds and mean test
    figures. A configuration lacking an objective's value in a seed is left out."""
    from lfm_ray.study.seed_stats import non_dominated, t_interval

    objectives = list(study.objectives)
    groups = done.groupby(keys, dropna=False, sort=False) if keys else [((), done)]
    configs: dict[int, dict[str, Any]] = {}
    means: dict[int, list[float]] = {}
    for key, rows in groups:
        key = key if isinstance(key, tuple) else (key,)
        values = {m: pd.to_numeric(rows[m], errors="coerce") if m in rows else None
                  for m in objectives}
        if any(v is None or v.isna().any() for v in values.values()):
            continue
        figures = {}
        for m in objectives:
            mean, low, high = t_interval(values[m].to_numpy(float))
            figures[m] = {"mean": mean, "ci_low": None if pd.isna(low) else low,
                          "ci_high": None if pd.isna(high) else high}
        i = len(configs)
        means[i] = [figures[m]["mean"] for m in objectives]
        seeds = rows[SEED].tolist() if SEED in rows else []
        configs[i] = {
            "params": {k: (None if pd.isna(v) else _plain(v)) for k, v in zip(keys, key)},
            "objectives": figures, "seeds": len(rows),
            "seed_values": [_plain(s) for s in seeds],
            "test": {k: float(pd.to_numeric(rows[k], errors="coerce").mean())
                     for k in ACCURACY_KEYS if k in rows},
            "trial_ids": list(rows["trial_id"])}
    front = non_dominated(means, -1.0 if study.mode == "min" else 1.0)
    return {"objectives": objectives, "mode": study.mode,
            "selection_split": study.selection_split or "test",
            "rule": "non-dominated by the means over seeds (no other configuration at least "
                    "as good in every objective and better in one); intervals: 95 % "
                    "Student-t over the seeds",
            "configurations": len(configs), "pareto_set": [configs[i] for i in front]}


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def write_tables(study: Study, table: pd.DataFrame, complete: bool = False) -> None:
    """trials.csv, replaced atomically; best.json only for a complete study (every trial
    finished or failed): while trials are missing there is no best, so an older best.json
    goes."""
    from lfm_ray.driver.launch import write_json_atomic

    study.result_dir.mkdir(parents=True, exist_ok=True)
    tmp = study.result_dir / (TRIALS_FILE + ".tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, study.result_dir / TRIALS_FILE)
    if complete:
        write_json_atomic(study.result_dir / BEST_FILE, best_configs(study, table))
    elif (study.result_dir / BEST_FILE).exists():
        (study.result_dir / BEST_FILE).unlink()


def kept_rows(study: Study, experiments: Sequence[str]) -> pd.DataFrame:
    """Rows of trials.csv that belong to earlier experiments of an extended study (finished
    before this run; their Tune experiments are not run again)."""
    path = study.result_dir / TRIALS_FILE
    if not experiments or not path.is_file():
        return pd.DataFrame()
    table = pd.read_csv(path)
    if "experiment" not in table:
        return pd.DataFrame()
    return table[table["experiment"].isin(list(experiments))]


def combine(kept: pd.DataFrame, current: pd.DataFrame) -> pd.DataFrame:
    if kept.empty:
        return current
    return pd.concat([kept, current], ignore_index=True)


def table_from_results(study: Study, results, experiment: str,
                       rows: Rows | None = None) -> pd.DataFrame:
    """The final table from Tune's ResultGrid (restored trials included)."""
    trials = []
    for r in results:
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        status = "ERROR" if r.error else "TERMINATED"
        trials.append(TrialView(trial_id, status, r.config or {}, r.metrics or {},
                                last_line(str(r.error)) if r.error else "",
                                checkpoint=r.checkpoint))
    return (rows or Rows(study)).rows(trials, experiment)


@dataclass
class TrialView:
    """The few Trial attributes `trial_rows` reads, built from a Result."""

    trial_id: str
    status: str
    config: dict[str, Any]
    last_result: dict[str, Any]
    error_text: str = ""
    error_file: str | None = None
    checkpoint: Any = None
