"""Studies: a Ray Tune experiment whose trials each run one TorchTrainer.

A `Study` says what to vary (a grid crossed with seeds, or a space for Optuna or random
search), what to optimise and where to keep results. `run_study` checks everything it can
before any trial starts, runs the trials (each a small Tune function that builds a
TorchTrainer and forwards its per-epoch reports with `TuneReportCallback`), and keeps
`results/<name>/trials.csv` and `best.json` current as trials finish. Running the same study
again with the same name resumes it: finished trials are kept, unfinished ones continue from
their last checkpoint (Ray Train finds it under the trial's own storage path).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from lfm_ray.config import RunConfig, known_fields
from lfm_ray.errors import LfmError, unknown_name
from lfm_ray.launch import (
    apply_fast_start_env, check_names, check_resources, init_ray, is_local, make_trainer,
    prepare_node,
)
from lfm_ray.train import METRIC_KEYS  # what every epoch reports

ALWAYS_COLUMNS = ("data.name", "model.name", "loss.name", "mix.method")
SEARCHES = ("grid", "optuna", "random")
SCHEDULERS = ("none", "asha")
SAMPLERS = ("tpe", "gp", "cmaes", "random")


# ---- search spaces -------------------------------------------------------------------------
@dataclass
class Dim:
    """One dimension of an Optuna or random search space.

    `when` makes it conditional (define-by-run): `Dim.uniform(0, 5, when={"loss.name":
    "focal"})` exists only in trials whose loss is focal.
    """

    kind: str                          # loguniform | uniform | int | choice
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    when: dict[str, Any] | None = None

    @classmethod
    def loguniform(cls, low: float, high: float, when: dict | None = None) -> "Dim":
        return cls("loguniform", float(low), float(high), when=when)

    @classmethod
    def uniform(cls, low: float, high: float, when: dict | None = None) -> "Dim":
        return cls("uniform", float(low), float(high), when=when)

    @classmethod
    def int(cls, low: int, high: int, when: dict | None = None) -> "Dim":
        return cls("int", low, high, when=when)

    @classmethod
    def choice(cls, choices: list[Any], when: dict | None = None) -> "Dim":
        return cls("choice", choices=tuple(choices), when=when)

    def check(self, name: str) -> None:
        if self.kind not in ("loguniform", "uniform", "int", "choice"):
            raise LfmError(f"space {name}: unknown kind {self.kind!r}; "
                           "known: choice, int, loguniform, uniform")
        if self.kind == "choice":
            if not self.choices:
                raise LfmError(f"space {name}: a choice needs at least one value")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise LfmError(f"space {name}: needs low < high, got {self.low!r}, {self.high!r}")
        elif self.kind == "loguniform" and self.low <= 0:
            raise LfmError(f"space {name}: loguniform needs low > 0, got {self.low!r}")

    def values_to_check(self) -> list[Any]:
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]


def parse_dim(text: str) -> Dim:
    """`loguniform:0.002:31.25`, `uniform:0:2`, `int:1:10` or `choice:ce,mms` (CLI form)."""
    kind, _, rest = text.partition(":")
    try:
        if kind == "choice":
            return Dim.choice([_literal(v) for v in rest.split(",") if v != ""])
        low, high = rest.split(":")
        return Dim(kind, float(low), float(high))
    except ValueError:
        raise LfmError(f"search dimension {text!r} is not valid; expected loguniform:LOW:HIGH, "
                       "uniform:LOW:HIGH, int:LOW:HIGH or choice:A,B,...") from None


def _literal(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


# ---- the study -----------------------------------------------------------------------------
@dataclass
class Study:
    name: str
    base: RunConfig = field(default_factory=RunConfig)
    search: str = "grid"                 # grid | optuna | random
    grid: dict[str, list[Any]] = field(default_factory=dict)   # dotted name -> values
    space: dict[str, Dim] = field(default_factory=dict)        # optuna / random
    seeds: list[int] = field(default_factory=lambda: [0])      # crossed with the grid
    num_samples: int = 8                 # optuna / random: trials to run
    metric: str = "acc_all"              # what "best" means, and what ASHA and Optuna use
    mode: str = "max"
    objectives: list[str] = field(default_factory=list)  # >1: multi-objective Optuna
    # Named bundles of settings swept as one parameter, "method" (e.g. "LFM + MMS" ->
    # {"loss.name": "mms", "mix.method": "lfm"}): the rows of the paper's comparison tables.
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    scheduler: str = "none"              # none | asha (on the global epoch)
    sampler: str = "tpe"                 # Optuna sampler
    optuna_storage: str | None = None    # e.g. sqlite:///results/optuna.db for optuna-dashboard
    storage_path: str = "results/ray"    # Tune experiment root: a local path or a URI
    results_dir: str = "results"         # trials.csv, best.json, study.json go to <dir>/<name>
    max_concurrent: int | None = None    # cap on concurrent trials; None: what resources allow
    max_failures: int = 1                # retries of a crashed trial from its checkpoint
    address: str | None = None           # Ray cluster; None: RAY_ADDRESS or a local instance
    prepare_data: bool = True            # build the node data cache in the driver first
    callbacks: list[Any] = field(default_factory=list)  # extra ray.tune.Callback objects
    command: list[str] = field(default_factory=lambda: list(sys.argv))

    @property
    def result_dir(self) -> Path:
        return Path(self.results_dir) / self.name

    @property
    def experiment_path(self) -> str:
        return _join(self.storage_path, self.name)

    @property
    def swept(self) -> list[str]:
        names = list(self.grid) if self.search == "grid" else list(self.space)
        if self.search != "optuna" and len(self.seeds) > 1 or self.search == "grid":
            names.append("runtime.seed")
        return list(dict.fromkeys(names))

    def config_for(self, params: dict[str, Any]) -> RunConfig:
        """The RunConfig of one trial: base, then the trial's method bundle, then its values."""
        return config_for(self.base.to_dict(), self.variants, params)

    def total_epochs(self, params: dict[str, Any] | None = None) -> int:
        cfg = self.config_for(params or {})
        return cfg.stage1.epochs + cfg.stage2.epochs


