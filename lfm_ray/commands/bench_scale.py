"""`lfm-ray bench` parts at scale: a simulated cluster, a study of many trials, the report of
a large study, and where a branch study's time goes.

Figures (JSON keys) and the claim each supports:
- cluster_*: a `ray.cluster_utils.Cluster` on the loopback address of N nodes that each
  declare GPUs (a logical resource, no device) and CPUs; trials ask what a study's trial
  asks with `--gpus-per-worker 0.25` (`lfm_ray.study.trial.trial_resources`) and run a short
  CPU stand-in step. Per N: trials placed per declared GPU at the peak (ideal 4), time from
  the run's start to the first trial's start, trials per second over the middle half of the
  completions (steady state), and the driver's and the nodes' resident memory.
- scale_*: a random search of smoke trials (one step per stage, batch 8, on digits-lt, the
  smallest embedded set, so the step stays short) through the study engine (trial records,
  per-trial copies, trials.csv, best.json): wall time per trial over the last `window`
  completions over the first `window` (scale_growth), the driver's resident memory at the
  end over that after `window` trials (scale_rss_growth); the wall time per trial that no
  trial accounts for (scale_between_s_per_trial: wall per trial less the trials' own time
  over the slots). Then plain Tune on the same Ray instance, each run driven from a fresh
  process: with a trivial function trainable, the same number of trials (scale_plain_*:
  Tune's own figure; scale_overhead_ratio: our wall time per trial over plain Tune's;
  scale_between_ratio: our time between trials over plain Tune's), and with a trainable
  that reports the numbers our trials report, as often (scale_keys_*: how much of the
  driver's memory per trial is Tune's record of each trial's results).
- report_*: `lfm-ray report` on a fabricated study of many trials in the files a study
  writes (trials.csv, study.json, best.json, per-trial copies): its wall time and HTML size;
  report_load_s the loaders (`lfm_ray.analysis.load_study`) reading it.
- branch_*: the branch τ study's wall time broken down from Tune's per-trial records (each
  report's time_this_iter_s and the training time it reports): training per stage, the rest
  inside trials (start-up before the first epoch, evaluation and checkpoints) and what lies
  outside trials (Ray's start, the data check, scheduling, the tables).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any


def rss_mib(pid: int | None = None) -> float:
    """Resident memory (VmRSS) of a process in MiB, from /proc."""
    path = f"/proc/{pid or os.getpid()}/status"
    with open(path) as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in {path}")


# ---- where a study's time goes -----------------------------------------------------------------
def tune_records(experiment_dir: Path) -> list[list[dict[str, Any]]]:
    """Every trial's reports under a Tune experiment folder (its trials' result.json files,
    one JSON object per report)."""
    trials = []
    for path in sorted(Path(experiment_dir).glob("*/result.json")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines:
            trials.append(lines)
    return trials


def time_breakdown(experiments: dict[str, Path], wall_s: float, slots: int) -> dict[str, float]:
    """Where a study's wall time went, from its Tune experiments' per-trial records.

    Per report, `time_this_iter_s` is the trial's time since its previous report (since its
    start for the first) and `train_time_s` the epoch's training; the rest is evaluation and
    the checkpoint, and for the first report also the trial's start-up (model, data, text
    features, a branch's stage-1 checkpoint). Start-up is the first report's rest less the
    median rest of the trial's later reports. What no trial accounts for (Ray's start, the
    checks, Tune's scheduling and process starts, the tables) is `slots` × wall less the
    trials' summed time: trials run `slots` at a time."""
    out: dict[str, float] = {}
    in_trials = 0.0
    for label, folder in experiments.items():
        train = setup = rest = total = 0.0
        trials = tune_records(folder)
        for reports in trials:
            others = [r["time_this_iter_s"] - r.get("train_time_s", 0.0) for r in reports]
            later = statistics.median(others[1:]) if len(others) > 1 else 0.0
            setup += max(0.0, others[0] - later)
            rest += sum(others) - max(0.0, others[0] - later)
            train += sum(r.get("train_time_s", 0.0) for r in reports)
            total += sum(r["time_this_iter_s"] for r in reports)
        out[f"branch_{label}_trials"] = len(trials)
        out[f"branch_{label}_train_s"] = train
        out[f"branch_{label}_startup_s"] = setup
        out[f"branch_{label}_eval_checkpoint_s"] = rest
        out[f"branch_{label}_trial_s"] = total
        in_trials += total
    out["branch_wall_s"] = wall_s
    out["branch_slots"] = slots
    out["branch_outside_trials_s"] = max(0.0, slots * wall_s - in_trials)
    return out


