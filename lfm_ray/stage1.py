"""Sharing stage 1: what its result depends on, and checkpoints of a completed stage 1.

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
import os
from pathlib import Path
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


def _differences(a: RunConfig, b: RunConfig) -> str:
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


def load_stage1(cfg: RunConfig, checkpoint_dir: str | os.PathLike,
                map_location: Any = "cpu") -> dict[str, Any]:
    """The state of a completed stage 1 that `cfg` may branch from, else one LfmError.

    The checkpoint must be the last epoch of stage 1 (a `stop_after_stage1` run's final
    checkpoint, or that epoch's checkpoint of a full run), and the config stored in it must
    have this run's stage1_key. `checkpoint_dir` is a local (or shared) folder, or a URI a
    Ray checkpoint can be read from (s3://, gs://, file://): a study's storage path.
    """
    check_branch_config(cfg)
    where = str(checkpoint_dir)
    if "://" in where:
        from ray.train import Checkpoint

        try:
            with Checkpoint(path=where).as_directory() as local:
                return _checked(cfg, where, Path(local), map_location, mmap=False)
        except LfmError:
            raise
        except Exception as exc:  # noqa: BLE001 - pyarrow raises assorted types
            raise LfmError(f"stage1_from {where!r} cannot be read: {exc}") from None
    # Memory-mapped: the driver's check reads the config, not the weights.
    return _checked(cfg, where, Path(where), map_location, mmap=True)


def _checked(cfg: RunConfig, where: str, folder: Path, map_location: Any,
             mmap: bool) -> dict[str, Any]:
    from lfm_ray.safe_load import load_state_file
    from lfm_ray.train import STATE_FILE

    path = folder / STATE_FILE
    if not path.is_file():
        raise LfmError(f"stage1_from {where!r} holds no {STATE_FILE}; give the checkpoint "
                       "directory of a completed stage 1")
    state = load_state_file(path, map_location=map_location, mmap=mmap, what="stage1_from")
    stored = RunConfig.from_dict(state["config"])
    if int(state["stage"]) != 1 or int(state["epoch"]) != stored.stage1.epochs:
        raise LfmError(
            f"stage1_from {where!r} holds epoch {state['epoch']} (stage {state['stage']}); a "
            f"branch needs the checkpoint of a completed stage 1, epoch "
            f"{stored.stage1.epochs} of stage 1")
    theirs, ours = stage1_key(stored), stage1_key(cfg)
    if theirs != ours:
        raise LfmError(
            f"stage1_from {where!r} was trained with stage-1 key {theirs}, this run's stage-1 "
            f"key is {ours}: its stage 1 is not this run's. They differ in "
            f"{_differences(stored, cfg)}")
    return state
