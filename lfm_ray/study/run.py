"""Running a study: check everything, decide new / resume / extend / restart, run Tune, keep
the tables current.

`run_study` returns the trials table; Tune's own `ResultGrid` of the run is kept on the study
as `study.result_grid` (the last experiment's, for an extended study).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, LoggerCallback, TBXLoggerCallback

from lfm_ray.errors import LfmError
from lfm_ray.driver.launch import (
    apply_fast_start_env, check_resources, init_ray, is_local, prepare_node, quiet_ray_logs, show_tune_trial_tables, write_json_atomic,
)
from lfm_ray.study import storage
from lfm_ray.study.budget import BUDGETS, Budget, budget_for, gated
from lfm_ray.study.cost import cost_unit, estimate, estimate_line, planned_configs
from lfm_ray.study.optuna_storage import check_storage_choice
from lfm_ray.study.record import (
    STUDY_FILE, Rerun, check_data, data_record, plan_rerun, read_stored, record_run, request,
)
from lfm_ray.study.search import (
    concurrency, param_space, scheduler, search_alg, trials_per_sample,
)
from lfm_ray.study.checks import validate
from lfm_ray.study.spec import SEED, Study, join_path, resolve_selection, selection_note
from lfm_ray.study.tables import (
    FINAL_STATUSES, Rows, combine, kept_rows, relative_to_storage, table_from_results,
    write_tables,
)
from lfm_ray.study.trial import (
    PLAN_FILE, TrialNamer, TrialPlan, trial_driver, trial_resources,
)
from lfm_ray.study.warm import check_warm_search, resolve_warm_start


def banner(text: str) -> None:
    """Progress messages go to stderr: stdout stays for what a command is asked to print."""
    print(text, file=sys.stderr, flush=True)


# ---- checks and the plan -----------------------------------------------------------------------
def check_study(study: Study, *, extend: bool = False, restart: bool = False) -> Rerun:
    """Everything that can be checked before Ray starts or anything is written."""
    resolve_selection(study)
    validate(study)
    check_storage_choice(study)  # the Optuna storage URL parses and answers
    for tracker in study.trackers:
        tracker_callback(tracker, study, check_only=True)
    if extend and restart:
        raise LfmError("give --extend or --restart, not both")
    stored = read_stored(study)
    if stored is not None and "request" not in stored and not restart:
        raise LfmError(f"{study.result_dir / STUDY_FILE} was written by an older lfm-ray and "
                       "cannot be compared with this request; run with --restart or a new --name")
    storage.check_owner(study, stored, restart)
    check_warm_search(study)
    if stored is None or restart:
        resolve_warm_start(study)  # a resumed study's Optuna search has its points already
    rerun = plan_rerun(study, stored, extend=extend, restart=restart)
    rerun.data = data_record(study)
    if rerun.kind in ("resume", "extend"):
        check_data(study, stored, rerun.data)
    study_budget(study, rerun)  # refuses a budget already spent
    return rerun


def study_budget(study: Study, rerun: Rerun) -> Budget | None:
    """The study's --budget-hours, less what its stored trials (a resume or extension) spent."""
    stored = kept_rows(study, rerun.experiments) if rerun.kind in ("resume", "extend") \
        else None
    return budget_for(study, stored)


