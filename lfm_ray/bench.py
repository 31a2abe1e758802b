"""`lfm-ray bench`: each figure side by side with a baseline measured in the same run.

Figures (JSON keys) and the claim each supports:
- sampler_speedup: pairs/s of the O(1) alias sampler over a per-sample Python loop
  (`random.choices` over a row of P), C = 1000 classes, batch 256, CPU.
- stage2_cost_ratio: time per training image of stage 2 over stage 1, tiny model, CPU.
- trial_overhead_s: median wall time of a study trial minus the training time it reported.
- sweep_speedup: six smoke trials one at a time through the engine over the same six as one
  study at the machine's concurrency.
- laptop_overhead_ratio: the τ study through Ray over the same trials run one after another
  in one process without Ray (as the authors' sweep ran).
- data_share_ratio: resident memory of four concurrent trials' image data over one trial's.
- gpu_* (CUDA only): stage-1 images/s of ViT-B/32 at 224 px from 32 px uint8 data, bf16,
  batch 256, input path included; four packed trials; speed-up over the reference pipeline.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

TARGETS = {
    "sampler_speedup": (">=", 100.0),
    "stage2_cost_ratio": ("<=", 0.4),
    "trial_overhead_s": ("<=", 10.0),
    "sweep_speedup": (">=", 1.5),
    "laptop_overhead_ratio": ("<=", 1.2),
    "data_share_ratio": ("<=", 1.3),
    "gpu_images_per_s": (">=", 9000.0),
    "gpu_speedup_vs_reference": (">=", 3.0),
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
def bench_sampler(num_classes: int = 1000, batch: int = 256, per_class: int = 20,
                  repeats: int = 5) -> dict[str, float]:
    from lfm_ray.bench_reference import python_partner_sampler
    from lfm_ray.mixing import PairSampler, local_sampling_matrix

    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(num_classes, 64, generator=g), dim=1)
    P = local_sampling_matrix(text, 0.05)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    sampler = PairSampler(P, labels, torch.device("cpu"))
    batch_labels = labels[torch.randint(len(labels), (batch,), generator=g)]
    P_np = P.double().numpy()
    by_class = [list(range(c * per_class, (c + 1) * per_class)) for c in range(num_classes)]
    rng = random.Random(0)
    ys = batch_labels.tolist()
    ref = _best_time(lambda: python_partner_sampler(P_np, by_class, ys, rng), repeats)
    ours = _best_time(lambda: sampler.sample(batch_labels, g), repeats * 20)
    return {"sampler_python_pairs_per_s": batch / ref, "sampler_pairs_per_s": batch / ours,
            "sampler_speedup": ref / ours}


# ---- stage 2 against stage 1 ------------------------------------------------------------------
def bench_stage_cost(steps: int = 30, batch: int = 64, repeats: int = 5,
                     cache_dir: str | None = None) -> dict[str, float]:
    """Seconds per training image of each stage in our trainer (tiny model, CPU, LFM + CE).
    The stages' epochs alternate, so drift in the machine's speed touches both alike; each
    stage's figure is its best epoch."""
    from lfm_ray.config import RunConfig
    from lfm_ray.losses import build_loss
    from lfm_ray.train import (
        Run, WorkerInfo, _mixer, _optimizer, _trainable, stage_plan, train_epoch,
    )

    cfg = RunConfig().override({"runtime.batch_size": batch, "runtime.max_steps_per_epoch": steps,
                                "data.cache_dir": cache_dir})
    run = Run(cfg, WorkerInfo(rank=0, world_size=1, device=torch.device("cpu")))
    loss_fn = build_loss("ce", run.class_counts)
    plans = {}
    for stage in stage_plan(cfg):
        trainable = _trainable(run, stage)
        opt, sched = _optimizer(run, stage, steps * (repeats + 1))
        plans[stage.number] = (stage, _mixer(run, stage), opt, sched, trainable)

    def epoch(number: int) -> None:
        stage, mixer, opt, sched, trainable = plans[number]
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
    return {"stage1_s_per_image": per_image[1], "stage2_s_per_image": per_image[2],
            "stage2_cost_ratio": per_image[2] / per_image[1]}


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
    from lfm_ray.config import RunConfig
    from lfm_ray.study import Study

    base = RunConfig().override({"stage1.epochs": 1, "stage2.epochs": 1,
                                 "runtime.max_steps_per_epoch": steps,
                                 "runtime.num_workers": workers, "data.cache_dir": cache_dir})
    return Study(name=name, base=base, grid={"mix.tau": taus}, seeds=[0],
                 storage_path=str(root / "ray"), results_dir=str(root / "results"),
                 max_concurrent=concurrent, callbacks=[clock] if clock else [],
                 command=["lfm-ray", "bench"])


