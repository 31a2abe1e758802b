"""The open_clip model: tiny registered config, text features, W_I, logits, weights lookup."""

from __future__ import annotations

import json
import time
from importlib.resources import files

import pytest
import torch
import torch.nn.functional as F

import lfm_ray.model
import lfm_ray.weights
from lfm_ray.config import ModelConfig
from lfm_ray.errors import LfmError
from lfm_ray.model import ImageSpec, LFMClassifier, build_classifier, build_clip, text_features

OTHER_MEAN, OTHER_STD = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4)


@pytest.fixture(scope="module")
def tiny():
    return build_clip("tiny")


@pytest.fixture
def no_network(monkeypatch):
    """The hub probe answers "unreachable" (as on the test machine), whatever the network."""
    monkeypatch.setattr(lfm_ray.weights, "hub_reachable", lambda timeout_s=3.0: False)


@pytest.fixture
def never_probe(monkeypatch):
    """Fails the test if the build even asks whether the hub can be reached."""
    def probe(timeout_s=3.0):
        raise AssertionError("the hub was probed although everything was cached")
    monkeypatch.setattr(lfm_ray.weights, "hub_reachable", probe)


def stage_in_hub_cache(cache, repo: str, contents: dict[str, bytes]) -> None:
    """Lay files out the way huggingface_hub caches a download of repo at revision main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in contents.items():
        (snap / name).write_bytes(data)


def state_bytes(model, tmp_path) -> bytes:
    path = tmp_path / "state.bin"
    torch.save(model.state_dict(), path)
    return path.read_bytes()


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        assert torch.equal(value, sb[key]), key


def test_tiny_is_an_open_clip_registered_config(tiny):
    import open_clip

    model, spec = tiny
    assert "tiny" in open_clip.list_models()
    assert isinstance(model, open_clip.CLIP) and not model.training
    cfg = json.loads(files("lfm_ray").joinpath("model_configs/tiny.json").read_text())
    assert open_clip.get_model_config("tiny") == cfg
    assert model.visual.output_dim == cfg["embed_dim"] == model.text_projection.shape[1]
    # The spec is the model's own preprocessing config (open_clip's OpenAI statistics).
    pre = open_clip.get_model_preprocess_cfg(model)
    assert (spec.size, spec.size) == (32, 32) == tuple(pre["size"])
    assert spec.mean == tuple(pre["mean"]) and spec.std == tuple(pre["std"])
    start = time.time()
    build_clip("tiny")
    assert time.time() - start < 1.0  # registered once; a tiny build is cheap


def test_text_features_are_the_normalised_prompt_ensemble(tiny, monkeypatch):
    model, _ = tiny
    names, templates = ["cat", "sea lion", "dog"], ["a photo of a {}.", "a drawing of a {}."]
    got = text_features(model, names, templates)
    assert got.shape == (3, 64) and not got.requires_grad
    assert torch.allclose(got.norm(dim=1), torch.ones(3), atol=1e-6)
    import open_clip

    tok = open_clip.get_tokenizer("tiny")
    with torch.no_grad():
        per = [F.normalize(model.encode_text(tok([t.format(n) for n in names])), dim=-1)
               for t in templates]
    assert torch.allclose(got, F.normalize((per[0] + per[1]) / 2, dim=-1), atol=1e-6)
    # One template: exactly its normalised features; batching the prompts changes nothing.
    assert torch.allclose(text_features(model, names, templates[:1]), per[0], atol=1e-6)
    monkeypatch.setattr(lfm_ray.model, "TEXT_BATCH", 2)
    assert torch.allclose(text_features(model, names, templates), got, atol=1e-6)


def test_the_default_prompt_is_the_authors(tiny):
    """ModelConfig's default template gives the features of "a photo of a {name}" (no full
    stop), the prompt of the LFM authors' code."""
    model, _ = tiny
    names = ["airfield", "sea lion"]
    got = text_features(model, names, ModelConfig().templates)
    with torch.no_grad():
        want = F.normalize(model.encode_text(model.lfm_tokenizer(
            [f"a photo of a {n}" for n in names])).float(), dim=-1)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, text_features(model, names, ["a photo of a {}."]), atol=1e-4)


def test_bad_templates_and_class_names(tiny):
    model, _ = tiny
    with pytest.raises(LfmError, match="'a photo' has no"):
        text_features(model, ["cat"], ["a photo"])
    with pytest.raises(LfmError, match="no prompt templates"):
        text_features(model, ["cat"], [])
    with pytest.raises(LfmError, match="no class names"):
        text_features(model, [], ["a {}"])


