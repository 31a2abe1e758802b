"""The per-worker training loop that Ray Train's TorchTrainer runs: both LFM stages.

Stage 1 trains the image encoder F_I with W_I frozen at the identity; stage 2 freezes F_I
(run without autograd) and trains only W_I. Each stage has its own Adam, cosine schedule,
α, τ and Beta parameter. Every epoch every worker reports the same metric keys (`METRIC_KEYS`,
and `VAL_METRIC_KEYS` where the run selects on val) with a checkpoint, so ASHA can stop a
trial and a restarted run resumes from its last epoch.

Two splits: the selection split (`data.selection_split`: val where the data set has one)
is evaluated every epoch as `val_acc_*`, for model selection; the reported split, test, as
`acc_*` at the end of each stage and of the run, and carried unchanged between (`test_epoch`
says from which epoch; before stage 1 ends they are NaN and it is None). A trial stopped
early therefore still carries test figures from its last completed stage. Where the
selection split is test (no val), test is evaluated every epoch and there are no `val_*`.

A run may train stage 1 only (`stop_after_stage1`) and others start stage 2 from its
checkpoint (`stage1_from`, checked by `lfm_ray.worker.checkpoint.load_stage1`): the paper's ablations.

Randomness is drawn from generators seeded by (seed, epoch, rank), so a run resumed at an
epoch boundary continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from lfm_ray import confusion
from lfm_ray.augment import BatchBuilder, DeviceImages
from lfm_ray.config import RunConfig, StageConfig, with_absolute_paths
from lfm_ray.contract import (
    GROUPS, HISTORY_FILE, HMEAN_FLOOR, RESULT_FILE, TEST_KEYS, VAL_METRIC_KEYS, check_batch_size,
    resolve_selection_split,
)
from lfm_ray.errors import LfmError
from lfm_ray.extrapolation import aux_record, auxiliary_training
from lfm_ray.head_init import initialise_classifier, resolved_init
from lfm_ray.patch_embed import patch_convs_as_matmul
from lfm_ray.stage1 import stage1_key
from lfm_ray.worker.checkpoint import load_stage1, load_state, save_state, write_confusion
from lfm_ray.worker.distributed import WorkerInfo, all_reduce_sum, seeded_generator, worker_info

# ---- what one worker holds -----------------------------------------------------------------
class Run:
    """Data on the device, the classifier, text features and shot groups for one worker."""

    def __init__(self, cfg: RunConfig, info: WorkerInfo, launch_dir: str | None = None):
        # launch_dir: the folder the run was started from, which relative file paths in the
        # configuration name (Ray runs workers in folders of their own); None: this one.
        from lfm_ray.backbones import build_backbone
        from lfm_ray.similarity import for_run

        self.cfg, self.info = cfg, info
        self._refuse_what_cannot_run(launch_dir)
        torch.manual_seed(cfg.runtime.seed)  # the same initial weights on every rank
        # The model comes first: its input size is the size lazily decoded data sets are
        # cached at, so preprocessing never drifts from the model. An open_clip model, or a
        # timm model (lfm_ray/backbones.py).
        files = with_absolute_paths(cfg, launch_dir)  # relative paths read where it started
        backbone, self.spec = build_backbone(files.model, info.device)
        arrays, options = self._load_classes(files)
        self._build_classifier(backbone)
        del backbone
        self._place_training_images(arrays)
        self._place_evaluation_sets(arrays, files.data, options)
        self._prepare_evaluation_and_batches()
        # LFM's class similarity S (mix.similarity), once, before stage 1 and any checkpoint
        # is loaded; None: P comes straight from the text features (lfm_ray/similarity.py).
        self.class_similarity = for_run(self, launch_dir)

    def _refuse_what_cannot_run(self, launch_dir: str | None) -> None:
        """What the model family cannot do (a timm model has no text tower), and LFM's
        similarity source, refused at once."""
        from lfm_ray.backbones import check_family
        from lfm_ray.similarity import check_similarity
        from lfm_ray.text import check_text

        check_family(self.cfg)
        check_text(self.cfg)
        check_similarity(self.cfg, launch_dir=launch_dir)

    def _load_classes(self, files: RunConfig) -> tuple[Any, dict[str, Any]]:
        """(the data set's arrays at the model's input size, the data options): the target
        classes and the auxiliary ones that train beside them."""
        from lfm_ray.data import load_arrays, run_options

        data = files.data
        options = run_options(data)
        arrays = load_arrays(data.name, root=data.root, image=self.spec,
                             cache_dir=data.cache_dir, **options)
        # The target classes: what the run is evaluated and reported on.
        self.class_names = list(arrays.class_names)
        self.class_counts = [int(c) for c in arrays.class_counts]
        self.num_classes = len(self.class_names)
        # Category extrapolation (lfm_ray.extrapolation): auxiliary classes, None without
        # aux.root, train beside the targets (head rows, loss, mixer) and are never predicted.
        self.aux = auxiliary_training(files, self.class_names, self.spec, data.cache_dir)
        self.train_counts = self.class_counts + (self.aux.counts if self.aux else [])
        return arrays, options

    def _build_classifier(self, backbone: torch.nn.Module) -> None:
        """The model over every trained class, with what stage 1 trains, on the device."""
        from lfm_ray.backbones import build_classifier_for
        from lfm_ray.finetune import prepare, trained_params

        cfg, info = self.cfg, self.info
        trained = self.class_names + (self.aux.class_names if self.aux else [])
        # The class text features of every trained class (model.text: CLIP's own tower or a
        # pretrained text encoder, once per run) are the classifier; a timm model without a
        # text encoder has a linear head over its pooled features.
        self.model, self.text_features = build_classifier_for(backbone, cfg, trained,
                                                              info.device, self.spec.size)
        # What stage 1 trains: adapters, prompts or class weights join the model here, before
        # checkpoints load and the tower is compiled.
        self.finetune_sizes = prepare(self.model, cfg.stage1, self.num_classes, cfg.model.name)
        self.model.to(info.device)
        counts = trained_params(self.model)
        self.trained_params = {key: 0 if cfg.runtime.zero_shot or stage.epochs == 0 else n
                               for (key, n), stage in zip(counts.items(), (cfg.stage1, cfg.stage2))}
        if info.device.type == "cuda":
            patch_convs_as_matmul(self.model.visual)  # the same sums; cuDNN is slow at this shape
        if compile_encoder(cfg, info.device):
            # In place, so state dict keys and checkpoints are those of the plain module.
            self.model.visual.compile()

    def _place_training_images(self, arrays: Any) -> None:
        device = self.info.device
        self.train_images = DeviceImages(arrays.train_images, device)
        self.train_labels = torch.as_tensor(np.asarray(arrays.train_labels), dtype=torch.long)
        if self.aux is not None:  # each epoch's auxiliary subsets after the target images
            self.train_images, self.train_labels = self.aux.join(
                self.train_images, self.train_labels, int(arrays.train_images.shape[1]),
                self.spec, device)

    def _place_evaluation_sets(self, arrays: Any, data: Any, options: dict[str, Any]) -> None:
        """The split selection reads and the test split, at the size evaluation sees them."""
        from lfm_ray.data import load_arrays

        cfg, info = self.cfg, self.info
        self.selection_split = resolve_selection_split(
            data.selection_split, arrays.val_images is not None, data.name)
        # Test is always there (the reported split); val only where selection reads it.
        splits = list(dict.fromkeys([self.selection_split, "test"]))
        self.tta = cfg.eval.tta
        self.fivecrop_resize: int | None = None
        eval_arrays = arrays
        if self.tta == "fivecrop":
            # The evaluation splits once more, at the larger size the crops are cut from.
            self.fivecrop_resize = fivecrop_size(self.spec.size, cfg.eval.fivecrop_resize)
            eval_arrays = load_arrays(data.name, root=data.root, cache_dir=data.cache_dir,
                                      image=dataclasses.replace(self.spec,
                                                                size=self.fivecrop_resize),
                                      splits=tuple(splits), **options)
            if info.rank == 0:
                print(fivecrop_memory_note(arrays, eval_arrays, splits, self.spec.size,
                                           self.fivecrop_resize), flush=True)
        self.eval_sets: dict[str, tuple[DeviceImages, torch.Tensor]] = {}
        for split in splits:
            images, labels = eval_arrays.split(split)
            self.eval_sets[split] = (DeviceImages(images, info.device),
                                     torch.as_tensor(np.asarray(labels), dtype=torch.long))

    def _prepare_evaluation_and_batches(self) -> None:
        from lfm_ray.data import shot_groups

        cfg, info = self.cfg, self.info
        self.groups = shot_groups(self.class_counts)
        # Post-hoc logit adjustment (eval.logit_adjust_tau): τ·log(n_k / Σn) over the trained
        # classes comes off every evaluation logit; None leaves them as the model gives them.
        self.logit_adjustment = logit_adjustment(cfg.eval.logit_adjust_tau, self.train_counts,
                                                 info.device)
        self.keep_confusion = confusion.wanted(cfg.runtime.save_confusion, self.num_classes)
        self._sampling_matrix: torch.Tensor | None = None
        self._samplers: dict[int, Any] = {}  # each stage's epoch sampler, built on first use
        self.build = BatchBuilder(self.spec, info.device)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if info.device.type == "cuda" else contextlib.nullcontext()
        )

    def loss_fn(self) -> torch.nn.Module:
        """The configured loss over this run's class counts and text features."""
        from lfm_ray.losses import build_loss

        if self.aux is not None:
            return self.aux.loss_fn(self.train_counts, self.text_features, self.cfg.logit_scale)
        return build_loss(self.cfg.loss.name, self.train_counts, text_features=self.text_features,
                          **self.cfg.loss.params(self.cfg.logit_scale))

    def epoch_sampler(self, stage: int):
        """The stage's sampler (`stageN.sampler`, lfm_ray.sampling), built once."""
        from lfm_ray.sampling import EpochSampler

        if stage not in self._samplers:
            name = (self.cfg.stage1 if stage == 1 else self.cfg.stage2).sampler
            self._samplers[stage] = EpochSampler(name, self.train_labels, len(self.train_counts))
        return self._samplers[stage]

    def finetune_record(self) -> dict[str, Any]:
        """Stage 1's mode and, for a lightweight one, the size it used (LIFT's default
        resolved where the config left it None)."""
        from lfm_ray.config import FINETUNE_SIZES

        mode = self.cfg.stage1.finetune
        return {"mode": mode, **{k: v for k, v in self.finetune_sizes.items()
                                 if FINETUNE_SIZES[k] == mode}}

    def class_info(self) -> dict[str, Any]:
        """Saved beside per-class accuracy, so a report can plot it against training counts."""
        return {"class_names": self.class_names, "class_counts": self.class_counts}

    # ---- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C) evaluation logits of a uint8 batch: the mean over the test-time views
        (`eval.tta`; one view, the model's input, for none), less τ·log prior where the run
        adjusts them post hoc (`eval.logit_adjust_tau`)."""
        total = None
        views = 0
        for x in self.build.views(images, self.tta, self.fivecrop_resize):
            with self.autocast:
                z = self.model(x).float()
            total = z if total is None else total + z
            views += 1
        mean = total / views
        return mean if self.logit_adjustment is None else mean - self.logit_adjustment

    @torch.no_grad()
    def evaluate(self, split: str, with_confusion: bool = False) -> dict[str, Any]:
        """Top-1 per class and per shot group on `split` ('val' or 'test'), and LIFT's
        macro-F1, harmonic-mean and worst-class accuracy, summed over workers; with
        `with_confusion` also the C×C counts (row: true, column: predicted)."""
        info, model = self.info, self.model
        images, labels = self.eval_sets[split]
        model.eval()
        C = self.num_classes
        correct = torch.zeros(C, dtype=torch.float64)
        total = torch.zeros(C, dtype=torch.float64)
        predicted = torch.zeros(C, dtype=torch.float64)
        counts = torch.zeros((C, C), dtype=torch.float64) if with_confusion else None
        positions = torch.arange(info.rank, len(images), info.world_size)
        bs = self.cfg.runtime.eval_batch_size
        for start in range(0, len(positions), bs):
            pos = positions[start:start + bs]
            # The target classes' rows only: auxiliary classes are never predicted.
            pred = self.logits(images.gather(pos))[:, :C].argmax(dim=1).cpu()
            y = labels[pos]
            total += torch.bincount(y, minlength=C).double()
            correct += torch.bincount(y[pred == y], minlength=C).double()
            predicted += torch.bincount(pred, minlength=C).double()
            if counts is not None:
                confusion.add_counts(counts, y, pred)
        if info.distributed:
            summed = all_reduce_sum(torch.stack([correct, total, predicted]).to(info.device),
                                     info).cpu()
            correct, total, predicted = summed[0], summed[1], summed[2]
            if counts is not None:
                counts = all_reduce_sum(counts.to(info.device), info).cpu()
        out = accuracy_summary(correct, total, self.groups, predicted)
        if counts is not None:
            out["confusion"] = counts.round().long()
        return out

    def sampling_matrix(self) -> torch.Tensor:
        """LFM's P at the run's stage-1 τ (saved beside the confusion matrix, Fig. 7), on
        the CPU; computed once."""
        if self._sampling_matrix is None:
            from lfm_ray.mixing import class_sampling_matrix, local_sampling_matrix

            # P at stage 1's τ, over the classes training samples partners from; with
            # auxiliary classes, its target block.
            C = self.num_classes
            if self.class_similarity is not None:
                P = class_sampling_matrix(self.class_similarity, self.cfg.stage1.tau).float()
            else:
                P = local_sampling_matrix(self.text_features.detach().cpu().float(),
                                          self.cfg.stage1.tau)
            self._sampling_matrix = P[:C, :C]
        return self._sampling_matrix


def logit_adjustment(tau: float, class_counts: list[int],
                     device: torch.device) -> torch.Tensor | None:
    """τ·log(n_k / Σn) (C,) on `device`, what post-hoc logit adjustment (Menon et al. 2021)
    subtracts from the evaluation logits; None for τ = 0."""
    if not tau:
        return None
    from lfm_ray.losses import log_prior

    return (float(tau) * log_prior(class_counts)).to(device)


def compile_encoder(cfg: RunConfig, device: torch.device) -> bool:
    """Whether the image tower runs through torch.compile: `runtime.compile`, or on a GPU
    when it is None (measured there: fewer, fused kernels; on the CPU the compile time is
    not won back by the tiny models tests run)."""
    if cfg.runtime.compile is not None:
        return bool(cfg.runtime.compile)
    return device.type == "cuda"


def accuracy_summary(correct: torch.Tensor, total: torch.Tensor, groups: dict[str, np.ndarray],
                     predicted: torch.Tensor | None = None) -> dict[str, Any]:
    """Per-class and per-group top-1 (a group's accuracy pools its classes' test images),
    and LIFT's figures over the classes that have test images: the harmonic mean of their
    accuracies (each at least HMEAN_FLOOR), the worst one, and, given the per-class counts of
    predictions, macro-F1 (F1_k = 2·TP / (2·TP + FP + FN), 0 for a class never right)."""
    out: dict[str, Any] = {}
    for name in GROUPS:
        idx = torch.as_tensor(np.asarray(groups[name], dtype=np.int64))
        n = float(total[idx].sum()) if len(idx) else 0.0
        out[f"acc_{name}"] = float(correct[idx].sum()) / n if n else float("nan")
    out["acc_all"] = float(correct.sum() / total.sum()) if float(total.sum()) else float("nan")
    per_class = torch.where(total > 0, correct / total.clamp(min=1), torch.full_like(total, float("nan")))
    out["per_class_acc"] = [float(v) for v in per_class]
    seen = total > 0
    nan = float("nan")
    accs = per_class[seen]
    out["acc_hmean"] = float(1.0 / (1.0 / accs.clamp(min=HMEAN_FLOOR)).mean()) if len(accs) else nan
    out["acc_worst"] = float(accs.min()) if len(accs) else nan
    out["macro_f1"] = nan
    if predicted is not None and len(accs):
        tp = correct[seen]
        fp = predicted[seen] - tp
        fn = total[seen] - tp
        out["macro_f1"] = float((2 * tp / (2 * tp + fp + fn)).mean())
    return out


def fivecrop_size(input_size: int, requested: int | None) -> int:
    """The side five-crop evaluation resizes images to: `eval.fivecrop_resize`, or LIFT's
    224 + 24 = 248 px scaled to the model's input size S; larger than S."""
    size = int(requested) if requested is not None else round(input_size * 248 / 224)
    if size <= input_size:
        raise LfmError(f"eval.fivecrop_resize={size} is not larger than the model's input size "
                       f"{input_size}; five crops of {input_size} px need a larger image (null "
                       f"gives {round(input_size * 248 / 224)})")
    return size


def fivecrop_memory_note(arrays, eval_arrays, splits: list[str], size: int, resize: int) -> str:
    """What keeping the evaluation splits at the five-crop size costs, for the run's log."""
    plain = sum(arrays.split(s)[0].nbytes for s in splits)
    large = sum(eval_arrays.split(s)[0].nbytes for s in splits)
    return (f"eval.tta=fivecrop: {' and '.join(splits)} images cached at {resize} px for the "
            f"crops besides the {size} px copy: {large / 2**20:.1f} MiB more node memory "
            f"({large / max(plain, 1):.2f}x the {size} px copy)")


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
    scfg = scfg_of(run, stage)
    params = [p for p in run.model.parameters() if p.requires_grad]
    # One fused kernel for the whole update on a GPU (the same Adam, a few launches instead
    # of several per parameter tensor).
    fused = True if run.info.device.type == "cuda" else None
    opt = torch.optim.Adam(params, lr=scfg.lr, fused=fused)
    return opt, cosine_segment(opt, scfg, stage.epochs * steps)


def scfg_of(run: Run, stage: Stage) -> StageConfig:
    """The settings of a stage (its epochs, learning rates, α, τ, β)."""
    return run.cfg.stage1 if stage.number == 1 else run.cfg.stage2


def cosine_segment(opt, scfg, total_steps: int):
    """A cosine from the stage's lr down to its min_lr over `total_steps` optimiser steps."""
    for group in opt.param_groups:
        group["lr"] = scfg.lr
        group.pop("initial_lr", None)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps),
                                                      eta_min=scfg.min_lr)