def bench_trial_overhead(root: Path, cache_dir: str, trials: int = 3,
                         workers: int = 0) -> dict[str, float]:
    """Median (trial wall time − training time it reported), one trial at a time."""
    from lfm_ray.study import run_study

    clock = _TrialClock()
    taus = [0.01 * (i + 1) for i in range(trials)]
    table = run_study(_smoke_study(f"overhead_w{workers}", root, taus, 1, cache_dir, clock,
                                   workers=workers))
    overheads = [clock.wall[t] - float(r) for t, r in zip(table["trial_id"], table["train_time_s"])]
    suffix = "" if workers == 0 else "_worker_group"
    return {f"trial_overhead{suffix}_s": statistics.median(overheads),
            f"trial_wall{suffix}_s": statistics.median(clock.wall.values())}


def bench_sweep(root: Path, cache_dir: str, trials: int = 6) -> dict[str, float]:
    """Six smoke trials one at a time through the engine, then as one study at full concurrency."""
    from lfm_ray.study import run_study

    taus = [0.01 * (i + 1) for i in range(trials)]
    start = time.perf_counter()
    run_study(_smoke_study("sequential", root, taus, 1, cache_dir))
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    run_study(_smoke_study("concurrent", root, taus, None, cache_dir))
    concurrent = time.perf_counter() - start
    return {"sweep_sequential_s": sequential, "sweep_concurrent_s": concurrent,
            "sweep_speedup": sequential / concurrent}