def test_logits_are_scaled_cosines_and_w_starts_as_identity(tiny):
    model, _ = tiny
    feats = torch.randn(3, 64)  # the classifier normalises them itself
    clf = LFMClassifier(model.visual, feats, logit_scale=30.0)
    assert torch.equal(clf.proj.weight, torch.eye(64)) and clf.proj.bias is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        img = model.visual(x)
        at_init = 30.0 * F.normalize(img, dim=1) @ F.normalize(feats, dim=1).t()
        assert torch.allclose(clf(x), at_init, atol=1e-5)
        clf.proj.weight.add_(0.1 * torch.randn(64, 64))
        direct = 30.0 * F.normalize(img @ clf.proj.weight.t(), dim=1) @ F.normalize(feats, dim=1).t()
        assert torch.allclose(clf(x), direct, atol=1e-5)
        assert torch.allclose(clf.head(clf.encode(x)), direct, atol=1e-5)
        assert clf(x).abs().max() <= 30.0 + 1e-4  # cosines times s


def test_stage_flags(tiny):
    model, _ = tiny
    clf = LFMClassifier(model.visual, torch.randn(3, 64), 1.0)
    clf.set_stage(1)
    assert all(p.requires_grad for p in clf.visual.parameters()) and not clf.proj.weight.requires_grad
    clf.set_stage(2)
    assert not any(p.requires_grad for p in clf.visual.parameters()) and clf.proj.weight.requires_grad
    clf.set_stage(1)
    assert all(p.requires_grad for p in clf.visual.parameters()) and not clf.proj.weight.requires_grad
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        clf.set_stage(3)


