"""The training loop in-process (ScalingConfig(num_workers=0)) and one real Ray Train run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lfm_ray.config import RunConfig
from lfm_ray.train import (
    METRIC_KEYS, RESULT_FILE, STATE_FILE, accuracy_summary, load_state, seeded_generator,
    stage_plan, steps_per_epoch,
)


def small_config(tmp_path, **overrides) -> RunConfig:
    cfg = RunConfig().override({
        "stage1.epochs": 1, "stage2.epochs": 1, "runtime.max_steps_per_epoch": 3,
        "runtime.batch_size": 16, "runtime.eval_batch_size": 128,
        "data.cache_dir": str(tmp_path / "cache"), "runtime.threads": 1,
    })
    return cfg.override(overrides)


def fit_local(cfg: RunConfig, checkpoint_dir, **extra):
    """Run the loop in this process through a real TorchTrainer in local mode."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from lfm_ray.train import train_loop_per_worker

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": cfg.to_dict(), "checkpoint_dir": str(checkpoint_dir), **extra},
        scaling_config=ScalingConfig(num_workers=0),
    )
    return trainer.fit()


def test_accuracy_summary_pools_the_group_images():
    correct = torch.tensor([8.0, 1.0, 3.0, 0.0], dtype=torch.float64)
    total = torch.tensor([10.0, 10.0, 5.0, 5.0], dtype=torch.float64)
    groups = {"many": np.array([0]), "medium": np.array([1, 2]), "few": np.array([3])}
    out = accuracy_summary(correct, total, groups)
    assert out["acc_many"] == pytest.approx(0.8)
    assert out["acc_medium"] == pytest.approx(4 / 15)   # pooled, not the mean of 0.1 and 0.6
    assert out["acc_few"] == 0.0
    assert out["acc_all"] == pytest.approx(12 / 30)
    assert out["per_class_acc"] == pytest.approx([0.8, 0.1, 0.6, 0.0])


def test_steps_are_equal_on_every_rank_and_capped():
    cfg = RunConfig().override({"runtime.batch_size": 32})
    assert steps_per_epoch(100, cfg, 1) == (4, 32)
    assert steps_per_epoch(101, cfg, 2) == (4, 16)
    cfg.runtime.max_steps_per_epoch = 2
    assert steps_per_epoch(1000, cfg, 1) == (2, 32)


def test_stage_plan_numbers_epochs_globally():
    cfg = RunConfig().override({"stage1.epochs": 3, "stage2.epochs": 2})
    plan = stage_plan(cfg)
    assert [(s.number, s.first_epoch, s.epochs) for s in plan] == [(1, 1, 3), (2, 4, 2)]


