"""Sharing stage 1: what its result depends on (`stage1_key`); the worker reads a completed
stage 1's checkpoint with lfm_ray.worker.checkpoint.load_stage1.

The paper's α and τ ablations sweep a stage-2 value on one trained stage-1 model (the
authors' config/ablation/*.yaml name a `phase1_model`). A run can therefore train stage 1
only and keep its checkpoint (`stop_after_stage1`), and other runs can start stage 2 from it
(`stage1_from`), provided stage 1 would have come out the same for them: the same
`stage1_key`.

`stage1_key` hashes every config field except those listed in NOT_STAGE1 (and every
stage2.* field), so a field added to the config later is part of the key until someone
decides it cannot change stage 1: a wrong "same" would silently mix two experiments, a wrong
"different" only costs a retrain. Two fields enter in a normalised form:
- runtime.num_workers as the world size max(1, n): DDP ranks draw their own batches and
  partners, so 1 and 2 workers train different stage-1 models; 0 (Ray Train's local mode)
  and 1 are the same single rank.
- runtime.gpus_per_worker as the device kind (GPU or CPU): a GPU trains in bf16 autocast, a
  CPU in float32; 0.25 and 1 GPU run the same arithmetic.
Fields left out change where things live or the floating-point rounding only, never the
recipe: see NOT_STAGE1.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from lfm_ray.config import RunConfig
from lfm_ray.errors import LfmError

# Bump when the trainer's stage 1 changes meaning (then no old checkpoint matches).
STAGE1_KEY_VERSION = 1

# Fields that do not change stage 1's weights or the history it records, and why.
NOT_STAGE1 = {
    "data.cache_dir": "where the node image cache lives (its contents keyed by the data fields)",
    "model.cache_dir": "where open_clip caches weights",
    "runtime.eval_batch_size": "how many test images one forward pass takes",
    "runtime.cpus_per_worker": "Ray's CPU reservation",
    "runtime.threads": "torch CPU threads: rounding only",
    "runtime.compile": "torch.compile of the image tower: the same arithmetic, fused",
    "runtime.save_confusion": "an output file",
}
STAGE2_PREFIX = "stage2."


def stage1_fields(cfg: RunConfig) -> dict[str, Any]:
    """Dotted name -> value of everything stage 1 depends on (what stage1_key hashes)."""
    out: dict[str, Any] = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if dotted.startswith(STAGE2_PREFIX) or dotted in NOT_STAGE1:
                continue
            out[dotted] = value
    rt = cfg.runtime
    out["runtime.num_workers"] = max(1, int(rt.num_workers))            # the world size
    out["runtime.gpus_per_worker"] = "gpu" if rt.gpus_per_worker > 0 else "cpu"
    return out


def stage1_key(cfg: RunConfig) -> str:
    """A stable hash of every field stage 1's result depends on (16 hex digits)."""
    blob = json.dumps([STAGE1_KEY_VERSION, stage1_fields(cfg)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def differences(a: RunConfig, b: RunConfig) -> str:
    fa, fb = stage1_fields(a), stage1_fields(b)
    diff = [f"{k} ({fa.get(k)!r} there, {fb.get(k)!r} here)"
            for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
    return "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")


def check_branch_config(cfg: RunConfig) -> None:
    """A run that starts stage 2 from a shared stage 1 needs both stages to exist."""
    if cfg.runtime.zero_shot:
        raise LfmError("stage1_from: a zero-shot run trains nothing to branch")
    if cfg.stage1.epochs < 1:
        raise LfmError("stage1_from: stage1.epochs=0, so there is no stage 1 to share")
    if cfg.stage2.epochs < 1:
        raise LfmError("stage1_from: stage2.epochs=0; a branch trains stage 2 only, so it "
                       "would train nothing")
