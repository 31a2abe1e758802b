"""The run's contract: what the worker writes and reports, and the driver, studies and
analysis read. No torch and no Ray here, so every side imports it without cost.

- the metric keys every epoch of every run reports, and the figures a study may select on;
- the files of a checkpoint (`STATE_FILE`, `RESULT_FILE`, `HISTORY_FILE`, `CONFUSION_FILE`)
  and when a kept checkpoint is whole (`complete_checkpoint`);
- the selection-split rule (`resolve_selection_split`, `selection_metric`);
- the checks both sides make of a run's batch and epochs.
"""

from __future__ import annotations

import json
from pathlib import Path

from lfm_ray.config import RunConfig
from lfm_ray.errors import LfmError

GROUPS = ("many", "medium", "few")
# Top-1 on the reported split (test), as fractions; `test_epoch` is the epoch they are from.
ACCURACY_KEYS = ("acc_many", "acc_medium", "acc_few", "acc_all")
# LIFT's figures over the classes of that split, as fractions: macro-F1, the harmonic mean of
# the per-class accuracies (each at least HMEAN_FLOOR) and the worst class's accuracy.
CLASS_KEYS = ("macro_f1", "acc_hmean", "acc_worst")
TEST_KEYS = ACCURACY_KEYS + CLASS_KEYS
# How many numbers each stage trains (lfm_ray.finetune; 0 for a stage of 0 epochs).
PARAM_KEYS = ("trained_params_stage1", "trained_params_stage2")
# What every epoch of every run reports.
METRIC_KEYS = ("epoch", "stage", "train_loss", *TEST_KEYS, "test_epoch", "selection_split",
               *PARAM_KEYS)
# Reported as well, every epoch, by runs that select on the val split.
VAL_METRIC_KEYS = tuple(f"val_{k}" for k in TEST_KEYS)
# The numeric figures a study may select or stop on.
OBJECTIVE_KEYS = ("train_loss", *TEST_KEYS, *VAL_METRIC_KEYS)
# A class of accuracy 0 enters the harmonic mean as this (LIFT's 0.001 %), so the mean is
# defined and close to 0 rather than exactly 0.
HMEAN_FLOOR = 1e-5
SELECTION_SPLITS = ("auto", "val", "test")
STATE_FILE = "state.pt"      # model, optimiser and scheduler state at the end of an epoch
RESULT_FILE = "result.json"  # that epoch's metrics and per-class accuracy
HISTORY_FILE = "history.json"  # every epoch's metrics so far, one dict per epoch
CONFUSION_FILE = "confusion.npz"  # the last test evaluation's confusion matrix (optional)


def resolve_selection_split(requested: str, has_val: bool, dataset: str) -> str:
    """'val' or 'test': `data.selection_split` for a data set with or without a val split."""
    if requested not in SELECTION_SPLITS:
        raise LfmError(f"data.selection_split={requested!r} is not valid; expected "
                       "'auto', 'val' or 'test'")
    if requested == "auto":
        return "val" if has_val else "test"
    if requested == "val" and not has_val:
        raise LfmError(f"data.selection_split='val', but data set {dataset!r} has no "
                       "validation split; use 'auto' or 'test' (select on test)")
    return requested


def metric_keys(selection_split: str) -> tuple[str, ...]:
    """The keys every epoch of a run with this (resolved) selection split reports."""
    return METRIC_KEYS + (VAL_METRIC_KEYS if selection_split == "val" else ())


def selection_metric(metric: str, selection_split: str) -> str:
    """The reported name of `metric` (acc_all, acc_few, ...) on the selection split."""
    if metric in TEST_KEYS and selection_split == "val":
        return f"val_{metric}"
    return metric


def complete_checkpoint(folder: Path) -> bool:
    """Whether a kept checkpoint was written to its end: the trainer writes state.pt, then
    result.json, then history.json, so a readable history.json means the rest is whole (a
    process killed while writing leaves a folder without it, which a resume passes over)."""
    try:
        json.loads((folder / HISTORY_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (folder / STATE_FILE).is_file() and (folder / RESULT_FILE).is_file()


def check_trains_something(cfg: RunConfig) -> None:
    """A run with no epoch in either stage (and not zero-shot) would train nothing."""
    if not cfg.runtime.zero_shot and cfg.stage1.epochs == 0 and cfg.stage2.epochs == 0:
        raise LfmError("stage1.epochs=0 and stage2.epochs=0: the run would train nothing; "
                       "give one stage epochs, or --zero-shot to evaluate without training")


def check_batch_size(cfg: RunConfig, num_train: int) -> None:
    """A global batch larger than the training split would repeat images within a step."""
    if cfg.runtime.batch_size > num_train:
        raise LfmError(f"runtime.batch_size={cfg.runtime.batch_size} is larger than the "
                       f"{num_train} training images of {cfg.data.name}; give at most "
                       f"{num_train}")