def segment_starts(stage: Stage, config: dict[str, Any]) -> list[int]:
    """The global epochs at which the stage's cosine segments start: its first epoch, and
    one more per `lfm-ray train --extend` of it (`schedule_segments`, epochs per segment,
    from config.json's extensions; lfm_ray.driver.rerun.schedule_segments)."""
    segments = (config.get("schedule_segments") or {})
    lengths = segments.get(str(stage.number)) or segments.get(stage.number) or [stage.epochs]
    starts, epoch = [], stage.first_epoch
    for n in lengths:
        starts.append(epoch)
        epoch += int(n)
    return starts


def _mixer(run: Run, stage: Stage):
    from lfm_ray.mixing import build_mixer

    scfg = scfg_of(run, stage)
    # β None: the method's own law (the mixer's `beta` holds what it resolved to); the
    # ConCutMix settings come filled in from the data set's row where unset.
    return build_mixer(
        run.cfg.mix.method, class_counts=run.train_counts, train_labels=run.train_labels,
        text_features=run.text_features, alpha=scfg.alpha, tau=scfg.tau, beta=scfg.beta,
        device=run.info.device, class_similarity=run.class_similarity,
        **run.cfg.mixer_params(),
    )


def train_epoch(run: Run, stage: Stage, epoch: int, mixer, loss_fn, opt, sched,
                trainable: torch.nn.Module, steps: int, per_worker: int) -> float:
    """One pass; returns the mean training loss over all workers' steps."""
    cfg, info, model = run.cfg, run.info, run.model
    seed = cfg.runtime.seed
    # The same epoch on every rank (each takes its own slice; instance-balanced: a shuffle);
    # draws differ per rank.
    order = run.epoch_sampler(stage.number).order(seeded_generator(seed, epoch))
    mine = order[info.rank::info.world_size]
    gen = seeded_generator(seed, epoch, info.rank, 7)
    if run.aux is not None:
        run.aux.start_epoch(epoch)  # this epoch's auxiliary subsets, seeded by (seed, epoch)
    # Neighbour silencing reads each sample's unmixed label.
    with_labels = bool(getattr(loss_fn, "needs_labels", False))
    # Where the stage is (ConCutMix's warm-up reads it); the mixer asks for the model's
    # image-text cosines if its label needs them.
    mixer.set_epoch(epoch - stage.first_epoch, stage.epochs)
    similarity_fn = _similarity_fn(run) if mixer.needs_similarity else None
    loss_sum = torch.zeros((), device=info.device)
    # Training mode only while the whole tower trains; a frozen tower (stage 2, or stage 1 of
    # a lightweight mode) runs as in evaluation: no dropout, no statistics updates.
    model.train(stage.number == 1 and model.finetune == "full")
    log_every = max(1, steps // 10) if steps >= 50 and info.rank == 0 else 0
    min_batch = 2 if batchnorm_trains(model) else 1
    for step in range(steps):
        batch = step_positions(mine, step, per_worker, min_batch)
        # runtime.accumulate micro-batches, each with its own mixing draw; weighting each
        # micro-batch's mean loss by its share of the batch gives the batch's mean loss.
        parts = micro_batches(batch, cfg.runtime.accumulate, min_batch)
        opt.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=info.device)
        for k, pos_i in enumerate(parts):
            last = k == len(parts) - 1
            with _sync_gradients(trainable, last):  # DDP all-reduces after the last one
                loss = _micro_batch_loss(run, stage, pos_i, mixer, loss_fn, trainable, gen,
                                         similarity_fn, with_labels)
                if len(parts) > 1:
                    loss = loss * (len(pos_i) / len(batch))
                loss.backward()
            step_loss += loss.detach()
        opt.step()
        sched.step()
        loss_sum += step_loss
        if log_every and (step + 1) % log_every == 0:
            print(f"  epoch {epoch} (stage {stage.number}): step {step + 1}/{steps}", flush=True)
    total = all_reduce_sum(loss_sum.reshape(1), info)
    mean = float(total) / (steps * info.world_size)
    if not math.isfinite(mean):
        raise LfmError(
            f"the training loss became {mean} in epoch {epoch} (stage {stage.number}); "
            f"the checkpoints of epochs before it are kept. Lower stage{stage.number}.lr "
            "or check the data"
        )
    return mean


