"""stage1_key: every field stage 1 depends on changes it, stage-2 and placement fields do not."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from lfm_ray.config import DataConfig, RunConfig, SECTIONS
from lfm_ray.stage1 import NOT_STAGE1, stage1_fields, stage1_key

ROOT = Path(__file__).resolve().parents[1]


def changed(value, kind: str):
    """Another valid-typed value than `value` for a field of type `kind`."""
    if value is None:
        if "bool" in kind:
            return True
        if "int" in kind:
            return 3
        if "float" in kind:
            return 2.5
        return "other"
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.5
    if isinstance(value, list):
        return value + ["another {}."]
    return value + "-other"


def every_field() -> list[tuple[str, str]]:
    return [(f"{section}.{f.name}", str(f.type)) for section, cls in SECTIONS.items()
            for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("dotted,kind", every_field())
def test_a_field_changes_the_key_exactly_when_stage_1_depends_on_it(dotted, kind):
    base = RunConfig(data=DataConfig("digits-lt"))
    other = RunConfig(data=DataConfig("digits-lt"))
    other.set(dotted, changed(base.get(dotted), kind))
    assert other.get(dotted) != base.get(dotted)
    # (runtime.num_workers goes 1 -> 2 ranks, runtime.gpus_per_worker 0 -> 0.5: CPU to GPU.)
    if not dotted.startswith("stage2.") and dotted not in NOT_STAGE1:
        assert stage1_key(other) != stage1_key(base), dotted
    else:
        assert stage1_key(other) == stage1_key(base), dotted


def test_stage_2_fields_keep_the_key_and_stage_1_fields_change_it():
    base = RunConfig(data=DataConfig("digits-lt"))
    same = RunConfig(data=DataConfig("digits-lt")).override({"stage2.tau": 1.25, "stage2.alpha": 2.0, "stage2.lr": 0.5,
                                 "stage2.epochs": 30, "stage2.beta": 1.0,
                                 "stage2.min_lr": 0.0, "runtime.eval_batch_size": 7,
                                 "data.cache_dir": "/elsewhere", "runtime.threads": 3})
    assert stage1_key(same) == stage1_key(base)
    for dotted, value in {"stage1.tau": 1.25, "mix.alpha": 2.0, "runtime.seed": 1,
                          "runtime.batch_size": 64, "runtime.max_steps_per_epoch": 5,
                          "data.imbalance_factor": 50, "model.name": "ViT-B-32",
                          "loss.name": "mms", "mix.method": "mixup",
                          "data.selection_split": "test"}.items():
        assert stage1_key(RunConfig(data=DataConfig("digits-lt")).override({dotted: value})) != stage1_key(base), dotted


def test_world_size_and_device_kind_are_what_count():
    def key(**runtime) -> str:
        return stage1_key(RunConfig(data=DataConfig("digits-lt")).override({f"runtime.{k}": v for k, v in runtime.items()}))

    assert key(num_workers=0) == key(num_workers=1)  # local mode and one worker: one rank
    assert key(num_workers=2) != key(num_workers=1)  # DDP ranks draw their own batches
    assert key(gpus_per_worker=0.25) == key(gpus_per_worker=1.0)
    assert key(gpus_per_worker=0.25) != key(gpus_per_worker=0.0)
    assert stage1_fields(RunConfig(data=DataConfig("digits-lt")))["runtime.num_workers"] == 1


def test_the_key_is_stable_across_round_trips_and_processes():
    cfg = RunConfig(data=DataConfig("digits-lt")).override({"mix.tau": 0.25, "stage1.epochs": 3})
    key = stage1_key(cfg)
    assert len(key) == 16 and stage1_key(RunConfig.from_dict(cfg.to_dict())) == key
    code = ("from lfm_ray.config import DataConfig, RunConfig; "
            "from lfm_ray.stage1 import stage1_key; "
            "print(stage1_key(RunConfig(data=DataConfig('digits-lt'))"
            ".override({'mix.tau': 0.25, 'stage1.epochs': 3})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "123"}, check=True)
    assert out.stdout.strip() == key
