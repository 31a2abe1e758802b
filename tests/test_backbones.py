"""Vision-only timm backbones: names, weights (cache first, never downloaded here), timm's
preprocessing as an ImageSpec, the linear head, both stages with LFM, and what is refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import lfm_ray.model
import lfm_ray.weights
from lfm_ray.backbones import (
    LinearClassifier, build_backbone, build_timm, check_family, check_timm_name, model_family,
    timm_image_spec,
)
from lfm_ray.config import DataConfig, ModelConfig, RunConfig
from lfm_ray.errors import LfmError
from lfm_ray.model import ImageSpec

from test_model import never_probe, stage_in_hub_cache  # noqa: E402,F401  (conftest.py; a fixture)

TIMM_TEST = "timm:test_vit"   # timm's own tiny test ViT (random init here), at 32 px in runs


@pytest.fixture
def no_network(monkeypatch):
    monkeypatch.setattr(lfm_ray.weights, "hub_reachable", lambda timeout_s=3.0: False)


def test_families_and_names():
    assert model_family("timm:resnet50") == "timm" and model_family("ViT-B-32") == "clip"
    assert model_family("tiny") == "clip"
    check_timm_name("timm:resnet50")
    check_timm_name("timm:test_vit", "r160_in1k")
    with pytest.raises(LfmError, match="names weights in the architecture; give the tag as the "
                                       "pretrained value: --model timm:resnet50 --pretrained a1_in1k"):
        check_timm_name("timm:resnet50.a1_in1k")
    with pytest.raises(LfmError, match="unknown timm model 'timm:resnet5O'; did you mean "
                                       "timm:resnet50"):
        check_timm_name("timm:resnet5O")
    with pytest.raises(LfmError, match="unknown pretrained tag 'imagenet' for timm:test_vit; "
                                       "timm's tags of test_vit: r160_in1k"):
        check_timm_name("timm:test_vit", "imagenet")
    with pytest.raises(LfmError, match="weights file '/no/such.pth' for timm:test_vit does not exist"):
        check_timm_name("timm:test_vit", "/no/such.pth")
    with pytest.raises(LfmError, match="names no timm architecture"):
        check_timm_name("timm:")


# ---- preprocessing ---------------------------------------------------------------------------
def test_image_spec_is_timms_data_config():
    import timm
    from timm.data import resolve_model_data_config

    for arch in ("test_vit", "test_resnet"):
        model = timm.create_model(arch, pretrained=False, num_classes=0)
        cfg = resolve_model_data_config(model)
        spec = timm_image_spec(model, f"timm:{arch}")
        assert spec == ImageSpec(cfg["input_size"][1], tuple(cfg["mean"]), tuple(cfg["std"]),
                                 resize_mode="shortest", interpolation=cfg["interpolation"])
        assert timm_image_spec(model, arch, image_size=48).size == 48
    assert spec.interpolation == "bilinear"  # test_resnet's
    squash = timm.create_model("test_resnet", pretrained=False, num_classes=0,
                               pretrained_cfg_overlay={"crop_mode": "squash"})
    assert timm_image_spec(squash, "sq").resize_mode == "squash"
    border = timm.create_model("test_resnet", pretrained=False, num_classes=0,
                               pretrained_cfg_overlay={"crop_mode": "border"})
    with pytest.raises(LfmError, match="timm's crop mode 'border' is not supported"):
        timm_image_spec(border, "timm:test_resnet")
    nearest = timm.create_model("test_resnet", pretrained=False, num_classes=0,
                                pretrained_cfg_overlay={"interpolation": "nearest"})
    with pytest.raises(LfmError, match="asks for 'nearest' interpolation"):
        timm_image_spec(nearest, "timm:test_resnet")


@pytest.mark.parametrize("arch", ["test_vit", "test_resnet"])
def test_cached_images_are_timms_eval_transform_at_crop_pct_one(tmp_path, arch):
    """The node cache and batch builder give what timm's own eval transform gives (with
    crop_pct 1: lfm-ray resizes the short side to S, as CLIP's preprocessing)."""
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    from lfm_ray.augment import BatchBuilder
    from lfm_ray.data.preprocess import preprocess_file

    rng = np.random.default_rng(0)
    path = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 256, size=(37, 61, 3), dtype=np.uint8)).save(path)
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    spec = timm_image_spec(model, arch, image_size=24)
    cfg = {**resolve_model_data_config(model), "input_size": (3, 24, 24), "crop_pct": 1.0}
    theirs = create_transform(**cfg, is_training=False)(Image.open(path).convert("RGB"))
    ours = BatchBuilder(spec, torch.device("cpu"))(
        torch.from_numpy(preprocess_file(str(path), spec).copy())[None])[0]
    assert ours.shape == theirs.shape == (3, 24, 24)
    assert torch.allclose(ours, theirs, atol=1e-5)


