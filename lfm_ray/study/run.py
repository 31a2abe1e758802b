"""Running a study: check everything, decide new / resume / extend / restart, run Tune, keep
the tables current.

`run_study` returns the trials table; Tune's own `ResultGrid` of the run is kept on the study
as `study.result_grid` (the last experiment's, for an extended study).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, LoggerCallback, TBXLoggerCallback

from lfm_ray.errors import LfmError
from lfm_ray.launch import (
    apply_fast_start_env, check_resources, init_ray, is_local, prepare_node, quiet_ray_logs,
    show_tune_trial_tables, write_json_atomic,
)
from lfm_ray.study.record import (
    STUDY_FILE, Rerun, discard, plan_rerun, read_stored, request, study_meta,
)
from lfm_ray.study.search import (
    check_optuna_storage, concurrency, optuna_storage_url, param_space, scheduler, search_alg,
)
from lfm_ray.study.spec import Study, join_path, resolve_selection, validate
from lfm_ray.study.tables import (
    Rows, combine, kept_rows, relative_to_storage, table_from_results, tables_callback,
    write_tables,
)
from lfm_ray.study.trial import (
    PLAN_FILE, TrialNamer, TrialPlan, trial_driver, trial_resources,
)


def banner(text: str) -> None:
    """Progress messages go to stderr: stdout stays for what a command is asked to print."""
    print(text, file=sys.stderr, flush=True)


# ---- checks and the plan -----------------------------------------------------------------------
def check_study(study: Study, *, extend: bool = False, restart: bool = False) -> Rerun:
    """Everything that can be checked before Ray starts or anything is written."""
    resolve_selection(study)
    validate(study)
    if study.optuna_storage and study.search != "optuna":
        raise LfmError(f"--optuna-storage is for --search optuna; this study is a "
                       f"{study.search} search")
    if study.search == "optuna":
        check_optuna_storage(optuna_storage_url(study))
    for tracker in study.trackers:
        tracker_callback(tracker, study, check_only=True)
    if extend and restart:
        raise LfmError("give --extend or --restart, not both")
    stored = read_stored(study)
    if stored is not None and "request" not in stored and not restart:
        raise LfmError(f"{study.result_dir / STUDY_FILE} was written by an older lfm-ray and "
                       "cannot be compared with this request; run with --restart or a new --name")
    return plan_rerun(study, stored, extend=extend, restart=restart)


def plan_study(study: Study, *, extend: bool = False, restart: bool = False) -> dict[str, Any]:
    """What `--dry-run` prints: the checked study as it would run (base configs, grid or space,
    seeds, number of trials, and new / resume / extend / restart). Starts nothing."""
    from lfm_ray.launch import check_inputs, check_local_resources

    rerun = check_study(study, extend=extend, restart=restart)
    for cfg in study.base_configs().values():
        check_inputs(cfg)
        if is_local(study.address):
            check_local_resources(cfg)
    req = request(study)
    if study.search == "grid":
        trials = len(rerun.new_points) if rerun.kind == "extend" else len(study.grid_points())
    else:
        trials = study.num_samples * (len(study.seeds) if study.search == "random" else 1)
    return {"study": study.name, "action": rerun.kind, "trials": trials,
            "search": study.search, "grid": req["grid"], "space": req["space"],
            "seeds": study.seeds, "metric": study.metric,
            "selection_split": study.selection_split, "scheduler": study.scheduler,
            "protocol": study.protocol, "share_stage1": study.share_stage1,
            "presets": {d: (study.layers.preset_for(d) if study.layers else None)
                        for d in study.datasets()},
            "base_configs": req["base_configs"], "results": str(study.result_dir),
            "experiment": study.experiment_path}


def selection_note(study: Study) -> str:
    """What the study selects on, and on which split it reports (banner, study.json, report)."""
    if study.selection_split == "val":
        return (f"selected on {study.metric} (the validation split); test figures (acc_*) "
                "reported beside it")
    return (f"selected on {study.metric} (test): selected on test: this data set has no "
            "validation split")


def prepare_node_data(study: Study) -> None:
    """Every data set and imbalance factor the study uses, cached on this node first."""
    factors = study.grid.get("data.imbalance_factor") if study.search == "grid" else None
    for cfg in study.base_configs().values():
        for factor in factors or [cfg.data.imbalance_factor]:
            prepare_node(cfg.copy().override({"data.imbalance_factor": factor}))


# ---- trackers ----------------------------------------------------------------------------------
def tracker_callback(name: str, study: Study, check_only: bool = False):
    """Ray Tune's own logger callback for a tracker (TensorBoard, MLflow, W&B)."""
    if name == "tensorboard":
        if check_only:
            return None
        return TensorBoardTracker()
    if name == "mlflow":
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise LfmError("--tracker mlflow needs MLflow: pip install 'lfm-ray[trackers]'") from None
        if check_only:
            return None
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        return MLflowLoggerCallback(tracking_uri=mlflow_uri(study), experiment_name=study.name,
                                    save_artifact=False)
    if name == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise LfmError("--tracker wandb needs Weights & Biases: pip install wandb "
                           "(offline: WANDB_MODE=offline)") from None
        if check_only:
            return None
        from ray.air.integrations.wandb import WandbLoggerCallback

        return WandbLoggerCallback(project=study.name, group=study.name)
    from lfm_ray.errors import unknown_name
    from lfm_ray.study.spec import TRACKERS

    raise unknown_name("tracker", name, TRACKERS)