def test_build_classifier_keeps_the_image_tower_and_text_features_only():
    cfg = ModelConfig(templates=["a photo of a {}.", "a {}."])
    clf, spec = build_classifier(cfg, ["zero", "one", "two"], 1.0)
    assert clf.text_features.shape == (3, 64) and spec.size == 32
    assert clf(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    tops = {k.split(".")[0] for k in clf.state_dict()}
    assert tops == {"visual", "proj", "text_features"}  # no text tower


def test_image_spec_follows_the_models_preprocessing_config(tiny, monkeypatch):
    """Resize mode, interpolation and fill colour come from the model's open_clip config;
    what it leaves out is open_clip's default, as in open_clip's own transform."""
    import open_clip
    from open_clip.transform import PreprocessCfg

    model, spec = tiny
    default = PreprocessCfg()
    assert (spec.resize_mode, spec.interpolation, spec.fill_color) == (
        default.resize_mode, default.interpolation, default.fill_color)
    assert ImageSpec(32, spec.mean, spec.std) == spec  # ImageSpec's defaults are open_clip's

    def config(cfg):
        monkeypatch.setattr(open_clip, "get_model_preprocess_cfg", lambda m: dict(cfg))
        return lfm_ray.model._image_spec(model, "m")

    full = {"size": (32, 32), "mean": OTHER_MEAN, "std": OTHER_STD, "interpolation": "bilinear",
            "resize_mode": "squash", "fill_color": 5}
    assert config(full) == ImageSpec(32, OTHER_MEAN, OTHER_STD, "squash", "bilinear", 5)
    # 'random' is a training-time choice; open_clip evaluates it as bicubic.
    assert config({**full, "interpolation": "random"}).interpolation == "bicubic"
    legacy = config({"size": 224, "mean": OTHER_MEAN, "std": OTHER_STD})  # older models' attributes
    assert legacy == ImageSpec(224, OTHER_MEAN, OTHER_STD, default.resize_mode,
                               default.interpolation, default.fill_color)
    with pytest.raises(LfmError, match="the preprocessing config of model m: resize_mode 'crop' "
                                       "is not valid; expected one of shortest, longest, squash"):
        config({**full, "resize_mode": "crop"})
    with pytest.raises(LfmError, match="interpolation 'lanczos' is not valid; expected one of "
                                       "bicubic, bilinear"):
        config({**full, "interpolation": "lanczos"})
    with pytest.raises(LfmError, match="ImageSpec: fill_color 300 is not valid"):
        ImageSpec(32, OTHER_MEAN, OTHER_STD, fill_color=300)


def test_unknown_model_and_tag_fail_fast_and_list_the_known_ones(no_network):
    start = time.time()
    with pytest.raises(LfmError, match=r"unknown model 'ViT-Q'; known: tiny, ViT-B-32.*list_models"):
        build_clip("ViT-Q")
    with pytest.raises(LfmError, match="did you mean ViT-B-32"):
        build_clip("vit-b-32")
    with pytest.raises(LfmError, match="unknown pretrained tag 'nope' for ViT-B-32; known: openai, "
                                       "laion400m_e31"):
        build_clip("ViT-B-32", "nope")
    with pytest.raises(LfmError, match="unknown pretrained tag 'openai' for tiny; known: none"):
        build_clip("tiny", "openai")
    with pytest.raises(LfmError, match="carries its own weights"):
        build_clip("hf-hub:org/model", "openai")
    assert time.time() - start < 5


def test_missing_weights_fail_fast_and_say_where_to_put_them(tmp_path, no_network):
    start = time.time()
    with pytest.raises(LfmError) as info:
        build_clip("ViT-B-32", "openai", cache_dir=str(tmp_path))
    assert time.time() - start < 5
    message = str(info.value)
    assert "ViT-B-32/openai are not cached" in message
    assert ("open_clip_pytorch_model.bin (or open_clip_model.safetensors) of the hub repository "
            "timm/vit_base_patch32_clip_224.openai") in message
    assert f"{tmp_path}/models--timm--vit_base_patch32_clip_224.openai/snapshots/" in message
    assert f"--cache-dir {tmp_path}" in message and "--pretrained /path/to/weights" in message
    assert "Traceback" not in message and "\n" not in message


def test_hub_offline_mode_needs_no_probe(tmp_path, never_probe, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.time()
    with pytest.raises(LfmError, match=r"(?s)hf-hub:org/tiny-model are not cached.*HF_HUB_OFFLINE "
                                       r"is set.*open_clip_config.json and open_clip_pytorch_model"):
        build_clip("hf-hub:org/tiny-model", cache_dir=str(tmp_path))
    assert time.time() - start < 5


def test_missing_local_weights_file(tmp_path):
    with pytest.raises(LfmError, match=f"weights file '{tmp_path}/none.pt' for tiny does not exist"):
        build_clip("tiny", str(tmp_path / "none.pt"))


def test_local_weights_file_round_trip(tmp_path, tiny, never_probe):
    model, _ = tiny
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    loaded, _ = build_clip("tiny", str(path))
    assert_same_weights(model, loaded)
    from safetensors.torch import save_file

    safe = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(safe))
    assert_same_weights(model, build_clip("tiny", str(safe))[0])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(LfmError, match="tiny with weights '.*bad.pt' could not be loaded"):
        build_clip("tiny", str(bad))


def test_a_pretrained_tag_loads_from_open_clips_cache_without_network(tmp_path, tiny, never_probe,
                                                                      monkeypatch):
    """A tag whose weights were pre-staged in the cache: loaded offline, and the tag's own
    preprocessing (mean, std) reaches the ImageSpec."""
    import open_clip.pretrained as pre

    model, _ = tiny
    monkeypatch.setitem(pre._PRETRAINED, "tiny", {"staged": pre._pcfg(
        hf_hub="lfm-test/tiny-staged/", mean=OTHER_MEAN, std=OTHER_STD)})
    stage_in_hub_cache(tmp_path, "lfm-test/tiny-staged",
                       {"open_clip_pytorch_model.bin": state_bytes(model, tmp_path)})
    start = time.time()
    loaded, spec = build_clip("tiny", "staged", cache_dir=str(tmp_path))
    assert time.time() - start < 5
    assert_same_weights(model, loaded)
    assert spec == lfm_ray.model.ImageSpec(32, OTHER_MEAN, OTHER_STD)


def test_an_hf_hub_model_loads_from_the_cache_without_network(tmp_path, tiny, never_probe):
    model, _ = tiny
    config = {"model_cfg": json.loads(files("lfm_ray").joinpath("model_configs/tiny.json").read_text()),
              "preprocess_cfg": {"mean": list(OTHER_MEAN), "std": list(OTHER_STD),
                                 "resize_mode": "longest", "interpolation": "bilinear"}}
    stage_in_hub_cache(tmp_path, "lfm-test/tiny-hub", {
        "open_clip_config.json": json.dumps(config).encode(),
        "open_clip_pytorch_model.bin": state_bytes(model, tmp_path)})
    loaded, spec = build_clip("hf-hub:lfm-test/tiny-hub", cache_dir=str(tmp_path))
    assert_same_weights(model, loaded)
    assert spec == ImageSpec(32, OTHER_MEAN, OTHER_STD, resize_mode="longest",
                             interpolation="bilinear")
    names = ["cat", "dog"]
    assert torch.allclose(text_features(loaded, names, ["a {}."]),
                          text_features(model, names, ["a {}."]), atol=1e-6)


def test_a_failed_hub_download_is_an_error_not_random_weights(tmp_path, monkeypatch):
    """open_clip itself would log the failure and build the hf-hub model with random weights."""
    import open_clip.pretrained as pre

    monkeypatch.setattr(lfm_ray.weights, "hub_reachable", lambda timeout_s=3.0: True)

    def refuse(model_id, filename=None, revision=None, cache_dir=None):
        raise FileNotFoundError(f"Failed to download file ({filename}) for {model_id}")
    monkeypatch.setattr(pre, "download_pretrained_from_hf", refuse)
    with pytest.raises(LfmError, match="could not download the weights of hf-hub:org/none from "
                                       f"the hub repository org/none into {tmp_path}"):
        build_clip("hf-hub:org/none", cache_dir=str(tmp_path))
