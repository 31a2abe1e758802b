"""`lfm-ray train --extend` trains the added epochs on a schedule config.json describes
exactly: a new cosine segment from the stage's lr to its min_lr over the added epochs (the
trained epochs keep theirs), resumed mid-segment where a run stops."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from lfm_ray.cli import main
from lfm_ray.config import RunConfig


STEPS = 2  # runtime.max_steps_per_epoch


def flags(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--output", str(out), "--num-workers", "0", "--stage1.epochs", "2",
            "--stage2.epochs", "1", "--runtime.max_steps_per_epoch", str(STEPS),
            "--stage2.lr", "0.01", "--stage2.min_lr", "0.0001",
            "--data.cache_dir", str(tmp_path / "cache"), *extra]


def lrs(out: Path) -> dict[int, float]:
    return {int(r["epoch"]): float(r["lr"]) for r in csv.DictReader((out / "history.csv").open())}


def cosine(t: int, total: int, start: float = 0.01, end: float = 0.0001) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * t / total)) / 2


def test_segments_follow_the_recorded_extensions():
    from lfm_ray.driver.rerun import schedule_segments

    cfg = RunConfig().override({"stage1.epochs": 2, "stage2.epochs": 5})
    assert schedule_segments(cfg, []) == {}
    once = [{"changed": {"stage2.epochs": [1, 3]}}]
    assert schedule_segments(cfg.copy().override({"stage2.epochs": 3}), once) == {2: [1, 2]}
    twice = once + [{"changed": {"stage2.epochs": [3, 5]}}]
    assert schedule_segments(cfg, twice) == {2: [1, 2, 2]}
    # A stage 2 added to a run that had none is a stage of its own: one segment.
    added = [{"changed": {"stage2.epochs": [0, 5]}}]
    assert schedule_segments(cfg, added) == {}
    grown = [{"changed": {"stage1.epochs": [1, 2]}}]
    assert schedule_segments(cfg.copy().override({"stage2.epochs": 0}), grown) == {1: [1, 1]}


def test_an_extension_runs_a_new_cosine_segment_recorded_in_config_json(tmp_path, capsys,
                                                                        local_ray):
    """The reported case: 2+1 epochs extended to 2+3. Stage 2's rate reached its minimum at
    the end of epoch 3; the two added epochs run a cosine of their own from stage2.lr to
    stage2.min_lr (not a jump to 7.5e-3 on a curve config.json does not describe)."""
    out = tmp_path / "run"
    assert main(flags(tmp_path, out)) == 0
    assert lrs(out)[3] == pytest.approx(0.0001)
    assert main(flags(tmp_path, out, "--stage2.epochs", "3", "--extend")) == 0
    err = capsys.readouterr().err
    assert "a new cosine segment" in err
    got = lrs(out)
    assert got[3] == pytest.approx(0.0001)                      # the first segment's end
    assert got[4] == pytest.approx(cosine(STEPS, 2 * STEPS))     # halfway down the new one
    assert got[5] == pytest.approx(0.0001)                      # the new segment's end
    record = json.loads((out / "config.json").read_text())["extensions"]
    assert record == [{"changed": {"stage2.epochs": [1, 3]},
                       "schedule": {"stage": "stage2", "epochs": [4, 5], "lr": 0.01,
                                    "min_lr": 0.0001,
                                    "rule": "a new cosine segment from stage2.lr to "
                                            "stage2.min_lr over the added epochs"}}]


def test_a_run_stopped_mid_segment_resumes_on_it(tmp_path, local_ray):
    from test_train import fit_local

    cfg = RunConfig().override({"stage1.epochs": 1, "stage2.epochs": 5, "stage2.lr": 0.01,
                                "stage2.min_lr": 0.0001, "runtime.max_steps_per_epoch": STEPS,
                                "data.cache_dir": str(tmp_path / "cache")})
    segments = {"schedule_segments": {"2": [1, 4]}}
    whole = fit_local(cfg, tmp_path / "whole", **segments)
    fit_local(cfg, tmp_path / "part", stop_after_epoch=3, **segments)
    resumed = fit_local(cfg, tmp_path / "part2", resume_from=str(tmp_path / "part" /
                                                                  "epoch_0003"), **segments)

    def history(result) -> list[tuple[int, float, float]]:
        with result.checkpoint.as_directory() as d:
            rows = json.loads((Path(d) / "history.json").read_text())
        return [(r["epoch"], r["lr"], r["train_loss"]) for r in rows]

    full = history(whole)
    assert [e for e, _, _ in full] == [1, 2, 3, 4, 5, 6]
    assert full[1][1] == pytest.approx(0.0001)                # segment 1: one epoch
    assert full[2][1] == pytest.approx(cosine(STEPS, 4 * STEPS))
    assert full[5][1] == pytest.approx(0.0001)
    again = history(resumed)
    assert [e for e, _, _ in again] == [e for e, _, _ in full]
    for (_, lr, loss), (_, lr_full, loss_full) in zip(again, full):
        assert lr == pytest.approx(lr_full) and loss == pytest.approx(loss_full)
