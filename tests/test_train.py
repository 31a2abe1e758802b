"""The training loop in-process (ScalingConfig(num_workers=0)) and one real Ray Train run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lfm_ray.config import DataConfig, RunConfig
from lfm_ray.contract import METRIC_KEYS, RESULT_FILE, STATE_FILE
from lfm_ray.worker.loop import accuracy_summary, stage_plan, steps_per_epoch
from lfm_ray.worker.checkpoint import load_state
from lfm_ray.worker.distributed import seeded_generator


def small_config(tmp_path, **overrides) -> RunConfig:
    cfg = RunConfig(data=DataConfig("digits-lt")).override({
        "stage1.epochs": 1, "stage2.epochs": 1, "runtime.max_steps_per_epoch": 3,
        "runtime.batch_size": 16, "runtime.eval_batch_size": 128,
        "data.cache_dir": str(tmp_path / "cache"), "runtime.threads": 1,
    })
    return cfg.override(overrides)


def fit_local(cfg: RunConfig, checkpoint_dir, **extra):
    """Run the loop in this process through a real TorchTrainer in local mode."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from lfm_ray.worker.loop import train_loop_per_worker

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
    cfg = RunConfig(data=DataConfig("digits-lt")).override({"runtime.batch_size": 32})
    assert steps_per_epoch(100, cfg, 1) == (4, 32)
    assert steps_per_epoch(101, cfg, 2) == (4, 16)
    cfg.runtime.max_steps_per_epoch = 2
    assert steps_per_epoch(1000, cfg, 1) == (2, 32)


def test_stage_plan_numbers_epochs_globally():
    cfg = RunConfig(data=DataConfig("digits-lt")).override({"stage1.epochs": 3, "stage2.epochs": 2})
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
    from lfm_ray import confusion

    cfg = small_config(tmp_path, **{"runtime.zero_shot": True})
    result = fit_local(cfg, tmp_path / "zs")
    assert result.metrics["epoch"] == 0 and result.metrics["stage"] == 0
    assert 0.0 <= result.metrics["acc_all"] <= 1.0 and result.metrics["test_epoch"] == 0
    # The zero-shot confusion matrix (Fig. 7's right half) and P at the stage-1 τ.
    saved = confusion.read(tmp_path / "zs" / "epoch_0000")
    assert saved["epoch"] == 0 and saved["counts"].sum() == 500
    assert np.trace(saved["counts"]) / 500 == pytest.approx(result.metrics["acc_all"])
    assert saved["tau"] == cfg.stage1.tau and saved["sampling_matrix"].shape == (10, 10)


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
    from lfm_ray.worker.loop import Run
    from lfm_ray.worker.distributed import WorkerInfo

    return Run(cfg, WorkerInfo(rank=0, world_size=1, device=torch.device("cpu")))


def test_the_runs_loss_is_built_at_the_runs_logit_scale(tmp_path):
    run = _run_in_process(small_config(tmp_path, **{"loss.name": "ldam", "model.logit_scale": 1}))
    assert run.model.logit_scale == 1.0 and run.loss_fn().logit_scale == 1.0
    run.cfg = run.cfg.copy().override({"model.logit_scale": None})  # the loss's default: 30
    assert run.loss_fn().logit_scale == 30.0
    run.cfg = run.cfg.copy().override({"loss.name": "mms", "model.logit_scale": 30})
    assert run.loss_fn().logit_scale == 30.0


def test_concutmix_in_the_trainer_warms_up_per_stage_then_uses_the_semantic_label(tmp_path):
    from lfm_ray.worker.loop import prepare_stage, train_epoch

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