def plan_study(study: Study, *, extend: bool = False, restart: bool = False) -> dict[str, Any]:
    """What `--dry-run` prints: the checked study as it would run (base configs, grid or space,
    seeds, number of trials, and new / resume / extend / restart). Starts nothing."""
    from lfm_ray.driver.launch import check_inputs, check_local_resources

    rerun = check_study(study, extend=extend, restart=restart)
    classes = {}
    for name, cfg in study.base_configs().items():
        classes[name] = check_inputs(cfg)
        if is_local(study.address):
            check_local_resources(cfg)
    check_trial_similarities(study, classes)
    req = request(study)
    points = rerun.new_points if rerun.kind == "extend" else None
    trials = experiment_trials(study, points)
    cost = estimate(study, planned_configs(study, points, trials))
    banner(estimate_line(cost))
    return {"study": study.name, "action": rerun.kind, "trials": trials,
            "cost_estimate": cost,
            "budget": ({"hours": study.budget_hours, "unit": cost_unit(study.base)}
                       if study.budget_hours is not None else None),
            "warm_start": study.warm_record,
            "search": study.search, "grid": req["grid"], "space": req["space"],
            "seeds": study.seeds, "metric": study.metric, "objectives": study.objectives,
            "selection_split": study.selection_split, "scheduler": study.scheduler,
            "optuna_storage": req["optuna_storage_kind"],
            "protocol": study.protocol, "share_stage1": study.share_stage1,
            "presets": {d: (study.layers.preset_for(d) if study.layers else None)
                        for d in study.datasets()},
            "base_configs": req["base_configs"], "results": str(study.result_dir),
            "experiment": study.experiment_path}


def prepare_node_data(study: Study) -> None:
    """Every data set and imbalance factor the study uses, cached on this node first; each
    trial's similarity file checked against its data set's classes."""
    factors = study.grid.get("data.imbalance_factor") if study.search == "grid" else None
    classes = {}
    for name, cfg in study.base_configs().items():
        for factor in factors or [cfg.data.imbalance_factor]:
            arrays = prepare_node(cfg.copy().override({"data.imbalance_factor": factor}))
        classes[name] = len(arrays.class_names)
    check_trial_similarities(study, classes)


def check_trial_similarities(study: Study, classes: dict[str, int]) -> None:
    """Each grid trial's LFM similarity source against its data set's classes (a file read
    whole), once per distinct setting; `classes`: data set -> number of classes."""
    from lfm_ray.similarity import check_similarity

    if study.search != "grid":
        return
    seen = {}
    for point in study.grid_points():
        cfg = study.config_for(point)
        seen.setdefault((cfg.data.name, cfg.mix.method, cfg.mix.similarity), cfg)
    for (name, _, _), cfg in seen.items():
        if name in classes:
            check_similarity(cfg, num_classes=classes[name])


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
        banner(f"--restart: discarding study {study.name!r}'s stored trials and results "
               f"({storage.restart_removes(study, stored)})")
        for path in storage.discard(study, stored):
            banner(f"  kept {path}: not written by study {study.name!r}")
    study_id = stored["study_id"] if rerun.kind in ("resume", "extend") else storage.new_study_id()
    if storage.owner(study) is None:
        storage.claim(study, study_id)
    study.result_dir.mkdir(parents=True, exist_ok=True)
    meta = record_run(study, rerun, stored, study_id, rerun.data, trials=len(to_run(study, rerun)))
    meta["budget_hours"] = study.budget_hours  # this run's (a resume may raise it)
    meta["budget_unit"] = cost_unit(study.base)
    budget = study_budget(study, rerun)
    set_status(study, meta, RUNNING)
    clear_write_up(study)  # best.json and the report return when every trial has ended

    slots = concurrency(study)
    workers = study.base.runtime.num_workers
    where = ("each trial trains in its own process" if workers == 0 else
             f"each trial runs a Ray Train worker group of {workers}")
    banner(f"study {study.name!r} ({rerun.kind}): {study.search} search, up to {slots} trials "
           f"at once, {where}; Ray's files in {study.experiment_path}")
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
    with watch_interrupts() as interrupted:
        for experiment in rerun.experiments:
            is_new = experiment == rerun.experiment and rerun.kind in ("new", "restart",
                                                                       "extend")
            path = join_path(study.storage_path, experiment)
            kept = tables
            if not is_new and not tune.Tuner.can_restore(path):
                # An earlier experiment that is gone from the storage path: keep its rows.
                tables = combine(tables, kept_rows(study, [experiment]))
                continue
            points = rerun.new_points if rerun.kind == "extend" else None
            if study.share_stage1:
                base_points = points if points is not None else study.grid_points()
                found, ended = run_stage1(study, experiment, base_points if is_new else None,
                                          stage1, slots, stopping=interrupted)
                stage1.update(found)
                record_stage1(study, stage1)
                if not ended or interrupted.is_set():
                    break  # the branches wait for their stage 1: resume runs both
            plan = TrialPlan.of(study, stage1_checkpoints=stage1 if study.share_stage1 else None)
            watch = TrialWatch(study, experiment, rows, kept, stopping=interrupted)
            if budget is not None:
                BUDGETS[experiment] = budget
            try:
                results = run_experiment(study, experiment, plan, slots,
                                         points if is_new else None, is_new, watch=watch)
            finally:
                BUDGETS.pop(experiment, None)
            study.result_grid = results
            current = rows.rows(watch.trials, experiment, watch.stopped) \
                if watch.trials is not None else table_from_results(study, results, experiment,
                                                                    rows)
            tables = combine(kept, current)
            write_tables(study, tables)
            if interrupted.is_set() or not watch.ended() or (budget and budget.stopped):
                break
    missing = missing_trials(study, tables)
    write_tables(study, tables, complete=not missing)
    failed = tables[tables["status"] == "ERROR"] if len(tables) else tables
    if len(failed):
        banner(f"{len(failed)} trial(s) failed: {', '.join(failed['trial_id'])}")
    if missing and budget is not None and budget.stopped and not interrupted.is_set():
        set_status(study, read_stored(study) or meta, STOPPED_BY_BUDGET, missing)
        banner(budget_note(study, budget, missing))
        return tables
    if missing:
        set_status(study, read_stored(study) or meta, INTERRUPTED, missing)
        raise StudyInterrupted(interrupted_note(study, tables, missing))
    set_status(study, read_stored(study) or meta, COMPLETE)
    banner(f"wrote {study.result_dir / 'trials.csv'} and best.json")
    return tables


