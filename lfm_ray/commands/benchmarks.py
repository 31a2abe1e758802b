"""`lfm-ray bench`: each figure side by side with a baseline measured in the same run.

Figures (JSON keys) and the claim each supports:
- sampler_speedup: pairs/s of the O(1) alias sampler over a per-sample Python loop
  (`random.choices` over a row of P), C = 1000 classes, batch 256, CPU.
- sampler_speedup_inat: the same at iNaturalist 2018's C = 8,142 classes, batch 256, with the
  tables' build time (sampler_inat_build_s) and memory (sampler_inat_table_mib: float64 keep
  probabilities and int16 aliases, C² · 10 bytes, per trial and stage; P itself beside it).
- cache_build_speedup: images/s of the node cache's build (the model's own preprocessing,
  resize short side + centre crop: simplejpeg's decode, PyTorch's uint8 resize, JPEG draft
  decoding where the source is large enough) over a per-image PIL baseline (open, convert,
  resize, crop), one thread each, alternating over chunks of the same fabricated
  ImageNet-style 500 × 375 JPEGs in the OLTR layout; cache_build_threads_speedup the build on
  every core over the baseline.
- cache_memory_growth: anonymous resident memory (RssAnon, the memory-mapped cache's file
  pages excluded) of a process running the trainer's step (gather from the memory-mapped node
  cache, batch build, LFM partners and mixing, forward and backward) for 50 steps on a
  50,000-image cache at 224 px over the same on a 5,000-image one, each the median of three
  processes (one process varies by tens of MiB with its allocator).
- stage2_cost_ratio: time per training image of stage 2 over stage 1, tiny model, CPU.
- trial_overhead_s: median wall time of a study trial minus the training time it reported
  (the sweep's trials run one at a time in one study; trial_overhead_worker_group_s the same
  with each trial on a Ray Train worker group, in full runs).
- sweep_speedup: six smoke trials run one at a time through the engine (a study each, one
  after another) over the same six as one study at the machine's concurrency; beside it,
  sweep_concurrency_speedup: the one study run one trial at a time over it at concurrency.
- laptop_overhead_ratio: the τ study through Ray over the same trials run one after another
  in one process without Ray (as the authors' sweep ran).
- data_share_ratio: resident memory of four concurrent trials' image data over one trial's.
- study_overhead_growth: wall time per trial over the last 100 trials of a 1,000-trial random
  search of smoke trials (one step per stage) over the same for its first 100 (`--quick`: the
  last 50 of 200 over the first 50): the study's bookkeeping must not grow with it.
- shared_stage1_ratio: wall time of the default τ study with a shared stage 1 (the paper's
  protocol: stage 1 once per seed, each τ branched in stage 2) over the same study retraining
  both stages for every τ, both run here (for information: the saving of the protocol).
- gpu_* (CUDA only): stage-1 images/s of the trainer's own epoch (ViT-B/32 at 224 px from
  32 px uint8 CIFAR-style data resized on the device, bf16, batch 256); the same from the node
  cache pre-resized; four trial processes packed on the GPU (and their ratio to one); the
  speed-up over the reference pipeline (DataLoader workers resizing PIL images, fp32);
  gpu_packed_speedup_b32, four packed trials at the paper's batch of 32 over one such trial;
  gpu_vit_b16_images_per_s, the ImageNet-LT preset's ViT-B/16 stage 1 at 224 px from the
  pre-resized cache, and gpu_stage2_cost_ratio, its stage-2 time per image over stage 1's.
  State the GPU each was measured on (gpu_name): H100 and H200 figures are not interchangeable.
- cluster_*, scale_*, report_scale_*, branch_*: the parts at scale, described in
  lfm_ray.commands.bench_scale (cluster and study_scale run only when --only names them).
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lfm_ray.config import MIX_BETA, RunConfig

TARGETS = {
    "sampler_speedup": (">=", 100.0),
    "sampler_speedup_inat": (">=", 100.0),
    "stage2_cost_ratio": ("<=", 0.4),
    "cache_memory_growth": ("<=", 1.2),
    "cache_build_speedup": (">=", 2.0),
    "trial_overhead_s": ("<=", 10.0),
    "sweep_speedup": (">=", 1.5),
    "laptop_overhead_ratio": ("<=", 1.2),
    "data_share_ratio": ("<=", 1.3),
    "study_overhead_growth": ("<=", 1.2),
    "gpu_images_per_s": (">=", 13000.0),
    "gpu_packed_ratio": (">=", 1.2),
    "gpu_speedup_vs_reference": (">=", 3.0),
    "gpu_packed_speedup_b32": (">=", 2.0),
    "gpu_stage2_cost_ratio": ("<=", 0.35),
    "cluster_placed_per_gpu": (">=", 4.0),
    "scale_growth": ("<=", 1.2),
    "scale_rss_growth": ("<=", 1.5),
    # The "overhead per trial at most plain Tune's": the wall time per trial that
    # the trials' own run does not account for, over plain Tune's wall time per trial.
    "scale_between_ratio": ("<=", 1.0),
    "report_scale_s": ("<=", 60.0),
    "report_scale_html_mib": ("<=", 20.0),
    "report_scale_load_s": ("<=", 5.0),
}


# Steps per epoch of the benchmark's smoke trials (one epoch per stage, batch 64).
SMOKE_STEPS = 5


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# ---- sampler ---------------------------------------------------------------------------------
def _sampler_rates(num_classes: int, batch: int, per_class: int, repeats: int):
    """(pairs/s of the alias sampler, of the per-sample Python loop, the sampler's build time
    in s, the sampler, P) for random unit text features at τ = 0.05."""
    from lfm_ray.commands.bench_reference import python_partner_sampler
    from lfm_ray.mixing import PairSampler, local_sampling_matrix

    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(num_classes, 64, generator=g), dim=1)
    P = local_sampling_matrix(text, 0.05)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    start = time.perf_counter()
    sampler = PairSampler(P, labels, torch.device("cpu"))
    build = time.perf_counter() - start
    batch_labels = labels[torch.randint(len(labels), (batch,), generator=g)]
    P_np = P.double().numpy()
    by_class = [list(range(c * per_class, (c + 1) * per_class)) for c in range(num_classes)]
    rng = random.Random(0)
    ys = batch_labels.tolist()
    ref = _best_time(lambda: python_partner_sampler(P_np, by_class, ys, rng), repeats)
    ours = _best_time(lambda: sampler.sample(batch_labels, g), repeats * 20)
    return batch / ours, batch / ref, build, sampler, P


def bench_sampler(num_classes: int = 1000, batch: int = 256, per_class: int = 20,
                  repeats: int = 5) -> dict[str, float]:
    ours, ref, _, _, _ = _sampler_rates(num_classes, batch, per_class, repeats)
    return {"sampler_python_pairs_per_s": ref, "sampler_pairs_per_s": ours,
            "sampler_speedup": ours / ref}


def bench_sampler_inat(num_classes: int = 8142, batch: int = 256, per_class: int = 2,
                       repeats: int = 3) -> dict[str, float]:
    """The LFM sampler at iNaturalist 2018's 8,142 classes: pairs/s against the per-sample
    Python loop, and what its tables cost (build time and memory, per trial and stage)."""
    ours, ref, build, sampler, P = _sampler_rates(num_classes, batch, per_class, repeats)
    return {"sampler_inat_classes": num_classes, "sampler_inat_pairs_per_s": ours,
            "sampler_inat_python_pairs_per_s": ref, "sampler_speedup_inat": ours / ref,
            "sampler_inat_build_s": build,
            "sampler_inat_table_mib": sampler.table_bytes() / 2**20,
            "sampler_inat_P_mib": P.element_size() * P.nelement() / 2**20}


# ---- stage 2 against stage 1 ------------------------------------------------------------------
def bench_stage_cost(steps: int = 30, batch: int = 64, repeats: int = 5,
                     cache_dir: str | None = None) -> dict[str, float]:
    """Seconds per training image of each stage in our trainer (tiny model, CPU, LFM + CE).
    The stages' epochs alternate, so drift in the machine's speed touches both alike: the
    ratio is the median over the rounds of stage 2's epoch over the stage-1 epoch just before
    it (the best epochs' ratio, which one lucky epoch can move, is kept beside it)."""
    from lfm_ray.worker.loop import Run, prepare_stage, stage_plan, train_epoch
    from lfm_ray.worker.distributed import WorkerInfo

    cfg = RunConfig().override({"runtime.batch_size": batch, "runtime.max_steps_per_epoch": steps,
                                "data.cache_dir": cache_dir})
    run = Run(cfg, WorkerInfo(rank=0, world_size=1, device=torch.device("cpu")))
    loss_fn = run.loss_fn()  # CE, the config's default
    plans = {stage.number: (stage, *prepare_stage(run, stage, steps * (repeats + 1)))
             for stage in stage_plan(cfg)}

    def epoch(number: int) -> None:
        stage, trainable, mixer, opt, sched = plans[number]
        run.model.set_stage(number)  # which parameters train
        train_epoch(run, stage, 1, mixer, loss_fn, opt, sched, trainable, steps, batch)

    times: dict[int, list[float]] = {1: [], 2: []}
    for r in range(repeats + 1):  # the first round warms up
        for number in (1, 2):
            start = time.perf_counter()
            epoch(number)
            if r:
                times[number].append(time.perf_counter() - start)
    per_image = {n: min(t) / (steps * batch) for n, t in times.items()}
    paired = statistics.median(t2 / t1 for t1, t2 in zip(times[1], times[2]))
    return {"stage1_s_per_image": per_image[1], "stage2_s_per_image": per_image[2],
            "stage2_cost_ratio": paired, "stage2_best_epochs_ratio": per_image[2] / per_image[1]}


# ---- studies through Ray ----------------------------------------------------------------------
class _TrialClock:
    """A Tune callback recording each trial's wall time, start of its actor to its end."""

    def __new__(cls):
        from ray.tune import Callback

        class Clock(Callback):
            def __init__(self):
                self.start: dict[str, float] = {}
                self.wall: dict[str, float] = {}

            def on_trial_start(self, iteration, trials, trial, **info):
                self.start[trial.trial_id] = time.perf_counter()

            def on_trial_complete(self, iteration, trials, trial, **info):
                self.wall[trial.trial_id] = time.perf_counter() - self.start[trial.trial_id]

        return Clock()


def _smoke_study(name: str, root: Path, taus: list[float], concurrent: int | None,
                 cache_dir: str, clock=None, workers: int = 0, steps: int = SMOKE_STEPS):
    """One epoch per stage of `steps` steps per τ. workers=0 is what a study on a local
    instance runs by default (training in the trial's own process); 1 is a worker group."""
    from lfm_ray.study import Study

    base = RunConfig().override({"stage1.epochs": 1, "stage2.epochs": 1,
                                 "runtime.max_steps_per_epoch": steps,
                                 "runtime.num_workers": workers, "data.cache_dir": cache_dir})
    return Study(name=name, base=base, grid={"mix.tau": taus}, seeds=[0],
                 storage_path=str(root / "ray"), results_dir=str(root / "results"),
                 max_concurrent=concurrent, callbacks=[clock] if clock else [],
                 command=["lfm-ray", "bench"])


def _overheads(table, clock, suffix: str = "") -> dict[str, float]:
    """Median (trial wall time − training time it reported) over a study's trials."""
    overheads = [clock.wall[t] - float(r) for t, r in zip(table["trial_id"], table["train_time_s"])]
    return {f"trial_overhead{suffix}_s": statistics.median(overheads),
            f"trial_wall{suffix}_s": statistics.median(clock.wall.values())}


def bench_trial_overhead(root: Path, cache_dir: str, trials: int = 3,
                         workers: int = 0) -> dict[str, float]:
    """The overhead of `trials` smoke trials run one at a time in one study."""
    from lfm_ray.study import run_study

    clock = _TrialClock()
    taus = [0.01 * (i + 1) for i in range(trials)]
    table = run_study(_smoke_study(f"overhead_w{workers}", root, taus, 1, cache_dir, clock,
                                   workers=workers))
    return _overheads(table, clock, "" if workers == 0 else "_worker_group")


def bench_sweep(root: Path, cache_dir: str, trials: int = 6) -> dict[str, float]:
    """Six smoke trials run one at a time through the engine (one study each, one after
    another, on the same Ray instance) against the same six as one study at the machine's
    concurrency. Also the six as one study one trial at a time, to show how much of the
    speed-up is concurrency alone."""
    from lfm_ray.study import run_study

    taus = [0.01 * (i + 1) for i in range(trials)]
    # Untimed: a freshly started instance is still busy starting its own services, which
    # would slow whichever side ran first.
    run_study(_smoke_study("warm_up", root, taus[:1], 1, cache_dir))
    start = time.perf_counter()
    for i, tau in enumerate(taus):
        run_study(_smoke_study(f"one_at_a_time_{i}", root, [tau], 1, cache_dir))
    one_at_a_time = time.perf_counter() - start
    clock = _TrialClock()  # this study's trials also give trial_overhead_s
    start = time.perf_counter()
    table = run_study(_smoke_study("one_study_serial", root, taus, 1, cache_dir, clock))
    serial = time.perf_counter() - start
    start = time.perf_counter()
    run_study(_smoke_study("one_study_concurrent", root, taus, None, cache_dir))
    concurrent = time.perf_counter() - start
    return {"sweep_sequential_s": one_at_a_time, "sweep_concurrent_s": concurrent,
            "sweep_speedup": one_at_a_time / concurrent,
            "sweep_one_study_serial_s": serial, "sweep_concurrency_speedup": serial / concurrent,
            **_overheads(table, clock)}


def bench_laptop_overhead(root: Path, cache_dir: str, quick: bool,
                          tiny: bool = False) -> dict[str, float]:
    """The τ study through Ray against the same trials one after another in this process,
    without Ray (Ray Train's in-process mode runs the same loop)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from lfm_ray.commands.catalog import tau_sweep
    from lfm_ray.commands.run_flags import new_parser
    from lfm_ray.commands.study_flags import add_study_flags, study_from_args
    from lfm_ray.study import run_study
    from lfm_ray.worker.loop import train_loop_per_worker


    # The script's own flags and defaults, as `python studies/tau_sweep.py` parses them.
    parser = new_parser()
    add_study_flags(parser, default_name="tau_bench")
    flags = ["--data.cache_dir", cache_dir, *(["--seeds", "0"] if quick else [])]
    if tiny:
        flags += ["--stage1.epochs", "1", "--stage2.epochs", "1",
                  "--runtime.max_steps_per_epoch", "2"]
    args = parser.parse_args(flags)
    study = study_from_args(args, tau_sweep.declare(args), script="tau_sweep",
                            command=["lfm-ray", "bench"])
    if quick or tiny:
        study.grid = {"mix.tau": tau_sweep.TAUS[:1 if tiny else 4]}
    study.seeds = [0] if quick else study.seeds
    study.storage_path, study.results_dir = str(root / "ray"), str(root / "results")
    start = time.perf_counter()
    run_study(study)
    through_ray = time.perf_counter() - start

    start = time.perf_counter()
    for tau in study.grid["mix.tau"]:
        for seed in study.seeds:
            cfg = study.config_for({"mix.tau": tau, "runtime.seed": seed})
            TorchTrainer(train_loop_per_worker,
                         train_loop_config={"run": cfg.to_dict(),
                                            "checkpoint_dir": tempfile.mkdtemp(dir=root)},
                         scaling_config=ScalingConfig(num_workers=0)).fit()
    in_process = time.perf_counter() - start
    return {"laptop_ray_s": through_ray, "laptop_in_process_s": in_process,
            "laptop_trials": len(study.grid["mix.tau"]) * len(study.seeds),
            "laptop_overhead_ratio": through_ray / in_process}


class _Completions:
    """A Tune callback recording when each trial ended (finished or failed)."""

    def __new__(cls):
        from ray.tune import Callback

        class Completions(Callback):
            def __init__(self):
                self.times: list[float] = []

            def on_trial_complete(self, iteration, trials, trial, **info):
                self.times.append(time.perf_counter())

            def on_trial_error(self, iteration, trials, trial, **info):
                self.times.append(time.perf_counter())

        return Completions()


def bench_study_overhead(root: Path, cache_dir: str, trials: int = 1000,
                         window: int = 100) -> dict[str, float]:
    """A random search of `trials` smoke trials (one step per stage) through the engine:
    wall time per trial over its last `window` trials over the same for its first `window`
    (the tables, experiment-state saves and callbacks must not grow with the study)."""
    from lfm_ray.commands.bench_scale import smoke_search
    from lfm_ray.study import run_study

    clock = _Completions()
    study = smoke_search(f"overhead_{trials}", root, cache_dir, trials, clock)
    start = time.perf_counter()
    run_study(study)
    total = time.perf_counter() - start
    ends = [start, *sorted(clock.times)]
    window = min(window, max(1, (len(ends) - 1) // 2))
    first = (ends[window] - ends[0]) / window
    last = (ends[-1] - ends[-1 - window]) / window
    return {"study_trials": len(ends) - 1, "study_wall_s": total,
            "study_first_s_per_trial": first, "study_last_s_per_trial": last,
            "study_overhead_growth": last / first}


def bench_shared_stage1(root: Path, cache_dir: str, quick: bool,
                        tiny: bool = False) -> dict[str, float]:
    """The default τ study with a shared stage 1 (the paper's protocol: one stage 1 per seed,
    each τ in stage 2 from it) over the same study retraining both stages per τ, both run
    here one after the other; `quick` runs one seed."""
    from lfm_ray.commands.catalog import tau_sweep
    from lfm_ray.commands.run_flags import new_parser
    from lfm_ray.commands.study_flags import add_study_flags, requested_datasets, study_from_args
    from lfm_ray.study import run_study


    walls, points = {}, {}
    for protocol in ("full", "branch"):
        parser = new_parser()
        add_study_flags(parser, default_name=f"tau_{protocol}")
        # Both sides the same seeds (the script's own default differs by protocol: two
        # seeds for full, the paper's three for branch), so they train the same grid.
        flags = ["--data.cache_dir", cache_dir, "--protocol", protocol,
                 "--storage-path", str(root / "ray"), "--results-dir", str(root / "results"),
                 "--seeds", "0" if quick or tiny else "0,1,2"]
        if tiny:
            flags += ["--smoke", "--runtime.max_steps_per_epoch", "2"]
        args = parser.parse_args(flags)
        args.datasets = requested_datasets(args)
        study = study_from_args(args, tau_sweep.declare(args), script="tau_sweep",
                                command=["lfm-ray", "bench"])
        start = time.perf_counter()
        run_study(study)
        walls[protocol] = time.perf_counter() - start
        points[protocol] = len(study.grid_points())
    from lfm_ray.commands.bench_scale import phase_spans, time_breakdown
    from lfm_ray.study.search import concurrency

    # Where the branch study's time went, from its trials' own records.
    folder = Path(study.experiment_path)
    experiments = {"stage1": folder / "stage1", "stage2": folder / "tune"}
    breakdown = {**time_breakdown(experiments, walls["branch"], concurrency(study)),
                 **phase_spans(experiments)}
    return {"shared_stage1_s": walls["branch"], "full_sweep_s": walls["full"],
            "shared_stage1_trials": points["branch"], "full_sweep_trials": points["full"],
            "shared_stage1_ratio": walls["branch"] / walls["full"], **breakdown}


# ---- building the node cache from image files -----------------------------------------------------
def write_imagenet_style(root: Path, images: int, width: int = 500, height: int = 375,
                         classes: int = 1000) -> None:
    """`images` JPEGs of ImageNet's typical 500 × 375 in the OLTR split-file layout
    (ImageNet_LT_train.txt / _test.txt, "path label" lines), smooth natural-like content
    (upsampled random low-frequency fields with a little noise)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    lines: dict[str, list[str]] = {"train": [], "test": []}
    if images < classes + classes // 10:
        raise ValueError(f"write_imagenet_style needs at least {classes + classes // 10} "
                         "images: every class one training image, a tenth for test")
    for i in range(images):
        split = "test" if i >= images - images // 10 else "train"  # train covers all classes
        label = i % classes
        rel = f"{split}/n{label:08d}/{i}.JPEG"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        field = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        im = np.asarray(Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC))
        noisy = np.clip(im.astype(np.int16) + rng.integers(-8, 9, im.shape), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(root / rel, quality=90)
        lines[split].append(f"{rel} {label}")
    for split, rows in lines.items():
        (root / f"ImageNet_LT_{split}.txt").write_text("\n".join(rows) + "\n")


def _pil_baseline(path: str, size: int) -> np.ndarray:
    """The per-image PIL way: open, convert to RGB, resize the short side, centre-crop."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((max(size, int(w * scale)), max(size, int(h * scale))),
                       Image.Resampling.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size)))


def bench_cache_build(root: Path, images: int = 3000, size: int = 224,
                      source: tuple[int, int] = (500, 375), chunk: int = 100
                      ) -> dict[str, float]:
    """Images/s of the node cache's build path (lfm_ray.data.cache: the model's own
    preprocessing, simplejpeg's decode and PyTorch's uint8 resize, into the array) against the
    per-image PIL baseline, both on one thread, then the build on every core, over the same
    fabricated ImageNet-style JPEGs. The two one-thread sides alternate over chunks of `chunk`
    files (which side goes first alternates too) and each side's times are summed, so a shared
    machine's drift in speed falls on both alike."""
    from lfm_ray.data import build_dataset
    from lfm_ray.data.base import ImageList
    from lfm_ray.data.cache import decode_into
    from lfm_ray.data.preprocess import ImageSpec

    data = root / "imagenet_style"
    write_imagenet_style(data, images, *source)
    ds = build_dataset("imagenet-lt", data)
    files = ds.train_images
    spec = ImageSpec(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "shortest", "bicubic", 0)
    out = np.ones((len(files), size, size, 3), dtype=np.uint8)  # written: no page faults timed
    for path in files.paths[:20]:  # warm the page cache and both code paths alike
        _pil_baseline(path, size)
    decode_into(out[:20], ImageList(files.paths[:20]), spec, "bench", threads=1)

    def baseline(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            out[i] = _pil_baseline(files.paths[i], size)

    def build(lo: int, hi: int, threads: int = 1) -> None:
        decode_into(out[lo:hi], ImageList(files.paths[lo:hi]), spec, "bench", threads=threads)

    spent = {"baseline": 0.0, "build": 0.0}
    for k, lo in enumerate(range(0, len(files), chunk)):
        hi = min(lo + chunk, len(files))
        sides = [("baseline", baseline), ("build", build)]
        for name, run in sides if k % 2 == 0 else sides[::-1]:
            start = time.perf_counter()
            run(lo, hi)
            spent[name] += time.perf_counter() - start
    cores = os.cpu_count() or 1
    start = time.perf_counter()
    build(0, len(files), threads=cores)
    on_cores = len(files) / (time.perf_counter() - start)
    baseline_rate, build_rate = len(files) / spent["baseline"], len(files) / spent["build"]
    shutil.rmtree(data, ignore_errors=True)
    return {"cache_build_images": len(files), "cache_build_baseline_images_per_s": baseline_rate,
            "cache_build_images_per_s": build_rate,
            f"cache_build_{cores}_threads_images_per_s": on_cores,
            "cache_build_speedup": build_rate / baseline_rate,
            "cache_build_threads_speedup": on_cores / baseline_rate}


# ---- memory of a training process against the size of the node cache ---------------------------
_TRAIN_RSS = r"""
import sys, numpy as np, torch
from lfm_ray.augment import BatchBuilder, DeviceImages
from lfm_ray.losses import build_loss
from lfm_ray.mixing import build_mixer
from lfm_ray.model import LFMClassifier, build_clip, text_features
folder, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0); torch.set_num_threads(1)
images = np.load(folder + "/train_images.npy", mmap_mode="r")
labels = torch.as_tensor(np.load(folder + "/train_labels.npy"))
C = int(labels.max()) + 1
counts = torch.bincount(labels, minlength=C).tolist()
clip, spec = build_clip("tiny")
feats = text_features(clip, [f"class {k}" for k in range(C)], ["a photo of a {}"])
model = LFMClassifier(clip.visual, feats, 1.0); model.set_stage(1); model.train()
data, build = DeviceImages(images, torch.device("cpu")), BatchBuilder(spec, "cpu")
mixer = build_mixer("lfm", class_counts=counts, train_labels=labels, text_features=feats)
loss_fn, opt = build_loss("ce", counts), torch.optim.Adam(model.parameters(), lr=1e-3)
g = torch.Generator().manual_seed(0)
order = torch.randperm(len(labels), generator=g)   # an epoch's shuffle, as the trainer's
for step in range(steps):
    pos_i = order[step * batch:(step + 1) * batch]
    pos_j = mixer.partners(pos_i, labels[pos_i], g).cpu()
    both = build(data.gather(torch.cat([pos_i, pos_j])), flip=True, generator=g)
    x, t = mixer.mix(both[:batch], labels[pos_i], both[batch:], labels[pos_j], g)
    loss = loss_fn(model(x), t); opt.zero_grad(); loss.backward(); opt.step()
rss = {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status")
       if l.startswith(("RssAnon", "RssFile"))}
print("rss", rss["RssAnon"], rss["RssFile"], flush=True)
"""


def write_fake_cache(folder: Path, images: int, size: int, classes: int = 1000,
                     imbalance: float = 100.0) -> None:
    """A node-cache split on disk as the trainer maps it: uint8 (N, S, S, 3) and long-tailed
    labels over `classes` (ImageNet-LT's shape of tail), filled with a repeated random block."""
    from lfm_ray.data import long_tail_counts

    folder.mkdir(parents=True, exist_ok=True)
    counts = np.asarray(long_tail_counts(classes, imbalance, 1000), dtype=float)
    counts = np.maximum(1, np.round(counts / counts.sum() * images)).astype(int)
    labels = np.repeat(np.arange(classes), counts)[:images]
    labels = np.concatenate([labels, np.zeros(images - len(labels), dtype=int)])
    np.save(folder / "train_labels.npy", labels.astype(np.int64))
    out = np.lib.format.open_memmap(folder / "train_images.npy", mode="w+", dtype=np.uint8,
                                    shape=(images, size, size, 3))
    block = np.random.default_rng(0).integers(0, 256, (256, size, size, 3), dtype=np.uint8)
    for start in range(0, images, len(block)):
        out[start:start + len(block)] = block[:images - start]
    out.flush()
    del out


def bench_cache_memory(root: Path, small: int = 5000, large: int = 50000, size: int = 224,
                       steps: int = 50, batch: int = 32, repeats: int = 3) -> dict[str, float]:
    """Anonymous resident memory (RssAnon: the memory-mapped cache's file pages excluded) of
    a process running the trainer's step (gather from the memory-mapped cache, batch build,
    LFM partners and mixing, forward and backward of the tiny model) for `steps` steps on a
    cache of `large` images over the same on `small` images, both at `size` px. Each is the
    median of `repeats` fresh processes (a small and a large one side by side per round): one
    process's RssAnon varies by tens of MiB with when the allocator returns freed batches to
    the system."""
    out: dict[str, float] = {}
    folders = {"small": (root / f"cache_{small}", small), "large": (root / f"cache_{large}", large)}
    for folder, n in folders.values():
        write_fake_cache(folder, n, size)
    samples: dict[str, list[tuple[int, int]]] = {"small": [], "large": []}
    try:
        for _ in range(repeats):  # the two sizes side by side, one process each
            procs = {name: subprocess.Popen([sys.executable, "-c", _TRAIN_RSS, str(folder),
                                             str(steps), str(batch)], stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)
                     for name, (folder, _) in folders.items()}
            for name, proc in procs.items():
                stdout, stderr = proc.communicate(timeout=1800)
                line = next((ln for ln in stdout.splitlines() if ln.startswith("rss ")), None)
                if line is None:
                    raise RuntimeError(f"the memory probe failed: {stderr[-2000:]}")
                anon, file_kib = (int(v) for v in line.split()[1:])
                samples[name].append((anon, file_kib))
    finally:
        for folder, _ in folders.values():
            shutil.rmtree(folder, ignore_errors=True)
    for name, (_, n) in folders.items():
        out[f"cache_rss_anon_{name}_mib"] = float(np.median([a for a, _ in samples[name]])) / 1024
        out[f"cache_rss_file_{name}_mib"] = float(np.median([f for _, f in samples[name]])) / 1024
        out[f"cache_images_{name}"] = n
    out["cache_memory_growth"] = out["cache_rss_anon_large_mib"] / out["cache_rss_anon_small_mib"]
    out["cache_memory_repeats"] = repeats
    out["cache_image_px"] = size
    return out


# ---- shared image data ------------------------------------------------------------------------
_TOUCH = r"""
import sys, time, numpy as np
from lfm_ray.data import load_arrays
a = load_arrays(sys.argv[1], cache_dir=sys.argv[2], seed=0)
checksum = int(np.asarray(a.train_images, dtype=np.uint64).sum())   # read every page
print("ready", checksum, flush=True)
time.sleep(float(sys.argv[3]))
"""


def _pss_kib(pid: int, needle: str) -> int:
    """Proportional set size of one process's mappings of files containing `needle`."""
    total, current = 0, False
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 5 and "-" in parts[0] and ":" in parts[3]:
                current = needle in line
            elif current and parts[0] == "Pss:":
                total += int(parts[1])
    return total


def bench_data_share(cache_dir: str, name: str = "digits-lt", trials: int = 4) -> dict[str, float]:
    """Resident image data of four concurrent trial processes over one's (proportional set
    size of their mappings of the node cache: shared pages count once in total)."""
    from lfm_ray.data import load_arrays

    load_arrays(name, cache_dir=cache_dir, seed=0)  # build the cache first

    def measure(n: int) -> int:
        procs = [subprocess.Popen([sys.executable, "-c", _TOUCH, name, cache_dir, "20"],
                                  stdout=subprocess.PIPE, text=True) for _ in range(n)]
        try:
            for p in procs:
                p.stdout.readline()
            return sum(_pss_kib(p.pid, str(Path(cache_dir).resolve())) for p in procs)
        finally:
            for p in procs:
                p.kill()
                p.wait()

    one, four = measure(1), measure(trials)
    return {"data_one_trial_kib": one, "data_four_trials_kib": four,
            "data_share_ratio": four / one if one else float("nan")}


# ---- GPU ----------------------------------------------------------------------------------------
GPU_MODEL = "ViT-B-32"
GPU_BATCH = 256          # images per optimiser step
GPU_PACKED_TRIALS = 4    # trials sharing one GPU, as Ray places four 0.25-GPU trials
GPU_PAPER_BATCH = 32     # the paper's batch (images per step) for the packing figure
GPU_LARGE_MODEL = "ViT-B-16"  # the ImageNet-LT preset's backbone, at 224 px


def write_random_cifar100(root: Path, per_class: int = 500, test_per_class: int = 100,
                          seed: int = 0) -> Path:
    """CIFAR-100's python pickles (torchvision's layout) holding random 32 px images, so the
    GPU figures go through the real loader, node cache and trainer without a download."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), n)
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        (base / split).write_bytes(pickle.dumps({b"data": data, b"fine_labels": labels.tolist()}))
    names = [f"class {k}".encode() for k in range(100)]
    (base / "meta").write_bytes(pickle.dumps({b"fine_label_names": names}))
    return Path(root)


def gpu_run_config(data_root: Path | str, cache_dir: str, model: str = GPU_MODEL,
                   batch: int = GPU_BATCH, device: str = "cuda") -> RunConfig:
    """Stage 1 of LFM + CE on cifar100-lt (γ = 100) with `model` at random init, one GPU."""
    return RunConfig().override({
        "data.name": "cifar100-lt", "data.root": str(data_root), "data.cache_dir": cache_dir,
        "model.name": model, "runtime.batch_size": batch,
        "runtime.gpus_per_worker": 1.0 if device == "cuda" else 0.0,
    })


def stage1_images_per_s(cfg: RunConfig, seconds: float, device: str = "cuda",
                        ready: Callable[[], None] | None = None, stage_number: int = 1) -> float:
    """Stage-1 (or `stage_number` 2) training images per second of the trainer's own epoch
    function (`lfm_ray.worker.loop.train_epoch`: gather, flip, resize, LFM partners and mixing, bf16
    forward and backward, Adam), after a warm-up epoch. `ready` is called between the two, so
    packed trials start their timed epochs together."""
    from lfm_ray.worker.loop import Run, Stage, prepare_stage, train_epoch
    from lfm_ray.worker.distributed import WorkerInfo

    run = Run(cfg, WorkerInfo(rank=0, world_size=1, device=torch.device(device)))
    stage = Stage(number=stage_number, first_epoch=1, epochs=1)
    loss_fn = run.loss_fn()
    trainable, mixer, opt, sched = prepare_stage(run, stage, steps=10**6)
    batch, steps = cfg.runtime.batch_size, 10

    def epoch(number: int) -> None:  # ends with a device sync (the epoch's mean loss)
        train_epoch(run, stage, number, mixer, loss_fn, opt, sched, trainable, steps, batch)

    epoch(1)  # warm-up: kernels, the caching allocator
    if ready is not None:
        ready()
    images, number, start = 0, 2, time.perf_counter()
    while True:
        epoch(number)
        images, number = images + steps * batch, number + 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return images / elapsed


_PACKED_TRIAL = r"""
import json, sys
from lfm_ray.commands.benchmarks import stage1_images_per_s
from lfm_ray.config import RunConfig

def ready():
    print("ready", flush=True)
    sys.stdin.readline()

rate = stage1_images_per_s(RunConfig.from_dict(json.loads(sys.argv[1])), float(sys.argv[2]),
                           device=sys.argv[3], ready=ready)
print("rate", rate, flush=True)
"""


def _read_until(proc: subprocess.Popen, word: str) -> str:
    for line in proc.stdout:
        if line.startswith(word):
            return line
    raise RuntimeError(f"a packed trial ended (exit {proc.wait()}) before printing {word!r}")


def packed_images_per_s(cfg: RunConfig, seconds: float, trials: int = GPU_PACKED_TRIALS,
                        device: str = "cuda") -> float:
    """Summed stage-1 images/s of `trials` processes on one GPU, timed together. Ray packs
    trials of gpus_per_worker = 1/trials the same way: one process each, the same device."""
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)}
    argv = [sys.executable, "-c", _PACKED_TRIAL, json.dumps(cfg.to_dict()), str(seconds), device]
    procs = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=env) for _ in range(trials)]
    try:
        for p in procs:
            _read_until(p, "ready")
        for p in procs:  # every trial is warm: start the timed epochs together
            p.stdin.write("go\n")
            p.stdin.flush()
        return sum(float(_read_until(p, "rate").split()[1]) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def reference_images_per_s(cfg: RunConfig, seconds: float, device: str = "cuda",
                           loader_workers: int | None = None) -> float:
    """The same stage-1 measurement through the reference-style pipeline: a DataLoader whose
    workers resize PIL images one by one and mix in the collate function, then fp32."""
    from lfm_ray.commands.bench_reference import reference_loader, reference_step
    from lfm_ray.data import load_arrays, run_options
    from lfm_ray.mixing import local_sampling_matrix
    from lfm_ray.model import LFMClassifier, build_clip, text_features

    dev = torch.device(device)
    torch.manual_seed(0)
    clip, spec = build_clip(cfg.model.name, cfg.model.pretrained, cfg.model.cache_dir, dev)
    options = run_options(cfg.data)
    # The 32 px images as the authors' pipeline reads them (no cache at the model's size).
    arrays = load_arrays(cfg.data.name, root=cfg.data.root, cache_dir=cfg.data.cache_dir,
                         **options)
    feats = text_features(clip, arrays.class_names, cfg.model.templates, dev)
    P = local_sampling_matrix(feats.float().cpu(), cfg.stage1.tau).double().numpy()
    workers = min(8, os.cpu_count() or 1) if loader_workers is None else loader_workers
    lfm_beta = MIX_BETA["lfm"] if cfg.stage1.beta is None else cfg.stage1.beta  # as our mixer
    loader = reference_loader(np.asarray(arrays.train_images), np.asarray(arrays.train_labels),
                              spec, P, arrays.class_counts, cfg.runtime.batch_size, workers,
                              alpha=cfg.stage1.alpha, beta=lfm_beta)
    model = LFMClassifier(clip.visual, feats, cfg.logit_scale).to(dev)
    del clip
    model.set_stage(1)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.stage1.lr)
    batches = iter(loader)

    def step() -> int:
        nonlocal batches
        try:
            x, t = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, t = next(batches)
        reference_step(model, opt, x, t, dev)
        return len(x)

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # plain fp32, as the reference trains
    try:
        for _ in range(2):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        images, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            images += step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return images / (time.perf_counter() - start)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def bench_gpu(root: Path, seconds: float = 20.0, device: str = "cuda", model: str = GPU_MODEL,
              per_class: int = 500, batch: int = GPU_BATCH,
              packed_trials: int = GPU_PACKED_TRIALS, paper_batch: int = GPU_PAPER_BATCH,
              large_model: str = GPU_LARGE_MODEL) -> dict[str, Any]:
    """Stage-1 images/s of `model` at its input size from CIFAR-style 32 px uint8 data, the
    input path included: with the batch resized on the device each step (the headline; the
    path of any set whose resized copy is over the node cache's pre-resize limit), and from
    the node cache pre-resized to the model's size (what cifar100-lt at 224 px uses); four
    packed trials; the reference pipeline; four packed trials at the paper's batch of 32 over
    one such trial; `large_model` (the ImageNet-LT preset's ViT-B/16) stage 1 and stage 2 from
    the pre-resized cache. `device="cpu"` and a tiny model test the code."""
    from lfm_ray.data import cache as node_cache

    data_root = write_random_cifar100(root / "gpu-data", per_class=per_class,
                                      test_per_class=max(1, per_class // 5))
    out: dict[str, Any] = {}
    native_cache = str(root / "gpu-cache-32px")
    limit = node_cache.PRE_RESIZE_BYTES
    # Keep 32 px in this cache: resize every batch on the device. The packed trials' own
    # processes keep the default limit; they find this cache already built by the first run.
    node_cache.PRE_RESIZE_BYTES = 0
    try:
        cfg = gpu_run_config(data_root, native_cache, model, batch, device)
        out["gpu_images_per_s"] = stage1_images_per_s(cfg, seconds, device)
        out["gpu_packed_images_per_s"] = packed_images_per_s(cfg, seconds, packed_trials, device)
    finally:
        node_cache.PRE_RESIZE_BYTES = limit
    pre_resized = gpu_run_config(data_root, str(root / "gpu-cache-resized"), model, batch, device)
    out["gpu_pre_resized_images_per_s"] = stage1_images_per_s(pre_resized, seconds, device)
    out["gpu_reference_images_per_s"] = reference_images_per_s(cfg, seconds, device)
    out["gpu_packed_ratio"] = out["gpu_packed_images_per_s"] / out["gpu_images_per_s"]
    out["gpu_speedup_vs_reference"] = out["gpu_images_per_s"] / out["gpu_reference_images_per_s"]
    # The paper's batch: one trial cannot fill a modern GPU; packing is where 0.25 GPUs pay.
    small = gpu_run_config(data_root, str(root / "gpu-cache-resized"), model, paper_batch, device)
    out["gpu_b32_images_per_s"] = stage1_images_per_s(small, seconds, device)
    out["gpu_packed_b32_images_per_s"] = packed_images_per_s(small, seconds, packed_trials, device)
    out["gpu_packed_speedup_b32"] = out["gpu_packed_b32_images_per_s"] / out["gpu_b32_images_per_s"]
    large = gpu_run_config(data_root, str(root / "gpu-cache-large"), large_model, batch, device)
    out["gpu_vit_b16_images_per_s"] = stage1_images_per_s(large, seconds, device)
    out["gpu_vit_b16_stage2_images_per_s"] = stage1_images_per_s(large, seconds, device,
                                                                 stage_number=2)
    # Time per image of stage 2 over stage 1: the encoder runs forward only in stage 2.
    out["gpu_stage2_cost_ratio"] = (out["gpu_vit_b16_images_per_s"]
                                    / out["gpu_vit_b16_stage2_images_per_s"])
    out["gpu_name"] = torch.cuda.get_device_name(0) if device == "cuda" else device
    return out


# ---- the whole benchmark ----------------------------------------------------------------------
def machine() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ray_version = version("ray")  # read without importing Ray (the GPU part needs none)
    except PackageNotFoundError:
        ray_version = None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray_version,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


PARTS = ("sampler", "sampler_inat", "cache_build", "cache_memory", "stage_cost", "data_share", "sweep", "laptop", "shared_stage1",
         "study_overhead", "worker_group", "gpu", "report_scale", "cluster", "study_scale")
# "cluster" (a simulated cluster) and "study_scale" (a study of 10,000 trials: an hour or
# more on a laptop) run only when --only names them.
# Figures with no target, printed for information.
INFO = ("shared_stage1_ratio", "sweep_concurrency_speedup", "trial_overhead_worker_group_s",
        "scale_overhead_ratio", "cluster_rate_scaling")


def run_bench(quick: bool = False, tiny: bool = False, only: list[str] | None = None) -> dict[str, Any]:
    """Every figure; `tiny` shrinks sizes for the test suite (numbers then mean nothing)."""
    from lfm_ray.errors import LfmError

    unknown = sorted(set(only or []) - set(PARTS))
    if unknown:
        raise LfmError(f"--only: unknown part {unknown[0]!r}; accepted: {', '.join(PARTS)}")
    if only and "gpu" in only and not torch.cuda.is_available():
        raise LfmError("--only gpu needs a CUDA GPU; torch sees none on this machine")
    out: dict[str, Any] = {"machine": machine(), "quick": quick}
    with tempfile.TemporaryDirectory(prefix="lfm-bench-") as tmp:
        root, cache = Path(tmp), str(Path(tmp) / "cache")
        parts: dict[str, Callable[[], dict[str, Any]]] = {
            "sampler": lambda: bench_sampler(num_classes=50 if tiny else 1000,
                                             repeats=1 if tiny else 5),
            "sampler_inat": lambda: bench_sampler_inat(num_classes=300 if tiny else 8142,
                                                       repeats=1 if tiny else 3),
            "cache_build": lambda: bench_cache_build(
                root, images=1200 if tiny or quick else 3000, size=32 if tiny else 224,
                source=(80, 60) if tiny else (500, 375)),
            "cache_memory": lambda: bench_cache_memory(
                root, small=500 if tiny else 5000, large=5000 if tiny else 50000,
                size=32 if tiny else 224, steps=5 if tiny else 50, repeats=1 if tiny else 3),
            "stage_cost": lambda: bench_stage_cost(steps=2 if tiny else 30,
                                                   repeats=1 if tiny else 5, cache_dir=cache),
            "data_share": lambda: bench_data_share(cache),
            "sweep": lambda: bench_sweep(root, cache, trials=2 if tiny else 6),  # + trial overhead
            "laptop": lambda: bench_laptop_overhead(root, cache, quick=quick, tiny=tiny),
            "shared_stage1": lambda: bench_shared_stage1(root, cache, quick=quick, tiny=tiny),
            "study_overhead": lambda: bench_study_overhead(
                root, cache, trials=4 if tiny else (200 if quick else 1000),
                window=1 if tiny else (50 if quick else 100)),
        }
        if not quick or (only and "worker_group" in only):  # for information: 20-40 s more
            parts["worker_group"] = lambda: bench_trial_overhead(
                root, cache, trials=1 if tiny or quick else 3, workers=1)
        if torch.cuda.is_available() and not tiny:
            parts["gpu"] = lambda: bench_gpu(root, 10.0 if quick else 30.0)
        from lfm_ray.commands import bench_scale

        parts["report_scale"] = lambda: bench_scale.bench_report_scale(
            root, trials=60 if tiny else 10_000)
        if only and "cluster" in only:
            parts["cluster"] = lambda: bench_scale.bench_cluster(
                root, nodes=(1, 2) if tiny else ((1, 4) if quick else (1, 4, 16)),
                trials_per_slot=1 if tiny else 3, hold_s=0.5 if tiny else 5.0,
                work=10_000 if tiny else 200_000)
        if only and "study_scale" in only:
            parts["study_scale"] = lambda: bench_scale.bench_study_scale(
                root, cache, trials=50 if tiny else (1_000 if quick else 10_000),
                window=10 if tiny else (100 if quick else 1_000))
        try:
            for name, fn in parts.items():
                if only and name not in only:
                    continue
                start = time.perf_counter()
                print(f"bench: {name} ...", flush=True)
                out.update(fn())
                out[f"{name}_bench_s"] = time.perf_counter() - start
        finally:
            ray = sys.modules.get("ray")
            if ray is not None and ray.is_initialized():
                ray.shutdown()
    out["targets_met"] = {k: _meets(out[k], *TARGETS[k]) for k in TARGETS if k in out}
    return out


def _meets(value: float, op: str, target: float) -> bool:
    return value >= target if op == ">=" else value <= target


def summary(result: dict[str, Any]) -> str:
    lines = [f"machine: {result['machine']}"]
    for key, (op, target) in TARGETS.items():
        if key in result:
            ok = "ok " if result["targets_met"][key] else "MISS"
            lines.append(f"  [{ok}] {key:26s} {result[key]:10.3f}   target {op} {target:g}")
    for key in INFO:
        if key in result:
            lines.append(f"  [   ] {key:26s} {result[key]:10.3f}   (for information)")
    return "\n".join(lines)
