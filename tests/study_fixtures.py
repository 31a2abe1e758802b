"""Fabricated study results in the formats lfm_ray.study writes, for the analysis tests.

`make_study` lays out what a study leaves behind:

    <root>/results/<name>/study.json, trials.csv (column `artifacts`),
    <root>/results/<name>/trials/<trial_id>/result.json, history.json, confusion.npz
    <root>/results/ray/<name>_train/train_<i>/epoch_<e>/ (the last checkpoint, the same files)

with `checkpoint_path` relative to the storage path ("results/ray", as typed), so a test
can move the results folder, delete the Ray folder, or drop the copies to see which source
the loader reads.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from lfm_ray import confusion
from lfm_ray.config import DataConfig, RunConfig

GROUPS = ("many", "medium", "few", "all")
COUNTS = [124, 96, 74, 57, 44, 34, 26, 20, 16, 12]  # digits-lt's training counts
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEST_PER_CLASS = 50
E1, E2 = 2, 2  # epochs of the two stages in the fabricated studies
TAUS = [0.002, 0.05, 1.25]
STORAGE = "results/ray"


def tau_accuracy(params: dict[str, Any], seed: int) -> dict[str, float]:
    """A peak at τ = 0.05 plus seed noise, so the best value is known."""
    rng = np.random.default_rng(1000 * seed + int(1e4 * float(params.get("mix.tau", 1))))
    peak = -abs(math.log10(float(params.get("mix.tau", 0.05))) - math.log10(0.05))
    bonus = 0.05 * float(params.get("mix.alpha", 0))
    return {f"acc_{g}": float(np.clip(0.6 + 0.1 * peak + bonus + (0.1 if g == "many" else 0)
                                      + rng.normal(0, 0.02), 0, 1)) for g in GROUPS}


SEPARATED_BASE = {0.002: 0.40, 0.05: 0.60, 1.25: 0.45}


def separated_accuracy(params: dict[str, Any], seed: int) -> dict[str, float]:
    """τ = 0.05 ahead by 15 points; every seed moves all τ alike (± 1 point), so the paired
    differences leave no doubt."""
    b = SEPARATED_BASE[float(params["mix.tau"])] + 0.01 * (seed - 1)
    return {"acc_many": b + 0.2, "acc_medium": b, "acc_few": b - 0.2, "acc_all": b}


def per_class_of(final: dict[str, float], trial: int) -> list[float]:
    """Per-class accuracies of a trial: its acc_all tilted towards the head classes, plus a
    per-trial offset so each trial's curve is told apart."""
    return [float(np.clip(final["acc_all"] + 0.002 * (c - 50) + 0.001 * trial, 0, 1))
            for c in COUNTS]


def sampling_matrix(tau: float) -> np.ndarray:
    """A C×C row-stochastic matrix with a zero diagonal (the shape of LFM's P)."""
    rng = np.random.default_rng(7)
    sim = rng.normal(size=(len(NAMES), len(NAMES)))
    sim = (sim + sim.T) / 2
    logits = sim / max(float(tau), 1e-3)
    np.fill_diagonal(logits, -np.inf)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def confusion_counts(per_class: list[float]) -> np.ndarray:
    """Test counts whose diagonal gives `per_class` (of TEST_PER_CLASS images each)."""
    C = len(per_class)
    counts = np.zeros((C, C), dtype=np.int64)
    for i, acc in enumerate(per_class):
        right = int(round(acc * TEST_PER_CLASS))
        counts[i, i] = right
        counts[i, (i + 1) % C] = TEST_PER_CLASS - right
    return counts