# ---- weights -----------------------------------------------------------------------------------
def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_random_init_follows_the_seed_and_the_input_size():
    torch.manual_seed(0)
    a, spec = build_timm(TIMM_TEST, image_size=32)
    torch.manual_seed(0)
    b, _ = build_timm(TIMM_TEST, image_size=32)
    for k, v in _state(a).items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert spec.size == 32 and not a.training
    assert a(torch.zeros(2, 3, 32, 32)).shape == (2, a.num_features)


def test_a_weights_file_loads_and_a_foreign_one_is_refused(tmp_path):
    import timm

    torch.manual_seed(1)
    source = timm.create_model("test_vit", pretrained=False)  # with its 1000-class head
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    loaded, _ = build_timm(TIMM_TEST, str(tmp_path / "vit.pth"))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, source.state_dict()[k]), k
    other = timm.create_model("test_resnet", pretrained=False)
    torch.save(other.state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(LfmError, match="resnet.pth' does not fit timm:test_vit: it lacks 78 "):
        build_timm(TIMM_TEST, str(tmp_path / "resnet.pth"))
    bigger = {**source.state_dict(), "blocks.9.norm1.weight": torch.ones(64)}
    torch.save(bigger, tmp_path / "bigger.pth")
    with pytest.raises(LfmError, match="bigger.pth' does not fit timm:test_vit: it holds 1 "
                                       r"parameters it has not \(first: blocks\.9\.norm1\.weight\)"):
        build_timm(TIMM_TEST, str(tmp_path / "bigger.pth"))
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("blocks.1.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(LfmError, match="partial.pth' does not fit timm:test_vit: it lacks"):
        build_timm(TIMM_TEST, str(tmp_path / "partial.pth"))


def test_a_timm_tag_loads_from_the_hub_cache_without_network(tmp_path, never_probe):
    import timm
    from safetensors.torch import save

    torch.manual_seed(2)
    source = timm.create_model("test_vit", pretrained=False)
    stage_in_hub_cache(tmp_path, "timm/test_vit.r160_in1k",
                       {"model.safetensors": save(source.state_dict())})
    loaded, spec = build_timm(TIMM_TEST, "r160_in1k", cache_dir=str(tmp_path))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, source.state_dict()[k]), k
    assert spec.size == 160


def test_missing_hub_weights_offline_are_one_error(tmp_path, no_network):
    from lfm_ray.backbones import check_backbone_weights

    cfg = ModelConfig(name=TIMM_TEST, pretrained="r160_in1k", cache_dir=str(tmp_path))
    message = ("the weights of timm:test_vit/r160_in1k are not cached and the Hugging Face hub "
               "cannot be reached; timm looks for model.safetensors or pytorch_model.bin of "
               "the hub repository timm/test_vit.r160_in1k")
    with pytest.raises(LfmError, match=message):
        check_backbone_weights(cfg)
    with pytest.raises(LfmError, match=message):
        build_backbone(cfg)


def test_build_backbone_keeps_open_clip_models_as_they_were():
    clip, spec = build_backbone(ModelConfig(name="tiny"))
    assert hasattr(clip, "encode_text") and spec.size == 32


# ---- the linear head ---------------------------------------------------------------------------
def test_linear_head_logits_stages_and_fresh_head():
    torch.manual_seed(0)
    backbone = torch.nn.Linear(6, 4)
    model = LinearClassifier(backbone, 4, 3, logit_scale=2.5)
    x = torch.randn(5, 6)
    f = backbone(x)
    expected = 2.5 * (f @ model.proj.weight.t() + model.proj.bias)
    assert torch.allclose(model(x), expected, atol=1e-6)
    model.set_stage(1)
    assert all(p.requires_grad for p in model.parameters())
    model.set_stage(2)
    assert not any(p.requires_grad for p in backbone.parameters())
    assert all(p.requires_grad for p in model.proj.parameters())
    model.begin_stage(1)
    assert model.proj.weight.abs().sum() > 0  # stage 1 keeps its initial head
    model.begin_stage(2)
    assert torch.equal(model.proj.weight, torch.zeros(3, 4))
    assert torch.equal(model.proj.bias, torch.zeros(3))


# ---- what a timm model cannot do -------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ({"runtime.zero_shot": True}, "runtime.zero_shot needs class text features, which the "
                                  "vision-only model timm:test_vit has not: the zero-shot"),
    ({"loss.name": "mms"}, "loss.name=mms needs class text features"),
    ({"mix.method": "concutmix"}, "mix.method=concutmix needs class text features.*ConCutMix"),
    ({"mix.similarity": "text"}, "mix.similarity='text' needs the run's class text features"),
])
def test_what_needs_text_is_refused_for_a_timm_model(override, message):
    from lfm_ray.driver.launch import check_names

    cfg = RunConfig(data=DataConfig("digits-lt")).override({"model.name": TIMM_TEST, **override}).validate()
    with pytest.raises(LfmError, match=message):
        check_names(cfg)