METHOD = "method"  # the grid parameter that picks a named bundle from Study.variants


def config_for(base: dict[str, Any], variants: dict[str, dict[str, Any]],
               params: dict[str, Any]) -> RunConfig:
    cfg = RunConfig.from_dict(base)
    if METHOD in params:
        cfg.override(variants[params[METHOD]])
    return cfg.override({k: v for k, v in params.items() if k != METHOD})


def _join(root: str, name: str) -> str:
    if "://" in root:
        return root.rstrip("/") + "/" + name
    return str(Path(root).resolve() / name)


# ---- checks before any trial starts ---------------------------------------------------------
def validate(study: Study) -> None:
    """One clear error for the first problem, before Ray starts."""
    if not study.name or any(c in study.name for c in "/\\ "):
        raise LfmError(f"study name {study.name!r} is not valid; use letters, digits, - and _")
    if study.search not in SEARCHES:
        raise unknown_name("search", study.search, SEARCHES)
    if study.scheduler not in SCHEDULERS:
        raise unknown_name("scheduler", study.scheduler, SCHEDULERS)
    if study.sampler not in SAMPLERS:
        raise unknown_name("Optuna sampler", study.sampler, SAMPLERS)
    if study.mode not in ("max", "min"):
        raise LfmError(f"mode {study.mode!r} is not valid; expected 'max' or 'min'")
    metrics = METRIC_KEYS[2:]
    for m in [study.metric, *study.objectives]:
        if m not in metrics:
            raise unknown_name("metric", m, metrics)
    if study.scheduler == "asha" and len(study.objectives) > 1:
        raise LfmError("ASHA stops trials on one metric; use scheduler 'none' with several objectives")
    if len(study.objectives) > 1 and study.search != "optuna":
        raise LfmError("several objectives need search 'optuna' (its Pareto front)")
    if not study.seeds:
        raise LfmError("seeds is empty; give at least one seed")
    fields = set(known_fields())
    if study.search == "grid":
        if not study.grid:
            raise LfmError("the grid is empty; give at least one parameter with values")
        for name, values in study.grid.items():
            if name == METHOD:
                missing = [v for v in values if v not in study.variants]
                if missing:
                    raise unknown_name("method", missing[0], list(study.variants))
                continue
            if name not in fields:
                raise unknown_name("study parameter", name, sorted(fields))
            if not isinstance(values, (list, tuple)) or len(values) == 0:
                raise LfmError(f"grid parameter {name!r} has no values; give a non-empty list")
    else:
        if not study.space:
            raise LfmError(f"search {study.search!r} needs a space; give at least one dimension")
        if study.num_samples < 1:
            raise LfmError(f"num_samples={study.num_samples} is not valid; expected >= 1")
        for name, dim in study.space.items():
            if name not in fields:
                raise unknown_name("study parameter", name, sorted(fields))
            dim.check(name)
            for key in (dim.when or {}):
                if key not in fields:
                    raise unknown_name(f"condition of {name}", key, sorted(fields))
    # Every value a trial could get must make a valid config with known names.
    for params in _corner_points(study):
        cfg = study.config_for(params).validate()
        check_names(cfg)
    _check_writable(study.storage_path, "storage path")
    _check_writable(study.results_dir, "results directory")


