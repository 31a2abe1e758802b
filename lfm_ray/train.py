"""The per-worker training loop that Ray Train's TorchTrainer runs: both LFM stages.

Stage 1 trains the image encoder F_I with W_I frozen at the identity; stage 2 freezes F_I
(run without autograd) and trains only W_I. Each stage has its own Adam, cosine schedule,
α, τ and Beta parameter. Every epoch every worker reports the same metric keys (`METRIC_KEYS`)
with a checkpoint, so ASHA can stop a trial and a restarted run resumes from its last epoch.

Randomness is drawn from generators seeded by (seed, epoch, rank), so a run resumed at an
epoch boundary continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lfm_ray.augment import BatchBuilder, DeviceImages
from lfm_ray.config import RunConfig
from lfm_ray.errors import LfmError
from lfm_ray.patch_embed import patch_convs_as_matmul

METRIC_KEYS = ("epoch", "stage", "train_loss", "acc_many", "acc_medium", "acc_few", "acc_all")
GROUPS = ("many", "medium", "few")
STATE_FILE = "state.pt"      # model, optimiser and scheduler state at the end of an epoch
RESULT_FILE = "result.json"  # that epoch's metrics and per-class accuracy
HISTORY_FILE = "history.json"  # every epoch's metrics so far, one dict per epoch


# ---- workers ------------------------------------------------------------------------------
@dataclass
class WorkerInfo:
    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def worker_info(cfg: RunConfig, in_tune_trial: bool = False) -> WorkerInfo:
    """Rank, world size and device of this worker. A loop in a Tune trial's own process
    (local mode) is the only rank; Ray refuses `ray.train` calls inside a Tune trial."""
    import ray.train

    if in_tune_trial:
        device = torch.device("cuda", 0) if cfg.runtime.gpus_per_worker > 0 \
            and torch.cuda.is_available() else torch.device("cpu")
        return WorkerInfo(rank=0, world_size=1, device=device)
    ctx = ray.train.get_context()
    if cfg.runtime.gpus_per_worker > 0 and torch.cuda.is_available():
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    return WorkerInfo(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), device=device)


def _all_reduce_sum(t: torch.Tensor, info: WorkerInfo) -> torch.Tensor:
    if info.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from integers (seed, epoch, rank, ...), stable across runs."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p) + 1) % (2**61 - 1)
    return torch.Generator().manual_seed(seed)


# ---- what one worker holds -----------------------------------------------------------------
class Run:
    """Data on the device, the classifier, text features and shot groups for one worker."""

    def __init__(self, cfg: RunConfig, info: WorkerInfo):
        from lfm_ray.data import load_arrays, options_for, shot_groups
        from lfm_ray.model import LFMClassifier, build_clip, text_features

        self.cfg, self.info = cfg, info
        torch.manual_seed(cfg.runtime.seed)  # the same initial weights on every rank
        # The model comes first: its input size is the size lazily decoded data sets are
        # cached at, so preprocessing never drifts from the model.
        clip, self.spec = build_clip(cfg.model.name, cfg.model.pretrained, cfg.model.cache_dir,
                                     info.device)
        data = cfg.data
        options = options_for(data.name, seed=data.seed, imbalance_factor=data.imbalance_factor)
        arrays = load_arrays(data.name, root=data.root, image=self.spec,
                             cache_dir=data.cache_dir, **options)
        self.class_names = list(arrays.class_names)
        self.class_counts = [int(c) for c in arrays.class_counts]
        self.num_classes = len(self.class_names)
        # Text features once per run; the text tower is then dropped.
        self.text_features = text_features(clip, self.class_names, cfg.model.templates, info.device)
        self.model = LFMClassifier(clip.visual, self.text_features, cfg.logit_scale).to(info.device)
        del clip
        if info.device.type == "cuda":
            patch_convs_as_matmul(self.model.visual)  # the same sums; cuDNN is slow at this shape
        if compile_encoder(cfg, info.device):
            # In place, so state dict keys and checkpoints are those of the plain module.
            self.model.visual.compile()

        self.train_images = DeviceImages(arrays.train_images, info.device)
        self.train_labels = torch.as_tensor(np.asarray(arrays.train_labels), dtype=torch.long)
        eval_images, eval_labels = arrays.split(data.eval_split)
        self.eval_images = DeviceImages(eval_images, info.device)
        self.eval_labels = torch.as_tensor(np.asarray(eval_labels), dtype=torch.long)
        self.groups = shot_groups(self.class_counts)
        self.build = BatchBuilder(self.spec, info.device)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if info.device.type == "cuda" else contextlib.nullcontext()
        )

    def loss_fn(self) -> torch.nn.Module:
        """The configured loss over this run's class counts and text features."""
        from lfm_ray.losses import build_loss

        return build_loss(self.cfg.loss.name, self.class_counts, text_features=self.text_features,
                          **self.cfg.loss.params(self.cfg.logit_scale))

    def class_info(self) -> dict[str, Any]:
        """Saved beside per-class accuracy, so a report can plot it against training counts."""
        return {"class_names": self.class_names, "class_counts": self.class_counts}

    # ---- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Top-1 per class and per shot group on the evaluation split, summed over workers."""
        info, model = self.info, self.model
        model.eval()
        correct = torch.zeros(self.num_classes, dtype=torch.float64)
        total = torch.zeros(self.num_classes, dtype=torch.float64)
        positions = torch.arange(info.rank, len(self.eval_images), info.world_size)
        bs = self.cfg.runtime.eval_batch_size
        for start in range(0, len(positions), bs):
            pos = positions[start:start + bs]
            x = self.build(self.eval_images.gather(pos))
            with self.autocast:
                pred = model(x).argmax(dim=1).cpu()
            y = self.eval_labels[pos]
            total += torch.bincount(y, minlength=self.num_classes).double()
            correct += torch.bincount(y[pred == y], minlength=self.num_classes).double()
        if info.distributed:
            both = _all_reduce_sum(torch.stack([correct, total]).to(info.device), info).cpu()
            correct, total = both[0], both[1]
        return accuracy_summary(correct, total, self.groups)