def mlflow_uri(study: Study) -> str:
    """MLflow's store: an SQLite file in the study's storage folder (works offline with
    `mlflow ui --backend-store-uri <it>`), or MLFLOW_TRACKING_URI when set."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if "://" in study.storage_path:
        raise LfmError("--tracker mlflow with a cloud storage path needs MLFLOW_TRACKING_URI "
                       "(an MLflow server); a local SQLite store has no place there")
    path = Path(join_path(study.storage_path, study.name)) / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


class TensorBoardTracker(LoggerCallback):
    """Tune's TensorBoard logger, wrapped: Tune prints a TensorBoard hint that points at a
    temporary session folder whenever a TBXLoggerCallback is among the callbacks; the study
    prints the storage path, where the event files end up, instead."""

    def __init__(self):
        self.inner = TBXLoggerCallback()

    def setup(self, *args, **kwargs):
        self.inner.setup(*args, **kwargs)

    def log_trial_start(self, trial):
        self.inner.log_trial_start(trial)

    def log_trial_result(self, iteration, trial, result):
        self.inner.log_trial_result(iteration, trial, result)

    def log_trial_end(self, trial, failed=False):
        self.inner.log_trial_end(trial, failed)


def logger_callbacks(study: Study) -> list[Any]:
    """Tune's CSV and JSON result files (the analysis reads them) and the asked-for trackers.
    Tune's automatic loggers are off, so TensorBoard files appear only when asked for."""
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    return [CSVLoggerCallback(), JsonLoggerCallback(),
            *[tracker_callback(t, study) for t in study.trackers]]