def phase_spans(experiments: dict[str, Path]) -> dict[str, float]:
    """Each experiment's span, from its first trial's start to its last trial's end (Tune's
    report timestamps, whole seconds), and the span of all of them: the trials' part of a
    study's wall time, read back from a finished study's Ray folder."""
    out: dict[str, float] = {}
    starts, ends = [], []
    for label, folder in experiments.items():
        trials = tune_records(folder)
        if not trials:
            continue
        s = min(r[0]["timestamp"] - r[0]["time_this_iter_s"] for r in trials)
        e = max(r[-1]["timestamp"] for r in trials)
        out[f"branch_{label}_span_s"] = e - s
        starts.append(s)
        ends.append(e)
    if starts:
        out["branch_trials_span_s"] = max(ends) - min(starts)
    return out


def study_breakdown(study_folder: Path, slots: int) -> dict[str, float]:
    """time_breakdown and phase_spans of a finished branch study's Ray folder
    (<storage-path>/<name>/, with its stage1/ and tune/ experiments), over the span of its
    trials: `python -c "from lfm_ray.commands.bench_scale import study_breakdown; ..."`."""
    folder = Path(study_folder)
    experiments = {"stage1": folder / "stage1", "stage2": folder / "tune"}
    spans = phase_spans(experiments)
    return {**time_breakdown(experiments, spans.get("branch_trials_span_s", 0.0), slots),
            **spans}


# ---- a simulated cluster -----------------------------------------------------------------------
def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _tree_rss_mib(pid: int) -> float:
    total = 0.0
    for p in _descendants(pid):
        try:
            total += rss_mib(p)
        except (OSError, RuntimeError):
            pass  # ended meanwhile, or a zombie
    return total


def available_mib() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def stand_in_trial(config: dict[str, Any]) -> None:
    """The CPU stand-in for a trial's training: `work` iterations of arithmetic (a short
    step), then the trial keeps its resources for `hold_s` as a training would. Reports
    where and when it ran."""
    import ray
    from ray import tune

    start = time.time()
    acc = 0
    for i in range(int(config["work"])):
        acc += i * i % 7
    time.sleep(float(config["hold_s"]))
    tune.report({"node": ray.get_runtime_context().get_node_id(), "start": start,
                 "end": time.time(), "acc": acc})


def _peak_per_node(rows: list[dict[str, Any]]) -> dict[str, int]:
    """The most trials that ran at once on each node, from their start and end times."""
    peaks: dict[str, int] = {}
    by_node: dict[str, list[tuple[float, int]]] = {}
    for r in rows:
        by_node.setdefault(r["node"], []).extend([(r["start"], 1), (r["end"], -1)])
    for node, events in by_node.items():
        running = peak = 0
        for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # ends first at a tie
            running += step
            peak = max(peak, running)
        peaks[node] = peak
    return peaks


class _GpuInUse:
    """A Tune callback sampling the cluster's GPUs held by trials (every `every_s`): the
    most trials placed at once per declared GPU is that peak over the trial's share."""

    def __new__(cls, share: float, every_s: float = 0.5):
        import ray
        from ray.tune import Callback

        class GpuInUse(Callback):
            def __init__(self):
                self.peak, self.last = 0.0, 0.0
                self.total = float(ray.cluster_resources().get("GPU", 0.0))

            def on_step_end(self, iteration, trials, **info):
                now = time.perf_counter()
                if now - self.last >= every_s:
                    self.last = now
                    free = float(ray.available_resources().get("GPU", 0.0))
                    self.peak = max(self.peak, (self.total - free) / share)

        return GpuInUse()


