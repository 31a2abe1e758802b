"""Build and run one Ray Train `TorchTrainer` for a RunConfig.

`lfm-ray train` calls `fit_run`; each study trial calls `make_trainer` inside its Tune
function trainable. Both share the resource arithmetic and the start-up settings that make
a trial cheap on a laptop.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

from lfm_ray.config import RunConfig
from lfm_ray.contract import (
    CONFUSION_FILE, HISTORY_FILE, RESULT_FILE, check_batch_size, check_trains_something,
    complete_checkpoint, resolve_selection_split,
)
from lfm_ray.driver.rerun import (
    CHECKPOINT_DIR, RAY_DIR, discard, plan_train_rerun, record, schedule_segments, with_resolved,
)
from lfm_ray.errors import LfmError

# Ray Train's controller polls its workers at this interval (default 2 s); every report and
# the end of a run wait for a poll, so a short interval takes seconds off every trial.
FAST_POLL_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # Worker prints go to the driver once (the print patch would log them a second time).
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


# Only for a local instance (see init_ray); LOCAL_FLAG also tells make_trainer.
LOCAL_FLAG = "LFM_RAY_LOCAL_INSTANCE"
LOCAL_INSTANCE_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    LOCAL_FLAG: "1",
}


def apply_fast_start_env() -> None:
    """Set Ray's polling intervals before Ray starts; a user's own setting wins."""
    for key, value in FAST_POLL_ENV.items():
        os.environ.setdefault(key, value)


def quiet_ray_logs() -> None:
    """Ray Train's per-report and worker-group start-up INFO lines off in this process (the
    study's table and the training progress bar say what matters; --verbose keeps them)."""
    for name in ("ray.train", "ray.tune.integration.ray_train", "ray.train.v2"):
        logging.getLogger(name).setLevel(logging.WARNING)


def show_tune_trial_tables(shown: bool) -> None:
    """Tune's terminal reporter prints, at its default verbosity, a configuration table when a
    trial starts and a table of every reported key when it ends, beside its status table
    (trial states, parameters, the study's metrics) every 30 s and at the end: about 35 lines
    per trial, 7,000 for a 200-trial study. Not `shown`, those two tables wait for Tune's
    verbose level, so the status table and errors (printed at any level) are what the
    terminal shows; --verbose shows them. The reporter lives in Tune's experimental output
    module: where that changes, the tables simply stay."""
    try:
        from ray.tune.experimental.output import AirVerbosity, TuneReporterBase
    except ImportError:
        return
    if hasattr(TuneReporterBase, "_start_end_verbosity"):
        TuneReporterBase._start_end_verbosity = (AirVerbosity.DEFAULT if shown
                                                 else AirVerbosity.VERBOSE)