def test_seeded_generators_repeat_and_differ():
    a = torch.rand(4, generator=seeded_generator(0, 1))
    b = torch.rand(4, generator=seeded_generator(0, 1))
    c = torch.rand(4, generator=seeded_generator(0, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_two_stages_report_every_epoch_and_stage_two_freezes_the_encoder(tmp_path):
    cfg = small_config(tmp_path, **{"stage1.epochs": 2, "stage2.epochs": 2})
    result = fit_local(cfg, tmp_path / "ckpt")
    assert set(METRIC_KEYS) <= set(result.metrics)
    assert result.metrics["epoch"] == 4 and result.metrics["stage"] == 2
    states = {e: load_state(tmp_path / "ckpt" / f"epoch_{e:04d}", torch.device("cpu"))
              for e in (1, 2, 3, 4)}
    eye = torch.eye(states[1]["proj"]["weight"].shape[0])
    # Stage 1: the encoder moves, W_I stays the identity.
    assert torch.equal(states[2]["proj"]["weight"], eye)
    moved = [not torch.equal(states[1]["visual"][k], states[2]["visual"][k])
             for k in states[1]["visual"]]
    assert any(moved)
    # Stage 2: the encoder's weights do not change; W_I does.
    for k in states[2]["visual"]:
        assert torch.equal(states[2]["visual"][k], states[4]["visual"][k]), k
    assert not torch.equal(states[3]["proj"]["weight"], states[4]["proj"]["weight"])
    saved = json.loads((tmp_path / "ckpt" / "epoch_0004" / RESULT_FILE).read_text())
    assert len(saved["per_class_acc"]) == 10


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    cfg = small_config(tmp_path, **{"stage1.epochs": 2, "stage2.epochs": 1})
    full = fit_local(cfg, tmp_path / "full")
    first = fit_local(cfg, tmp_path / "part", stop_after_epoch=1)
    assert first.metrics["epoch"] == 1
    resumed = fit_local(cfg, tmp_path / "part", resume_from=str(tmp_path / "part" / "epoch_0001"))
    assert resumed.metrics["epoch"] == 3
    a = load_state(tmp_path / "full" / "epoch_0003", torch.device("cpu"))
    b = load_state(tmp_path / "part" / "epoch_0003", torch.device("cpu"))
    for k in a["visual"]:
        assert torch.allclose(a["visual"][k], b["visual"][k], atol=1e-6), k
    assert torch.allclose(a["proj"]["weight"], b["proj"]["weight"], atol=1e-6)
    for key in ("acc_all", "acc_many", "acc_few", "train_loss"):
        assert resumed.metrics[key] == pytest.approx(full.metrics[key], abs=1e-6)


def test_zero_shot_reports_once_without_training(tmp_path):
    cfg = small_config(tmp_path, **{"runtime.zero_shot": True})
    result = fit_local(cfg, tmp_path / "zs")
    assert result.metrics["epoch"] == 0 and result.metrics["stage"] == 0
    assert 0.0 <= result.metrics["acc_all"] <= 1.0


def test_nan_loss_stops_with_the_epoch_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    import lfm_ray.losses
    from lfm_ray.errors import LfmError

    real_build = lfm_ray.losses.build_loss

    def build_loss_that_fails_in_stage_two(*args, **kwargs):
        loss = real_build(*args, **kwargs)
        calls = {"n": 0}

        def forward(logits, targets):
            calls["n"] += 1
            value = loss(logits, targets)
            return value * float("nan") if calls["n"] > 3 else value  # stage 1 has 3 steps

        return forward

    monkeypatch.setattr(lfm_ray.losses, "build_loss", build_loss_that_fails_in_stage_two)
    cfg = small_config(tmp_path)
    with pytest.raises(LfmError, match=r"epoch 2 \(stage 2\)"):
        fit_local(cfg, tmp_path / "nan")
    assert (tmp_path / "nan" / "epoch_0001" / STATE_FILE).is_file()


def test_pre_resized_cache_gives_the_logits_of_the_batch_resize(tmp_path):
    """The node cache stores small sets at the model's size; a batch from it must match the
    plain path (resize each batch in float) to within uint8 rounding."""
    from lfm_ray.augment import BatchBuilder
    from lfm_ray.data import build_dataset, load_arrays
    from lfm_ray.model import build_classifier, build_clip
    from lfm_ray.config import ModelConfig

    native = build_dataset("digits-lt").test_images[:64]
    cached = load_arrays("digits-lt", image=build_clip("tiny")[1], cache_dir=tmp_path,
                         seed=0).test_images[:64]
    assert native.shape[1:3] == (8, 8) and cached.shape[1:3] == (32, 32)
    torch.manual_seed(0)
    model, spec = build_classifier(ModelConfig(), [str(i) for i in range(10)], 30.0)
    build = BatchBuilder(spec, torch.device("cpu"))
    plain = build(torch.from_numpy(np.ascontiguousarray(native)))
    fast = build(torch.from_numpy(np.ascontiguousarray(cached)))
    step = 1 / 255 / min(spec.std)
    assert (plain - fast).abs().max().item() <= 0.5 * step + 1e-6  # uint8 rounding only
    with torch.no_grad():
        assert torch.allclose(model(plain), model(fast), atol=0.05)
        assert torch.equal(model(plain).argmax(1), model(fast).argmax(1))


def _run_in_process(cfg):
    from lfm_ray.train import Run, WorkerInfo

    return Run(cfg, WorkerInfo(rank=0, world_size=1, device=torch.device("cpu")))


def test_the_runs_loss_is_built_at_the_runs_logit_scale(tmp_path):
    run = _run_in_process(small_config(tmp_path, **{"loss.name": "ldam", "model.logit_scale": 1}))
    assert run.model.logit_scale == 1.0 and run.loss_fn().logit_scale == 1.0
    run.cfg = run.cfg.copy().override({"model.logit_scale": None})  # the loss's default: 30
    assert run.loss_fn().logit_scale == 30.0
    run.cfg = run.cfg.copy().override({"loss.name": "mms", "model.logit_scale": 30})
    assert run.loss_fn().logit_scale == 30.0


def test_concutmix_in_the_trainer_warms_up_per_stage_then_uses_the_semantic_label(tmp_path):
    from lfm_ray.train import prepare_stage, train_epoch

    cfg = small_config(tmp_path, **{"mix.method": "concutmix", "mix.concutmix_prob": 1.0,
                                    "stage1.epochs": 2, "stage2.epochs": 2,
                                    "runtime.max_steps_per_epoch": 2})
    run = _run_in_process(cfg)
    loss_fn = run.loss_fn()
    steps, per_worker = steps_per_epoch(len(run.train_images), cfg, 1)
    seen = []
    for stage in stage_plan(cfg):
        trainable, mixer, opt, sched = prepare_stage(run, stage, steps)
        # digits-lt's row (CIFAR-10-LT's settings) and ConCutMix's own Beta(1, 1)
        assert mixer.settings() == {"method": "concutmix", "beta": 1.0,
                                    "concutmix_omega": 2 / 255, "concutmix_topk": 3,
                                    "concutmix_prob": 1.0, "concutmix_warmup": 0.5}
        real_mix = mixer.mix

        def spy(x_i, y_i, x_j, y_j, gen, similarity_fn=None, _mixer=mixer, _real=real_mix,
                _stage=stage):
            x, t = _real(x_i, y_i, x_j, y_j, gen, similarity_fn=similarity_fn)
            # classes each target names: 2 at most for the area label, more with ŷ_sem (k = 3)
            seen.append((_stage.number, _mixer.epoch_in_stage, _mixer.stage_epochs,
                         int((t > 0).sum(dim=1).max()), similarity_fn is not None))
            return x, t

        mixer.mix = spy
        for epoch in range(stage.first_epoch, stage.first_epoch + stage.epochs):
            train_epoch(run, stage, epoch, mixer, loss_fn, opt, sched, trainable, steps, per_worker)
    assert [s[:3] for s in seen] == [(1, 0, 2)] * 2 + [(1, 1, 2)] * 2 + [(2, 0, 2)] * 2 \
        + [(2, 1, 2)] * 2
    for stage, epoch, _, named, has_similarity in seen:
        assert has_similarity
        assert (named <= 2) if epoch == 0 else (named >= 3), (stage, epoch, named)