def _corner_points(study: Study) -> list[dict[str, Any]]:
    if study.search == "grid":
        points = [dict(zip(study.grid, combo)) for combo in itertools.product(*study.grid.values())]
    else:
        points = [{name: v} for name, dim in study.space.items() for v in dim.values_to_check()]
    return [{**p, "runtime.seed": s} for p in points for s in study.seeds[:1]]


def _check_writable(path: str, what: str) -> None:
    if "://" in path:
        try:
            import pyarrow.fs

            pyarrow.fs.FileSystem.from_uri(path)
        except Exception as exc:  # noqa: BLE001 - any scheme or credential problem
            raise LfmError(f"{what} {path!r} cannot be used: {exc}") from None
        return
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write_test_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise LfmError(f"{what} {path!r} cannot be written: {exc.strerror or exc}") from None


# ---- the trial: a Tune function that runs one TorchTrainer ---------------------------------
def trial_driver(config: dict[str, Any]) -> None:
    """Runs in a Tune trial: one TorchTrainer run of the trial's config.

    A worker-group trial reports through TuneReportCallback; restored, it reuses its Train
    run name, so Ray Train resumes it from its latest checkpoint in `train_storage`. A trial
    with num_workers=0 trains right here and reports to Tune itself; restored, it resumes
    from the checkpoint Tune kept."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from lfm_ray.launch import unwrap_training_error

    cfg = config_for(config["base"], config.get("variants") or {}, config["params"])
    trial_id = ray.tune.get_context().get_trial_id()
    in_trial = cfg.runtime.num_workers == 0
    with contextlib.ExitStack() as stack:
        if in_trial:
            # Ray logs a notice about local mode for every run; the study's banner says it once.
            logging.getLogger("ray.train.v2.api.config").setLevel(logging.WARNING)
            extra: dict[str, Any] = {"report_to_tune": True}
            checkpoint = ray.tune.get_checkpoint()
            if checkpoint is not None:
                extra["resume_from"] = stack.enter_context(checkpoint.as_directory())
            callbacks: list[Any] = []
        else:
            extra, callbacks = {}, [TuneReportCallback()]
        trainer = make_trainer(
            cfg, name=f"train_{trial_id}", storage_path=config["train_storage"],
            callbacks=callbacks, extra=extra, max_failures=int(config.get("max_failures", 0)),
        )
        try:
            trainer.fit()
        except Exception as exc:  # noqa: BLE001 - keep the worker's own message for the table
            inner = unwrap_training_error(exc)
            if inner is not exc:
                raise RuntimeError(f"{type(inner).__name__}: {inner}") from None
            raise


def trial_resources(study: Study) -> dict[str, float]:
    """What a trial's own actor holds. A worker-group trial only waits on its TorchTrainer,
    whose workers hold the CPUs and GPUs, so it asks for a token of memory and no CPU a
    worker needs; a trial that trains in its own process (num_workers=0) holds one
    worker's CPUs and GPUs itself."""
    rt = study.base.runtime
    if rt.num_workers == 0:
        out = {"cpu": rt.cpus_per_worker}
        if rt.gpus_per_worker > 0:
            out["gpu"] = rt.gpus_per_worker
        return out
    return {"cpu": 0, "memory": 1024}