def compile_encoder(cfg: RunConfig, device: torch.device) -> bool:
    """Whether the image tower runs through torch.compile: `runtime.compile`, or on a GPU
    when it is None (measured there: fewer, fused kernels; on the CPU the compile time is
    not won back by the tiny models tests run)."""
    if cfg.runtime.compile is not None:
        return bool(cfg.runtime.compile)
    return device.type == "cuda"


def accuracy_summary(correct: torch.Tensor, total: torch.Tensor,
                     groups: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per-class and per-group top-1: a group's accuracy pools its classes' test images."""
    out: dict[str, Any] = {}
    for name in GROUPS:
        idx = torch.as_tensor(np.asarray(groups[name], dtype=np.int64))
        n = float(total[idx].sum()) if len(idx) else 0.0
        out[f"acc_{name}"] = float(correct[idx].sum()) / n if n else float("nan")
    out["acc_all"] = float(correct.sum() / total.sum()) if float(total.sum()) else float("nan")
    per_class = torch.where(total > 0, correct / total.clamp(min=1), torch.full_like(total, float("nan")))
    out["per_class_acc"] = [float(v) for v in per_class]
    return out


# ---- one stage ----------------------------------------------------------------------------
@dataclass
class Stage:
    number: int          # 1 or 2
    first_epoch: int     # global epoch number of this stage's first epoch (1-based)
    epochs: int


def stage_plan(cfg: RunConfig) -> list[Stage]:
    e1, e2 = cfg.stage1.epochs, cfg.stage2.epochs
    return [Stage(1, 1, e1), Stage(2, e1 + 1, e2)]


def steps_per_epoch(num_train: int, cfg: RunConfig, world_size: int) -> tuple[int, int]:
    """(steps, per-worker batch). Every rank takes the same number of steps."""
    per_worker = max(1, cfg.runtime.batch_size // max(1, world_size))
    per_rank = num_train // max(1, world_size)
    steps = max(1, math.ceil(per_rank / per_worker))
    if cfg.runtime.max_steps_per_epoch is not None:
        steps = min(steps, cfg.runtime.max_steps_per_epoch)
    return steps, per_worker


def _optimizer(run: Run, stage: Stage, steps: int):
    scfg = run.cfg.stage1 if stage.number == 1 else run.cfg.stage2
    params = [p for p in run.model.parameters() if p.requires_grad]
    # One fused kernel for the whole update on a GPU (the same Adam, a few launches instead
    # of several per parameter tensor).
    fused = True if run.info.device.type == "cuda" else None
    opt = torch.optim.Adam(params, lr=scfg.lr, fused=fused)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=max(1, stage.epochs * steps), eta_min=scfg.min_lr
    )
    return opt, sched


def _mixer(run: Run, stage: Stage):
    from lfm_ray.mixing import build_mixer

    scfg = run.cfg.stage1 if stage.number == 1 else run.cfg.stage2
    # β None: the method's own law (the mixer's `beta` holds what it resolved to); the
    # ConCutMix settings come filled in from the data set's row where unset.
    return build_mixer(
        run.cfg.mix.method, class_counts=run.class_counts, train_labels=run.train_labels,
        text_features=run.text_features, alpha=scfg.alpha, tau=scfg.tau, beta=scfg.beta,
        device=run.info.device, **run.cfg.mixer_params(),
    )


def train_epoch(run: Run, stage: Stage, epoch: int, mixer, loss_fn, opt, sched,
                trainable: torch.nn.Module, steps: int, per_worker: int) -> float:
    """One pass; returns the mean training loss over all workers' steps."""
    cfg, info, model = run.cfg, run.info, run.model
    seed = cfg.runtime.seed
    # The same shuffle on every rank (each takes its own slice); draws differ per rank.
    order = torch.randperm(len(run.train_images), generator=seeded_generator(seed, epoch))
    mine = order[info.rank::info.world_size]
    gen = seeded_generator(seed, epoch, info.rank, 7)
    # Where the stage is (ConCutMix's warm-up reads it); the mixer asks for the model's
    # image-text cosines if its label needs them.
    mixer.set_epoch(epoch - stage.first_epoch, stage.epochs)
    similarity_fn = _similarity_fn(run) if mixer.needs_similarity else None
    loss_sum = torch.zeros((), device=info.device)
    if stage.number == 1:
        model.train()
    else:
        model.eval()  # the encoder is frozen in stage 2: no dropout, no statistics updates
    log_every = max(1, steps // 10) if steps >= 50 and info.rank == 0 else 0
    for step in range(steps):
        start = (step * per_worker) % len(mine)  # wraps only when more steps than one pass
        pos_i = mine[start:start + per_worker]
        y_i = run.train_labels[pos_i]
        pos_j = mixer.partners(pos_i, y_i, gen)
        # Labels stay on the host: the mixers read class counts there and send the soft
        # targets to the device without waiting on it.
        if pos_j is None:
            x_i = run.build(run.train_images.gather(pos_i), flip=True, generator=gen)
            x, targets = mixer.mix(x_i, y_i, None, None, gen)
        else:
            pos_j = pos_j.cpu()
            # The images and their partners in one gather and one build (half the per-call
            # cost); the flips are drawn as two builds would draw them, images first.
            flips = torch.cat([run.build.draw_flips(len(pos_i), gen),
                               run.build.draw_flips(len(pos_j), gen)])
            both = run.build(run.train_images.gather(torch.cat([pos_i, pos_j])), flips=flips)
            x_i, x_j = both[:len(pos_i)], both[len(pos_i):]
            y_j = run.train_labels[pos_j]
            x, targets = mixer.mix(x_i, y_i, x_j, y_j, gen, similarity_fn=similarity_fn)
        with run.autocast:
            if stage.number == 1:
                logits = trainable(x)
            else:
                with torch.no_grad():
                    feats = model.encode(x)
                logits = trainable(feats.float())
            loss = loss_fn(logits.float(), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.detach()
        if log_every and (step + 1) % log_every == 0:
            print(f"  epoch {epoch} (stage {stage.number}): step {step + 1}/{steps}", flush=True)
    total = _all_reduce_sum(loss_sum.reshape(1), info)
    mean = float(total) / (steps * info.world_size)
    if not math.isfinite(mean):
        raise LfmError(
            f"the training loss became {mean} in epoch {epoch} (stage {stage.number}); "
            f"the checkpoints of epochs before it are kept. Lower stage{stage.number}.lr "
            "or check the data"
        )
    return mean


def _similarity_fn(run: Run) -> Callable[[torch.Tensor], torch.Tensor]:
    """Cosine similarity of images to the class text features (ConCutMix's semantic label:
    the unit image feature W_I F_I(x) against the unit text features, its class centres)."""

    @torch.no_grad()
    def similarity(x: torch.Tensor) -> torch.Tensor:
        with run.autocast:
            feats = run.model.proj(run.model.encode(x)).float()
        return F.normalize(feats, dim=-1) @ run.text_features.float().t()

    return similarity


class _Head(torch.nn.Module):
    """Stage 2's trainable part as a module of its own, so DDP syncs only W_I."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.model.head(feats)


def _trainable(run: Run, stage: Stage) -> torch.nn.Module:
    run.model.set_stage(stage.number)
    module: torch.nn.Module = run.model if stage.number == 1 else _Head(run.model)
    if run.info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [run.info.device.index] if run.info.device.type == "cuda" else None
        module = DistributedDataParallel(module, device_ids=ids)
    return module


def prepare_stage(run: Run, stage: Stage, steps: int):
    """(trainable module, mixer, optimiser, scheduler) for one stage of `steps` steps per
    epoch; sets which parameters train."""
    trainable = _trainable(run, stage)
    opt, sched = _optimizer(run, stage, steps)
    return trainable, _mixer(run, stage), opt, sched


def progress_line(m: dict[str, Any], total: int) -> str:
    return (f"epoch {m['epoch']}/{total} (stage {m['stage']}): loss {m['train_loss']:.4f}  "
            f"acc many {m['acc_many']:.3f} medium {m['acc_medium']:.3f} few {m['acc_few']:.3f} "
            f"all {m['acc_all']:.3f}  [{m['train_time_s']:.1f}s]")


def _progress(config: dict[str, Any], metrics: dict[str, Any], total: int) -> None:
    """The epoch's line to the driver's progress bars (`lfm-ray train`), else to the log."""
    if config.get("progress") is not None:
        from lfm_ray.progress import report_progress

        report_progress(config["progress"], metrics)
    else:
        print(progress_line(metrics, total), flush=True)


def _node_id() -> str:
    """The Ray node this worker runs on (shows where a study's trials landed)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


# ---- checkpoints --------------------------------------------------------------------------
def save_state(path: Path, run: Run, stage: Stage, epoch: int, opt, sched,
               result: dict[str, Any], history: list[dict[str, Any]]) -> None:
    state = {
        "epoch": epoch,
        "stage": stage.number,
        "visual": run.model.visual.state_dict(),
        "proj": run.model.proj.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "config": run.cfg.to_dict(),
        "train_time_total_s": result.get("train_time_total_s", 0.0),
        "history": history,
    }
    torch.save(state, path / STATE_FILE)
    (path / RESULT_FILE).write_text(json.dumps(result))
    (path / HISTORY_FILE).write_text(json.dumps(history))


def load_state(checkpoint_dir: str | os.PathLike, device: torch.device) -> dict[str, Any]:
    path = Path(checkpoint_dir) / STATE_FILE
    if not path.is_file():
        raise LfmError(f"checkpoint {str(checkpoint_dir)!r} has no {STATE_FILE}")
    return torch.load(path, map_location=device, weights_only=False)


def _resume_state(config: dict[str, Any], device: torch.device) -> dict[str, Any] | None:
    """The checkpoint Ray hands back on a restart, else an explicit `resume_from` path."""
    import ray.train

    ckpt = None if config.get("report_to_tune") else ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            return load_state(d, device)
    if config.get("resume_from"):
        return load_state(config["resume_from"], device)
    return None


def _report(metrics: dict[str, Any], make_checkpoint: Callable[[Path], None] | None,
            info: WorkerInfo, keep_dir: str | None, to_tune: bool = False) -> None:
    """Report on every worker; rank 0 attaches the checkpoint.

    With `keep_dir` (in-process runs, which have no storage to copy to) the checkpoint is
    written there and kept; otherwise into a temporary directory Ray copies from. With
    `to_tune` (a study trial training in its own process, Ray Train's local mode, which runs
    no report callbacks) metrics and checkpoint go straight to the Tune trial.
    """
    import ray.train
    from ray.train import Checkpoint

    if to_tune:
        from ray import tune

        with tempfile.TemporaryDirectory(prefix="lfm-ckpt-") as tmp:
            if make_checkpoint is not None:
                make_checkpoint(Path(tmp))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp)
                        if make_checkpoint is not None else None)
        return
    if info.rank != 0 or make_checkpoint is None:
        ray.train.report(metrics)
        return
    if keep_dir is not None:
        path = Path(keep_dir) / f"epoch_{int(metrics['epoch']):04d}"
        path.mkdir(parents=True, exist_ok=True)
        make_checkpoint(path)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(path)))
        return
    with tempfile.TemporaryDirectory(prefix="lfm-ckpt-") as tmp:
        make_checkpoint(Path(tmp))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"epoch_{int(metrics['epoch']):04d}")