def batchnorm_trains(model: torch.nn.Module) -> bool:
    """Whether a batch-norm layer is in training mode (timm's CNNs: it normalises by the
    batch's own statistics, which one image does not have)."""
    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
             torch.nn.SyncBatchNorm)
    return any(isinstance(m, norms) and m.training for m in model.modules())


def step_positions(mine: torch.Tensor, step: int, per_worker: int,
                   min_batch: int = 1) -> torch.Tensor:
    """This rank's positions for one step: the next `per_worker` of its order (wrapping only
    when there are more steps than one pass). A last batch shorter than `min_batch` is topped
    up from the start of the order, so a training batch-norm layer never sees one image (a
    training set of 64k + 1 images at batch 64 would otherwise end every epoch on a batch of
    one; PyTorch refuses it)."""
    start = (step * per_worker) % len(mine)
    batch = mine[start:start + per_worker]
    short = min(min_batch, len(mine)) - len(batch)
    if short > 0:
        batch = torch.cat([batch, mine[:short]])
    return batch


def micro_batches(batch: torch.Tensor, accumulate: int, min_batch: int = 1
                  ) -> tuple[torch.Tensor, ...]:
    """A step's positions in `accumulate` micro-batches (torch's chunk), or, where a training
    batch-norm layer needs `min_batch` images in each, in as many near-equal ones as keep to
    that (a last short batch: 3 images and accumulate 2 give one micro-batch of 3)."""
    if min_batch <= 1:
        return batch.chunk(accumulate)
    return batch.tensor_split(max(1, min(accumulate, len(batch) // min_batch)))


def _sync_gradients(trainable: torch.nn.Module, sync: bool):
    """DDP's gradient all-reduce on (sync) or deferred to a later micro-batch (no_sync)."""
    if sync or not hasattr(trainable, "no_sync"):
        return contextlib.nullcontext()
    return trainable.no_sync()


def _micro_batch_loss(run: Run, stage: Stage, pos_i: torch.Tensor, mixer, loss_fn,
                      trainable: torch.nn.Module, gen: torch.Generator,
                      similarity_fn: Callable | None, with_labels: bool = False) -> torch.Tensor:
    """The mean loss of one (micro-)batch of training positions, mixed and flipped with
    draws from `gen`; `with_labels` passes each sample's unmixed label to the loss (neighbour
    silencing reads it)."""
    model = run.model
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
        if with_labels:
            return loss_fn(logits.float(), targets, y_i)
        return loss_fn(logits.float(), targets)


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
    """One line per epoch: the selection split's figures, then the test figures and the
    epoch they are from (test every epoch where selection is on test)."""
    def figures(prefix: str) -> str:
        return (f"many {m[prefix + 'acc_many']:.3f} medium {m[prefix + 'acc_medium']:.3f} "
                f"few {m[prefix + 'acc_few']:.3f} all {m[prefix + 'acc_all']:.3f}")

    line = f"epoch {m['epoch']}/{total} (stage {m['stage']}): loss {m['train_loss']:.4f}  "
    if m.get("selection_split") == "val":
        line += f"val {figures('val_')}  "
        if m.get("test_epoch") is None:
            line += "test: at the end of stage 1  "
        elif m["test_epoch"] == m["epoch"]:
            line += f"test {figures('')}  "
        else:
            line += f"test (epoch {m['test_epoch']}) all {m['acc_all']:.3f}  "
    else:
        line += f"test {figures('')}  "
    return line + f"[{m['train_time_s']:.1f}s]"


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
def no_test(num_classes: int) -> dict[str, Any]:
    """The test figures before the first test evaluation: NaN, from no epoch."""
    nan = float("nan")
    return {**{k: nan for k in TEST_KEYS}, "per_class_acc": [nan] * num_classes,
            "test_epoch": None, "confusion": None}


def evaluate_epoch(run: Run, epoch: int, test_now: bool,
                   last_test: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(this epoch's selection-split figures, the test figures carried from now on).

    The selection split every epoch; test when `test_now` (a stage's or the run's end) or
    when test is the selection split (then once, not twice)."""
    if test_now or run.selection_split == "test":
        last_test = {**run.evaluate("test", with_confusion=run.keep_confusion),
                     "test_epoch": epoch}
    selection: dict[str, Any] = {}
    if run.selection_split == "val":
        val = run.evaluate("val")
        selection = {f"val_{k}": val[k] for k in TEST_KEYS}
        selection["val_per_class_acc"] = val["per_class_acc"]
    return selection, last_test


def epoch_metrics(run: Run, epoch: int, stage: int, loss: float, selection: dict[str, Any],
                  last_test: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What one epoch reports: the same keys every epoch (`metric_keys`), then extras.

    The selection split's overall accuracy comes first, then test's all and few: Tune's
    table shows the first few figures a trial reports."""
    val = {k: v for k, v in selection.items() if k in VAL_METRIC_KEYS}
    first = {"val_acc_all": val.pop("val_acc_all")} if "val_acc_all" in val else {}
    # .get: test figures carried from a checkpoint written before a key existed are NaN.
    test = {k: last_test.get(k, float("nan")) for k in TEST_KEYS}
    return {**first, "acc_all": test["acc_all"], "acc_few": test["acc_few"],
            "epoch": epoch, "stage": stage, "train_loss": loss, **test,
            "test_epoch": last_test["test_epoch"], "selection_split": run.selection_split,
            **run.trained_params, **val, **extra}


def result_record(run: Run, metrics: dict[str, Any], selection: dict[str, Any],
                  last_test: dict[str, Any], stage1_from: str | None) -> dict[str, Any]:
    """result.json of a checkpoint (and `lfm-ray train`'s metrics.json): the epoch's
    metrics, per-class accuracy on test (and on val), the classes, stage 1's fine-tuning
    mode with the size it used, and where stage 1 is from."""
    out = {**metrics, "per_class_acc": last_test["per_class_acc"]}
    if "val_per_class_acc" in selection:
        out["val_per_class_acc"] = selection["val_per_class_acc"]
    out.update(run.class_info())
    out["finetune"] = run.finetune_record()
    out["logit_adjust_tau"] = float(run.cfg.eval.logit_adjust_tau)  # post hoc, on every figure
    out["classifier_init"] = resolved_init(run.cfg)
    out.update(aux_record(run.aux))
    out["stage1_key"] = stage1_key(run.cfg)
    if stage1_from is not None:
        out["stage1_from"] = stage1_from
    return out


def _start_state(config: dict[str, Any], cfg: RunConfig,
                 device: torch.device) -> tuple[dict[str, Any] | None, str | None]:
    """(state to start from, the stage-1 checkpoint a branch starts from): the checkpoint
    Ray hands back on a restart, else an explicit `resume_from`, else `stage1_from`."""
    import ray.train

    ckpt = None if config.get("report_to_tune") else ray.train.get_checkpoint()
    branch = str(config["stage1_from"]) if config.get("stage1_from") else None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            return load_state(d, device), branch
    if config.get("resume_from"):
        return load_state(config["resume_from"], device), branch
    if branch is not None:
        return load_stage1(cfg, branch, map_location=device), branch
    return None, None


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
def _report_zero_shot(run: Run, info: WorkerInfo, keep_dir: str | None, to_tune: bool) -> None:
    """A zero-shot run: one evaluation of the text classifier, reported as epoch 0."""
    selection, last_test = evaluate_epoch(run, 0, True, no_test(run.num_classes))
    metrics = epoch_metrics(run, 0, 0, float("nan"), selection, last_test,
                            train_time_s=0.0, train_time_total_s=0.0, node_id=_node_id())

    def write_zero_shot(path: Path) -> None:
        record = result_record(run, metrics, selection, last_test, None)
        (path / RESULT_FILE).write_text(json.dumps(record))
        (path / HISTORY_FILE).write_text(json.dumps([metrics]))
        write_confusion(path, run, last_test)

    _report(metrics, write_zero_shot, info, keep_dir, to_tune)


def _progress_so_far(run: Run, state: dict[str, Any] | None
                     ) -> tuple[int, float, list[dict[str, Any]], Any]:
    """(epochs done, training seconds so far, history, the last test) of a run starting
    afresh, or of the checkpoint `state` it resumes (whose weights it loads)."""
    done, train_time_total = 0, 0.0
    history: list[dict[str, Any]] = []
    last_test = no_test(run.num_classes)
    if state is not None:
        run.model.load_weights(state)
        done = int(state["epoch"])
        train_time_total = float(state.get("train_time_total_s", 0.0))
        history = list(state.get("history", []))
        last_test = state.get("last_test") or last_test
    return done, train_time_total, history, last_test


def _start_stage(run: Run, stage: Stage, config: dict[str, Any], state: dict[str, Any] | None,
                 done: int, steps: int) -> tuple[Any, Any, Any, Any, list[int]]:
    """(trainable parameters, mixer, optimiser, schedule, the epochs its cosine segments
    start at) of a stage about to train: its classifier start or fresh head where it begins,
    the optimiser's and schedule's state where it resumes."""
    if done < stage.first_epoch and stage.number == 1:
        initialise_classifier(run)  # model.classifier_init: where class weights start
    if done < stage.first_epoch and hasattr(run.model, "begin_stage"):
        run.model.begin_stage(stage.number)  # a timm model's stage 2: a fresh head
    trainable, mixer, opt, sched = prepare_stage(run, stage, steps)
    starts = segment_starts(stage, config)
    if len(starts) > 1:  # an extended stage: its first cosine ends where it first ended
        sched = cosine_segment(opt, scfg_of(run, stage), (starts[1] - starts[0]) * steps)
    if state is not None and state["stage"] == stage.number and done >= stage.first_epoch:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    return trainable, mixer, opt, sched, starts


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """TorchTrainer entry. `config["run"]` is a RunConfig dict; optional keys:
    `resume_from` (a checkpoint directory), `stage1_from` (the checkpoint of a completed
    stage 1 with this run's stage1_key: train stage 2 only, from it), `stop_after_stage1`
    (train stage 1 only and end; its last checkpoint is what branches start from),
    `checkpoint_dir` (keep checkpoints there, for in-process runs), `report_to_tune` (a
    study trial in Ray Train's local mode: report to the Tune trial itself),
    `stop_after_epoch` (end after that global epoch, for tests of resume), `launch_dir`
    (the folder relative file paths of the configuration are read from).
    """
    # Ray Train logs every report and checkpoint at INFO; our own progress line says enough.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    cfg = RunConfig.from_dict(config["run"]).validate()
    threads = cfg.runtime.threads or max(1, int(cfg.runtime.cpus_per_worker))
    torch.set_num_threads(threads)
    keep_dir = config.get("checkpoint_dir")
    to_tune = bool(config.get("report_to_tune"))
    info = worker_info(cfg, in_tune_trial=to_tune)
    run = Run(cfg, info, launch_dir=config.get("launch_dir"))
    check_batch_size(cfg, len(run.train_images))  # where the driver did not (a cluster)
    if cfg.runtime.zero_shot:
        _report_zero_shot(run, info, keep_dir, to_tune)
        return

    loss_fn = run.loss_fn()
    state, stage1_from = _start_state(config, cfg, info.device)
    done, train_time_total, history, last_test = _progress_so_far(run, state)
    stop_after = config.get("stop_after_epoch")
    plan = stage_plan(cfg)[:1] if config.get("stop_after_stage1") else stage_plan(cfg)
    steps, per_worker = steps_per_epoch(len(run.train_images), cfg, info.world_size)
    last_epoch = cfg.stage1.epochs + cfg.stage2.epochs
    for stage in plan:
        last = stage.first_epoch + stage.epochs - 1
        if stage.epochs == 0 or done >= last:
            continue
        trainable, mixer, opt, sched, starts = _start_stage(run, stage, config, state, done,
                                                            steps)
        for epoch in range(max(done + 1, stage.first_epoch), last + 1):
            if epoch in starts[1:]:
                # An extension's epochs: a cosine segment of their own (lfm_ray.driver.rerun).
                length = [*starts, last + 1][starts.index(epoch) + 1] - epoch
                sched = cosine_segment(opt, scfg_of(run, stage), length * steps)
            start = time.perf_counter()
            loss = train_epoch(run, stage, epoch, mixer, loss_fn, opt, sched, trainable,
                               steps, per_worker)
            train_time = time.perf_counter() - start
            train_time_total += train_time
            # Test at the end of every stage (the run ends with one).
            selection, last_test = evaluate_epoch(run, epoch, epoch == last, last_test)
            metrics = epoch_metrics(run, epoch, stage.number, loss, selection, last_test,
                                    lr=sched.get_last_lr()[0], train_time_s=train_time,
                                    train_time_total_s=train_time_total, node_id=_node_id())
            history.append(metrics)
            if info.rank == 0:
                _progress(config, metrics, last_epoch)

            def write(path: Path, _epoch=epoch, _stage=stage, _m=metrics, _sel=selection,
                      _test=last_test) -> None:
                save_state(path, run, _stage, _epoch, opt, sched,
                           result_record(run, _m, _sel, _test, stage1_from), history, _test)

            _report(metrics, write, info, keep_dir, to_tune)
            done = epoch
            if stop_after is not None and epoch >= int(stop_after):
                return