# ---- interrupted studies ------------------------------------------------------------------------
RUNNING, COMPLETE, INTERRUPTED = "running", "complete", "interrupted"
STOPPED_BY_BUDGET = "stopped_by_budget"  # --budget-hours spent: no best.json, resumable


def budget_note(study: Study, budget: Budget, missing: list[str]) -> str:
    unit = cost_unit(study.base)
    return (f"study {study.name!r} stopped by its budget: {budget.spent:.4g} of "
            f"{budget.hours:g} {unit} measured, {', '.join(missing)} not run; "
            f"{study.result_dir / 'trials.csv'} holds what ran, with no best.json. Go on with "
            f"a larger budget: {resume_command(study)} --budget-hours <more than "
            f"{budget.hours:g}>")


class StudyInterrupted(KeyboardInterrupt):
    """A study stopped (Ctrl-C) before every trial ended. trials.csv holds what ran (the
    trials stopped on their way marked INTERRUPTED); study.json says "interrupted" and lists
    the missing trials; there is no best.json and no report. The message names the command
    that resumes it."""


def resume_command(study: Study) -> str:
    """The lfm-ray command that resumes the stored study as it is."""
    from lfm_ray.study.spec import DEFAULT_RESULTS_DIR

    parts = ["lfm-ray", "study", "--resume", study.name]
    if study.results_dir != DEFAULT_RESULTS_DIR:
        parts += ["--results-dir", study.results_dir]
    if study.address:
        parts += ["--address", study.address]
    return " ".join(shlex.quote(p) for p in parts)


def interrupted_note(study: Study, tables: pd.DataFrame, missing: list[str]) -> str:
    done = int((tables["status"] == "TERMINATED").sum()) if len(tables) else 0
    shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    return (f"study {study.name!r} was interrupted: {done} trial(s) finished, {len(missing)} "
            f"not ({shown}); {study.result_dir / 'trials.csv'} holds what ran, with no "
            "best.json and no report. Resume it with: " + resume_command(study))


