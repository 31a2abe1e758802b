"""Category extrapolation from the command line: `lfm-ray train` and every study take
--aux-root and --aux-neighbours, check them before anything runs, and a run's metrics.json
records its auxiliary classes; the study script's methods and data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lfm_ray.cli import main



def test_train_dry_run_resolves_the_embedded_auxiliary_set(tmp_path, capsys):
    code = main(["train", "--dataset", "digits-lt", "--dry-run", "--aux-root", "digits-aux", "--loss", "balce",
                 "--aux.silence", "neighbours+aux", "--output", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    cfg = json.loads(captured.out)
    assert cfg["aux"] == {"root": "digits-aux", "neighbours": None, "max_per_class": 50,
                          "silence": "neighbours+aux"}


@pytest.mark.parametrize("flags,needle", [
    (["--aux-neighbours", "map.json"], "aux.neighbours='map.json' is set but aux.root is not"),
    (["--aux-root", "digits-aux", "--loss", "focal"], "needs loss ce or balce"),
    (["--aux-root", "/no/such/folder", "--aux.silence", "none"], "is not a folder"),
    (["--aux-root", "digits-aux", "--dataset", "cifar10-lt", "--preset", "none",
      "--data-root", "/no/such/cifar"], "data root"),
    (["--aux-root", "digits-aux", "--aux-neighbours", "/no/such/map.json"], "is not a file"),
    (["--aux.max_per_class", "0"], "aux.max_per_class=0 is not valid"),
])
def test_bad_auxiliary_input_is_one_line_before_anything_runs(tmp_path, capsys, flags, needle):
    dataset = [] if "--dataset" in flags else ["--dataset", "digits-lt"]
    code = main(["train", *dataset, "--dry-run", "--output", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err and err.count("\n") == 1


def test_every_study_script_takes_the_auxiliary_flags(tmp_path, capsys):
    from lfm_ray.commands.catalog import tau_sweep

    code = tau_sweep.main(["--dry-run", "--smoke", "--dataset", "digits-lt", "--aux-root",
                           "digits-aux", "--loss", "balce",
                           "--storage-path", str(tmp_path / "ray"),
                           "--results-dir", str(tmp_path / "results")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    base = json.loads(captured.out)["base_configs"]["digits-lt"]
    assert base["aux"]["root"] == "digits-aux" and base["loss"]["name"] == "balce"


def plan(tmp_path, capsys, *flags):
    from lfm_ray.commands.catalog import category_extrapolation

    code = category_extrapolation.main(["--dry-run", "--storage-path", str(tmp_path / "ray"),
                                        "--results-dir", str(tmp_path / "results"), *flags])
    captured = capsys.readouterr()
    return code, captured


def test_the_study_runs_its_ablation_on_the_embedded_sets_by_default(tmp_path, capsys):
    from lfm_ray.commands.catalog.category_extrapolation import METHODS

    code, captured = plan(tmp_path, capsys)
    assert code == 0, captured.err
    out = json.loads(captured.out)
    assert out["grid"] == {"method": list(METHODS)} and out["trials"] == len(METHODS) * 2
    base = out["base_configs"]["fashion-lt"]  # the default: fashion-lt and fashion-aux
    assert base["aux"]["root"] == "fashion-aux" and base["loss"]["name"] == "balce"
    code, captured = plan(tmp_path, capsys, "--dataset", "digits-lt")
    assert code == 0, captured.err
    base = json.loads(captured.out)["base_configs"]["digits-lt"]
    assert base["aux"]["root"] == "digits-aux" and base["loss"]["name"] == "balce"
    assert not (tmp_path / "ray").exists()


def test_the_study_methods_are_the_ablation_rows():
    from lfm_ray.commands.catalog.category_extrapolation import declare

    class Args:
        smoke, datasets, config, preset = False, ["digits-lt"], None, None

    variants = declare(Args()).variants
    assert variants["BalCE"]["aux.root"] is None
    assert variants["BalCE + random aux"]["aux.root"] == "digits-aux-scrambled"
    assert variants["BalCE + aux"]["aux.silence"] == "none"
    assert variants["BalCE + aux + NS"] == {"loss.name": "balce", "mix.method": "none",
                                            "aux.silence": "neighbours", "aux.root": "digits-aux"}
    assert variants["LFM + BalCE + aux + NS"]["mix.method"] == "lfm"
    assert all(v["loss.name"] == "balce" for v in variants.values())


def test_the_study_needs_auxiliary_classes_off_the_embedded_data(tmp_path, capsys):
    code, captured = plan(tmp_path, capsys, "--dataset", "cifar100-lt", "--data-root",
                          str(tmp_path))
    assert code == 2 and "needs the auxiliary classes: --aux-root" in captured.err


def test_the_study_on_a_users_folder_drops_the_random_row(tmp_path, capsys):
    from PIL import Image

    from lfm_ray.data.digits import DIGIT_NAMES

    root = tmp_path / "aux"
    for d in DIGIT_NAMES:
        (root / f"bold {d}").mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 40, dtype=np.uint8)).save(root / f"bold {d}" / "a.png")
    (tmp_path / "map.json").write_text(json.dumps({d: [f"bold {d}"] for d in DIGIT_NAMES}))
    code, captured = plan(tmp_path, capsys, "--dataset", "digits-lt", "--aux-root", str(root),
                          "--aux-neighbours", str(tmp_path / "map.json"))
    assert code == 0, captured.err
    methods = json.loads(captured.out)["grid"]["method"]
    assert "BalCE + random aux" not in methods and "BalCE + aux + NS" in methods
    (tmp_path / "map.json").write_text(json.dumps({"three": ["bold seven"]}))
    code, captured = plan(tmp_path, capsys, "--dataset", "digits-lt", "--aux-root", str(root),
                          "--aux-neighbours", str(tmp_path / "map.json"))
    assert code == 2 and "is no target class's neighbour" in captured.err


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    from lfm_ray.driver.launch import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_train_with_auxiliary_classes_writes_target_metrics(tmp_path, ray_instance):
    from lfm_ray import confusion

    out = tmp_path / "run"
    code = main(["train", "--dataset", "digits-lt", "--aux-root", "digits-aux", "--loss", "balce", "--mix", "lfm",
                 "--stage1.epochs", "1", "--stage2.epochs", "1", "--runtime.max_steps_per_epoch",
                 "3", "--data.cache_dir", str(tmp_path / "cache"), "--output", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["aux_classes"] == 10 and metrics["aux_images"] == 500
    assert len(metrics["per_class_acc"]) == 10 and len(metrics["class_names"]) == 10
    assert confusion.read(out)["counts"].shape == (10, 10)