def _concurrency(study: Study) -> int:
    import ray

    rt = study.base.runtime
    total = ray.cluster_resources()
    workers = max(1, rt.num_workers)
    fits = [int(total.get("CPU", 1) // (workers * rt.cpus_per_worker))]
    if rt.gpus_per_worker > 0:
        fits.append(int(total.get("GPU", 0) // (workers * rt.gpus_per_worker) + 1e-9))
    n = max(1, min(fits))
    return min(n, study.max_concurrent) if study.max_concurrent else n


def _search_alg(study: Study):
    if study.search != "optuna":
        return None
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    seed = study.seeds[0]
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }
    storage = None
    if study.optuna_storage:
        storage = optuna.storages.RDBStorage(study.optuna_storage) \
            if "://" in study.optuna_storage else None
    objectives = study.objectives if len(study.objectives) > 1 else None
    return OptunaSearch(
        space=DefineByRun(study.space, study.base.to_dict()),
        metric=objectives or study.metric,
        mode=[study.mode] * len(objectives) if objectives else study.mode,
        sampler=samplers[study.sampler](),
        study_name=study.name,
        storage=storage,
    )


class DefineByRun:
    """Optuna's define-by-run space: a conditional dimension is suggested only in trials
    whose earlier choices (or the base config) meet its `when`. A class, not a closure, so
    Tune can save it with the experiment state."""

    def __init__(self, space: dict[str, Dim], base: dict[str, Any]):
        self.space, self.base = space, base

    def __call__(self, trial) -> None:
        base = RunConfig.from_dict(self.base)
        chosen: dict[str, Any] = {}
        for name, dim in self.space.items():
            if dim.when and any(chosen.get(k, base.get(k)) != v for k, v in dim.when.items()):
                continue
            key = "params/" + name
            if dim.kind == "loguniform":
                chosen[name] = trial.suggest_float(key, dim.low, dim.high, log=True)
            elif dim.kind == "uniform":
                chosen[name] = trial.suggest_float(key, dim.low, dim.high)
            elif dim.kind == "int":
                chosen[name] = trial.suggest_int(key, int(dim.low), int(dim.high))
            else:
                chosen[name] = trial.suggest_categorical(key, list(dim.choices))
        return None


def _random_space(study: Study) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for name, dim in study.space.items():
        if dim.kind == "loguniform":
            out[name] = tune.loguniform(dim.low, dim.high)
        elif dim.kind == "uniform":
            out[name] = tune.uniform(dim.low, dim.high)
        elif dim.kind == "int":
            out[name] = tune.randint(int(dim.low), int(dim.high) + 1)
        else:
            out[name] = tune.choice(list(dim.choices))
    return out


def _param_space(study: Study) -> dict[str, Any]:
    from ray import tune

    common = {
        "base": study.base.to_dict(),
        "train_storage": _join(study.storage_path, f"{study.name}_train"),
        "max_failures": study.max_failures,
        "variants": study.variants,
    }
    if study.search == "grid":
        params = {k: tune.grid_search(list(v)) for k, v in study.grid.items()}
        params["runtime.seed"] = tune.grid_search(list(study.seeds))
    elif study.search == "random":
        params = _random_space(study)
        if len(study.seeds) > 1:
            params["runtime.seed"] = tune.grid_search(list(study.seeds))
    else:
        return common  # Optuna fills config["params"] (define-by-run)
    return {**common, "params": params}


def _scheduler(study: Study):
    if study.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", metric=study.metric, mode=study.mode,
                         max_t=max(1, study.total_epochs()), grace_period=1, reduction_factor=2)


# ---- the table ------------------------------------------------------------------------------
def trial_rows(study: Study, trials: list[Any]) -> pd.DataFrame:
    """One row per Tune trial: swept parameters, final metrics, status, costs."""
    rows = []
    for t in trials:
        params = dict((t.config or {}).get("params") or {})
        rows.append(trial_row(t.trial_id, t.status, _error_message(t), params, study.swept,
                              study.config_for(params), dict(t.last_result or {}),
                              getattr(t, "checkpoint", None)))
    return pd.DataFrame(rows)


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
    for key in METRIC_KEYS:
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


def _last_line(text: str) -> str:
    """The line of a traceback that says what went wrong (its last)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "failed"


def _error_message(trial: Any) -> str:
    if getattr(trial, "error_text", ""):
        return trial.error_text[:500]
    path = getattr(trial, "error_file", None)
    if trial.status != "ERROR" or not path or not os.path.exists(path):
        return ""
    return _last_line(Path(path).read_text(errors="replace"))[:500]


def best_configs(study: Study, table: pd.DataFrame) -> dict[str, Any]:
    """Best configuration per objective, the mean over seeds deciding."""
    done = table[table["status"] == "TERMINATED"]
    out: dict[str, Any] = {}
    if done.empty:
        return out
    keys = [c for c in study.swept if c != "runtime.seed" and c in done.columns]
    for metric in dict.fromkeys([study.metric, *study.objectives, "acc_all", "acc_few", "acc_many"]):
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
        out[metric] = {"mode": study.mode, "value": float(best["mean"]),
                       "seeds": int(best["count"]), "params": params,
                       "trial_ids": list(match["trial_id"])}
    return out


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def write_tables(study: Study, table: pd.DataFrame) -> None:
    """trials.csv and best.json, each replaced atomically."""
    from lfm_ray.launch import write_json_atomic

    study.result_dir.mkdir(parents=True, exist_ok=True)
    tmp = study.result_dir / "trials.csv.tmp"
    table.to_csv(tmp, index=False)
    os.replace(tmp, study.result_dir / "trials.csv")
    write_json_atomic(study.result_dir / "best.json", best_configs(study, table))


def _tables_callback(study: Study):
    from ray.tune import Callback

    class TablesCallback(Callback):
        """Rewrites the tables whenever a trial finishes or fails."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            write_tables(study, trial_rows(study, trials))

        def on_trial_error(self, iteration, trials, trial, **info):
            write_tables(study, trial_rows(study, trials))

    return TablesCallback()


def study_meta(study: Study) -> dict[str, Any]:
    import ray
    import torch

    return {
        "name": study.name, "command": study.command, "search": study.search,
        "swept": study.swept, "grid": study.grid,
        "space": {k: dataclasses.asdict(v) for k, v in study.space.items()},
        "variants": study.variants, "seeds": study.seeds, "num_samples": study.num_samples,
        "metric": study.metric, "mode": study.mode, "objectives": study.objectives,
        "scheduler": study.scheduler, "sampler": study.sampler,
        "optuna_storage": study.optuna_storage, "storage_path": study.storage_path,
        "experiment_path": study.experiment_path, "base_config": study.base.to_dict(),
        "max_concurrent": study.max_concurrent, "max_failures": study.max_failures,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": {"ray": ray.__version__, "torch": torch.__version__,
                     **_versions("open_clip_torch", "optuna", "pandas", "plotly")},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "absent"
    return out


def load_study_spec(results_dir: str, name: str) -> Study:
    """The Study stored in results/<name>/study.json, for `lfm-ray study --resume NAME`."""
    path = Path(results_dir) / name / "study.json"
    if not path.is_file():
        raise LfmError(f"no study {name!r} to resume: {path} does not exist")
    meta = json.loads(path.read_text())
    return Study(
        name=meta["name"], base=RunConfig.from_dict(meta["base_config"]), search=meta["search"],
        grid=meta.get("grid") or {},
        space={k: Dim(**{**v, "choices": tuple(v.get("choices") or ())})
               for k, v in (meta.get("space") or {}).items()},
        variants=meta.get("variants") or {}, seeds=meta["seeds"], num_samples=meta["num_samples"], metric=meta["metric"],
        mode=meta["mode"], objectives=meta.get("objectives") or [],
        scheduler=meta["scheduler"], sampler=meta.get("sampler", "tpe"),
        optuna_storage=meta.get("optuna_storage"), storage_path=meta["storage_path"],
        results_dir=results_dir, max_concurrent=meta.get("max_concurrent"),
        max_failures=meta.get("max_failures", 1), command=meta.get("command", []),
    )


# ---- running ------------------------------------------------------------------------------
def _prepare_node_data(study: Study) -> None:
    """Every data set and imbalance factor the study uses, cached on this node first."""
    names = study.grid.get("data.name") if study.search == "grid" else None
    factors = study.grid.get("data.imbalance_factor") if study.search == "grid" else None
    for name in names or [study.base.data.name]:
        for factor in factors or [study.base.data.imbalance_factor]:
            prepare_node(study.base.copy().override({"data.name": name,
                                                     "data.imbalance_factor": factor}))


def run_study(study: Study) -> pd.DataFrame:
    """Run (or resume) a study; returns the trials table also written to results/<name>/."""
    from ray import tune

    validate(study)
    apply_fast_start_env()
    # Save Tune's experiment state often, so a killed driver loses no finished trial.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    init_ray(study.address)
    probe = study.base.copy()
    check_resources(probe)
    if study.prepare_data and is_local(study.address):
        _prepare_node_data(study)

    study.result_dir.mkdir(parents=True, exist_ok=True)
    meta_path = study.result_dir / "study.json"
    from lfm_ray.launch import write_json_atomic

    resumed = tune.Tuner.can_restore(study.experiment_path)
    if not resumed or not meta_path.is_file():
        write_json_atomic(meta_path, study_meta(study))

    concurrency = _concurrency(study)
    trainable = tune.with_resources(trial_driver, trial_resources(study))
    run_config = tune.RunConfig(
        name=study.name,
        storage_path=study.storage_path if "://" in study.storage_path
        else str(Path(study.storage_path).resolve()),
        failure_config=tune.FailureConfig(max_failures=study.max_failures),
        callbacks=[_tables_callback(study), *study.callbacks],
    )
    if resumed:
        print(f"resuming study {study.name!r} from {study.experiment_path}", flush=True)
        tuner = tune.Tuner.restore(study.experiment_path, trainable=trainable,
                                   resume_unfinished=True, resume_errored=True,
                                   restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(study),
            tune_config=tune.TuneConfig(
                search_alg=_search_alg(study),
                scheduler=_scheduler(study),
                num_samples=study.num_samples if study.search != "grid" else 1,
                max_concurrent_trials=concurrency,
                # A trial driver is reused by the next trial: its Ray process and imports
                # (torch, Ray Train; ~3 CPU-seconds) are paid once per concurrent slot.
                reuse_actors=True,
            ),
            run_config=run_config,
        )
    workers = study.base.runtime.num_workers
    where = ("each trial trains in its own process" if workers == 0 else
             f"each trial runs a Ray Train worker group of {workers}")
    print(f"study {study.name!r}: {study.search} search, up to {concurrency} trials at once, "
          f"{where}; experiment at {study.experiment_path}", flush=True)
    results = tuner.fit()
    table = _table_from_results(study, results)
    write_tables(study, table)
    failed = table[table["status"] == "ERROR"]
    if len(failed):
        print(f"{len(failed)} trial(s) failed: {', '.join(failed['trial_id'])}", flush=True)
    print(f"wrote {study.result_dir / 'trials.csv'} and best.json", flush=True)
    return table


def _table_from_results(study: Study, results) -> pd.DataFrame:
    """The final table from Tune's ResultGrid (restored trials included)."""
    trials = []
    for r in results:
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        status = "ERROR" if r.error else "TERMINATED"
        trials.append(_TrialView(trial_id, status, r.config or {}, r.metrics or {},
                                 _last_line(str(r.error)) if r.error else "",
                                 checkpoint=r.checkpoint))
    return trial_rows(study, trials)


@dataclass
class _TrialView:
    """The few Trial attributes `trial_rows` reads, built from a Result."""

    trial_id: str
    status: str
    config: dict[str, Any]
    last_result: dict[str, Any]
    error_text: str = ""
    error_file: str | None = None
    checkpoint: Any = None