def to_run(study: Study, rerun: Rerun) -> list[Any]:
    """The trials this run adds (a grid's points, or a search's samples)."""
    if rerun.kind == "resume":
        return []
    if study.search == "grid":
        return rerun.new_points if rerun.kind == "extend" else study.grid_points()
    return list(range(study.num_samples * trials_per_sample(study)))


def all_ended(trials: list[Any] | None) -> bool:
    return trials is None or all(str(t.status) in FINAL_STATUSES for t in trials)


def missing_trials(study: Study, tables: pd.DataFrame) -> list[str]:
    """The trials of the request that have not ended (finished or failed), by their swept
    values; empty when the study is complete."""
    ended = tables[tables["status"].isin(FINAL_STATUSES)] if len(tables) else tables
    if study.search != "grid":
        want = len(to_run(study, Rerun("new", [])))
        return [f"{want - len(ended)} of {want} trials"] if len(ended) < want else []
    keys = list(study.grid) + [SEED]

    def key(values: dict[str, Any]) -> str:
        return json.dumps({k: _plain_number(values.get(k)) for k in keys}, sort_keys=True)

    have = {key(row) for row in ended.to_dict("records")} if len(ended) else set()
    return [", ".join(f"{'seed' if k == SEED else k}={p[k]}" for k in keys)
            for p in study.grid_points() if key(p) not in have]


