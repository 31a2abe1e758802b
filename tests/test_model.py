"""The open_clip model: tiny registered config, text features, W_I, logits, weight errors."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from lfm_ray.config import ModelConfig
from lfm_ray.errors import LfmError
from lfm_ray.model import LFMClassifier, build_classifier, build_clip, text_features


@pytest.fixture(scope="module")
def tiny():
    return build_clip("tiny")


def test_tiny_is_an_open_clip_registered_config(tiny):
    import open_clip

    model, spec = tiny
    assert "tiny" in open_clip.list_models()
    assert isinstance(model, open_clip.CLIP)
    assert spec.size == 32 and len(spec.mean) == 3


def test_text_features_are_the_normalised_prompt_ensemble(tiny):
    model, _ = tiny
    names, templates = ["cat", "sea lion"], ["a photo of a {}.", "a drawing of a {}."]
    got = text_features(model, names, templates)
    assert got.shape == (2, 64)
    assert torch.allclose(got.norm(dim=1), torch.ones(2), atol=1e-6)
    with torch.no_grad():
        per = [F.normalize(model.encode_text(model.lfm_tokenizer([t.format(n) for n in names])), dim=-1)
               for t in templates]
    assert torch.allclose(got, F.normalize((per[0] + per[1]) / 2, dim=-1), atol=1e-6)


def test_logits_are_scaled_cosines_and_w_starts_as_identity(tiny):
    model, _ = tiny
    feats = F.normalize(torch.randn(3, 64), dim=1)
    clf = LFMClassifier(model.visual, feats, logit_scale=30.0)
    assert torch.equal(clf.proj.weight, torch.eye(64))
    with torch.no_grad():
        clf.proj.weight.add_(0.1 * torch.randn(64, 64))
        x = torch.randn(2, 3, 32, 32)
        img = model.visual(x)
        direct = 30.0 * F.normalize(img @ clf.proj.weight.t(), dim=1) @ feats.t()
        assert torch.allclose(clf(x), direct, atol=1e-5)


def test_stage_flags(tiny):
    model, _ = tiny
    clf = LFMClassifier(model.visual, F.normalize(torch.randn(3, 64), dim=1), 1.0)
    clf.set_stage(1)
    assert all(p.requires_grad for p in clf.visual.parameters()) and not clf.proj.weight.requires_grad
    clf.set_stage(2)
    assert not any(p.requires_grad for p in clf.visual.parameters()) and clf.proj.weight.requires_grad


def test_build_classifier_from_a_model_config():
    clf, spec = build_classifier(ModelConfig(), ["zero", "one", "two"], 1.0)
    assert clf.text_features.shape == (3, 64) and spec.size == 32
    assert clf(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_unknown_model_and_tag():
    with pytest.raises(LfmError, match="unknown model 'ViT-Q'; known: tiny, ViT-B-32"):
        build_clip("ViT-Q")
    with pytest.raises(LfmError, match="unknown pretrained tag 'nope' for ViT-B-32; known: openai"):
        build_clip("ViT-B-32", "nope")


def test_missing_weights_fail_fast_and_say_where_to_put_them(tmp_path, monkeypatch):
    import lfm_ray.model

    monkeypatch.setattr(lfm_ray.model, "_hub_reachable", lambda timeout_s=3.0: False)
    start = time.time()
    with pytest.raises(LfmError) as info:
        build_clip("ViT-B-32", "openai", cache_dir=str(tmp_path))
    assert time.time() - start < 5
    message = str(info.value)
    assert str(tmp_path) in message and "timm/vit_base_patch32_clip_224.openai" in message
    assert "--pretrained /path/to/weights" in message


def test_local_weights_file_round_trip(tmp_path, tiny):
    model, _ = tiny
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    loaded, _ = build_clip("tiny", str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(LfmError, match="could not be loaded"):
        build_clip("tiny", str(bad))
