"""A study's results as tidy pandas frames, and their aggregation over seeds.

Three inputs are accepted: a results directory (results/<name>/ with study.json and
trials.csv, written by `lfm_ray.study`), a Tune experiment directory (read through Tune's own
`ExperimentAnalysis`), or a trials CSV. Whatever the input, the result is a `Study` with

- `trials`: one row per trial: the swept parameters by dotted name, the always-present
  columns (data.name, model.name, loss.name, mix.method), status, error, final metrics,
  wall time, GPU-hours, whether ASHA stopped it, its last checkpoint;
- `epochs`: one row per trial per epoch (the learning curves);
- `meta`: study.json (or what can be recovered from the Tune experiment).

What a report needs of each trial (final per-class accuracy, every epoch's metrics, the
confusion matrix with the sampling matrix P) is read from the copies the study keeps in
`results/<name>/trials/<trial_id>/` first (column `artifacts`), so a results folder that is
moved, committed or downloaded renders without the Ray folders; only where a trial has no
copy are its last checkpoint (`checkpoint_path`, relative to the study's storage path) and
the Tune experiment read instead. `better_than_rest` decides whether a best configuration
is better than the others at the study's seeds, for every "best" mark a report draws.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from lfm_ray.errors import LfmError
from lfm_ray.study.seed_stats import t_interval

GROUPS = ("many", "medium", "few", "all")
METRICS = tuple(f"acc_{g}" for g in GROUPS)
SEED = "runtime.seed"
DONE = "TERMINATED"
FAILED = "ERROR"
INTERRUPTED = "INTERRUPTED"  # a trial an interruption stopped on its way (not finished)
# Columns of the trials table that are not parameters (everything else may be one).
VAL_METRICS = tuple(f"val_{m}" for m in METRICS)
NOT_PARAMS = frozenset({
    "trial_id", "status", "error", "checkpoint_path", "node_id", "stopped_early", "epoch",
    "stage", "train_loss", "lr", "wall_time_s", "train_time_s", "gpu_hours", *METRICS,
    *VAL_METRICS, "test_epoch", "selection_split", "artifacts", "experiment",
})
ARTIFACTS_DIR = "trials"  # results/<name>/trials/<trial_id>/: the copies of each trial
RESULT_FILE, HISTORY_FILE, CONFUSION_FILE = "result.json", "history.json", "confusion.npz"
EPOCH_COLUMNS = ("epoch", "stage", "train_loss", *METRICS, *VAL_METRICS, "lr", "train_time_s")


@dataclass
class StudyResults:
    """One study's trials, learning curves and description."""

    trials: pd.DataFrame                       # one row per trial
    epochs: pd.DataFrame                       # one row per trial per epoch
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None                   # the directory the study was read from
    notes: list[str] = field(default_factory=list)  # what could not be read, for the report
    # Results computed once per loaded study (the best configuration, which three sections
    # of a report ask for: at 10,000 trials each costs seconds).
    computed: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or (self.path.name if self.path else "study"))

    @property
    def metric(self) -> str:
        return str(self.meta.get("metric") or "acc_all")

    @property
    def selection_split(self) -> str:
        """The split the metric is measured on: "val" for val_acc_*, else "test"."""
        split = self.meta.get("selection_split")
        if split in ("val", "test"):
            return str(split)
        return "val" if self.metric.startswith("val_") else "test"

    @property
    def mode(self) -> str:
        return "min" if self.meta.get("mode") == "min" else "max"

    @property
    def objectives(self) -> list[str]:
        return list(self.meta.get("objectives") or [])

    @property
    def search(self) -> str:
        return str(self.meta.get("search") or "grid")

    @property
    def swept(self) -> list[str]:
        """The swept parameters present in the table, in the study's declared order."""
        if self.meta.get("swept"):
            return [p for p in self.meta["swept"] if p in self.trials.columns]
        return [c for c in self.trials.columns
                if c not in NOT_PARAMS and self.trials[c].nunique(dropna=True) > 1]

    @property
    def params(self) -> list[str]:
        """The swept parameters that define a configuration (the seed excluded)."""
        return [p for p in self.swept if p != SEED]

    @property
    def finished(self) -> pd.DataFrame:
        return self.trials[self.trials["status"] == DONE]

    @property
    def failed(self) -> pd.DataFrame:
        return self.trials[self.trials["status"] == FAILED]

    @property
    def incomplete(self) -> list[str]:
        """What is missing from a study whose trials have not all ended (study.json's status
        "interrupted", "running" or "stopped_by_budget", or trials the table marks
        INTERRUPTED); empty for a
        complete study."""
        missing = [str(m) for m in self.meta.get("missing_trials") or []]
        stopped = [f"trial {t} (interrupted)" for t in
                   self.trials.loc[self.trials["status"] == INTERRUPTED, "trial_id"]] \
            if "status" in self.trials.columns else []
        if self.meta.get("status") in ("running", "interrupted", "stopped_by_budget") \
                and not (missing or stopped):
            missing = [f"unknown: study.json says the study is {self.meta['status']}"]
        return missing or stopped

    def require_finished(self) -> pd.DataFrame:
        """The finished trials; one clear error when there are none."""
        done = self.finished
        if done.empty:
            statuses = self.trials["status"].astype(str).value_counts().to_dict() \
                if len(self.trials) else {}
            summary = ", ".join(f"{n} {s}" for s, n in statuses.items()) or "no trials"
            raise LfmError(f"study {self.name!r} has no finished trials to report ({summary})")
        return done

    def require_param(self, param: str) -> None:
        """`param` must be a parameter this study swept."""
        if param not in self.swept:
            raise LfmError(f"parameter {param!r} was not swept in study {self.name!r}; "
                           f"swept: {', '.join(self.swept) or 'none'}")

    def declared_values(self, param: str) -> list[Any] | None:
        """The values the study declared for a grid parameter, in their declared order."""
        grid = self.meta.get("grid") or {}
        if param in grid:
            return list(grid[param])
        if param == SEED and self.meta.get("seeds"):
            return list(self.meta["seeds"])
        return None


