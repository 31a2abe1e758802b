"""A worker's checkpoints: what `save_state` writes at the end of an epoch, `load_state` reads
back on a resume, and `load_stage1` reads for a run that starts stage 2 from a shared stage 1.

The file names are the run's contract (lfm_ray.contract); `run` is the worker's
`lfm_ray.worker.loop.Run` (its model, config, class names and sampling matrix).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lfm_ray import confusion
from lfm_ray.config import RunConfig
from lfm_ray.contract import CONFUSION_FILE, HISTORY_FILE, RESULT_FILE, STATE_FILE
from lfm_ray.errors import LfmError
from lfm_ray.safe_load import load_state_file
from lfm_ray.similarity import sampling_source
from lfm_ray.stage1 import check_branch_config, differences, stage1_key


def write_confusion(path: Path, run, last_test: dict[str, Any]) -> None:
    """confusion.npz of the last test evaluation, when the run keeps one."""
    if last_test.get("confusion") is None:
        return
    # .cpu(): a state restored with map_location on a GPU brings the counts there.
    confusion.write(path / CONFUSION_FILE, last_test["confusion"].cpu().numpy(),
                    run.sampling_matrix().numpy(), class_names=run.class_names, split="test",
                    epoch=int(last_test["test_epoch"]), tau=run.cfg.stage1.tau,
                    source=str(sampling_source(run.cfg)))


def save_state(path: Path, run, stage, epoch: int, opt, sched,
               result: dict[str, Any], history: list[dict[str, Any]],
               last_test: dict[str, Any]) -> None:
    state = {
        "epoch": epoch,
        "stage": stage.number,
        **run.model.weights(),  # the tower (with a mode's modules), W_I, class weights
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "config": run.cfg.to_dict(),
        "stage1_key": stage1_key(run.cfg),
        "train_time_total_s": result.get("train_time_total_s", 0.0),
        "history": history,
        "last_test": last_test,  # carried into the epochs until the next test evaluation
    }
    torch.save(state, path / STATE_FILE)
    (path / RESULT_FILE).write_text(json.dumps(result))
    (path / HISTORY_FILE).write_text(json.dumps(history))
    write_confusion(path, run, last_test)


def load_state(checkpoint_dir: str | os.PathLike, device: torch.device) -> dict[str, Any]:
    """A checkpoint's state, read weights-only (lfm_ray.safe_load: no code runs from it)."""
    path = Path(checkpoint_dir) / STATE_FILE
    if not path.is_file():
        raise LfmError(f"checkpoint {str(checkpoint_dir)!r} has no {STATE_FILE}")
    return load_state_file(path, map_location=device)



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
            f"{differences(stored, cfg)}")
    return state
