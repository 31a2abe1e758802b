"""Test-time augmentation (flip, five-crop and its evaluation cache) and LIFT's metrics
(macro-F1, harmonic-mean and worst-class accuracy), each against a direct computation."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lfm_ray.augment import BatchBuilder, five_crops
from lfm_ray.errors import LfmError
from lfm_ray.model import ImageSpec
from lfm_ray.contract import CLASS_KEYS, HMEAN_FLOOR, METRIC_KEYS, VAL_METRIC_KEYS
from lfm_ray.worker.loop import Run, accuracy_summary, fivecrop_size
from lfm_ray.worker.distributed import WorkerInfo
from test_train import small_config

CPU = torch.device("cpu")
SPEC = ImageSpec(size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def normalised(chw_0_255: torch.Tensor, spec: ImageSpec = SPEC) -> torch.Tensor:
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (chw_0_255 / 255.0 - mean) / std


def pillow_resized(images: np.ndarray, size: int) -> torch.Tensor:
    """(B, 3, size, size) float 0..255 of Pillow's bicubic resize of each uint8 image."""
    from PIL import Image

    out = [np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC))
           for im in images]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()


# ---- views ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,size", [((2, 3, 35, 35), 32), ((1, 3, 11, 14), 9), ((1, 3, 8, 8), 8)])
def test_five_crops_are_torchvision_five_crop(shape, size):
    from torchvision.transforms.functional import five_crop

    x = torch.randn(shape)
    for ours, theirs in zip(five_crops(x, size), five_crop(x, [size, size])):
        assert torch.equal(ours, theirs)


def test_fivecrop_views_resize_then_cut_five_crops():
    """LIFT's five-crop evaluation: resize to R, then torchvision's FiveCrop of S."""
    from torchvision.transforms.functional import five_crop

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    build = BatchBuilder(SPEC, CPU)
    views = list(build.views(torch.from_numpy(images), "fivecrop", resize=35))
    expected = five_crop(pillow_resized(images, 35), [32, 32])
    assert len(views) == 5
    for view, crop in zip(views, expected):
        assert torch.allclose(view, normalised(crop), atol=1e-6)
    # Images stored at R already (the evaluation cache) are cropped without a resize.
    stored = pillow_resized(images, 35).permute(0, 2, 3, 1).to(torch.uint8)
    for view, crop in zip(build.views(stored, "fivecrop", resize=35), expected):
        assert torch.allclose(view, normalised(crop), atol=1e-6)
    with pytest.raises(ValueError, match="need resize > 32"):
        list(build.views(stored, "fivecrop", resize=32))


def test_flip_views_are_the_input_and_its_mirror():
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    build = BatchBuilder(SPEC, CPU)
    plain, mirrored = build.views(images, "flip")
    assert torch.equal(plain, build(images))
    assert torch.equal(mirrored, build(images, flips=torch.ones(4, dtype=torch.bool)))
    assert torch.equal(mirrored, plain.flip(-1))
    (only,) = build.views(images, "none")
    assert torch.equal(only, build(images))


def test_fivecrop_size_follows_lift_and_must_exceed_the_input():
    assert fivecrop_size(224, None) == 248      # LIFT: 224 + 24
    assert fivecrop_size(32, None) == 35 and fivecrop_size(336, None) == 372
    assert fivecrop_size(224, 256) == 256
    with pytest.raises(LfmError, match="eval.fivecrop_resize=224 is not larger than the model's "
                                       "input size 224"):
        fivecrop_size(224, 224)


