"""A study's tables: trials.csv (one row per trial) and best.json, kept current as trials end."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from lfm_ray.config import RunConfig
from lfm_ray.study.spec import ALWAYS_COLUMNS, SEED, Study
from lfm_ray.train import ACCURACY_KEYS, METRIC_KEYS, VAL_METRIC_KEYS  # what epochs report

TRIALS_FILE = "trials.csv"
BEST_FILE = "best.json"


class Rows:
    """The study's trial rows, kept portable and cheap as the study grows.

    A finished trial's row is built once (a study of a thousand trials rewrites its table
    after every trial); its final result, history and confusion matrix are copied from its
    checkpoint into results/<name>/trials/<trial_id>/ (`artifacts`), and its checkpoint
    path is stored relative to the storage path, so the results folder renders anywhere."""

    def __init__(self, study: Study):
        self.study = study
        self.done: dict[str, dict[str, Any]] = {}

    def rows(self, trials: list[Any], experiment: str | None = None) -> pd.DataFrame:
        out = []
        for t in trials:
            key = f"{experiment}/{t.trial_id}"
            if key in self.done:
                out.append(self.done[key])
                continue
            row = self._row(t, experiment)
            if str(t.status) in ("TERMINATED", "ERROR"):
                self.done[key] = row
            out.append(row)
        return pd.DataFrame(out)

    def _row(self, t: Any, experiment: str | None) -> dict[str, Any]:
        study = self.study
        params = dict((t.config or {}).get("params") or {})
        row = trial_row(t.trial_id, t.status, error_message(t), params, study.swept,
                        study.config_for(params), dict(t.last_result or {}),
                        getattr(t, "checkpoint", None))
        row["experiment"] = experiment or study.name
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
    except OSError:
        return None
    return f"{ARTIFACTS_DIR}/{trial_id}"


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


def error_message(trial: Any) -> str:
    if getattr(trial, "error_text", ""):
        return trial.error_text[:500]
    path = getattr(trial, "error_file", None)
    if trial.status != "ERROR" or not path or not os.path.exists(path):
        return ""
    return last_line(Path(path).read_text(errors="replace"))[:500]


def best_configs(study: Study, table: pd.DataFrame) -> dict[str, Any]:
    """The best configuration by the study's selection metric (and each further objective),
    the mean over seeds deciding, with that configuration's mean test figures beside it.
    Nothing is selected on the test split of a study that has a validation split."""
    done = table[table["status"] == "TERMINATED"]
    out: dict[str, Any] = {}
    if done.empty:
        return out
    keys = [c for c in study.swept if c != SEED and c in done.columns]
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


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def write_tables(study: Study, table: pd.DataFrame) -> None:
    """trials.csv and best.json, each replaced atomically."""
    from lfm_ray.launch import write_json_atomic

    study.result_dir.mkdir(parents=True, exist_ok=True)
    tmp = study.result_dir / (TRIALS_FILE + ".tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, study.result_dir / TRIALS_FILE)
    write_json_atomic(study.result_dir / BEST_FILE, best_configs(study, table))


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


def tables_callback(study: Study, experiment: str, kept: pd.DataFrame, rows: Rows):
    from ray.tune import Callback

    class TablesCallback(Callback):
        """Rewrites the tables whenever a trial finishes or fails."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            write_tables(study, combine(kept, rows.rows(trials, experiment)))

        def on_trial_error(self, iteration, trials, trial, **info):
            write_tables(study, combine(kept, rows.rows(trials, experiment)))

    return TablesCallback()


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