# ---- selection split and reported split ------------------------------------------------------
def write_folder_with_val(root) -> None:
    """A folder data set with train/, val/ and test/: 3 classes, one per shot group, 8×8 PNGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = {"train": (110, 30, 6), "val": (3, 3, 3), "test": (4, 5, 6)}  # many, medium, few
    for split, counts in sizes.items():
        for k, (cls, n) in enumerate(zip(("cat", "dog", "fox"), counts)):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(50 + 70 * k, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def results_by_epoch(checkpoint_dir, epochs) -> dict[int, dict]:
    return {e: json.loads((checkpoint_dir / f"epoch_{e:04d}" / RESULT_FILE).read_text())
            for e in epochs}


def count_evaluations(monkeypatch) -> list[str]:
    """The splits Run.evaluate is called on, in order (the loop runs in this process)."""
    from lfm_ray.worker.loop import Run

    calls: list[str] = []
    real = Run.evaluate

    def evaluate(self, split, with_confusion=False):
        calls.append(split)
        return real(self, split, with_confusion)

    monkeypatch.setattr(Run, "evaluate", evaluate)
    return calls


def direct_accuracy(cfg: RunConfig, state: dict, split: str):
    """Per-class top-1 and confusion counts of a checkpoint's weights on a split, computed
    here from the node cache and a model rebuilt the way the trainer builds it."""
    from lfm_ray.augment import BatchBuilder, DeviceImages
    from lfm_ray.data import load_arrays, options_for
    from lfm_ray.model import LFMClassifier, build_clip, text_features

    torch.manual_seed(cfg.runtime.seed)
    clip, spec = build_clip(cfg.model.name)
    arrays = load_arrays(cfg.data.name, root=cfg.data.root, image=spec,
                         cache_dir=cfg.data.cache_dir,
                         **options_for(cfg.data.name, seed=cfg.data.seed))
    model = LFMClassifier(clip.visual, text_features(clip, arrays.class_names,
                                                     cfg.model.templates), cfg.logit_scale)
    model.visual.load_state_dict(state["visual"])
    model.proj.load_state_dict(state["proj"])
    model.eval()
    images, labels = arrays.split(split)
    store = DeviceImages(images, torch.device("cpu"))
    with torch.no_grad():
        pred = model(BatchBuilder(spec, torch.device("cpu"))(
            store.gather(torch.arange(len(images))))).argmax(1).numpy()
    C = len(arrays.class_names)
    counts = np.zeros((C, C), dtype=np.int64)
    for y, p in zip(np.asarray(labels), pred):
        counts[y, p] += 1
    per_class = [counts[k, k] / counts[k].sum() for k in range(C)]
    return per_class, counts, text_features(clip, arrays.class_names, cfg.model.templates)


def test_selection_on_val_every_epoch_and_test_at_the_end_of_each_stage(tmp_path, monkeypatch):
    from lfm_ray import confusion
    from lfm_ray.mixing import local_sampling_matrix
    from lfm_ray.contract import VAL_METRIC_KEYS, metric_keys

    write_folder_with_val(tmp_path / "data")
    cfg = small_config(tmp_path, **{"data.name": "folder", "data.root": str(tmp_path / "data"),
                                    "stage1.epochs": 2, "stage2.epochs": 2,
                                    "runtime.batch_size": 8})
    calls = count_evaluations(monkeypatch)
    result = fit_local(cfg, tmp_path / "ckpt")
    # val every epoch (4), test at the end of stage 1 and of the run (2), nothing else.
    assert sorted(calls) == ["test"] * 2 + ["val"] * 4
    saved = results_by_epoch(tmp_path / "ckpt", range(1, 5))
    keys = set(metric_keys("val"))
    for e, r in saved.items():
        assert keys <= set(r) and r["selection_split"] == "val" and r["epoch"] == e
        assert all(0.0 <= r[k] <= 1.0 for k in VAL_METRIC_KEYS)
    assert saved[1]["test_epoch"] is None and math.isnan(saved[1]["acc_all"])
    assert saved[2]["test_epoch"] == 2 and saved[3]["test_epoch"] == 2
    assert saved[4]["test_epoch"] == 4
    for k in ("acc_many", "acc_medium", "acc_few", "acc_all", "per_class_acc"):
        assert saved[3][k] == saved[2][k]  # carried through stage 2 until it ends
    assert keys <= set(result.metrics) and result.metrics["test_epoch"] == 4
    # acc_* are test's, val_acc_* val's: recomputed here from the final weights.
    state = load_state(tmp_path / "ckpt" / "epoch_0004", torch.device("cpu"))
    test_acc, test_counts, feats = direct_accuracy(cfg, state, "test")
    val_acc, _, _ = direct_accuracy(cfg, state, "val")
    assert saved[4]["per_class_acc"] == pytest.approx(test_acc, abs=1e-12)
    assert saved[4]["val_per_class_acc"] == pytest.approx(val_acc, abs=1e-12)
    assert saved[4]["acc_all"] == pytest.approx(np.trace(test_counts) / test_counts.sum())
    # confusion.npz: the test counts of test_epoch, and P at the stage-1 τ.
    saved_confusion = confusion.read(tmp_path / "ckpt" / "epoch_0004")
    assert np.array_equal(saved_confusion["counts"], test_counts)
    assert saved_confusion["epoch"] == 4 and saved_confusion["split"] == "test"
    assert saved_confusion["class_names"] == ["cat", "dog", "fox"]
    assert np.allclose(saved_confusion["sampling_matrix"],
                       local_sampling_matrix(feats, cfg.stage1.tau).numpy(), atol=1e-6)
    assert confusion.read(tmp_path / "ckpt" / "epoch_0003")["epoch"] == 2
    assert not (tmp_path / "ckpt" / "epoch_0001" / confusion.CONFUSION_FILE).exists()


def test_selection_on_test_evaluates_test_once_every_epoch(tmp_path, monkeypatch):
    from lfm_ray.contract import VAL_METRIC_KEYS

    from lfm_ray import confusion

    cfg = small_config(tmp_path, **{"stage1.epochs": 2, "stage2.epochs": 1,
                                    "runtime.save_confusion": False})
    calls = count_evaluations(monkeypatch)
    fit_local(cfg, tmp_path / "ckpt")
    assert calls == ["test"] * 3
    assert not list((tmp_path / "ckpt").rglob(confusion.CONFUSION_FILE))  # not asked for
    for e, r in results_by_epoch(tmp_path / "ckpt", range(1, 4)).items():
        assert r["selection_split"] == "test" and r["test_epoch"] == e
        assert not set(VAL_METRIC_KEYS) & set(r) and "val_per_class_acc" not in r
        assert 0.0 <= r["acc_all"] <= 1.0


def test_confusion_is_kept_up_to_1000_classes_unless_asked():
    from lfm_ray import confusion

    assert confusion.wanted(None, 1000) and not confusion.wanted(None, 1001)
    assert confusion.wanted(True, 8142) and not confusion.wanted(False, 10)
    counts = torch.zeros((3, 3), dtype=torch.float64)
    confusion.add_counts(counts, torch.tensor([0, 0, 2, 1, 0]), torch.tensor([0, 2, 2, 0, 0]))
    assert counts.tolist() == [[2, 0, 1], [1, 0, 0], [0, 0, 1]]


def test_resolving_the_selection_split():
    from lfm_ray.errors import LfmError
    from lfm_ray.contract import resolve_selection_split, selection_metric

    assert resolve_selection_split("auto", True, "places-lt") == "val"
    assert resolve_selection_split("auto", False, "digits-lt") == "test"
    assert resolve_selection_split("test", True, "places-lt") == "test"
    with pytest.raises(LfmError, match="'digits-lt' has no validation split"):
        resolve_selection_split("val", False, "digits-lt")
    assert selection_metric("acc_few", "val") == "val_acc_few"
    assert selection_metric("acc_few", "test") == "acc_few"
    assert selection_metric("train_loss", "val") == "train_loss"


def test_val_on_a_data_set_without_one_fails_in_the_driver_before_ray(tmp_path, monkeypatch):
    import lfm_ray.driver.launch
    from lfm_ray.errors import LfmError

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(lfm_ray.driver.launch, "init_ray", no_ray)
    cfg = small_config(tmp_path, **{"data.selection_split": "val"})
    with pytest.raises(LfmError, match="data.selection_split='val', but data set 'digits-lt' "
                                       "has no validation split"):
        lfm_ray.driver.launch.fit_run(cfg, tmp_path / "out")


# ---- stage 2 from a shared stage 1 -----------------------------------------------------------
TIMING = ("train_time_s", "train_time_total_s", "node_id")


def without(record: dict, keys=TIMING + ("stage1_from",)) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


def test_branches_start_from_the_shared_stage_1_and_equal_a_full_run(tmp_path, monkeypatch):
    import copy

    import lfm_ray.worker.loop

    base = small_config(tmp_path, **{"stage1.epochs": 2, "stage2.epochs": 2})
    # The shared stage 1: its own stage 2 (τ = 1) never runs.
    shared = fit_local(base.copy().override({"stage2.tau": 1.0}), tmp_path / "s1",
                       stop_after_stage1=True)
    assert shared.metrics["epoch"] == 2 and shared.metrics["test_epoch"] == 2
    assert not (tmp_path / "s1" / "epoch_0003").exists()
    stage1_ckpt = str(tmp_path / "s1" / "epoch_0002")

    starts: dict[str, dict] = {}
    now = {"run": ""}
    real_prepare = lfm_ray.worker.loop.prepare_stage

    def recording_prepare(run, stage, steps):
        if stage.number == 2:  # the weights stage 2 starts from
            starts[now["run"]] = copy.deepcopy(run.model.state_dict())
        return real_prepare(run, stage, steps)

    monkeypatch.setattr(lfm_ray.worker.loop, "prepare_stage", recording_prepare)
    runs = {}
    for name, tau, extra in (("a", 0.05, {"stage1_from": stage1_ckpt}),
                             ("b", 0.5, {"stage1_from": stage1_ckpt}),
                             ("full", 0.05, {})):
        now["run"] = name
        runs[name] = fit_local(base.copy().override({"stage2.tau": tau}), tmp_path / name,
                               **extra)
    # Both branches, and the full run, start stage 2 from the identical weights.
    for name in ("b", "full"):
        assert starts[name].keys() == starts["a"].keys()
        for k in starts["a"]:
            assert torch.equal(starts[name][k], starts["a"][k]), (name, k)
    stage1_state = load_state(stage1_ckpt, torch.device("cpu"))
    for k, v in stage1_state["visual"].items():
        assert torch.equal(starts["a"][f"visual.{k}"], v), k
    # The branch with the full run's config: the same weights, history and final metrics.
    a = load_state(tmp_path / "a" / "epoch_0004", torch.device("cpu"))
    full = load_state(tmp_path / "full" / "epoch_0004", torch.device("cpu"))
    for part in ("visual", "proj"):
        for k in full[part]:
            assert torch.equal(a[part][k], full[part][k]), (part, k)
    history_a = json.loads((tmp_path / "a" / "epoch_0004" / "history.json").read_text())
    history_full = json.loads((tmp_path / "full" / "epoch_0004" / "history.json").read_text())
    assert [h["epoch"] for h in history_a] == [1, 2, 3, 4]
    assert [without(h) for h in history_a] == [without(h) for h in history_full]
    final_a, final_full = results_by_epoch(tmp_path / "a", [4])[4], \
        results_by_epoch(tmp_path / "full", [4])[4]
    assert without(final_a) == without(final_full)
    assert final_a["stage1_from"] == stage1_ckpt and "stage1_from" not in final_full
    assert without(runs["a"].metrics, TIMING + ("time_total_s", "timestamp", "time_this_iter_s")) \
        == without(runs["full"].metrics, TIMING + ("time_total_s", "timestamp",
                                                   "time_this_iter_s"))
    # The branch trained stage 2 only; the other τ gives another stage 2.
    assert not (tmp_path / "a" / "epoch_0002").exists()
    b = load_state(tmp_path / "b" / "epoch_0004", torch.device("cpu"))
    assert not torch.equal(a["proj"]["weight"], b["proj"]["weight"])


def test_a_branch_refuses_a_stage_1_that_is_not_its_own(tmp_path):
    from lfm_ray.errors import LfmError
    from lfm_ray.worker.checkpoint import load_stage1
    from lfm_ray.stage1 import stage1_key

    base = small_config(tmp_path, **{"stage1.epochs": 1, "stage2.epochs": 1})
    fit_local(base, tmp_path / "full")
    other = base.copy().override({"stage1.lr": 1e-4})
    with pytest.raises(LfmError) as info:
        fit_local(other, tmp_path / "x", stage1_from=str(tmp_path / "full" / "epoch_0001"))
    message = str(info.value)
    assert stage1_key(base) in message and stage1_key(other) in message
    assert "stage1.lr" in message
    with pytest.raises(LfmError, match=r"holds epoch 2 \(stage 2\); a branch needs"):
        load_stage1(base, tmp_path / "full" / "epoch_0002")
    with pytest.raises(LfmError, match="holds no state.pt"):
        load_stage1(base, tmp_path)
    assert load_stage1(base, tmp_path / "full" / "epoch_0001")["epoch"] == 1
    # A study's storage path may be a URI (s3://, gs://): read through a Ray checkpoint.
    uri = (tmp_path / "full" / "epoch_0001").as_uri()
    assert load_stage1(base, uri)["stage1_key"] == stage1_key(base)
    with pytest.raises(LfmError, match="stage-1 key"):
        load_stage1(other, uri)


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    from lfm_ray.driver.launch import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_lfm_ray_train_files_for_a_shared_stage_1_and_its_branch(tmp_path, ray_instance):
    """fit_run (what `lfm-ray train` runs): a stage-1-only run, then a branch from its final
    checkpoint; metrics.json, history.csv, confusion.npz and the table use the new names."""
    import csv

    from lfm_ray import confusion
    from lfm_ray.commands.train import format_table
    from lfm_ray.driver.launch import fit_run
    from lfm_ray.stage1 import stage1_key

    # Ray Train's local mode (no worker group): the files are what is tested here.
    base = small_config(tmp_path, **{"stage1.epochs": 2, "stage2.epochs": 2,
                                     "runtime.num_workers": 0})
    first = fit_run(base, tmp_path / "s1", stop_after_stage1=True)
    assert first["epoch"] == 2 and first["test_epoch"] == 2 and first["stage"] == 1
    branch_cfg = base.copy().override({"stage2.alpha": 0.5})
    final = fit_run(branch_cfg, tmp_path / "branch", stage1_from=first["checkpoint_path"])
    saved = json.loads((tmp_path / "branch" / "metrics.json").read_text())
    assert saved["epoch"] == 4 and saved["test_epoch"] == 4 and saved["selection_split"] == "test"
    assert saved["stage1_from"] == str(Path(first["checkpoint_path"]).resolve())
    assert saved["stage1_key"] == stage1_key(base) == stage1_key(branch_cfg)
    assert len(saved["per_class_acc"]) == 10 and 0.0 <= saved["acc_all"] <= 1.0
    assert saved["acc_all"] == final["acc_all"]
    rows = list(csv.DictReader((tmp_path / "branch" / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]  # stage 1's epochs from the shared run
    assert [int(r["test_epoch"]) for r in rows] == [1, 2, 3, 4]  # selected on test: every epoch
    stage1_rows = list(csv.DictReader((tmp_path / "s1" / "history.csv").open()))
    for ours, theirs in zip(rows[:2], stage1_rows):
        assert ours["acc_all"] == theirs["acc_all"] and ours["train_loss"] == theirs["train_loss"]
    counts = confusion.read(tmp_path / "branch")
    assert counts["epoch"] == 4 and counts["counts"].sum() == 500  # digits-lt's test images
    assert np.trace(counts["counts"]) / 500 == pytest.approx(saved["acc_all"])
    table = format_table(saved)
    assert "selected on test" in table and f"{100 * saved['acc_all']:6.2f}%" in table
    from lfm_ray.errors import LfmError

    with pytest.raises(LfmError, match="stage-1 key"):
        fit_run(base.copy().override({"runtime.seed": 1}), tmp_path / "x",
                stage1_from=first["checkpoint_path"])


# ---- gradient accumulation ------------------------------------------------------------------------
def one_step_gradients(tmp_path, stage_number: int, **overrides):
    """(loss, {name: gradient}) of one optimiser step of the trainer's epoch loop, from the
    same initial weights (the run's seed), captured as the optimiser gets them."""
    from lfm_ray.worker.loop import Run, prepare_stage, train_epoch
    from lfm_ray.worker.distributed import WorkerInfo

    cfg = small_config(tmp_path, **overrides).validate()
    run = Run(cfg, WorkerInfo(rank=0, world_size=1, device=torch.device("cpu")))
    stage = stage_plan(cfg)[stage_number - 1]
    trainable, mixer, opt, sched = prepare_stage(run, stage, 1)
    grads: dict[str, torch.Tensor] = {}

    def before_step(optimizer, args, kwargs):
        grads.update({n: p.grad.clone() for n, p in run.model.named_parameters()
                      if p.grad is not None})

    opt.register_step_pre_hook(before_step)
    calls = {"mix": 0}
    real_mix = mixer.mix

    def mix(*args, **kwargs):
        calls["mix"] += 1
        return real_mix(*args, **kwargs)

    mixer.mix = mix
    loss = train_epoch(run, stage, stage.first_epoch, mixer, run.loss_fn(), opt, sched,
                       trainable, steps=1, per_worker=cfg.runtime.batch_size)
    return loss, grads, calls["mix"]


@pytest.mark.parametrize("stage_number", [1, 2])
def test_accumulation_gives_the_gradient_of_one_big_batch_without_mixing(tmp_path, stage_number):
    base = {"mix.method": "none", "runtime.batch_size": 16, "stage1.epochs": 1}
    loss_1, grads_1, mixes_1 = one_step_gradients(tmp_path, stage_number, **base)
    loss_4, grads_4, mixes_4 = one_step_gradients(tmp_path, stage_number,
                                                  **base, **{"runtime.accumulate": 4})
    assert (mixes_1, mixes_4) == (1, 4)  # one draw per micro-batch
    assert loss_4 == pytest.approx(loss_1, rel=1e-5)
    assert grads_1.keys() == grads_4.keys() and grads_1
    for name, g in grads_1.items():
        scale = float(g.abs().max()) + 1e-12
        assert torch.allclose(grads_4[name], g, atol=1e-5 * scale, rtol=1e-4), name


def test_accumulation_with_mixing_draws_per_micro_batch_and_still_trains(tmp_path):
    loss, grads, mixes = one_step_gradients(tmp_path, 1, **{"mix.method": "lfm",
                                                           "runtime.batch_size": 16,
                                                           "runtime.accumulate": 2})
    assert mixes == 2 and math.isfinite(loss) and grads


def test_accumulation_must_split_the_batch_evenly():
    from lfm_ray.errors import LfmError

    with pytest.raises(LfmError, match=r"runtime.batch_size=16 is not valid; expected a "
                                       r"multiple of num_workers × accumulate = 3"):
        RunConfig(data=DataConfig("digits-lt")).override({"runtime.batch_size": 16, "runtime.accumulate": 3}).validate()
    with pytest.raises(LfmError, match="runtime.accumulate=0 is not valid"):
        RunConfig(data=DataConfig("digits-lt")).override({"runtime.accumulate": 0}).validate()
    RunConfig(data=DataConfig("digits-lt")).override({"runtime.batch_size": 96, "runtime.num_workers": 3,
                          "runtime.accumulate": 4}).validate()