# ---- running -----------------------------------------------------------------------------------
def run_study(study: Study, *, extend: bool = False, restart: bool = False,
              announce: Callable[[], None] | None = None) -> pd.DataFrame:
    """Run a study: new, resumed (same name, same request), extended (`extend`: the new
    seeds or grid values only) or run afresh (`restart`). Returns the trials table, also
    written to results/<name>/trials.csv; Tune's ResultGrid is left on `study.result_grid`.
    A different request under a stored name is refused before anything is written.
    `announce` is called once the request is checked, before Ray starts."""
    rerun = check_study(study, extend=extend, restart=restart)
    if announce is not None:
        announce()
    apply_fast_start_env()
    # Save Tune's experiment state often, so a killed driver loses no finished trial.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    if not study.verbose:
        quiet_ray_logs()
    show_tune_trial_tables(study.verbose)
    init_ray(study.address, log_to_driver=study.verbose)
    for cfg in study.base_configs().values():
        check_resources(cfg)
    if study.prepare_data and is_local(study.address):
        prepare_node_data(study)

    stored = read_stored(study)
    if rerun.kind == "restart":
        banner(f"--restart: discarding study {study.name!r}'s stored trials and results")
        discard(study, stored)
    study.result_dir.mkdir(parents=True, exist_ok=True)
    meta_path = study.result_dir / STUDY_FILE
    if rerun.kind == "resume" and stored is not None:
        stored.setdefault("resumed_by", []).append(study.command)
        write_json_atomic(meta_path, stored)
    else:
        write_json_atomic(meta_path, study_meta(study, rerun.experiments))

    slots = concurrency(study)
    workers = study.base.runtime.num_workers
    where = ("each trial trains in its own process" if workers == 0 else
             f"each trial runs a Ray Train worker group of {workers}")
    banner(f"study {study.name!r} ({rerun.kind}): {study.search} search, up to {slots} trials "
           f"at once, {where}; experiment at {study.experiment_path}")
    banner(selection_note(study))
    if study.share_stage1:
        banner("protocol: stage 1 trained once per stage-1 configuration (per seed), every "
               "trial's stage 2 branching from it, as the paper's ablations")
    elif study.protocol == "full":
        banner("protocol: full, both stages retrained for every value (--protocol branch: "
               "the paper's, one stage 1 per seed)")
    if "tensorboard" in study.trackers:
        banner(f"TensorBoard: tensorboard --logdir {study.experiment_path}")
    if "mlflow" in study.trackers:
        banner(f"MLflow: mlflow ui --backend-store-uri {mlflow_uri(study)}")

    tables = pd.DataFrame()
    rows = Rows(study)
    stage1: dict[str, str] = {}  # stage1_key -> checkpoint of its shared stage 1
    for experiment in rerun.experiments:
        is_new = experiment == rerun.experiment and rerun.kind in ("new", "restart", "extend")
        path = join_path(study.storage_path, experiment)
        kept = tables
        if not is_new and not tune.Tuner.can_restore(path):
            # An earlier experiment that is gone from the storage path: keep its rows.
            tables = combine(tables, kept_rows(study, [experiment]))
            continue
        points = rerun.new_points if rerun.kind == "extend" else None
        if study.share_stage1:
            base_points = points if points is not None else study.grid_points()
            stage1.update(run_stage1(study, experiment, base_points if is_new else None,
                                     stage1, slots))
            record_stage1(study, stage1)
        plan = TrialPlan.of(study, stage1_checkpoints=stage1 if study.share_stage1 else None)
        results = run_experiment(study, experiment, plan, slots, points if is_new else None,
                                 is_new, callbacks=[tables_callback(study, experiment, kept,
                                                                    rows)])
        study.result_grid = results
        tables = combine(kept, table_from_results(study, results, experiment, rows))
        write_tables(study, tables)
    failed = tables[tables["status"] == "ERROR"] if len(tables) else tables
    if len(failed):
        banner(f"{len(failed)} trial(s) failed: {', '.join(failed['trial_id'])}")
    banner(f"wrote {study.result_dir / 'trials.csv'} and best.json")
    return tables