def init_ray(address: str | None = None, num_cpus: int | None = None,
             log_to_driver: bool = True) -> None:
    """Connect to `address` (or RAY_ADDRESS), else start a local instance; once per process.

    `log_to_driver=False` keeps the Ray processes' own output (Ray Train's controller and
    workers) off this terminal; errors still reach it through the trials' exceptions."""
    import ray

    explicit = address or os.environ.get("RAY_ADDRESS")
    if explicit and explicit != "auto" and not explicit.startswith("ray://"):
        _check_reachable(explicit)
        if not ray.is_initialized():
            _check_token(explicit)
    if ray.is_initialized():
        return
    apply_fast_start_env()
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # A laptop is not preempted and has no metrics dashboard: skip the per-run preemption
        # watcher and Train's metrics callbacks. Set before Ray starts, so every Ray process
        # (trial drivers included) inherits them. Clusters keep Ray's defaults.
        for key, value in LOCAL_INSTANCE_ENV.items():
            os.environ.setdefault(key, value)
    try:
        if address:
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
            # The instance is this process's: if it is killed, its watchdog ends the instance.
            from lfm_ray.watchdog import guard_local_instance

            node = getattr(ray._private.worker, "_global_node", None)  # Ray's own handle
            if node is not None:
                guard_local_instance(node.get_session_dir_path())
    except ConnectionError as exc:
        raise LfmError(f"no Ray cluster answers at address {address!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - Ray raises assorted types for a bad address
        if address:
            raise LfmError(f"could not connect to a Ray cluster at {address!r}: {exc}") from None
        raise


def _check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """A host:port with nothing listening fails here at once, not after Ray's retries."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise LfmError(f"Ray address {address!r} is not valid; expected HOST:PORT, auto or "
                       "ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise LfmError(f"no Ray cluster answers at address {address!r} "
                       f"({exc.strerror or exc}); start one with `ray start --head` or "
                       "leave --address out for a local instance") from None


TOKEN_HELP = ("pass the cluster's token: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<token> "
              "(or RAY_AUTH_TOKEN_PATH=<file holding it>, or put it in ~/.ray/auth_token); "
              "`ray get-auth-token` on the head node prints it")


def _token_given() -> bool:
    """Whether this process would send a token: token mode on and a token to send."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return False
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or bool(path and os.path.isfile(path)) \
        or os.path.isfile(os.path.expanduser("~/.ray/auth_token"))


@contextlib.contextmanager
def _stderr_to_file():
    """File descriptor 2 into a temporary file for the duration (Ray's C++ client logs each
    refused attempt there); yields the file, read it after."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _check_token(address: str) -> None:
    """A cluster with token authentication refuses a client without its token: say so in
    one line, naming the token and how to give it, instead of Ray's minute of retries that
    ends in "Failed to connect"."""
    try:
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:  # Ray's internals moved: ray.init reports what it finds
        return
    try:
        with _stderr_to_file():
            GcsClient(address=address)
    except AuthenticationError:
        what = "a wrong token" if _token_given() else "no token"
        raise LfmError(f"the Ray cluster at {address} uses token authentication and refused "
                       f"this client, which sent {what}; {TOKEN_HELP}") from None
    except Exception:  # noqa: BLE001 - anything else: ray.init reports it as it finds it
        return


def check_names(cfg: RunConfig) -> None:
    """Unknown data set, loss, mixing method, model or pretrained tag: one error, before Ray."""
    from lfm_ray.data import DATASETS
    from lfm_ray.errors import unknown_name
    from lfm_ray.losses import LOSSES
    from lfm_ray.mixing import MIXERS

    if cfg.data.name not in DATASETS:
        raise unknown_name("data set", cfg.data.name, list(DATASETS))
    if cfg.loss.name not in LOSSES:
        raise unknown_name("loss", cfg.loss.name, list(LOSSES))
    if cfg.mix.method not in MIXERS:
        raise unknown_name("mixing method", cfg.mix.method, list(MIXERS))
    from lfm_ray.backbones import check_backbone, check_family
    from lfm_ray.finetune import check_architecture
    from lfm_ray.similarity import check_similarity
    from lfm_ray.text import check_text

    check_backbone(cfg.model)   # an open_clip or a timm: model, and its weights value
    check_family(cfg)           # what a vision-only model cannot do
    check_text(cfg)             # the text encoder against the model (lfm_ray/text.py)
    check_similarity(cfg)       # LFM's similarity source and the files it names
    check_architecture(cfg.model.name, cfg.stage1.finetune)  # ViT-only modes on a ViT


def prepare_node(cfg: RunConfig):
    """Load the model once (fails at once on missing weights) and build this node's data
    cache (fails at once on missing data), so trials start on a warm cache. Returns the
    cached data set (an ArraySet: its splits tell check_selection_split what exists)."""
    from lfm_ray.backbones import build_backbone
    from lfm_ray.data import load_arrays, run_options
    from lfm_ray.similarity import check_similarity

    _, spec = build_backbone(cfg.model, "cpu")
    check_similarity(cfg, weights=True)  # a text:MODEL similarity's weights, here at once
    options = run_options(cfg.data)
    arrays = load_arrays(cfg.data.name, root=cfg.data.root, image=spec,
                         cache_dir=cfg.data.cache_dir, **options)
    check_similarity(cfg, num_classes=len(arrays.class_names))  # a file's size, read whole
    if cfg.aux.root is not None:  # auxiliary classes: checked and cached like the data set
        from lfm_ray.data.auxiliary import load_aux_arrays

        load_aux_arrays(cfg, arrays.class_names, spec, cfg.data.cache_dir)
    return arrays


def check_selection_split(cfg: RunConfig, arrays) -> str:
    """The split this run selects on ('val' or 'test'), from the prepared data set's splits
    (`prepare_node`'s result); `data.selection_split = val` on a data set without a val
    split is one LfmError here, in the driver, before Ray starts. Where the driver has not
    prepared the data (a cluster), the workers raise the same error."""

    return resolve_selection_split(cfg.data.selection_split,
                                   getattr(arrays, "val_images", None) is not None, cfg.data.name)


def check_inputs(cfg: RunConfig) -> int:
    """Names, values, weights and data files (the auxiliary classes' folders and neighbour map
    too) of one run, checked without training, building caches or starting Ray (what
    --dry-run checks). Returns the data set's number of classes."""
    from lfm_ray.backbones import check_backbone_weights
    from lfm_ray.data import build_dataset, run_options
    from lfm_ray.data.cache import check_cache_dir
    from lfm_ray.similarity import check_similarity

    cfg.validate()
    check_names(cfg)
    check_trains_something(cfg)
    check_backbone_weights(cfg.model)
    check_similarity(cfg, weights=True)  # a text:MODEL source's weights too
    options = run_options(cfg.data)
    dataset = build_dataset(cfg.data.name, cfg.data.root, **options)
    check_similarity(cfg, num_classes=len(dataset.class_names))  # a file against the classes
    resolve_selection_split(cfg.data.selection_split, dataset.val_images is not None,
                            cfg.data.name)
    check_batch_size(cfg, len(dataset.train_labels))
    check_cache_dir(cfg.data.cache_dir)
    if cfg.aux.root is not None:  # the auxiliary folder and neighbour map against its classes
        from lfm_ray.data.auxiliary import aux_source

        aux_source(cfg, dataset.class_names)
    return len(dataset.class_names)


def check_local_resources(cfg: RunConfig) -> None:
    """One run's CPUs and GPUs against this machine's, without starting Ray."""
    rt = cfg.runtime
    need_gpus = rt.num_workers * rt.gpus_per_worker
    if need_gpus > 0:
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if need_gpus > have + 1e-9:
            raise LfmError(f"runtime.gpus_per_worker={rt.gpus_per_worker} × num_workers="
                           f"{rt.num_workers} asks for {need_gpus:g} GPUs, but this machine "
                           f"has {have}")
    need_cpus = max(1, rt.num_workers) * rt.cpus_per_worker
    have_cpus = os.cpu_count() or 1
    if need_cpus > have_cpus + 1e-9:
        raise LfmError(f"runtime.cpus_per_worker={rt.cpus_per_worker} × num_workers="
                       f"{rt.num_workers} asks for {need_cpus:g} CPUs, but this machine has "
                       f"{have_cpus}")


def is_local(address: str | None) -> bool:
    """No cluster address: this machine runs the trials and holds their data."""
    return not (address or os.environ.get("RAY_ADDRESS"))


def default_trial_workers(address: str | None, gpus_per_worker: float) -> int:
    """Workers per study trial when none are asked for. On a local instance a CPU trial
    gains nothing from a worker group (DDP over one rank) and pays for three more Python
    processes (Train controller, worker, synchronisation actor: about 10 s and 15
    CPU-seconds per trial on 2 cores), so it trains in its own process (0, Ray Train's local
    mode); clusters and GPU trials get a worker group (1)."""
    return 0 if is_local(address) and not gpus_per_worker else 1


def check_resources(cfg: RunConfig) -> None:
    """Fail before training when the cluster cannot hold one run of this config."""
    import ray

    total = ray.cluster_resources()
    rt = cfg.runtime
    need_gpus = rt.num_workers * rt.gpus_per_worker
    have_gpus = float(total.get("GPU", 0.0))
    if need_gpus > have_gpus + 1e-9:
        raise LfmError(
            f"runtime.gpus_per_worker={rt.gpus_per_worker} × num_workers={rt.num_workers} asks "
            f"for {need_gpus:g} GPUs, but the Ray cluster has {have_gpus:g}"
        )
    need_cpus = max(1, rt.num_workers) * rt.cpus_per_worker
    have_cpus = float(total.get("CPU", 0.0))
    if need_cpus > have_cpus + 1e-9:
        raise LfmError(
            f"runtime.cpus_per_worker={rt.cpus_per_worker} × num_workers={rt.num_workers} asks "
            f"for {need_cpus:g} CPUs, but the Ray cluster has {have_cpus:g}"
        )


def scaling_config(cfg: RunConfig):
    from ray.train import ScalingConfig

    rt = cfg.runtime
    resources = {"CPU": rt.cpus_per_worker}
    if rt.gpus_per_worker > 0:
        resources["GPU"] = rt.gpus_per_worker
    return ScalingConfig(
        num_workers=rt.num_workers,
        use_gpu=rt.gpus_per_worker > 0,
        resources_per_worker=resources if rt.num_workers > 0 else None,
    )


def _lean_trainer_class():
    """TorchTrainer without the per-run actors our runs do not use.

    Ray Train 2.60 starts a DatasetManager actor for every run, with or without Ray Data
    datasets (we pass none: images live in the node cache), and a detached
    PlacementGroupCleaner that frees the run's placement group if the controller dies. Each
    is a Python process (1.5-2 CPU-seconds to start), and the cleaner's launch blocks the
    controller for about 2 s. On a local instance the placement groups end with the
    instance, so the cleaner goes too; on a cluster it stays. Ctrl-C during fit() stops the
    run and raises KeyboardInterrupt, so `lfm-ray train` says how to resume (Ray's own
    handler exits with status 1 and no word).
    """
    from ray.train.torch import TorchTrainer

    try:  # Ray's private modules: where they moved or changed, the stock trainer runs
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import (
            PlacementGroupCleanerCallback,
        )
    except ImportError:
        return TorchTrainer
    if not callable(getattr(TorchTrainer, "_create_default_callbacks", None)):
        return TorchTrainer

    dropped: tuple[type, ...] = (DatasetsCallback,)
    if os.environ.get(LOCAL_FLAG) == "1":
        dropped += (PlacementGroupCleanerCallback,)

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return [cb for cb in callbacks if not isinstance(cb, dropped)]

        def _register_sigint_handler(self, controller):
            # Ray's own handler exits with status 1 and no word; ours stops the run and
            # lets the command say how to resume (Ray calls this in the main thread only).
            signal.signal(signal.SIGINT, _interrupt_handler(controller))

    return LeanTorchTrainer


def launch_dir() -> str:
    """The folder this run or study was started from: relative file paths in a configuration
    (a similarity file) are read from there, since Ray Tune runs each trial, and Ray Train
    each worker, in a folder of its own (Tune keeps the original in TUNE_ORIG_WORKING_DIR)."""
    return os.environ.get("TUNE_ORIG_WORKING_DIR") or os.getcwd()


def _interrupt_handler(controller):
    """Ctrl-C during `trainer.fit()`: ask the Train controller to abort (its workers stop;
    the checkpoints already reported stay), then raise KeyboardInterrupt in the driver. A
    second Ctrl-C interrupts at once."""
    def on_sigint(signum, frame):
        import ray

        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            ray.get(controller.abort.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - the controller may be gone already
            pass
        raise KeyboardInterrupt

    return on_sigint


def make_trainer(cfg: RunConfig, *, name: str, storage_path: str,
                 callbacks: Iterable[Any] = (), extra: dict[str, Any] | None = None,
                 max_failures: int = 0):
    """A TorchTrainer running `train_loop_per_worker` for `cfg` (gloo on CPU, NCCL on GPU)."""
    from ray.train import CheckpointConfig, FailureConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig

    from lfm_ray.worker.loop import train_loop_per_worker  # torch: not before a trainer is made

    backend = "nccl" if cfg.runtime.gpus_per_worker >= 1 else "gloo"
    return _lean_trainer_class()(
        train_loop_per_worker,
        train_loop_config={"run": cfg.to_dict(), "launch_dir": launch_dir(), **(extra or {})},
        scaling_config=scaling_config(cfg),
        torch_config=TorchConfig(backend=backend),
        run_config=RayRunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


def unwrap_training_error(exc: BaseException) -> BaseException:
    """The user's own error inside Ray's wrappers (so an LfmError prints as one line)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, LfmError):
            return exc
        for attr in ("worker_failures", "errors"):
            inner = getattr(exc, attr, None)
            if isinstance(inner, dict) and inner:
                exc = next(iter(inner.values()))
                break
        else:
            nxt = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
            if nxt is None:
                break
            exc = nxt
    return exc


def fit_run(cfg: RunConfig, output: str | os.PathLike, *, address: str | None = None,
            verbose: bool = False, announce: Callable[[], None] | None = None,
            progress: bool = True, stage1_from: str | os.PathLike | None = None,
            stop_after_stage1: bool = False, extend: bool = False,
            restart: bool = False) -> dict[str, Any]:
    """Run one training on Ray and write config.json, history.csv, metrics.json and (where
    the run keeps one) confusion.npz to `output`.

    An output folder holds one configuration and one data set (lfm_ray.driver.rerun): the same
    again resumes from its last checkpoint; another is refused before anything is written,
    unless `extend` (more epochs of the last stage) or `restart` (discard and train afresh).
    `announce` is called once the inputs are checked, before training; `progress` draws a
    bar per stage from the run's reports; `verbose` keeps Ray's own log lines.
    `stage1_from`: the checkpoint directory of a completed stage 1 whose config has this
    run's stage1_key; only stage 2 trains, from it (checked here before Ray starts).
    `stop_after_stage1`: train stage 1 only; its final checkpoint is what branches start from.
    """
    from lfm_ray.data import run_data_fingerprint

    cfg.validate()
    check_names(cfg)
    check_trains_something(cfg)
    extra = _stage_options(cfg, stage1_from, stop_after_stage1)
    out = Path(output).resolve()
    check_output_parent(out)
    fingerprint = run_data_fingerprint(cfg)
    plan = plan_train_rerun(out, cfg, fingerprint, extend=extend, restart=restart)
    if is_local(address):
        arrays = prepare_node(cfg)
        check_selection_split(cfg, arrays)
        check_batch_size(cfg, len(arrays.train_labels))
    if not verbose:
        quiet_ray_logs()
    init_ray(address, log_to_driver=verbose)
    check_resources(cfg)
    # Every input is checked: from here on the output folder is written.
    _open_output(out, plan, announce)
    write_json_atomic(out / "config.json", record(cfg, fingerprint, plan.extensions))
    segments = schedule_segments(cfg, plan.extensions)
    if segments:
        extra["schedule_segments"] = {str(k): v for k, v in segments.items()}
    if cfg.runtime.num_workers == 0:
        _keep_checkpoints_in(out / CHECKPOINT_DIR, extra)
    result = _train(cfg, out, extra, progress)
    return _write_results(out, result.checkpoint, extra)


def _stage_options(cfg: RunConfig, stage1_from: str | os.PathLike | None,
                   stop_after_stage1: bool) -> dict[str, Any]:
    """The trainer's options for a branch (stage 2 from a shared stage 1, checked here) or a
    run that stops after stage 1; refused where they would train nothing."""
    from lfm_ray.worker.checkpoint import load_stage1  # torch: only when a run starts

    if stage1_from is not None and stop_after_stage1:
        raise LfmError("stage1_from and stop_after_stage1 together would train nothing; "
                       "give one of them")
    extra: dict[str, Any] = {}
    if stage1_from is not None:
        if "://" not in str(stage1_from):
            stage1_from = str(Path(stage1_from).resolve())
        load_stage1(cfg, stage1_from)
        extra["stage1_from"] = stage1_from
    if stop_after_stage1:
        if cfg.stage1.epochs < 1 or cfg.runtime.zero_shot:
            raise LfmError("stop_after_stage1 needs a stage 1 to train (stage1.epochs >= 1, "
                           "not zero-shot)")
        extra["stop_after_stage1"] = True
    return extra


def _open_output(out: Path, plan: Any, announce: Callable[[], None] | None) -> None:
    """The output folder made (emptied first for a restart), and what the run will do said."""
    if plan.action == "restart":
        discard(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LfmError(f"--output {str(out)!r} cannot be created: {exc}") from None
    if announce is not None:
        announce()
    if plan.action in ("resume", "extend"):
        print(f"{'extending' if plan.action == 'extend' else 'resuming'} the run in {out} "
              "from its last checkpoint", file=sys.stderr, flush=True)
    segment = (plan.extensions[-1].get("schedule") or {}) if plan.action == "extend" else {}
    if segment:
        first, last = segment["epochs"]
        print(f"epochs {first}-{last} of {segment['stage']} run {segment['rule']} "
              f"({segment['lr']:g} to {segment['min_lr']:g}; config.json records it)",
              file=sys.stderr, flush=True)


def _keep_checkpoints_in(keep: Path, extra: dict[str, Any]) -> None:
    """Ray Train's local mode keeps no checkpoints of its own: they go to a folder of the
    run's, and a rerun resumes from the last one there. (With workers, re-running with the
    same output resumes from the run's last checkpoint: Ray Train finds it under the same
    storage path and name.)"""
    extra["checkpoint_dir"] = str(keep)
    done = [d for d in sorted(keep.glob("epoch_*")) if complete_checkpoint(d)] \
        if keep.is_dir() else []
    if done:
        extra["resume_from"] = str(done[-1])


def _train(cfg: RunConfig, out: Path, extra: dict[str, Any], progress: bool) -> Any:
    """The trainer's result, with a progress bar per stage where asked; the worker's own
    LfmError surfaces as itself, and Ctrl-C's handler is restored after."""
    from lfm_ray.progress import ProgressFeed

    feed = ProgressFeed(cfg) if progress else contextlib.nullcontext()
    main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        with feed:
            if progress:
                extra["progress"] = feed.queue
            trainer = make_trainer(cfg, name="run", storage_path=str(out / RAY_DIR), extra=extra)
            return trainer.fit()
    except Exception as exc:  # noqa: BLE001 - surface the worker's own error
        inner = unwrap_training_error(exc)
        if isinstance(inner, LfmError):
            raise inner from None
        raise
    finally:
        if main_thread:  # the trainer's Ctrl-C handler ends with its run
            signal.signal(signal.SIGINT, sigint)


def _write_results(out: Path, checkpoint: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """history.csv and metrics.json (and the final checkpoint's files) in `out`, from the
    final checkpoint; the final metrics."""
    if checkpoint is None and extra.get("resume_from"):
        # A finished run resumed in local mode trains and reports nothing: its last kept
        # checkpoint is the result.
        from ray.train import Checkpoint

        checkpoint = Checkpoint.from_directory(extra["resume_from"])
    final, rows = final_result(checkpoint, copy_to=out)
    # Where the final checkpoint is: what a branch's stage1_from names after a
    # stop_after_stage1 run, and what `lfm-ray report --tsne` reads.
    final["checkpoint_path"] = checkpoint.path
    write_history(out / "history.csv", rows)
    write_json_atomic(out / "metrics.json", final)
    return final


def config_json(cfg: RunConfig) -> str:
    """What `--dry-run` prints (and config.json holds beside the record's keys): the run's
    settings, and in its `resolved` section what they resolve to (the model family, LFM's
    similarity source); read back as a config file, that section is skipped."""
    return json.dumps(with_resolved(cfg.to_dict(), cfg), indent=2, sort_keys=True)


def check_output_parent(out: Path) -> None:
    """--output is a folder or can become one: refused now, before Ray starts."""
    if out.exists():
        if not out.is_dir():
            raise LfmError(f"--output {str(out)!r} is a file, not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise LfmError(f"--output {str(out)!r} is not writable")
        return
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise LfmError(f"--output {str(out)!r} cannot be created: {str(parent)!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LfmError(f"--output {str(out)!r} cannot be created: {str(parent)!r} is not "
                       "writable")


def final_result(checkpoint, copy_to: Path | None = None
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(final metrics with per-class accuracy, every epoch's metrics) from the last
    checkpoint; with `copy_to`, its confusion.npz is copied there (or a stale one removed)."""
    if checkpoint is None:
        raise LfmError("the run reported no checkpoint; nothing to write")
    with checkpoint.as_directory() as d:
        final = json.loads((Path(d) / RESULT_FILE).read_text())
        hist = Path(d) / HISTORY_FILE
        rows = json.loads(hist.read_text()) if hist.is_file() else [final]
        if copy_to is not None:
            source, target = Path(d) / CONFUSION_FILE, Path(copy_to) / CONFUSION_FILE
            if source.is_file():
                tmp = target.with_suffix(".tmp.npz")
                shutil.copyfile(source, tmp)
                os.replace(tmp, target)
            elif target.exists():
                target.unlink()  # from an earlier run in this folder
    return final, rows


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys and not isinstance(row[k], (list, dict))]
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")  # no lists
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=True))
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