def bench_laptop_overhead(root: Path, cache_dir: str, quick: bool,
                          tiny: bool = False) -> dict[str, float]:
    """The τ study through Ray against the same trials one after another in this process,
    without Ray (Ray Train's in-process mode runs the same loop)."""
    import argparse
    import sys as _sys

    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from lfm_ray.commands.study_flags import add_study_flags, base_overrides
    from lfm_ray.study import run_study
    from lfm_ray.train import train_loop_per_worker

    _sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))
    import tau_sweep

    # The script's own flags and defaults, as `python studies/tau_sweep.py` parses them.
    parser = argparse.ArgumentParser()
    add_study_flags(parser, default_name="tau_bench")
    args = parser.parse_args(["--seeds", "0"] if quick else [])
    smoke = {"stage1.epochs": 1, "stage2.epochs": 1, "runtime.max_steps_per_epoch": 2}
    study = tau_sweep.build(args, {**base_overrides(args), "data.cache_dir": cache_dir,
                                   **(smoke if tiny else {})})
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
def bench_gpu(seconds: float = 20.0) -> dict[str, float]:
    """Stage-1 images/s of ViT-B/32 at 224 px from CIFAR-style 32 px uint8 data, bf16, batch
    256, the input path included; four packed trials; the reference pipeline (fp32, PIL)."""
    import open_clip

    from lfm_ray.augment import BatchBuilder
    from lfm_ray.model import LFMClassifier, ImageSpec

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    spec = ImageSpec(224, (0.481, 0.458, 0.408), (0.269, 0.261, 0.276))
    images = torch.randint(0, 256, (20_000, 32, 32, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 100, (20_000,), device=device)

    def model():
        clip = open_clip.create_model("ViT-B-32", pretrained=None, device=device)
        feats = torch.nn.functional.normalize(torch.randn(100, 512, device=device), dim=1)
        m = LFMClassifier(clip.visual, feats, 1.0).to(device).to(memory_format=torch.channels_last)
        m.set_stage(1)
        return m

    def ours_step(m, opt, build):
        idx = torch.randint(0, len(images), (256,), device=device)
        x = build(images[idx], flip=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(m(x).float(), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def rate(step_fn, n_models=1) -> float:
        ms = [model() for _ in range(n_models)]
        opts = [torch.optim.Adam(m.parameters(), lr=1e-6) for m in ms]
        build = BatchBuilder(spec, device)
        streams = [torch.cuda.Stream() for _ in ms]
        for _ in range(3):
            for m, o in zip(ms, opts):
                step_fn(m, o, build)
        torch.cuda.synchronize()
        start, steps = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            for m, o, s in zip(ms, opts, streams):
                with torch.cuda.stream(s):
                    step_fn(m, o, build)
            steps += 1
        torch.cuda.synchronize()
        return steps * 256 * n_models / (time.perf_counter() - start)

    ours = rate(ours_step)
    packed = rate(ours_step, 4)
    reference = _gpu_reference_rate(seconds)
    return {"gpu_images_per_s": ours, "gpu_packed_images_per_s": packed,
            "gpu_reference_images_per_s": reference, "gpu_speedup_vs_reference": ours / reference,
            "gpu_name": torch.cuda.get_device_name(0)}


def _gpu_reference_rate(seconds: float) -> float:
    import open_clip

    from lfm_ray.bench_reference import reference_loader, reference_step
    from lfm_ray.mixing import local_sampling_matrix
    from lfm_ray.model import ImageSpec, LFMClassifier

    device = torch.device("cuda")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20_000, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, 20_000)
    feats = torch.nn.functional.normalize(torch.randn(100, 512), dim=1)
    P = local_sampling_matrix(feats, 0.05).double().numpy()
    spec = ImageSpec(224, (0.481, 0.458, 0.408), (0.269, 0.261, 0.276))
    loader = reference_loader(images, labels, spec, P, np.bincount(labels, minlength=100),
                              256, num_workers=min(8, os.cpu_count() or 1))
    clip = open_clip.create_model("ViT-B-32", pretrained=None, device=device)
    m = LFMClassifier(clip.visual, feats.to(device), 1.0).to(device)
    m.set_stage(1)
    opt = torch.optim.Adam(m.parameters(), lr=1e-6)
    it = iter(loader)
    for _ in range(2):
        reference_step(m, opt, *next(it), device)
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        try:
            x, t = next(it)
        except StopIteration:
            it = iter(loader)
            x, t = next(it)
        reference_step(m, opt, x, t, device)
        n += len(x)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


# ---- the whole benchmark ----------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import ray

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_bench(quick: bool = False, tiny: bool = False, only: list[str] | None = None) -> dict[str, Any]:
    """Every figure; `tiny` shrinks sizes for the test suite (numbers then mean nothing)."""
    import ray

    out: dict[str, Any] = {"machine": machine(), "quick": quick}
    with tempfile.TemporaryDirectory(prefix="lfm-bench-") as tmp:
        root, cache = Path(tmp), str(Path(tmp) / "cache")
        parts: dict[str, Callable[[], dict[str, Any]]] = {
            "sampler": lambda: bench_sampler(num_classes=50 if tiny else 1000,
                                             repeats=1 if tiny else 5),
            "stage_cost": lambda: bench_stage_cost(steps=2 if tiny else 30,
                                                   repeats=1 if tiny else 5, cache_dir=cache),
            "data_share": lambda: bench_data_share(cache),
            "trial_overhead": lambda: bench_trial_overhead(root, cache, trials=1 if tiny else 3),
            "trial_overhead_worker_group": lambda: bench_trial_overhead(
                root, cache, trials=1 if tiny else 3, workers=1),
            "sweep": lambda: bench_sweep(root, cache, trials=2 if tiny else 6),
            "laptop": lambda: bench_laptop_overhead(root, cache, quick=quick, tiny=tiny),
        }
        if torch.cuda.is_available() and not tiny:
            parts["gpu"] = lambda: bench_gpu(10.0 if quick else 30.0)
        try:
            for name, fn in parts.items():
                if only and name not in only:
                    continue
                start = time.perf_counter()
                print(f"bench: {name} ...", flush=True)
                out.update(fn())
                out[f"{name}_bench_s"] = time.perf_counter() - start
        finally:
            if ray.is_initialized():
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
    return "\n".join(lines)