# ---- entry point --------------------------------------------------------------------------
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """TorchTrainer entry. `config["run"]` is a RunConfig dict; optional keys:
    `resume_from` (a checkpoint directory), `checkpoint_dir` (keep checkpoints there, for
    in-process runs), `report_to_tune` (a study trial in Ray Train's local mode: report to
    the Tune trial itself), `stop_after_epoch` (end after that global epoch, for tests of
    resume).
    """
    # Ray Train logs every report and checkpoint at INFO; our own progress line says enough.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    cfg = RunConfig.from_dict(config["run"]).validate()
    threads = cfg.runtime.threads or max(1, int(cfg.runtime.cpus_per_worker))
    torch.set_num_threads(threads)
    keep_dir = config.get("checkpoint_dir")
    to_tune = bool(config.get("report_to_tune"))
    info = worker_info(cfg, in_tune_trial=to_tune)
    run = Run(cfg, info)
    if cfg.runtime.zero_shot:
        result = run.evaluate()
        metrics = {"epoch": 0, "stage": 0, "train_loss": float("nan"),
                   **{k: result[k] for k in METRIC_KEYS[3:]},
                   "train_time_s": 0.0, "train_time_total_s": 0.0, "node_id": _node_id()}

        def write_zero_shot(path: Path) -> None:
            (path / RESULT_FILE).write_text(json.dumps({**metrics, **result, **run.class_info()}))
            (path / HISTORY_FILE).write_text(json.dumps([metrics]))

        _report(metrics, write_zero_shot, info, keep_dir, to_tune)
        return

    loss_fn = run.loss_fn()
    state = _resume_state(config, info.device)
    done, train_time_total = 0, 0.0
    history: list[dict[str, Any]] = []
    if state is not None:
        run.model.visual.load_state_dict(state["visual"])
        run.model.proj.load_state_dict(state["proj"])
        done = int(state["epoch"])
        train_time_total = float(state.get("train_time_total_s", 0.0))
        history = list(state.get("history", []))
    stop_after = config.get("stop_after_epoch")
    steps, per_worker = steps_per_epoch(len(run.train_images), cfg, info.world_size)
    last_epoch = cfg.stage1.epochs + cfg.stage2.epochs
    for stage in stage_plan(cfg):
        last = stage.first_epoch + stage.epochs - 1
        if stage.epochs == 0 or done >= last:
            continue
        trainable, mixer, opt, sched = prepare_stage(run, stage, steps)
        if state is not None and state["stage"] == stage.number and done >= stage.first_epoch:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        for epoch in range(max(done + 1, stage.first_epoch), last + 1):
            start = time.perf_counter()
            loss = train_epoch(run, stage, epoch, mixer, loss_fn, opt, sched, trainable,
                               steps, per_worker)
            train_time = time.perf_counter() - start
            train_time_total += train_time
            result = run.evaluate()
            metrics = {"epoch": epoch, "stage": stage.number, "train_loss": loss,
                       **{k: result[k] for k in METRIC_KEYS[3:]},
                       "lr": sched.get_last_lr()[0], "train_time_s": train_time,
                       "train_time_total_s": train_time_total, "node_id": _node_id()}

            history.append(metrics)
            if info.rank == 0:
                _progress(config, metrics, last_epoch)

            def write(path: Path, _epoch=epoch, _result=result, _stage=stage, _m=metrics) -> None:
                save_state(path, run, _stage, _epoch, opt, sched,
                           {**_m, **_result, **run.class_info()}, history)

            _report(metrics, write, info, keep_dir, to_tune)
            done = epoch
            if stop_after is not None and epoch >= int(stop_after):
                return