def write_trial_files(folder: Path, history: list[dict[str, Any]], per_class: list[float],
                      tau: float, val: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    result = {**history[-1], "per_class_acc": per_class, "class_counts": COUNTS,
              "class_names": NAMES}
    if val:
        result["val_per_class_acc"] = per_class
    (folder / "result.json").write_text(json.dumps(result))
    (folder / "history.json").write_text(json.dumps(history))
    confusion.write(folder / confusion.CONFUSION_FILE, confusion_counts(per_class),
                    sampling_matrix(tau), class_names=NAMES, split="test",
                    epoch=int(history[-1]["epoch"]), tau=tau)


def make_study(root: Path, name: str, grid: dict[str, list], seeds=(0, 1),
               acc: Callable[[dict, int], dict] = tau_accuracy, failed: int = 0,
               stopped: tuple[int, ...] = (), search: str = "grid",
               meta: dict | None = None, copies: bool = True, checkpoints: bool = True,
               variants: dict[str, dict] | None = None, val: bool = False) -> Path:
    """A results folder as lfm_ray.study writes it (see the module's docstring); returns
    <root>/results/<name>. `copies` / `checkpoints` leave out the per-trial copies or the
    Ray checkpoints; `val` adds val_acc_* columns (selection on the validation split)."""
    keys = list(grid)
    rows = []
    combos = list(itertools.product(*grid.values())) if keys else [()]
    d = root / "results" / name
    d.mkdir(parents=True)
    for i, (values, seed) in enumerate(itertools.product(combos, seeds)):
        params = dict(zip(keys, values))
        final = acc(params, seed)
        zero = bool((variants or {}).get(params.get("method"), {}).get("runtime.zero_shot"))
        early = i in stopped
        last = 0 if zero else (2 if early else E1 + E2)
        epochs = [0] if zero else range(1, last + 1)
        history = [{"epoch": e, "stage": 0 if zero else (1 if e <= E1 else 2),
                    "train_loss": 2.0 / max(e, 1),
                    **{k: v * (0.8 + 0.2 * max(e, 1) / (E1 + E2)) if not zero else v
                       for k, v in final.items()},
                    **({f"val_{k}": v for k, v in final.items()} if val else {})}
                   for e in epochs]
        per_class = per_class_of(final, i)
        trial_id = f"{name[:3]}_{i:05d}"
        tau = float(params.get("mix.tau", 0.05))
        ckpt_rel = f"{name}_train/train_{i:05d}/epoch_{last:04d}"
        if checkpoints:
            write_trial_files(root / STORAGE / ckpt_rel, history, per_class, tau, val)
        if copies:
            write_trial_files(d / "trials" / trial_id, history, per_class, tau, val)
        rows.append({"trial_id": trial_id, "status": "TERMINATED", "error": "",
                     **params, "runtime.seed": seed, "data.name": "digits-lt",
                     "model.name": "tiny", "loss.name": params.get("loss.name", "ce"),
                     "mix.method": params.get("mix.method", "lfm"), **history[-1],
                     "test_epoch": last, "selection_split": "val" if val else "test",
                     "wall_time_s": 30.0 + i, "train_time_s": 8.0, "gpu_hours": 0.0,
                     "stopped_early": early, "checkpoint_path": ckpt_rel, "node_id": "n0",
                     "experiment": name, "artifacts": f"trials/{trial_id}"})
    for j in range(failed):
        rows.append({"trial_id": f"bad_{j}", "status": "ERROR",
                     "error": "RuntimeError: CUDA out of memory", **dict(zip(keys, combos[0])),
                     "runtime.seed": 99, "data.name": "digits-lt", "model.name": "tiny",
                     "experiment": name})
    pd.DataFrame(rows).to_csv(d / "trials.csv", index=False)
    base = RunConfig(data=DataConfig("digits-lt")).override({"stage1.epochs": E1, "stage2.epochs": E2}).to_dict()
    swept = [*keys, "runtime.seed"] if search == "grid" else keys
    metric = "val_acc_all" if val else "acc_all"
    split = "val" if val else "test"
    (d / "study.json").write_text(json.dumps({
        "name": name, "command": ["python", f"studies/{name}.py", "--seeds",
                                  ",".join(map(str, seeds))],
        "called_by": "studies/run_all.py", "search": search,
        "swept": swept, "grid": grid if search == "grid" else {}, "space": {},
        "variants": variants or {}, "seeds": list(seeds), "metric": metric, "mode": "max",
        "objectives": [], "selection_split": split,
        "selection": (f"selected on {metric} (the validation split)" if val else
                      "selected on acc_all (test): selected on test: this data set has no "
                      "validation split"),
        "scheduler": "none", "sampler": "tpe", "optuna_storage": None,
        "experiments": [name], "storage_path": STORAGE, "base_config": base,
        "layers": {"preset": None, "defaults": {}, "file": {},
                   "fixed": {"mix.method": "lfm", "mix.alpha": 1.0}, "smoke": {},
                   "flags": {"stage1.epochs": E1, "stage2.epochs": E2}, "study": name},
        "machine": {"platform": "Linux-test", "cpus": 2, "cpu_model": "Test CPU 9000",
                    "memory_gib": 24.0, "python": "3.11", "gpus": ["NVIDIA H200"],
                    "cuda": "13.0"},
        "versions": {"lfm-ray": "0.1.0", "git_commit": "abc1234", "ray": "2.60.0",
                     "plotly": "7"}, "started": "2026-01-01 00:00:00", **(meta or {})}))
    return d


def drop_ray_folders(root: Path) -> None:
    """What a results folder looks like once committed or downloaded: no Ray folders."""
    shutil.rmtree(root / STORAGE, ignore_errors=True)
