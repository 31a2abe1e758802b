"""RunConfig: JSON round trip, dotted overrides, presets, validation messages."""

import json

import pytest
import torch

from lfm_ray.config import PAPER_PRESETS, PRESETS, RunConfig, preset
from lfm_ray.errors import LfmError


def test_json_round_trip_keeps_every_field():
    cfg = RunConfig().override({"stage1.lr": 3e-4, "mix.method": "mixup", "loss.name": "mms"})
    again = RunConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert again.stage1.lr == 3e-4 and again.mix.method == "mixup"


def test_mix_shorthands_set_both_stages():
    cfg = RunConfig().override({"mix.tau": 0.25, "mix.alpha": 1.5})
    assert (cfg.stage1.tau, cfg.stage2.tau) == (0.25, 0.25)
    assert (cfg.stage1.alpha, cfg.stage2.alpha) == (1.5, 1.5)
    assert cfg.get("mix.tau") == 0.25


def test_strings_from_the_command_line_are_coerced():
    cfg = RunConfig().override({"stage1.epochs": "3", "stage2.lr": "1e-2",
                                "runtime.zero_shot": "true", "data.imbalance_factor": "none"})
    assert cfg.stage1.epochs == 3 and cfg.stage2.lr == 0.01
    assert cfg.runtime.zero_shot is True and cfg.data.imbalance_factor is None


def test_compile_is_on_off_or_automatic():
    from lfm_ray.worker.loop import compile_encoder

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    auto = RunConfig()
    assert auto.runtime.compile is None
    assert not compile_encoder(auto, cpu) and compile_encoder(auto, gpu)
    off = RunConfig().override({"runtime.compile": "false"})
    assert off.runtime.compile is False and not compile_encoder(off, gpu)
    on = RunConfig().override({"runtime.compile": "yes"})
    assert compile_encoder(on, cpu)
    assert RunConfig().override({"runtime.compile": "none"}).runtime.compile is None
    with pytest.raises(LfmError, match="runtime.compile='maybe' is not valid; expected bool or null"):
        RunConfig().override({"runtime.compile": "maybe"})


@pytest.mark.parametrize("field,value,needle", [
    ("stage1.alpha", -0.1, "stage1.alpha"),
    ("stage2.tau", 0.0, "stage2.tau"),
    ("stage1.beta", 0.0, "stage1.beta"),
    ("stage1.lr", 0.0, "stage1.lr"),
    ("stage2.epochs", -1, "stage2.epochs"),
    ("data.imbalance_factor", 0.5, "data.imbalance_factor"),
])
def test_bad_values_name_the_field(field, value, needle):
    cfg = RunConfig().override({field: value})
    with pytest.raises(LfmError, match=needle):
        cfg.validate()


def test_unknown_field_lists_known_ones():
    with pytest.raises(LfmError, match="unknown config field 'stage1.lrr'.*stage1.lr"):
        RunConfig().override({"stage1.lrr": 1})


def test_non_numeric_value_is_one_clear_error():
    with pytest.raises(LfmError, match="stage1.lr='fast'"):
        RunConfig().override({"stage1.lr": "fast"})


def test_fractional_gpus_need_one_worker():
    cfg = RunConfig().override({"runtime.num_workers": 2, "runtime.gpus_per_worker": 0.5})
    with pytest.raises(LfmError, match="fractional GPUs"):
        cfg.validate()


def test_presets_match_table_6():
    places = preset("places-lt")
    assert (places.stage1.alpha, places.stage2.alpha) == (1.25, 1.5)
    assert places.stage1.tau == places.stage2.tau == 1.0
    assert places.runtime.batch_size == 96 and places.model.name == "ViT-B-16"
    c100 = preset("cifar100-lt")
    assert (c100.stage1.epochs, c100.stage1.lr, c100.stage1.min_lr) == (50, 1e-6, 1e-9)
    assert (c100.stage2.epochs, c100.stage2.lr, c100.stage2.min_lr) == (10, 1e-2, 1e-5)
    assert set(PAPER_PRESETS) == {"cifar10-lt", "cifar100-lt", "imagenet-lt", "places-lt"}
    assert set(PRESETS) == set(PAPER_PRESETS) | {"fashion-lt"}
    with pytest.raises(LfmError, match="unknown preset"):
        preset("mnist")