# ---- loading ---------------------------------------------------------------------------
def load_study(path: str | os.PathLike) -> StudyResults:
    """A results directory, a Tune experiment directory (or URI), or a trials CSV."""
    text = os.fspath(path)
    if "://" in text:
        return _from_tune(text)
    p = Path(text).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise LfmError(f"{text!r} is not a study: a file must be a trials CSV; expected "
                           "results/<name>/ (study.json + trials.csv), a Tune experiment "
                           "directory, or a trials .csv")
        return _from_csv(p)
    if not p.is_dir():
        raise LfmError(f"{text!r} does not exist; expected results/<name>/ (study.json + "
                       "trials.csv), a Tune experiment directory, or a trials .csv")
    if (p / "study.json").is_file():
        return _from_results_dir(p)
    if is_tune_experiment(p):
        return _from_tune(str(p))
    raise LfmError(f"{text!r} is not a study: it holds no study.json and trials.csv "
                   "(results/<name>/) and no Tune experiment state; expected one of those "
                   "or a trials .csv")


def is_tune_experiment(path: str | os.PathLike) -> bool:
    """Tune writes experiment_state-<time>.json at the root of every experiment."""
    return any(Path(path).glob("experiment_state*.json"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LfmError(f"{str(path)!r} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise LfmError(f"{str(path)!r} must hold a JSON object")
    return data


def read_trials_csv(path: Path) -> pd.DataFrame:
    """A trials table; checks the columns every table has."""
    try:
        trials = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise LfmError(f"{str(path)!r} is not a readable trials table: {exc}") from None
    missing = [c for c in ("trial_id", "acc_all") if c not in trials.columns]
    if missing:
        raise LfmError(f"{str(path)!r} is not a trials table: it lacks the column(s) "
                       f"{', '.join(missing)}; expected the trials.csv a study writes")
    if "status" not in trials.columns:
        # A hand-made table of results: a row with metrics is a finished trial.
        trials["status"] = np.where(trials["acc_all"].notna(), DONE, FAILED)
    if "error" not in trials.columns:
        trials["error"] = ""
    trials["error"] = ["" if pd.isna(v) else str(v) for v in trials["error"]]
    if "stopped_early" in trials.columns:
        trials["stopped_early"] = trials["stopped_early"].map(_as_bool)
    trials["trial_id"] = trials["trial_id"].astype(str)
    return trials


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value) if value is not None and not _isnan(value) else False


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _from_results_dir(p: Path) -> StudyResults:
    meta = _read_json(p / "study.json")
    if not (p / "trials.csv").is_file():
        raise LfmError(f"study {meta.get('name', p.name)!r} in {str(p)!r} has no trials.csv "
                       "yet: no trial has finished or failed; run or resume the study first")
    trials = read_trials_csv(p / "trials.csv")
    study = StudyResults(trials=trials, epochs=pd.DataFrame(), meta=meta, path=p)
    study.epochs = _epochs_for(study, _experiments(study))
    return study


def experiment_paths(meta: dict[str, Any]) -> list[str]:
    """The study's Tune experiments (one, or more for a study that was extended)."""
    names, root = meta.get("experiments"), meta.get("storage_path")
    if names and root:
        return [_join(root, n) for n in names]
    return [meta["experiment_path"]] if meta.get("experiment_path") else []


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name if "://" in root else str(Path(root) / name)


def _experiments(study: StudyResults) -> list[str]:
    """experiment_paths, a relative storage path found from here (see storage_roots)."""
    names = study.meta.get("experiments")
    roots = storage_roots(study)
    if names and roots:
        for root in roots:
            paths = [str(root / n) for n in names]
            if all(is_tune_experiment(p) for p in paths):
                return paths
    return experiment_paths(study.meta)


def _from_csv(p: Path) -> StudyResults:
    trials = read_trials_csv(p)
    beside = p.parent / "study.json"
    meta = _read_json(beside) if beside.is_file() else {"name": p.stem}
    study = StudyResults(trials=trials, epochs=pd.DataFrame(), meta=meta, path=p.parent)
    study.epochs = _epochs_for(study, _experiments(study))
    return study


# ---- each trial's files: the study's copies first, the checkpoint second --------------------
def shown_path(path: str | os.PathLike, base: Path | None = None) -> str:
    """A path as a report may print it: a URI or a relative path as it is, an absolute one
    relative to `base` (the results folder) where it lies below it, else its last two parts,
    so no report names a folder of the machine that ran or rendered it."""
    text = os.fspath(path)
    if "://" in text or not os.path.isabs(text):
        return text
    if base is not None:
        try:
            return str(Path(text).relative_to(Path(base).resolve()))
        except ValueError:
            pass
    return str(Path("…", *Path(text).parts[-2:]))


def storage_roots(study: StudyResults) -> list[Path]:
    """Where the study's storage path may be on this machine: as recorded when absolute;
    a relative one (as the user typed it) from the working directory, or from a folder
    above the results folder (runs/<name>/ beside runs/ray/)."""
    root = study.meta.get("storage_path")
    if not root or "://" in str(root):
        return []
    root = Path(str(root)).expanduser()
    if root.is_absolute():
        return [root]
    out = [Path.cwd() / root]
    if study.path is not None:
        out += [parent / root for parent in list(Path(study.path).resolve().parents)[:3]]
    return list(dict.fromkeys(out))


def copy_dir(study: StudyResults, row: pd.Series | dict[str, Any]) -> Path | None:
    """The trial's copy under the results folder (column `artifacts`, relative to it), if
    it is there."""
    if study.path is None:
        return None
    given = row.get("artifacts")
    rel = given if isinstance(given, str) and given else f"{ARTIFACTS_DIR}/{row.get('trial_id')}"
    copy = Path(study.path) / rel
    return copy if copy.is_dir() else None


def checkpoint_dir(study: StudyResults, row: pd.Series | dict[str, Any]) -> Path | None:
    """The trial's last checkpoint on this machine (`checkpoint_path`: relative to the
    storage path, or absolute in older tables), if it is reachable."""
    ckpt = row.get("checkpoint_path")
    if not isinstance(ckpt, str) or not ckpt or "://" in ckpt:
        return None
    path = Path(ckpt).expanduser()
    candidates = [path] if path.is_absolute() else \
        [r / path for r in storage_roots(study)] + [Path.cwd() / path]
    return next((c for c in candidates if c.is_dir()), None)


def trial_dirs(study: StudyResults, row: pd.Series | dict[str, Any]) -> list[Path]:
    """The folders that hold a trial's result.json, history.json and confusion.npz, in the
    order to read them: its copy under the results folder, then its last checkpoint."""
    return [d for d in (copy_dir(study, row), checkpoint_dir(study, row)) if d is not None]


def trial_result(study: StudyResults, row: pd.Series | dict[str, Any]) -> dict[str, Any] | None:
    """A trial's final result with per-class accuracy and class counts (load_checkpoint_result
    of its copy, else of its checkpoint), or None."""
    for folder in trial_dirs(study, row):
        result = load_checkpoint_result(folder)
        if result is not None:
            return result
    return None


def trial_confusion(study: StudyResults, row: pd.Series | dict[str, Any]) -> Path | None:
    """The trial's confusion.npz (the copy first), or None."""
    for folder in trial_dirs(study, row):
        if (folder / CONFUSION_FILE).is_file():
            return folder / CONFUSION_FILE
    return None


def _history(folder: Path) -> list[dict[str, Any]]:
    try:
        history = json.loads((folder / HISTORY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return history if isinstance(history, list) else []


def _epochs_for(study: StudyResults, experiments: list[str]) -> pd.DataFrame:
    """Learning curves: each trial's copied history.json; for trials without a copy, Tune's
    per-trial frames, else the history.json of their checkpoints."""
    frames, missing = [], []
    records: list[dict[str, Any]] = []  # the copies' epochs, one frame for all (fast at 10,000)
    for row in study.trials.to_dict("records"):  # plain dicts: fast at 10,000 trials
        copy = copy_dir(study, row)
        history = _history(copy) if copy is not None else []
        if history:
            trial_id = str(row["trial_id"])
            records.extend({**{k: h[k] for k in EPOCH_COLUMNS if k in h}, "trial_id": trial_id}
                           for h in history if isinstance(h, dict))
        else:
            missing.append(row)
    if records:
        frames.append(pd.DataFrame.from_records(records))
    if missing:
        wanted = {str(r["trial_id"]) for r in missing}
        readable = [e for e in experiments if "://" in e or is_tune_experiment(e)]
        got = pd.DataFrame()
        if readable and len(readable) == len(experiments):
            try:
                got = _tidy_epochs([tune_epochs(e, wanted) for e in readable])
            except Exception as exc:  # noqa: BLE001 - curves are optional; say why they are absent
                why = str(exc).splitlines()[0] if str(exc) else repr(exc)
                study.notes.append(f"Tune experiment {shown_path(readable[0], study.path)} "
                                   f"could not be read ({why}); learning curves come from "
                                   "the checkpoints instead")
        if not got.empty:
            frames.append(got)
            wanted -= set(got["trial_id"])
        for row in missing:
            if str(row["trial_id"]) not in wanted:
                continue
            for folder in trial_dirs(study, row):
                history = _history(folder)
                if history:
                    frames.append(_history_frame(history, str(row["trial_id"])))
                    break
    epochs = _tidy_epochs(frames)
    if epochs.empty and len(study.trials):
        study.notes.append("no per-epoch results: the trials have no copies under "
                           f"{ARTIFACTS_DIR}/ and their checkpoints and Tune experiment are "
                           "not reachable from here")
    return epochs


def _history_frame(history: list[dict[str, Any]], trial_id: str) -> pd.DataFrame:
    df = pd.DataFrame(history)
    keep = [c for c in EPOCH_COLUMNS if c in df.columns]
    return df[keep].assign(trial_id=trial_id)


def _analysis(path: str):
    from ray.tune import ExperimentAnalysis

    return ExperimentAnalysis(path)


def tune_epochs(path: str, trial_ids: Iterable[str] | None = None, analysis=None) -> pd.DataFrame:
    """One row per trial per reported epoch, from Tune's per-trial result frames."""
    analysis = analysis or _analysis(path)
    wanted = set(trial_ids) if trial_ids is not None else None
    frames = []
    for key, df in analysis.trial_dataframes.items():
        if df is None or df.empty or "epoch" not in df.columns:
            continue
        trial_id = str(df["trial_id"].iloc[-1]) if "trial_id" in df.columns else str(key)
        if wanted is not None and trial_id not in wanted:
            continue
        keep = [c for c in EPOCH_COLUMNS if c in df.columns]
        frames.append(df[keep].assign(trial_id=trial_id))
    return _tidy_epochs(frames)


def history_epochs(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per trial per epoch from history.json, which the trainer keeps beside every
    checkpoint (its own file, every epoch's metrics so far); `checkpoint_path` as given."""
    frames = []
    if "checkpoint_path" not in trials.columns:
        return pd.DataFrame()
    for _, row in trials.iterrows():
        path = row["checkpoint_path"]
        history = _history(Path(path)) if isinstance(path, str) else []
        if history:
            frames.append(_history_frame(history, str(row["trial_id"])))
    return _tidy_epochs(frames)


def _tidy_epochs(frames: list[pd.DataFrame]) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame(columns=["trial_id", *EPOCH_COLUMNS])
    out = pd.concat(frames, ignore_index=True)
    # A trial restored from a checkpoint may report an epoch twice; the last report counts.
    out = out.drop_duplicates(["trial_id", "epoch"], keep="last")
    return out.sort_values(["trial_id", "epoch"]).reset_index(drop=True)


def _from_tune(path: str) -> StudyResults:
    trials, epochs, meta = read_tune_experiment(path)
    study = StudyResults(trials=trials, epochs=epochs, meta=meta,
                  path=None if "://" in path else Path(path))
    if trials.empty:
        raise LfmError(f"Tune experiment {path!r} holds no trials")
    return study


def read_tune_experiment(path: str) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(trials, epochs, meta) straight from a Tune experiment through Tune's reader."""
    try:
        analysis = _analysis(path)
    except Exception as exc:  # noqa: BLE001 - Tune's reader says what is wrong
        raise LfmError(f"{path!r} is not a readable Tune experiment: "
                       f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    from lfm_ray.study import trial_row

    plan = _trial_plan(path)
    rows, params_seen, base, variants = [], [], None, {}
    for trial in analysis.trials:
        config = dict(trial.config or {})
        params = dict(config.get("params") or {})
        base = base or config.get("base")
        variants = variants or config.get("variants") or {}
        for name in params:
            if name not in params_seen:
                params_seen.append(name)
        cfg = _planned_config(plan, params) if plan else _run_config(config, params)
        row = trial_row(str(trial.trial_id), str(trial.status), _tune_error(trial), params,
                        list(params), cfg, dict(trial.last_result or {}),
                        getattr(trial, "checkpoint", None))
        rows.append(row)
    if plan:
        variants = plan.variants
        base = plan.bases.get(plan.default_dataset)
    trials = pd.DataFrame(rows)
    if "gpu_hours" not in trials.columns:
        trials["gpu_hours"] = np.nan
    if "stopped_early" not in trials.columns:
        trials["stopped_early"] = False
    # Everything a trial's params named is swept; the seed last, as studies write it.
    swept = [p for p in params_seen if p != SEED] + ([SEED] if SEED in params_seen else [])
    meta: dict[str, Any] = {"name": Path(path.rstrip("/")).name, "swept": swept,
                            "experiment_path": path, "metric": "acc_all", "mode": "max",
                            "search": "grid", "variants": variants}
    if base:
        meta["base_config"] = base
    epochs = tune_epochs(path, analysis=analysis)
    return trials, epochs, meta


def _trial_plan(path: str):
    """The study's TrialPlan that run_study leaves in its Tune experiment folder, if any."""
    from lfm_ray.study.trial import PLAN_FILE, TrialPlan

    file = Path(path) / PLAN_FILE
    if "://" in path or not file.is_file():
        return None
    raw = _read_json(file)
    return TrialPlan(bases=raw["bases"], default_dataset=raw["default_dataset"],
                     variants=raw.get("variants") or {}, train_storage="", max_failures=0)


def _planned_config(plan, params: dict[str, Any]):
    try:
        return plan.config_for(params)
    except (LfmError, KeyError, TypeError, ValueError):
        return None


def _tune_error(trial: Any) -> str:
    """The last line of a failed trial's error, through Tune's own accessors."""
    if str(trial.status) != FAILED:
        return ""
    try:
        err = trial.get_pickled_error() or trial.get_error()
    except Exception:  # noqa: BLE001 - an unreadable error file still marks the trial failed
        err = None
    text = str(err) if err else "failed"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "failed")[:500]


def _run_config(config: dict[str, Any], params: dict[str, Any]):
    """The trial's RunConfig, when the trial is one of lfm-ray's (its config has a base)."""
    if not isinstance(config.get("base"), dict):
        return None
    from lfm_ray.study import config_for

    try:
        return config_for(config["base"], config.get("variants") or {}, params)
    except (LfmError, KeyError, TypeError, ValueError):
        return None


# ---- aggregation over seeds --------------------------------------------------------------
def aggregate(trials: pd.DataFrame, by: Sequence[str], metrics: Sequence[str] = METRICS,
              confidence: float = 0.95, sort: bool = True) -> pd.DataFrame:
    """Per configuration (`by`), over its seeds: for each metric `<m>_mean`, `<m>_std`
    (sample standard deviation, ddof 1), `<m>_n`, and a two-sided `confidence` interval of
    the mean from Student's t: mean ± t_{(1+c)/2, n-1} · std / sqrt(n) (`<m>_ci_low`,
    `<m>_ci_high`, half-width `<m>_ci`). std and the interval are NaN for a single seed.
    Only finished trials count when the table has a status column. `sort=False` keeps the
    order in which configurations first appear."""
    from scipy import stats

    by = list(by)
    missing = [b for b in [*by, *metrics] if b not in trials.columns]
    if missing:
        raise LfmError(f"cannot aggregate: the trials table has no column(s) "
                       f"{', '.join(missing)}; columns: {', '.join(map(str, trials.columns))}")
    done = trials[trials["status"] == DONE] if "status" in trials.columns else trials
    if by and len(done):
        return _aggregate_grouped(done, by, metrics, confidence, sort)
    rows = []
    groups = done.groupby(by, dropna=False, sort=sort) if by else [((), done)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(by, key))
        for m in metrics:
            values = pd.to_numeric(group[m], errors="coerce").dropna().to_numpy(float)
            n = len(values)
            mean = float(values.mean()) if n else float("nan")
            std = float(values.std(ddof=1)) if n > 1 else float("nan")
            half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n)) \
                if n > 1 else float("nan")
            row.update({f"{m}_mean": mean, f"{m}_std": std, f"{m}_n": n, f"{m}_ci": half,
                        f"{m}_ci_low": mean - half, f"{m}_ci_high": mean + half})
        rows.append(row)
    return pd.DataFrame(rows)


def _aggregate_grouped(done: pd.DataFrame, by: list[str], metrics: Sequence[str],
                       confidence: float, sort: bool) -> pd.DataFrame:
    """aggregate's columns per configuration in one grouped pass (a search of 10,000
    trials has 10,000 configurations)."""
    from scipy import stats

    numeric = done[by].copy()
    for m in metrics:
        numeric[f"{m} (values)"] = pd.to_numeric(done[m], errors="coerce")
    grouped = numeric.groupby(by, dropna=False, sort=sort)
    out = grouped.size().reset_index()[by]
    for m in metrics:
        col = grouped[f"{m} (values)"]
        mean = col.mean().to_numpy(float)
        std = col.std(ddof=1).to_numpy(float)
        n = col.count().to_numpy(int)
        with np.errstate(invalid="ignore", divide="ignore"):
            t = np.where(n > 1, stats.t.ppf((1 + confidence) / 2, np.maximum(n - 1, 1)), np.nan)
            half = np.where(n > 1, t * std / np.sqrt(np.maximum(n, 1)), np.nan)
        std = np.where(n > 1, std, np.nan)
        out[f"{m}_mean"], out[f"{m}_std"], out[f"{m}_n"] = mean, std, n
        out[f"{m}_ci"], out[f"{m}_ci_low"], out[f"{m}_ci_high"] = half, mean - half, mean + half
    return out


def best_row(agg: pd.DataFrame, metric: str, mode: str = "max") -> int:
    """Positional index of the best configuration of an aggregate table."""
    values = agg[f"{metric}_mean"].to_numpy(float)
    if np.isnan(values).all():
        raise LfmError(f"no finished trial reported {metric!r}")
    return int(np.nanargmin(values) if mode == "min" else np.nanargmax(values))


def is_numeric_param(series: pd.Series) -> bool:
    """A swept parameter plotted on a numeric axis: numbers (not booleans), ≥ 2 values."""
    values = series.dropna()
    if values.empty or pd.api.types.is_bool_dtype(values):
        return False
    numeric = pd.to_numeric(values, errors="coerce")
    return bool(numeric.notna().all() and numeric.nunique() > 1)


def load_checkpoint_result(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """A checkpoint's result.json with per-class accuracy and the training count of every
    class; counts come from the data set named in state.pt when result.json lacks them.
    None when the checkpoint is not reachable or holds no per-class accuracy."""
    path = Path(checkpoint)
    if not (path / "result.json").is_file():
        return None
    try:
        result = json.loads((path / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if "per_class_acc" not in result:
        return None
    if "class_counts" not in result:
        info = _dataset_class_info(path)
        if info is None:
            return None
        result.update(info)
    return result


def _dataset_class_info(checkpoint: Path) -> dict[str, Any] | None:
    """Class names and training counts of the data set a checkpoint was trained on."""
    if not (checkpoint / "state.pt").is_file():
        return None
    try:
        from lfm_ray.config import RunConfig
        from lfm_ray.data import build_dataset, run_options
        from lfm_ray.safe_load import load_state_file

        state = load_state_file(checkpoint / "state.pt")
        data = RunConfig.from_dict(state["config"]).data
        ds = build_dataset(data.name, root=data.root,
                           **run_options(data))
        return {"class_counts": [int(c) for c in ds.class_counts],
                "class_names": list(ds.class_names)}
    except Exception:  # noqa: BLE001 - the figure is optional when the data set is absent
        return None


# ---- is the best configuration better than the rest? ---------------------------------------
@dataclass
class Separation:
    """Whether the best configuration (by mean) is better than every other at `confidence`.

    `best` and `runner_up` are keys of the input; `diff` is best − runner-up (the mean
    paired difference for a paired test, the difference of the means otherwise) and
    [`low`, `high`] its interval for a paired test (NaN otherwise: an unpaired test compares
    the two means' own intervals). `reason` says why no claim is made when `separated` is
    False."""

    best: Any
    runner_up: Any
    separated: bool
    test: str              # "paired", "unpaired", or "" (no test possible)
    diff: float = float("nan")
    low: float = float("nan")
    high: float = float("nan")
    n: int = 0             # seeds behind the runner-up comparison (shared ones when paired)
    reason: str = ""
    against: Any = None    # the configuration the best is not separated from, if any
    sd: float = float("nan")  # std of the paired differences (pooled std when unpaired)


def better_than_rest(values_by_config: Mapping[Any, Sequence[float]],
                     seeds: Mapping[Any, Sequence[Any]] | None = None, mode: str = "max",
                     confidence: float = 0.95) -> Separation:
    """Is the configuration with the best mean better than each other one at `confidence`?

    Against each other configuration: over the seeds both ran (`seeds[c][i]` is the seed of
    `values_by_config[c][i]`), the `confidence` t-interval of the mean paired difference must
    exclude 0 on the best's side; with fewer than two shared seeds (or no `seeds`) the two
    means' t-intervals must not overlap, which needs two or more seeds on each side. The
    best is separated only when it is separated from every other configuration (the
    runner-up's comparison is the one reported). NaN values are left out."""
    sign = -1.0 if mode == "min" else 1.0
    clean: dict[Any, dict[Any, float]] = {}
    for key, values in values_by_config.items():
        ids = list(seeds[key]) if seeds is not None else list(range(len(values)))
        if len(ids) != len(values):
            raise LfmError(f"configuration {key!r} has {len(values)} values but {len(ids)} seeds")
        kept = {s: float(v) for s, v in zip(ids, values) if not _isnan(float(v))}
        if kept:
            clean[key] = kept
    if not clean:
        raise LfmError("better_than_rest needs at least one configuration with a value")
    means = {k: float(np.mean(list(v.values()))) for k, v in clean.items()}
    order = sorted(clean, key=lambda k: -sign * means[k])
    best = order[0]
    if len(order) == 1:
        return Separation(best, None, False, "", reason="one configuration: nothing to compare")
    paired = seeds is not None
    results = [_compare(clean[best], clean[other], sign, paired, confidence)
               for other in order[1:]]
    first = results[0]
    separated = all(r.separated for r in results)
    failing = next((i for i, r in enumerate(results) if not r.separated), None)
    return Separation(best, order[1], separated, first.test, first.diff, first.low,
                      first.high, first.n,
                      "" if failing is None else results[failing].reason,
                      None if failing is None else order[1 + failing], first.sd)


def _compare(best: dict[Any, float], other: dict[Any, float], sign: float, paired: bool,
             confidence: float) -> Separation:
    shared = [s for s in best if s in other] if paired else []
    if len(shared) >= 2:
        diffs = [best[s] - other[s] for s in shared]
        mean, low, high = t_interval(diffs, confidence)
        ok = bool(low > 0) if sign > 0 else bool(high < 0)
        return Separation(None, None, ok, "paired", mean, low, high, len(shared),
                          "" if ok else "the interval of the paired difference includes 0",
                          sd=float(np.std(diffs, ddof=1)))
    a, b = list(best.values()), list(other.values())
    diff = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2:
        return Separation(None, None, False, "", diff, n=min(len(a), len(b)),
                          reason="fewer than two seeds: no interval")
    _, a_low, a_high = t_interval(a, confidence)
    _, b_low, b_high = t_interval(b, confidence)
    ok = bool(a_low > b_high) if sign > 0 else bool(a_high < b_low)
    pooled = math.sqrt(((len(a) - 1) * np.var(a, ddof=1) + (len(b) - 1) * np.var(b, ddof=1))
                       / (len(a) + len(b) - 2))
    return Separation(None, None, ok, "unpaired", diff, n=min(len(a), len(b)),
                      reason="" if ok else "the intervals of the means overlap", sd=pooled)


def seed_values(trials: pd.DataFrame, by: Sequence[str], metric: str
                ) -> tuple[dict[tuple, list[float]], dict[tuple, list[Any]]]:
    """Per configuration of `by` (a tuple key, NaN as None), the finished trials' values of
    `metric` and their seeds (the trial id where there is no seed column), for
    better_than_rest."""
    done = trials[trials["status"] == DONE] if "status" in trials.columns else trials
    values: dict[tuple, list[float]] = {}
    seeds: dict[tuple, list[Any]] = {}
    numbers = pd.to_numeric(done[metric], errors="coerce") if metric in done.columns \
        else pd.Series(np.nan, index=done.index)
    # Column by column (a search of 10,000 trials): the keys as config_key makes them.
    columns = [done[p].tolist() for p in by]
    ids = done["trial_id"].tolist()
    seed_column = done[SEED].tolist() if SEED in done.columns else [None] * len(done)
    for i, v in enumerate(numbers.to_numpy(float)):
        key = tuple(_plain_value(col[i]) for col in columns)
        seed = seed_column[i]
        values.setdefault(key, []).append(float(v))
        seeds.setdefault(key, []).append(ids[i] if seed is None or _isnan(seed) else seed)
    return values, seeds


def _plain_value(v: Any) -> Any:
    """A configuration key's value: a missing value (NaN) as None, numpy scalars as Python's."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if isinstance(v, np.generic) else v


def config_key(row: pd.Series | Mapping[str, Any], by: Sequence[str]) -> tuple:
    """A configuration's values of `by` as a hashable key, a missing value (NaN) as None."""
    return tuple(_plain_value(row[p]) for p in by)