# ---- metrics -------------------------------------------------------------------------------------
def test_lift_metrics_against_sklearn_and_their_definitions():
    from sklearn.metrics import f1_score

    # 5 classes: class 3 has no test images, class 4 is never right, class 1 is predicted
    # for other classes' images too.
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 4, 4])
    y_pred = np.array([0, 0, 1, 2, 1, 1, 2, 1, 2, 1, 0])
    C = 5
    yt, yp = torch.as_tensor(y_true), torch.as_tensor(y_pred)
    total = torch.bincount(yt, minlength=C).double()
    correct = torch.bincount(yt[yt == yp], minlength=C).double()
    predicted = torch.bincount(yp, minlength=C).double()
    groups = {"many": np.array([0]), "medium": np.array([1, 2]), "few": np.array([3, 4])}
    out = accuracy_summary(correct, total, groups, predicted)
    f1 = f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true), zero_division=0)
    assert out["macro_f1"] == pytest.approx(f1)
    accs = [2 / 4, 2 / 2, 2 / 3, 0 / 2]          # the classes with test images
    assert out["acc_worst"] == 0.0
    assert out["acc_hmean"] == pytest.approx(4 / sum(1 / max(a, HMEAN_FLOOR) for a in accs))
    assert 0 < out["acc_hmean"] < 1e-4            # a class at 0 pulls it to about 0
    no_zero = accuracy_summary(correct[:3], total[:3], {"many": np.array([0]),
                                                        "medium": np.array([1, 2]),
                                                        "few": np.array([], dtype=int)})
    assert no_zero["acc_hmean"] == pytest.approx(3 / (2 + 1 + 1.5))  # the plain harmonic mean
    assert np.isnan(no_zero["macro_f1"])           # no prediction counts given
    assert set(CLASS_KEYS) <= set(METRIC_KEYS)
    assert {f"val_{k}" for k in CLASS_KEYS} <= set(VAL_METRIC_KEYS)


# ---- a run's evaluation --------------------------------------------------------------------------
def direct_predictions(run: Run, views_of) -> np.ndarray:
    """argmax of the mean logits over `views_of(uint8 batch)`, computed here."""
    images, _ = run.eval_sets["test"]
    raw = images.gather(torch.arange(len(images)))
    run.model.eval()
    with torch.no_grad():
        logits = [run.model(v) for v in views_of(raw)]
    return (sum(logits) / len(logits)).argmax(1).numpy()


def check_against(out: dict, run: Run, pred: np.ndarray) -> None:
    from sklearn.metrics import f1_score

    labels = run.eval_sets["test"][1].numpy()
    per_class = [float(np.mean(pred[labels == k] == k)) for k in range(run.num_classes)]
    assert out["per_class_acc"] == pytest.approx(per_class, abs=1e-12)
    assert out["acc_all"] == pytest.approx(float(np.mean(pred == labels)))
    assert out["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro",
                                                     labels=np.unique(labels), zero_division=0))
    assert out["acc_worst"] == pytest.approx(min(per_class))
    assert out["acc_hmean"] == pytest.approx(
        len(per_class) / sum(1 / max(a, HMEAN_FLOOR) for a in per_class))


def test_a_run_without_tta_evaluates_the_models_input(tmp_path):
    cfg = small_config(tmp_path).validate()
    run = Run(cfg, WorkerInfo(0, 1, CPU))
    pred = direct_predictions(run, lambda raw: [run.build(raw)])
    check_against(run.evaluate("test"), run, pred)


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror(tmp_path):
    cfg = small_config(tmp_path, **{"eval.tta": "flip"}).validate()
    run = Run(cfg, WorkerInfo(0, 1, CPU))
    pred = direct_predictions(run, lambda raw: [run.build(raw), run.build(raw).flip(-1)])
    check_against(run.evaluate("test"), run, pred)
    raw = run.eval_sets["test"][0].gather(torch.arange(6))
    with torch.no_grad():
        direct = (run.model(run.build(raw)) + run.model(run.build(raw).flip(-1))) / 2
        assert torch.allclose(run.logits(raw), direct, atol=1e-6)


