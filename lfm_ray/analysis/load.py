"""A study's results as tidy pandas frames, and their aggregation over seeds.

Three inputs are accepted: a results directory (results/<name>/ with study.json and
trials.csv, written by `lfm_ray.study`), a Tune experiment directory (read through Tune's own
`ExperimentAnalysis`), or a trials CSV. Whatever the input, the result is a `Study` with

- `trials`: one row per trial: the swept parameters by dotted name, the always-present
  columns (data.name, model.name, loss.name, mix.method), status, error, final metrics,
  wall time, GPU-hours, whether ASHA stopped it, its last checkpoint;
- `epochs`: one row per trial per epoch (the learning curves), from Tune's per-trial result
  frames when the experiment directory is reachable, else from the trainer's own
  history.json beside each trial's last checkpoint;
- `meta`: study.json (or what can be recovered from the Tune experiment).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from lfm_ray.errors import LfmError

GROUPS = ("many", "medium", "few", "all")
METRICS = tuple(f"acc_{g}" for g in GROUPS)
SEED = "runtime.seed"
DONE = "TERMINATED"
FAILED = "ERROR"
# Columns of the trials table that are not parameters (everything else may be one).
NOT_PARAMS = frozenset({
    "trial_id", "status", "error", "checkpoint_path", "node_id", "stopped_early", "epoch",
    "stage", "train_loss", "lr", "wall_time_s", "train_time_s", "gpu_hours", *METRICS,
})
EPOCH_COLUMNS = ("epoch", "stage", "train_loss", *METRICS, "lr", "train_time_s")


@dataclass
class StudyResults:
    """One study's trials, learning curves and description."""

    trials: pd.DataFrame                       # one row per trial
    epochs: pd.DataFrame                       # one row per trial per epoch
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None                   # the directory the study was read from
    notes: list[str] = field(default_factory=list)  # what could not be read, for the report

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or (self.path.name if self.path else "study"))

    @property
    def metric(self) -> str:
        return str(self.meta.get("metric") or "acc_all")

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
    study.epochs = _epochs_for(study, experiment_paths(meta))
    return study


def experiment_paths(meta: dict[str, Any]) -> list[str]:
    """The study's Tune experiments (one, or more for a study that was extended)."""
    from lfm_ray.study.spec import join_path

    names, root = meta.get("experiments"), meta.get("storage_path")
    if names and root:
        return [join_path(root, n) for n in names]
    return [meta["experiment_path"]] if meta.get("experiment_path") else []


def _from_csv(p: Path) -> StudyResults:
    trials = read_trials_csv(p)
    beside = p.parent / "study.json"
    meta = _read_json(beside) if beside.is_file() else {"name": p.stem}
    study = StudyResults(trials=trials, epochs=pd.DataFrame(), meta=meta, path=p.parent)
    study.epochs = _epochs_for(study, experiment_paths(meta))
    return study


def _epochs_for(study: StudyResults, experiments: list[str]) -> pd.DataFrame:
    """Learning curves: Tune's per-trial frames, else the checkpoints' history.json."""
    readable = [e for e in experiments if "://" in e or is_tune_experiment(e)]
    if readable and len(readable) == len(experiments):
        try:
            wanted = set(study.trials["trial_id"])
            return _tidy_epochs([tune_epochs(e, wanted) for e in readable])
        except Exception as exc:  # noqa: BLE001 - curves are optional; say why they are absent
            study.notes.append(f"Tune experiment {readable[0]} could not be read ({exc}); "
                               "learning curves come from the checkpoints instead")
    epochs = history_epochs(study.trials)
    if epochs.empty:
        study.notes.append("no per-epoch results: the Tune experiment directory "
                           f"({', '.join(experiments) or 'not recorded'}) and the trials' "
                           "checkpoints are not reachable")
    return epochs


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
    checkpoint (its own file, every epoch's metrics so far)."""
    frames = []
    if "checkpoint_path" not in trials.columns:
        return pd.DataFrame()
    for _, row in trials.iterrows():
        path = row["checkpoint_path"]
        if not isinstance(path, str) or not (Path(path) / "history.json").is_file():
            continue
        try:
            history = json.loads((Path(path) / "history.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if history:
            df = pd.DataFrame(history)
            keep = [c for c in EPOCH_COLUMNS if c in df.columns]
            frames.append(df[keep].assign(trial_id=str(row["trial_id"])))
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
        from lfm_ray.data import build_dataset, options_for
        from lfm_ray.safe_load import load_state_file

        state = load_state_file(checkpoint / "state.pt")
        data = RunConfig.from_dict(state["config"]).data
        ds = build_dataset(data.name, root=data.root,
                           **options_for(data.name, seed=data.seed,
                                         imbalance_factor=data.imbalance_factor))
        return {"class_counts": [int(c) for c in ds.class_counts],
                "class_names": list(ds.class_names)}
    except Exception:  # noqa: BLE001 - the figure is optional when the data set is absent
        return None
