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

from lfm_ray.config import RunConfig, diff, flatten
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
    return {k: v for k, v in comparable(flatten(cfg.to_dict())).items()
            if not k.startswith(STAGE2_PREFIX)}


def comparable(fields: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flat config fields (under `prefix`) as runs compare them: NOT_STAGE1 left out, the
    worker count as the world size max(1, n), the GPU share as the device kind."""
    out = {k: v for k, v in fields.items() if k[len(prefix):] not in NOT_STAGE1}
    workers, gpus = f"{prefix}runtime.num_workers", f"{prefix}runtime.gpus_per_worker"
    if isinstance(out.get(workers), int) and not isinstance(out[workers], bool):
        out[workers] = max(1, out[workers])                                 # the world size
    if isinstance(out.get(gpus), (int, float)) and not isinstance(out[gpus], bool):
        out[gpus] = "gpu" if out[gpus] > 0 else "cpu"
    return out


def stage1_key(cfg: RunConfig) -> str:
    """A stable hash of every field stage 1's result depends on (16 hex digits)."""
    blob = json.dumps([STAGE1_KEY_VERSION, stage1_fields(cfg)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def differences(a: RunConfig, b: RunConfig) -> str:
    """The stage-1 fields two configs differ in, for a refusal (six named, then a count)."""
    named = [f"{k} ({x!r} there, {y!r} here)"
             for k, x, y in diff(stage1_fields(a), stage1_fields(b))]
    return "; ".join(named[:6]) + (f"; and {len(named) - 6} more" if len(named) > 6 else "")


def check_branch_config(cfg: RunConfig) -> None:
    """A run that starts stage 2 from a shared stage 1 needs both stages to exist."""
    if cfg.runtime.zero_shot:
        raise LfmError("stage1_from: a zero-shot run trains nothing to branch")
    if cfg.stage1.epochs < 1:
        raise LfmError("stage1_from: stage1.epochs=0, so there is no stage 1 to share")
    if cfg.stage2.epochs < 1:
        raise LfmError("stage1_from: stage2.epochs=0; a branch trains stage 2 only, so it "
                       "would train nothing")