def test_fivecrop_tta_crops_the_evaluation_split_cached_at_the_larger_size(tmp_path, capsys):
    from torchvision.transforms.functional import five_crop

    from lfm_ray.data import build_dataset

    cfg = small_config(tmp_path, **{"eval.tta": "fivecrop"}).validate()
    run = Run(cfg, WorkerInfo(0, 1, CPU))
    note = capsys.readouterr().out
    assert "eval.tta=fivecrop: test images cached at 35 px" in note and "MiB more" in note
    assert run.fivecrop_resize == 35
    # The test split as the cache holds it: digits' 8 × 8 images resized to 35 px as Pillow
    # does, in a cache of their own next to the full one (no second training split).
    images, labels = run.eval_sets["test"]
    raw = images.gather(torch.arange(len(images)))
    digits = build_dataset("digits-lt")
    assert raw.shape == (500, 35, 35, 3)
    expected = pillow_resized(digits.test_images, 35).permute(0, 2, 3, 1).to(torch.uint8)
    assert torch.equal(raw, expected)
    assert np.array_equal(labels.numpy(), digits.test_labels)
    folders = sorted(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert len(folders) == 2
    partial = [f for f in folders if not (f / "train_images.npy").exists()]
    assert len(partial) == 1 and (partial[0] / "test_images.npy").exists()
    # Five crops of 32 px from each, logits averaged, against the evaluation.
    spec = run.spec

    def crops(batch):
        x = batch.permute(0, 3, 1, 2).float()
        return [normalised(c, spec) for c in five_crop(x, [32, 32])]

    pred = direct_predictions(run, crops)
    check_against(run.evaluate("test"), run, pred)


def test_the_new_metrics_reach_every_epochs_report(tmp_path):
    from test_train import fit_local

    result = fit_local(small_config(tmp_path, **{"eval.tta": "flip"}), tmp_path / "ckpt")
    for key in (*CLASS_KEYS, "trained_params_stage1", "trained_params_stage2"):
        assert key in result.metrics, key
    m = result.metrics
    assert 0.0 <= m["macro_f1"] <= 1.0
    # digits-lt's test split is balanced, so acc_all is the mean of the per-class accuracies,
    # which bounds their harmonic mean from above; the worst one bounds it from below.
    assert m["acc_worst"] <= m["acc_hmean"] <= m["acc_all"] + 1e-9


def test_the_report_shows_the_class_metrics_and_parameter_counts(tmp_path):
    from test_analysis import make_study

    from lfm_ray.analysis import write_report

    def accuracy(params, seed):
        light = params["method"] == "LoRA"
        return {"acc_many": 0.8, "acc_medium": 0.6, "acc_few": 0.4 + 0.1 * light,
                "acc_all": 0.6, "macro_f1": 0.5 + 0.1 * light + 0.02 * seed,
                "acc_hmean": 0.3, "acc_worst": 0.1 * light,
                "trained_params_stage1": 1024 if light else 117760,
                "trained_params_stage2": 4096}

    study = make_study(tmp_path, "finetune_modes", {"method": ["full", "LoRA"]}, acc=accuracy)
    page = write_report(study, png=False).read_text()
    table = page[page.index("LIFT's figures"):]
    table = table[:table.index("</table>")]
    cells = re.findall(r"<td>([^<]*)</td>", table)
    # method, macro-F1 (%, mean of seeds 0 and 1), harmonic mean, worst, the two counts
    assert cells == ["full", "51.00", "30.00", "0.00", "117760", "4096",
                     "LoRA", "61.00", "30.00", "10.00", "1024", "4096"]


def test_a_partial_cache_has_its_own_key_and_a_full_one_names_no_splits():
    import hashlib
    import json

    from lfm_ray.data.cache import CACHE_FORMAT, _preprocessing, cache_key

    options = {"imbalance_factor": 10.0, "seed": 0, "test_per_class": 50}
    # A full cache's key names no splits (the splits enter only where some are left out).
    blob = json.dumps([CACHE_FORMAT, "digits-lt", "", _preprocessing(SPEC),
                       sorted({"imbalance_factor": 10, "seed": 0, "test_per_class": 50}.items()),
                       ""], default=str)
    assert cache_key("digits-lt", None, SPEC, options) == \
        hashlib.sha256(blob.encode()).hexdigest()[:16]
    partial = cache_key("digits-lt", None, SPEC, options, ("test",))
    assert partial != cache_key("digits-lt", None, SPEC, options)
    assert partial != cache_key("digits-lt", None, SPEC, options, ("val", "test"))
