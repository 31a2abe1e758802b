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

import json
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