def _plain_number(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def set_status(study: Study, meta: dict[str, Any], status: str,
               missing: list[str] | None = None) -> None:
    """study.json's `status` (running, complete, interrupted) and its missing trials."""
    meta["status"] = status
    for key in ("missing_trials", "resume_command"):
        meta.pop(key, None)
    if missing:
        meta["missing_trials"] = missing
        meta["resume_command"] = resume_command(study)
        if status == STOPPED_BY_BUDGET:
            meta["resume_command"] += f" --budget-hours <more than {study.budget_hours:g}>"
    write_json_atomic(study.result_dir / STUDY_FILE, meta)


def clear_write_up(study: Study) -> None:
    """best.json, the report and its figures of an earlier run: they describe another set of
    trials than the one about to run, and return when the study is complete."""
    for name in ("best.json", "report.html"):
        (study.result_dir / name).unlink(missing_ok=True)
    for path in study.result_dir.glob("*.png"):
        path.unlink()


class _TuneStopLines(logging.Filter):
    """Tune's lines on Ctrl-C: its "Stop signal received" tells the study it is being
    interrupted (`event`); its advice to resume with `Tuner.restore(...)` and its list of
    unfinished Trial objects are left out (the study prints the lfm-ray command instead)."""

    def __init__(self, event: threading.Event):
        super().__init__()
        self.event = event

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text.startswith("Stop signal received"):
            self.event.set()
            record.msg, record.args = ("stopping the study: saving its state (Ctrl-C again "
                                       "skips this)"), ()
            return True
        return not ("Tuner.restore" in text or text.startswith("Trials did not complete"))


@contextlib.contextmanager
def watch_interrupts():
    """An event set when Tune is asked to stop (Ctrl-C) while the block runs."""
    event = threading.Event()
    line_filter = _TuneStopLines(event)
    tune_logger = logging.getLogger("ray.tune.tune")
    tune_logger.addFilter(line_filter)
    try:
        yield event
    finally:
        tune_logger.removeFilter(line_filter)


def run_experiment(study: Study, experiment: str, plan: TrialPlan, slots: int,
                   points: list[dict[str, Any]] | None, is_new: bool,
                   watch: TrialWatch | None = None):
    """Run one Tune experiment of the study (new, over `points` or the whole grid), or
    restore and finish it, followed by `watch`; returns Tune's ResultGrid."""
    if watch is not None:
        WATCHES[experiment] = watch
    try:
        return _run_experiment(study, experiment, plan, slots, points, is_new)
    finally:
        WATCHES.pop(experiment, None)


def _run_experiment(study: Study, experiment: str, plan: TrialPlan, slots: int,
                    points: list[dict[str, Any]] | None, is_new: bool):
    path = join_path(study.storage_path, experiment)
    trainable = tune.with_resources(tune.with_parameters(trial_driver, plan=plan),
                                    trial_resources(study))
    tune_storage, tune_name = storage.split_experiment(study.storage_path, experiment)
    run_config = tune.RunConfig(
        name=tune_name,
        storage_path=tune_storage,
        failure_config=tune.FailureConfig(max_failures=study.max_failures),
        callbacks=[WatchCallback(experiment), *logger_callbacks(study), *study.callbacks],
    )
    if is_new:
        write_plan(path, study, plan)
        tuner = tune.Tuner(trainable, param_space=param_space(study, points),
                           tune_config=_tune_config(study, slots, points,
                                                    scheduled=plan.stage != "stage1",
                                                    experiment=experiment),
                           run_config=run_config)
    else:
        banner(f"resuming experiment {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, restart_errored=False)
    with trial_tracebacks(study.verbose), \
            experiment_state_period(experiment_trials(study, points)):
        return tuner.fit()


def experiment_trials(study: Study, points: list[dict[str, Any]] | None) -> int:
    """The Tune trials of an experiment over `points` (None: the whole grid), or of a
    search: each sampled configuration once per seed."""
    if study.search == "grid":
        return len(points if points is not None else study.grid_points())
    return study.num_samples * trials_per_sample(study)


# Tune saves its experiment state (every trial's record: about 26 KB per smoke trial of
# ours, most of it Tune's running statistics of each reported number) as one JSON file,
# rewritten whole. Saved every second, a killed driver loses no finished trial of a small
# study; but the file grows with the study, and at 4,000 trials (105 MB, about 2.5 s to
# write) the driver did little else and trials waited on it. So the period grows with the
# study: 1 s up to 100 trials, then STATE_SAVE_S_PER_TRIAL per trial (10 s at 1,000, 100 s
# at 10,000), which keeps the save near a twentieth of the driver's time at any size. A
# driver killed outright loses at most one period's finished trials (resuming runs them
# again). A user's own TUNE_GLOBAL_CHECKPOINT_S wins.
STATE_SAVE_MIN_S = 1.0
STATE_SAVE_S_PER_TRIAL = 0.01


def state_save_period(trials: int) -> float:
    """Seconds between saves of Tune's experiment state for an experiment of `trials`."""
    return max(STATE_SAVE_MIN_S, STATE_SAVE_S_PER_TRIAL * trials)


@contextlib.contextmanager
def experiment_state_period(trials: int):
    """Tune reads TUNE_GLOBAL_CHECKPOINT_S as its controller starts (in `fit`): set for the
    experiment's size while it runs, then removed, so no later experiment inherits it."""
    key = "TUNE_GLOBAL_CHECKPOINT_S"
    if key in os.environ:
        yield
        return
    os.environ[key] = f"{state_save_period(trials):g}"
    try:
        yield
    finally:
        os.environ.pop(key, None)


@contextlib.contextmanager
def trial_tracebacks(shown: bool):
    """Not `shown`, a failed trial is one line (TrialWatch.failed), not Tune's traceback of
    Ray's wrappers around it (the trial's error file keeps it); a user's own setting of
    Tune's TUNE_PRINT_ALL_TRIAL_ERRORS wins."""
    key = "TUNE_PRINT_ALL_TRIAL_ERRORS"
    ours = not shown and key not in os.environ
    if ours:
        os.environ[key] = "0"
    try:
        yield
    finally:
        if ours:
            os.environ.pop(key, None)


# ---- a shared stage 1 (the paper's ablation protocol) -------------------------------------------
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
               known: dict[str, str], slots: int,
               stopping: threading.Event | None = None) -> tuple[dict[str, str], bool]:
    """Train (or restore) the shared stage-1 trials of one experiment: (stage1_key ->
    checkpoint of each that completed, whether every stage-1 trial ended). `points` None:
    restore the stored experiment only."""
    from lfm_ray.stage1 import stage1_key

    name = storage.stage1_experiment(experiment)
    path = join_path(study.storage_path, name)
    if points is None:
        if not tune.Tuner.can_restore(path):
            return {}, True
        todo = None
    else:
        todo = stage1_points(study, points, known)
        if not todo:
            return {}, True
        banner(f"stage 1: {len(todo)} shared stage-1 run(s) first ({name})")
    plan = TrialPlan.of(study, stage="stage1")
    watch = TrialWatch(study, name, stopping=stopping)
    results = run_experiment(study, name, plan, slots, todo, is_new=todo is not None,
                             watch=watch)
    found = {}
    for r in results:
        if r.error or r.checkpoint is None:
            continue
        cfg = plan.config_for((r.config or {}).get("params") or {})
        if int((r.metrics or {}).get("epoch") or 0) < cfg.stage1.epochs:
            continue  # stopped before the end of its stage 1: nothing to branch from
        found[stage1_key(cfg)] = (r.metrics or {}).get("checkpoint_path") or r.checkpoint.path
    complete = watch.ended()
    if todo is not None and watch.trials is not None and len(watch.trials) < len(todo):
        complete = False
    return found, complete


# trials.csv is rewritten while a study runs at most this share of the driver's time: a
# rewrite waits until WRITE_SPACING times the last rewrite's duration has passed. A small
# table (milliseconds) is still rewritten after every trial; one of 10,000 rows (a few
# tenths of a second) every few seconds, where rewriting it after each trial would grow the
# time per trial with the study. The study's end always writes it (run_study).
WRITE_SPACING = 20.0


class TrialWatch:
    """Follows one Tune experiment of the study in this process: rewrites trials.csv
    as trials finish or fail (with `rows`; none for a shared stage 1; spaced by
    WRITE_SPACING), and keeps
    Tune's trials as the experiment ends (`trials`) with those that were on their way when
    the study was interrupted (`stopped`; `stopping` is the event set then): Tune ends
    those TERMINATED. Tune reaches it through a `WatchCallback` (see there)."""

    def __init__(self, study: Study, experiment: str, rows: Rows | None = None,
                 kept: pd.DataFrame | None = None, stopping: threading.Event | None = None):
        self.study, self.experiment, self.rows = study, experiment, rows
        self.kept = kept if kept is not None else pd.DataFrame()
        self.stopping = stopping
        self.trials: list[Any] | None = None
        self.open: dict[str, Any] = {}  # trials not ended at the last step before a stop
        self.seen = 0  # how many of Tune's trials step_end has looked at
        self.stopped: set[str] = set()
        self.next_write = 0.0  # time.monotonic() before which trials.csv is not rewritten

    def _stopped(self) -> bool:
        return self.stopping is not None and self.stopping.is_set()

    def write(self, trials: list[Any]) -> None:
        if self.rows is None or time.monotonic() < self.next_write:
            return
        start = time.monotonic()
        cut = self.in_flight if self._stopped() else ()
        write_tables(self.study, combine(self.kept, self.rows.rows(trials, self.experiment,
                                                                    cut)))
        end = time.monotonic()
        self.next_write = end + WRITE_SPACING * (end - start)

    def failed(self, trial: Any, retrying: bool) -> None:
        """One line per failed trial: its error's own message and where the full log is
        (Tune's traceback of Ray's wrappers only with --verbose)."""
        if self.study.verbose:
            return
        from lfm_ray.study.tables import error_message

        what = "failed; retrying from its last checkpoint" if retrying else "failed"
        log = getattr(trial, "error_file", None)
        banner(f"trial {trial} {what}: {error_message(trial, failed=True) or 'see its log'}"
               + (f" (full log: {log})" if log else ""))

    @property
    def in_flight(self) -> set[str]:
        """The ids of the trials not ended at the last step before a stop."""
        return set(self.open)

    def step_end(self, trials: list[Any]) -> None:
        """Keeps the trials not ended at this step (`open`). Tune calls this at every
        step of its loop with the experiment's whole list, which only grows and whose ended
        trials stay ended (a trial Tune retries is set ERROR and requeued PENDING within one
        step): only the trials added since the last step and those still open are looked
        at (a scan of 10,000 trials at every step had taken a share of the driver's time)."""
        if self._stopped():
            return
        if len(trials) < self.seen:  # not the list seen before: look at all of it again
            self.open, self.seen = {}, 0
        for t in trials[self.seen:]:
            self.open[t.trial_id] = t
        self.seen = len(trials)
        self.open = {k: t for k, t in self.open.items() if str(t.status) not in FINAL_STATUSES}

    def experiment_end(self, trials: list[Any]) -> None:
        self.trials = list(trials)
        if self._stopped():
            self.stopped = set(self.in_flight)

    def ended(self) -> bool:
        """Whether every trial of the experiment ended (finished or failed)."""
        return self.trials is None or (not self.stopped and all_ended(self.trials))


# The TrialWatch of each experiment running in this process, by its name under the storage
# path. Tune saves an experiment's callbacks with it and a restored experiment runs the
# saved ones, so the callback carries only this key and finds the current run's watch here.
WATCHES: dict[str, TrialWatch] = {}


class WatchCallback(tune.Callback):
    """Tune's side of a TrialWatch (see WATCHES)."""

    def __init__(self, key: str):
        self.key = key

    def on_step_end(self, iteration, trials, **info):
        if self.key in WATCHES:
            WATCHES[self.key].step_end(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.key in WATCHES:
            WATCHES[self.key].write(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.key in WATCHES:
            WATCHES[self.key].failed(trial, retrying=False)
            WATCHES[self.key].write(trials)

    def on_trial_recover(self, iteration, trials, trial, **info):
        if self.key in WATCHES:
            WATCHES[self.key].failed(trial, retrying=True)

    def on_experiment_end(self, trials, **info):
        if self.key in WATCHES:
            WATCHES[self.key].experiment_end(trials)



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
                 scheduled: bool = True, experiment: str = ""):
    """`scheduled=False`: no early stopping (a shared stage 1 must run to its end). The
    search algorithm sits behind the experiment's budget gate (lfm_ray.study.budget), which
    also keeps at most `slots` trials at once."""
    alg = gated(search_alg(study, points, slots), experiment, slots)
    sched = scheduler(study) if scheduled else None
    if study.search == "grid":
        samples = len(points if points is not None else study.grid_points())
    elif study.search == "optuna":
        samples = study.num_samples * trials_per_sample(study)  # each seed is a trial
    else:
        samples = study.num_samples  # the basic generator crosses each sample with the seeds
    return tune.TuneConfig(
        search_alg=alg, scheduler=sched,
        # No metric here: the searcher and scheduler carry their own, and with one Tune's
        # status table adds a "Current best trial" line, a single trial's value with no
        # seeds or interval behind it (ties included). The report says which configuration,
        # if any, is better than the rest (lfm_ray.analysis.load.better_than_rest).
        num_samples=samples,
        max_concurrent_trials=None,  # the gated search algorithm keeps to `slots`
        trial_name_creator=TrialNamer(study.name),
        trial_dirname_creator=TrialNamer(study.name, folder=True),
        # A trial driver is reused by the next trial: its Ray process and imports
        # (torch, Ray Train; ~3 CPU-seconds) are paid once per concurrent slot.
        reuse_actors=True,
    )


def dry_run_json(plan: dict[str, Any]) -> str:
    return json.dumps(plan, indent=2, sort_keys=False, default=str)