def test_logit_scale_defaults_follow_the_loss():
    assert RunConfig().override({"loss.name": "ldam"}).logit_scale == 30.0
    assert RunConfig().override({"loss.name": "mms"}).logit_scale == 100.0
    assert RunConfig().override({"loss.name": "mms", "model.logit_scale": 5}).logit_scale == 5.0


def test_yaml_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stage1:\n  epochs: 4\nmix:\n  method: remix\n")
    cfg = RunConfig.from_file(path)
    assert cfg.stage1.epochs == 4 and cfg.mix.method == "remix"
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(LfmError, match="mapping"):
        RunConfig.from_file(bad)
    with pytest.raises(LfmError, match="does not exist"):
        RunConfig.from_file(tmp_path / "missing.json")


@pytest.mark.parametrize("field,replacement", [
    ("loss.ldam_scale", "model.logit_scale"),
    ("loss.mms_temperature", "model.logit_scale"),
    ("mix.concutmix_weight", "mix.concutmix_omega"),
])
def test_removed_fields_say_what_replaced_them(tmp_path, field, replacement):
    with pytest.raises(LfmError, match=f"config field '{field}' was removed: .*{replacement}"):
        RunConfig().override({field: 1.0})
    section, key = field.split(".")
    path = tmp_path / "old.json"
    path.write_text(json.dumps({section: {key: 1.0}}))
    with pytest.raises(LfmError, match=f"'{field}' was removed"):
        RunConfig.from_file(path)


def test_beta_defaults_to_the_methods_own_law_and_a_set_beta_applies():
    cfg = RunConfig().validate()
    assert cfg.stage1.beta is None and cfg.stage2.beta is None
    cfg = RunConfig().override({"mix.beta": "0.5"}).validate()
    assert (cfg.stage1.beta, cfg.stage2.beta) == (0.5, 0.5)
    assert RunConfig().override({"stage2.beta": "none"}).stage2.beta is None
    with pytest.raises(LfmError, match="stage2.beta=-1.0 is not valid"):
        RunConfig().override({"stage2.beta": -1}).validate()


def test_concutmix_settings_come_from_the_data_sets_row_unless_set():
    from lfm_ray.config import CONCUTMIX_SETTINGS

    # ConCutMix's own runs: CIFAR-10-LT ω = 2/255, k = 3; CIFAR-100-LT ω = 20/255, k = 30;
    # both use the area label alone for the first half of the epochs.
    for name, omega, k in (("cifar10-lt", 2 / 255, 3), ("cifar100-lt", 20 / 255, 30)):
        p = RunConfig().override({"data.name": name, "mix.method": "concutmix"}).mixer_params()
        assert (p["concutmix_omega"], p["concutmix_topk"], p["concutmix_warmup"]) == (omega, k, 0.5)
        assert p["concutmix_prob"] == 0.5
    assert set(CONCUTMIX_SETTINGS) == {"fashion-lt", "digits-lt", "cifar10-lt", "cifar100-lt",
                                       "imagenet-lt", "places-lt", "inat2018"}
    set_ = RunConfig().override({"mix.method": "concutmix", "mix.concutmix_omega": 0.1,
                                 "mix.concutmix_topk": "2", "mix.concutmix_warmup": 0,
                                 "mix.concutmix_prob": 1}).validate().mixer_params()
    assert (set_["concutmix_omega"], set_["concutmix_topk"], set_["concutmix_warmup"],
            set_["concutmix_prob"]) == (0.1, 2, 0.0, 1.0)
    # A data set without a row: refused for concutmix, unused by the other methods.
    folder = RunConfig().override({"data.name": "folder", "mix.method": "concutmix"})
    with pytest.raises(LfmError, match="mix.concutmix_omega is not set and data set 'folder' "
                                       "has no ConCutMix setting"):
        folder.validate()
    assert RunConfig().override({"data.name": "folder"}).validate().mixer_params()[
        "concutmix_omega"] is None
    folder.override({"mix.concutmix_omega": 0.01, "mix.concutmix_topk": 5,
                     "mix.concutmix_warmup": 0.5}).validate()


@pytest.mark.parametrize("field,value", [
    ("mix.concutmix_omega", -0.1), ("mix.concutmix_topk", 0), ("mix.concutmix_prob", 1.5),
    ("mix.concutmix_warmup", 2.0),
])
def test_concutmix_values_are_checked(field, value):
    with pytest.raises(LfmError, match=f"{field}="):
        RunConfig().override({field: value}).validate()