def run_experiment(study: Study, experiment: str, plan: TrialPlan, slots: int,
                   points: list[dict[str, Any]] | None, is_new: bool,
                   callbacks: list[Any] = ()):
    """Run one Tune experiment of the study (new, over `points` or the whole grid), or
    restore and finish it; returns Tune's ResultGrid."""
    path = join_path(study.storage_path, experiment)
    trainable = tune.with_resources(tune.with_parameters(trial_driver, plan=plan),
                                    trial_resources(study))
    run_config = tune.RunConfig(
        name=experiment,
        storage_path=study.storage_path if "://" in study.storage_path
        else str(Path(study.storage_path).resolve()),
        failure_config=tune.FailureConfig(max_failures=study.max_failures),
        callbacks=[*callbacks, *logger_callbacks(study), *study.callbacks],
    )
    if is_new:
        write_plan(path, study, plan)
        tuner = tune.Tuner(trainable, param_space=param_space(study, points),
                           tune_config=_tune_config(study, slots, points, experiment,
                                                    scheduled=plan.stage != "stage1"),
                           run_config=run_config)
    else:
        banner(f"resuming experiment {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, restart_errored=False)
    return tuner.fit()


# ---- a shared stage 1 (the paper's ablation protocol) -------------------------------------------
STAGE1_SUFFIX = "_stage1"


def stage1_points(study: Study, points: list[dict[str, Any]],
                  known: dict[str, str]) -> list[dict[str, Any]]:
    """One point per stage-1 configuration among `points` not yet trained (`known`), its
    stage-2 values dropped (they do not change stage 1)."""
    from lfm_ray.stage1 import stage1_key

    plan = TrialPlan.of(study)
    out: dict[str, dict[str, Any]] = {}
    for point in points:
        trimmed = {k: v for k, v in point.items() if not k.startswith("stage2.")}
        key = stage1_key(plan.config_for(trimmed))
        if key not in known:
            out.setdefault(key, trimmed)
    return list(out.values())


def run_stage1(study: Study, experiment: str, points: list[dict[str, Any]] | None,
               known: dict[str, str], slots: int) -> dict[str, str]:
    """Train (or restore) the shared stage-1 trials of one experiment; stage1_key ->
    checkpoint of each that completed. `points` None: restore the stored experiment only."""
    from lfm_ray.stage1 import stage1_key

    name = experiment + STAGE1_SUFFIX
    path = join_path(study.storage_path, name)
    if points is None:
        if not tune.Tuner.can_restore(path):
            return {}
        todo = None
    else:
        todo = stage1_points(study, points, known)
        if not todo:
            return {}
        banner(f"stage 1: {len(todo)} shared stage-1 run(s) first ({name})")
    plan = TrialPlan.of(study, stage="stage1")
    results = run_experiment(study, name, plan, slots, todo, is_new=todo is not None)
    found = {}
    for r in results:
        if r.error or r.checkpoint is None:
            continue
        cfg = plan.config_for((r.config or {}).get("params") or {})
        found[stage1_key(cfg)] = (r.metrics or {}).get("checkpoint_path") or r.checkpoint.path
    return found


def record_stage1(study: Study, checkpoints: dict[str, str]) -> None:
    """study.json keeps which shared stage-1 checkpoint each stage1_key trained."""
    path = study.result_dir / STUDY_FILE
    meta = json.loads(path.read_text())
    meta["stage1_checkpoints"] = {k: relative_to_storage(study.storage_path, v)
                                  for k, v in checkpoints.items()}
    write_json_atomic(path, meta)


def write_plan(experiment_path: str, study: Study, plan: TrialPlan) -> None:
    """The trials' shared plan beside Tune's own files, so the experiment folder alone says
    what each trial ran (`lfm_ray.analysis.load_study` on a Tune folder reads it)."""
    if "://" in experiment_path:
        return  # a cloud experiment is read through its results folder's study.json
    folder = Path(experiment_path)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / PLAN_FILE, {
        "study": study.name, "bases": plan.bases, "default_dataset": plan.default_dataset,
        "variants": plan.variants, "swept": study.swept, "metric": study.metric,
        "mode": study.mode, "search": study.search})


def _tune_config(study: Study, slots: int, points: list[dict[str, Any]] | None = None,
                 experiment: str | None = None, scheduled: bool = True):
    """`scheduled=False`: no early stopping (a shared stage 1 must run to its end)."""
    alg, sched = search_alg(study, points, slots), scheduler(study) if scheduled else None
    if study.search == "grid":
        samples = len(points if points is not None else study.grid_points())
    else:
        samples = study.num_samples
    return tune.TuneConfig(
        search_alg=alg, scheduler=sched,
        # No metric here: the searcher and scheduler carry their own, and with one Tune's
        # status table adds a "Current best trial" line, a single trial's value with no
        # seeds or interval behind it (ties included). The report says which configuration,
        # if any, is better than the rest (lfm_ray.analysis.load.better_than_rest).
        num_samples=samples,
        max_concurrent_trials=None if study.search == "grid" else slots,
        trial_name_creator=TrialNamer(experiment or study.name),
        trial_dirname_creator=TrialNamer(experiment or study.name, folder=True),
        # A trial driver is reused by the next trial: its Ray process and imports
        # (torch, Ray Train; ~3 CPU-seconds) are paid once per concurrent slot.
        reuse_actors=True,
    )


def dry_run_json(plan: dict[str, Any]) -> str:
    return json.dumps(plan, indent=2, sort_keys=False, default=str)