def test_image_size_is_for_timm_models_only():
    cfg = RunConfig(data=DataConfig("digits-lt")).override({"model.image_size": 64}).validate()
    with pytest.raises(LfmError, match="model.image_size=64 is for timm: models; the CLIP "
                                       "model tiny takes its own input size"):
        check_family(cfg)
    with pytest.raises(LfmError, match="model.image_size=0 is not valid"):
        RunConfig(data=DataConfig("digits-lt")).override({"model.image_size": 0}).validate()


def test_the_cli_refuses_mms_for_a_timm_model_and_its_dry_run_says_what_resolves(capsys):
    from lfm_ray.cli import main

    assert main(["train", "--dataset", "digits-lt", "--model", TIMM_TEST, "--loss", "mms", "--dry-run"]) == 2
    assert "loss.name=mms needs class text features" in capsys.readouterr().err
    assert main(["train", "--dataset", "digits-lt", "--model", TIMM_TEST, "--model.image_size", "32", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["resolved"] == {"model.family": "timm", "model.text": "none",
                                   "mix.similarity": "image-prototypes",
                                   "model.classifier_init": "random"}
    assert printed["model"]["image_size"] == 32


def test_config_json_records_the_family_and_the_similarity(tmp_path):
    from lfm_ray.config import read_config_file
    from lfm_ray.driver.launch import write_json_atomic
    from lfm_ray.driver.rerun import record

    cfg = RunConfig(data=DataConfig("digits-lt")).override({"model.name": TIMM_TEST, "model.image_size": 32})
    write_json_atomic(tmp_path / "config.json", record(cfg, None, []))
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["resolved"] == {"model.family": "timm", "model.text": "none",
                                   "mix.similarity": "image-prototypes",
                                   "model.classifier_init": "random"}
    assert written["model"]["name"] == TIMM_TEST
    # Read back as a config file, the derived section is skipped.
    assert RunConfig(data=DataConfig("digits-lt")).override(read_config_file(tmp_path / "config.json")) == cfg
    assert RunConfig.from_dict(written) == cfg


# ---- training ------------------------------------------------------------------------------------
def timm_config(tmp_path, **overrides) -> RunConfig:
    from test_train import small_config

    return small_config(tmp_path, **{"model.name": TIMM_TEST, "model.image_size": 32,
                                     "mix.method": "lfm", **overrides})


def test_a_timm_model_trains_both_stages_with_lfm(tmp_path):
    from test_train import fit_local

    from lfm_ray.worker.checkpoint import load_state

    cfg = timm_config(tmp_path, **{"stage1.epochs": 2, "stage2.epochs": 2})
    result = fit_local(cfg, tmp_path / "ckpt")
    assert result.metrics["epoch"] == 4 and math.isfinite(result.metrics["train_loss"])
    states = {e: load_state(tmp_path / "ckpt" / f"epoch_{e:04d}", torch.device("cpu"))
              for e in (1, 2, 3, 4)}
    # Stage 1 trains the backbone and the head.
    assert any(not torch.equal(states[1]["visual"][k], states[2]["visual"][k])
               for k in states[1]["visual"])
    assert not torch.equal(states[1]["proj"]["weight"], states[2]["proj"]["weight"])
    # Stage 2 trains the head alone, on the frozen backbone.
    for k in states[2]["visual"]:
        assert torch.equal(states[2]["visual"][k], states[4]["visual"][k]), k
    assert not torch.equal(states[3]["proj"]["weight"], states[4]["proj"]["weight"])
    assert states[4]["proj"]["weight"].shape == (10, 64)


def test_stage_two_retrains_a_fresh_head_also_after_a_resume_at_the_boundary(tmp_path):
    from test_train import fit_local

    from lfm_ray.worker.checkpoint import load_state

    # With a vanishing stage-2 learning rate the head stays where stage 2 started it: zero.
    cfg = timm_config(tmp_path, **{"stage2.lr": 1e-12, "stage2.min_lr": 0.0})
    fit_local(cfg, tmp_path / "full")
    full = load_state(tmp_path / "full" / "epoch_0002", torch.device("cpu"))
    stage1 = load_state(tmp_path / "full" / "epoch_0001", torch.device("cpu"))
    assert stage1["proj"]["weight"].abs().sum() > 0
    assert full["proj"]["weight"].abs().max() < 1e-6
    # A run stopped after stage 1 and resumed there starts stage 2 the same way.
    cfg = timm_config(tmp_path)
    a = fit_local(cfg, tmp_path / "a")
    fit_local(cfg, tmp_path / "b", stop_after_epoch=1)
    b = fit_local(cfg, tmp_path / "b", resume_from=str(tmp_path / "b" / "epoch_0001"))
    sa = load_state(tmp_path / "a" / "epoch_0002", torch.device("cpu"))
    sb = load_state(tmp_path / "b" / "epoch_0002", torch.device("cpu"))
    assert torch.allclose(sa["proj"]["weight"], sb["proj"]["weight"], atol=1e-6)
    assert b.metrics["acc_all"] == pytest.approx(a.metrics["acc_all"], abs=1e-6)


@pytest.mark.parametrize("similarity", ["uniform", "text:tiny"])
def test_a_timm_model_takes_other_text_free_sources(tmp_path, similarity):
    from test_train import fit_local

    cfg = timm_config(tmp_path, **{"mix.similarity": similarity, "loss.name": "ldam"})
    result = fit_local(cfg, tmp_path / "ckpt")
    assert result.metrics["epoch"] == 2 and math.isfinite(result.metrics["train_loss"])


def test_tsne_features_of_a_timm_checkpoint_are_its_pooled_features(tmp_path):
    from test_train import fit_local

    from lfm_ray.analysis.tsne import checkpoint_features
    from lfm_ray.worker.loop import Run
    from lfm_ray.worker.distributed import WorkerInfo
    from lfm_ray.worker.checkpoint import load_state

    cfg = timm_config(tmp_path, **{"stage2.epochs": 0})
    fit_local(cfg, tmp_path / "ckpt")
    got = checkpoint_features(tmp_path / "ckpt" / "epoch_0001", ["zero", "nine"], per_class=4)
    assert got["features"].shape == (8, 64) and list(got["classes"]) == [0, 9]
    # The trained backbone's unit pooled features of those images.
    run = Run(cfg, WorkerInfo(rank=0, world_size=1, device=torch.device("cpu")))
    run.model.visual.load_state_dict(load_state(tmp_path / "ckpt" / "epoch_0001",
                                                torch.device("cpu"))["visual"])
    run.model.eval()
    images, labels = run.eval_sets["test"]
    picked = torch.cat([torch.nonzero(labels == c).flatten()[:4] for c in (0, 9)])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(run.model.encode(run.build(images.gather(picked))),
                                                 dim=-1)
    assert np.allclose(got["features"], expected.numpy(), atol=1e-5)