def _cluster_round(nodes: int, gpus_per_node: int, trials_per_slot: int, hold_s: float,
                   work: int, root: Path) -> dict[str, Any]:
    """One simulated cluster of `nodes` nodes (the head is the first), each declaring
    `gpus_per_node` GPUs and 4 CPUs per GPU; trials ask what a study's trial asks with
    --gpus-per-worker 0.25 and train in their own process (num_workers 0)."""
    import ray
    from ray import tune
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from lfm_ray.config import RunConfig
    from lfm_ray.study import Study
    from lfm_ray.study.search import concurrency
    from lfm_ray.study.trial import trial_resources

    study = Study(name="cluster_bench", base=RunConfig().override(
        {"runtime.gpus_per_worker": 0.25, "runtime.num_workers": 0}),
        grid={"mix.tau": [0.05]}, storage_path=str(root / "study"),
        results_dir=str(root / "results"))
    resources = trial_resources(study)
    per_gpu = int(round(1 / study.base.runtime.gpus_per_worker))
    cpus = int(gpus_per_node * per_gpu * resources["cpu"])
    node_args = {"num_cpus": cpus, "num_gpus": gpus_per_node,
                 "object_store_memory": 78 * 2**20, "node_ip_address": "127.0.0.1",
                 "include_dashboard": False}
    # Loopback only: Ray keeps 127.0.0.1 where it thinks clusters are off, and the head's
    # address file goes to a temp folder of this run's own, so no other `ray.init()` on the
    # machine finds this cluster.
    # Ray's own folder is short (its sockets' paths must stay under 108 bytes).
    ray_tmp = Path(tempfile.mkdtemp(prefix="lfm-cluster-"))
    saved = ray_constants.ENABLE_RAY_CLUSTER, dict(os.environ)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    (ray_tmp / "ray").mkdir()  # where Ray writes the address file
    if ray.is_initialized():  # an earlier part's local instance
        ray.shutdown()
    before = _tree_rss_mib(os.getpid())
    cluster = Cluster(shutdown_at_exit=True)
    out: dict[str, Any] = {}
    try:
        started = time.perf_counter()
        cluster.add_node(temp_dir=str(ray_tmp / "ray"), **node_args)
        for _ in range(nodes - 1):
            cluster.add_node(**{k: v for k, v in node_args.items() if k != "include_dashboard"})
        cluster.wait_for_nodes()
        out["start_s"] = time.perf_counter() - started
        ray.init(address=cluster.address, log_to_driver=False)
        out["nodes_mib"] = _tree_rss_mib(os.getpid()) - before
        slots = concurrency(study)
        trials = slots * trials_per_slot
        held = _GpuInUse(study.base.runtime.gpus_per_worker)
        tuner = tune.Tuner(
            tune.with_resources(stand_in_trial, resources),
            param_space={"hold_s": hold_s, "work": work,
                         "mix.tau": tune.loguniform(0.002, 31.25)},
            tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=slots,
                                        reuse_actors=True),
            run_config=tune.RunConfig(storage_path=str(root / "tune"), name=f"n{nodes}",
                                      verbose=0, callbacks=[held]))
        fit_start = time.time()
        grid = tuner.fit()
        rows = [r.metrics for r in grid if r.metrics and "start" in r.metrics]
        # After the run: reused trial processes may already have ended, so this is no peak.
        after_mib = _tree_rss_mib(os.getpid()) - before
        ends = sorted(r["end"] for r in rows)
        mid = ends[len(ends) // 4: len(ends) - len(ends) // 4]
        peaks = _peak_per_node(rows)
        out.update({
            "trials": trials, "done": len(rows), "slots": slots,
            "gpus": nodes * gpus_per_node,
            # Trials holding a GPU share at once (Ray's placement), and trials whose
            # stand-in step ran at once (placement and their processes' start-up).
            "placed_per_gpu": held.peak / (nodes * gpus_per_node),
            "ran_per_gpu": sum(peaks.values()) / (nodes * gpus_per_node),
            "nodes_used": len(peaks),
            "first_trial_s": min(r["start"] for r in rows) - fit_start,
            "trials_per_s": (len(mid) - 1) / (mid[-1] - mid[0]) if len(mid) > 1 else float("nan"),
            "ideal_trials_per_s": slots / hold_s,  # every slot busy, nothing between trials
            "wall_s": ends[-1] - fit_start, "after_trials_mib": after_mib,
        })
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = saved[0]
        os.environ.clear()
        os.environ.update(saved[1])
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return out


def bench_cluster(root: Path, nodes: tuple[int, ...] = (1, 4, 16), gpus_per_node: int = 1,
                  trials_per_slot: int = 3, hold_s: float = 2.0, work: int = 200_000,
                  reserve_mib: float = 4096) -> dict[str, Any]:
    """Placement, time to first trial and steady-state rate on simulated clusters of each
    size in `nodes`. Before each size the memory it would take (per node and per trial
    slot, as measured on the size before) is checked against what the machine has free
    less `reserve_mib`; a size that would not fit is skipped and the reason kept."""
    from ray import tune  # noqa: F401 - fail here, before any cluster starts

    out: dict[str, Any] = {"cluster_gpus_per_node": gpus_per_node,
                           "cluster_hold_s": hold_s}
    per_node = per_slot = None
    for n in nodes:
        if per_node is not None:
            need = n * per_node + n * gpus_per_node * 4 * per_slot
            free = available_mib() - reserve_mib
            if need > free:
                out[f"cluster_n{n}_skipped"] = (
                    f"needs about {need:.0f} MiB ({per_node:.0f} per node, {per_slot:.0f} per "
                    f"trial slot), {free:.0f} MiB free beyond a {reserve_mib:.0f} MiB reserve")
                print(f"bench: cluster of {n} nodes skipped: {out[f'cluster_n{n}_skipped']}",
                      flush=True)
                continue
        print(f"bench: cluster of {n} nodes ...", flush=True)
        r = _cluster_round(n, gpus_per_node, trials_per_slot, hold_s, work,
                           root / f"cluster{n}")
        per_node = r["nodes_mib"] / n
        # A lower bound: measured after the run (a trial process without torch is ~100 MB).
        per_slot = max(100.0, (r["after_trials_mib"] - r["nodes_mib"]) / r["slots"])
        for key, value in r.items():
            out[f"cluster_n{n}_{key}"] = value
    sizes = [n for n in nodes if f"cluster_n{n}_placed_per_gpu" in out]
    if sizes:
        out["cluster_nodes_max"] = sizes[-1]
        out["cluster_placed_per_gpu"] = out[f"cluster_n{sizes[-1]}_placed_per_gpu"]
        if len(sizes) > 1:  # how the steady-state rate scales from the smallest to the largest
            out["cluster_rate_scaling"] = (out[f"cluster_n{sizes[-1]}_trials_per_s"]
                                           / out[f"cluster_n{sizes[0]}_trials_per_s"])
    return out


# ---- a study of many trials --------------------------------------------------------------------
class _Ends:
    """A Tune callback keeping when each trial ended and this process's resident memory
    then."""

    def __new__(cls):
        from ray.tune import Callback

        class Ends(Callback):
            def __init__(self):
                self.times: list[float] = []
                self.rss: list[float] = []

            def _ended(self):
                self.times.append(time.perf_counter())
                self.rss.append(rss_mib())

            def on_trial_complete(self, iteration, trials, trial, **info):
                self._ended()

            def on_trial_error(self, iteration, trials, trial, **info):
                self._ended()

        return Ends()


def _per_trial(start: float, ends: list[float], window: int) -> tuple[float, float]:
    """Wall time per trial over the first and over the last `window` trials to end."""
    ends = [start, *sorted(ends)]
    window = min(window, max(1, (len(ends) - 1) // 2))
    return (ends[window] - ends[0]) / window, (ends[-1] - ends[-1 - window]) / window


def _rss_per_trial_kib(rss: list[float], window: int) -> float:
    """The driver's memory growth per trial (KiB) from the `window`-th trial's end to the
    last's."""
    at = min(window, len(rss)) - 1
    return (rss[-1] - rss[at]) * 1024 / max(1, len(rss) - 1 - at)


# The smoke study: one step per stage at batch 8 on the smallest embedded set, so the step
# is short and what the study engine and Tune add around it shows.
SMOKE_STUDY = {"data.name": "digits-lt", "stage1.epochs": 1, "stage2.epochs": 1,
               "runtime.max_steps_per_epoch": 1, "runtime.num_workers": 0,
               "runtime.batch_size": 8}


def smoke_search(name: str, root: Path, cache_dir: str, trials: int, callback: Any):
    """A random search over τ of `trials` smoke trials (SMOKE_STUDY, in the trial's own
    process) with `callback` on Tune, its files under `root`."""
    from lfm_ray.config import RunConfig
    from lfm_ray.study import Dim, Study

    base = RunConfig().override({**SMOKE_STUDY, "data.cache_dir": cache_dir})
    return Study(name=name, base=base, search="random",
                 space={"mix.tau": Dim.loguniform(0.002, 31.25)}, num_samples=trials,
                 storage_path=str(root / "ray"), results_dir=str(root / "results"),
                 callbacks=[callback], command=["lfm-ray", "bench"])


def trivial_trial(config: dict[str, Any]) -> None:
    """Plain Tune's side: a function trainable that reports once and ends."""
    from ray import tune

    tune.report({"value": float(config["mix.tau"])})


def keys_trial(config: dict[str, Any]) -> None:
    """Plain Tune reporting what a study trial reports: `config["report"]` (its numbers and
    lists), `config["reports"]` times."""
    from ray import tune

    for _ in range(int(config["reports"])):
        tune.report(dict(config["report"]))


# Keys Tune adds to every report itself; a trainable standing in for ours leaves them to Tune.
TUNE_KEYS = ("time_this_iter_s", "time_total_s", "timestamp", "training_iteration",
             "iterations_since_restore", "time_since_restore", "pid", "hostname", "node_ip",
             "date", "done", "trial_id", "config", "checkpoint_dir_name", "should_checkpoint",
             "experiment_tag")


def _plain_tune(address: str, name: str, trainable: Any, space: dict[str, Any], trials: int,
                slots: int, cpus: float, root: Path, window: int) -> dict[str, float]:
    """Plain Tune, as the driver of a process of its own on the Ray instance at `address`:
    `trials` trials of `trainable` at `slots` at once; wall time, its growth, and the
    driver's memory growth per trial (a fresh process, so no heap freed by an earlier run
    absorbs it)."""
    import ray
    from ray import tune

    ray.init(address=address, log_to_driver=False)
    ends = _Ends()
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": cpus}), param_space=space,
        tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=slots,
                                    reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(root / name), name=name, verbose=0,
                                  callbacks=[ends]))
    start = time.perf_counter()
    tuner.fit()
    wall = time.perf_counter() - start
    first, last = _per_trial(start, ends.times, window)
    return {"trials": len(ends.times), "wall_s": wall, "first_s_per_trial": first,
            "last_s_per_trial": last, "growth": last / first,
            "rss_kib_per_trial": _rss_per_trial_kib(ends.rss, window)}


def bench_study_scale(root: Path, cache_dir: str, trials: int = 10_000,
                      window: int = 1_000) -> dict[str, Any]:
    """A random search of `trials` smoke trials through the study engine, then plain Tune
    with a trivial function trainable and with one reporting what our trials report, the
    same number of trials at the same concurrency on the same Ray instance, each plain run
    driven from a fresh process (see _plain_tune)."""
    import pandas as pd
    import ray
    from ray import tune

    from lfm_ray.study import run_study
    from lfm_ray.study.search import concurrency

    ours = _Ends()
    study = smoke_search(f"scale_{trials}", root, cache_dir, trials, ours)
    base = study.base
    start = time.perf_counter()
    table = run_study(study)
    our_wall = time.perf_counter() - start
    first, last = _per_trial(start, ours.times, window)
    at = min(window, len(ours.rss)) - 1
    slots = concurrency(study)
    done = len(ours.times)
    # What trials account for: each trial's own time (Tune's time_total_s, from its start in
    # its process to its last report), `slots` at a time.
    in_trial = float(pd.to_numeric(table["wall_time_s"]).sum())
    between = our_wall / max(1, done) - in_trial / slots / max(1, done)
    # One trial's last report, for plain Tune to report the same numbers as often.
    last_result = {k: v for k, v in (study.result_grid[0].metrics or {}).items()
                   if k not in TUNE_KEYS and isinstance(v, (int, float, str, list))}
    reports = int(study.result_grid[0].metrics.get("training_iteration") or 1)

    space = {"mix.tau": tune.loguniform(0.002, 31.25)}
    cpus = base.runtime.cpus_per_worker
    address = ray.get_runtime_context().gcs_address
    runs = {"plain": (trivial_trial, space),
            "plain_keys": (keys_trial, {**space, "report": last_result, "reports": reports})}
    found = {}
    for name, (trainable, param_space) in runs.items():
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            found[name] = pool.submit(_plain_tune, address, name, trainable, param_space,
                                      trials, slots, cpus, root, window).result()
    plain, keys = found["plain"], found["plain_keys"]
    read_start = time.perf_counter()
    csv = pd.read_csv(study.result_dir / "trials.csv")
    read_s = time.perf_counter() - read_start
    plain_per_trial = plain["wall_s"] / max(1, plain["trials"])
    return {
        "scale_trials": done, "scale_window": window, "scale_slots": slots,
        "scale_data": base.data.name,
        "scale_wall_s": our_wall, "scale_first_s_per_trial": first,
        "scale_last_s_per_trial": last, "scale_growth": last / first,
        "scale_rss_at_window_mib": ours.rss[at], "scale_rss_end_mib": ours.rss[-1],
        "scale_rss_growth": ours.rss[-1] / ours.rss[at],
        "scale_rss_kib_per_trial": _rss_per_trial_kib(ours.rss, window),
        "scale_trial_s": in_trial / max(1, done),
        "scale_train_s_per_trial": float(pd.to_numeric(table["train_time_s"]).mean()),
        "scale_between_s_per_trial": between,
        **{f"scale_plain_{k}": v for k, v in plain.items()},
        "scale_overhead_ratio": (our_wall / max(1, done)) / plain_per_trial,
        "scale_between_ratio": between / plain_per_trial,
        "scale_keys_reported": sum(isinstance(v, (int, float)) for v in last_result.values()),
        "scale_keys_reports": reports,
        **{f"scale_keys_{k}": v for k, v in keys.items()},
        "scale_trials_csv_rows": len(csv), "scale_trials_csv_read_s": read_s,
    }


# ---- the report of a large study ---------------------------------------------------------------
def write_large_study(folder: Path, trials: int, seed: int = 0) -> Path:
    """A random search of `trials` smoke-sized trials over τ, as the study engine leaves it:
    trials.csv, study.json, best.json and per-trial copies (result.json, history.json,
    confusion.npz) under trials/<id>/, with digits-lt's classes. Accuracy peaks near
    τ = 0.05 with noise, so the figures have a shape to show."""
    import numpy as np
    import pandas as pd

    from lfm_ray import confusion
    from lfm_ray.config import RunConfig
    from lfm_ray.data import long_tail_counts, shot_groups
    from lfm_ray.study.spec import Dim

    rng = np.random.default_rng(seed)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    counts = long_tail_counts(10, 10, 124)
    groups = shot_groups(counts)
    test = 50
    name = folder.name
    folder.mkdir(parents=True, exist_ok=True)
    taus = np.exp(rng.uniform(np.log(0.002), np.log(31.25), trials))
    sims = rng.normal(size=(10, 10))
    sims = (sims + sims.T) / 2
    rows = []
    for i, tau in enumerate(taus):
        level = 0.6 - 0.05 * abs(np.log10(tau) - np.log10(0.05))
        per_class = np.clip(level + 0.01 * (4.5 - np.arange(10)) + rng.normal(0, 0.03, 10), 0, 1)
        right = np.round(per_class * test).astype(int)
        acc = {f"acc_{g}": float(right[idx].sum() / (test * len(idx))) if len(idx) else 0.0
               for g, idx in groups.items()}
        acc["acc_all"] = float(right.sum() / (test * 10))
        history = [{"epoch": e, "stage": e, "train_loss": 2.0 / e, "lr": 1e-4,
                    "train_time_s": 0.05, "train_time_total_s": 0.05 * e,
                    **{k: v * (0.9 + 0.05 * e) for k, v in acc.items()},
                    "test_epoch": e, "selection_split": "test"} for e in (1, 2)]
        history[-1].update(acc)
        trial_id = f"{i // 10_000:05d}_{i % 10_000:05d}"
        copy = folder / "trials" / trial_id
        copy.mkdir(parents=True, exist_ok=True)
        (copy / "result.json").write_text(json.dumps({
            **history[-1], "per_class_acc": (right / test).tolist(), "class_counts": counts,
            "class_names": names}))
        (copy / "history.json").write_text(json.dumps(history))
        logits = sims / max(float(tau), 1e-3)
        np.fill_diagonal(logits, -np.inf)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        cm = np.diag(right)
        cm[np.arange(10), (np.arange(10) + 1) % 10] = test - right
        confusion.write(copy / confusion.CONFUSION_FILE, cm, p / p.sum(axis=1, keepdims=True),
                        class_names=names, split="test", epoch=2, tau=float(tau))
        rows.append({"trial_id": trial_id, "status": "TERMINATED", "error": "",
                     "mix.tau": float(tau), "data.name": "digits-lt", "model.name": "tiny",
                     "loss.name": "ce", "mix.method": "lfm", **history[-1],
                     "wall_time_s": 0.4, "train_time_s": 0.1, "gpu_hours": 0.0,
                     "stopped_early": False, "checkpoint_path": None, "node_id": "n0",
                     "experiment": "tune", "artifacts": f"trials/{trial_id}"})
    table = pd.DataFrame(rows)
    table.to_csv(folder / "trials.csv", index=False)
    best = table.loc[table["acc_all"].idxmax()]
    (folder / "best.json").write_text(json.dumps({"acc_all": {
        "mode": "max", "value": float(best["acc_all"]), "seeds": 1,
        "params": {"mix.tau": float(best["mix.tau"])}, "selection_split": "test",
        "test": {k: float(best[k]) for k in ("acc_many", "acc_medium", "acc_few", "acc_all")},
        "trial_ids": [best["trial_id"]]}}))
    base = RunConfig().override({"data.name": "digits-lt", "model.name": "tiny",
                                 "stage1.epochs": 1, "stage2.epochs": 1}).to_dict()
    (folder / "study.json").write_text(json.dumps({
        "name": name, "command": ["lfm-ray", "bench"], "search": "random",
        "swept": ["mix.tau"], "grid": {}, "num_samples": trials,
        "space": {"mix.tau": Dim.loguniform(0.002, 31.25).to_dict()}, "variants": {},
        "seeds": [0], "metric": "acc_all", "mode": "max", "objectives": [],
        "selection_split": "test",
        "selection": "selected on acc_all (test): this data set has no validation split",
        "scheduler": "none", "experiments": ["tune"], "storage_path": "ray",
        "base_config": base, "status": "complete",
        "machine": {"platform": "fabricated by lfm-ray bench", "cpus": 0},
        "versions": {}, "started": "2026-01-01 00:00:00"}))
    return folder


def bench_report_scale(root: Path, trials: int = 10_000) -> dict[str, Any]:
    """`lfm-ray report` on a fabricated random search of `trials` trials: wall time (loading
    included) and HTML size; trials.csv read alone (report_scale_csv_s) and the loader with
    every per-trial history (report_scale_load_s), each timed alone before."""
    from lfm_ray.analysis import load_study
    from lfm_ray.analysis.report import write_report

    from lfm_ray.analysis.load import read_trials_csv

    folder = write_large_study(root / "report_scale" / f"search_{trials}", trials)
    start = time.perf_counter()
    read_trials_csv(folder / "trials.csv")
    csv_s = time.perf_counter() - start
    start = time.perf_counter()
    study = load_study(folder)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    html = write_report(folder, png=False)
    report_s = time.perf_counter() - start
    return {"report_scale_trials": len(study.trials), "report_scale_load_s": load_s,
            "report_scale_csv_s": csv_s,
            "report_scale_s": report_s,
            "report_scale_html_mib": html.stat().st_size / 2**20}
