"""study.json keeps the study's history and its data: every run of it (command, time,
versions, commit, the trials it added), an extension that adds nothing writes nothing, the
data fingerprint per data set refuses a resume or an extension on changed data (naming what
changed), and a cluster address is free on a rerun. One Ray instance for the module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lfm_ray.cli import main

SMOKE = ["--stage1.epochs", "1", "--stage2.epochs", "1", "--runtime.max_steps_per_epoch", "2",
         "--batch-size", "8", "--no-report"]


def write_folder(root: Path, val: bool = False) -> None:
    """An ImageFolder set: 3 classes of 8x8 PNGs, 8 / 5 / 3 training images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    counts = {"train": {"ant": 8, "bee": 5, "cow": 3}, "test": {"ant": 3, "bee": 3, "cow": 3}}
    if val:
        counts["val"] = {"ant": 2, "bee": 2, "cow": 2}
    for split, per_class in counts.items():
        for cls, n in per_class.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                    folder / f"{i}.png")


def argv(tmp_path: Path, name: str, *flags: str) -> list[str]:
    return ["study", "--name", name, *SMOKE, "--data.cache_dir", str(tmp_path / "cache"),
            "--results-dir", str(tmp_path / "results"), *flags]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.slow
def test_an_extension_keeps_the_history_and_one_that_adds_nothing_writes_nothing(
        tmp_path, capsys, local_ray):
    assert main(argv(tmp_path, "hist", "--grid", "mix.tau=0.05", "--seeds", "0")) == 0
    meta_path = tmp_path / "results" / "hist" / "study.json"
    first = json.loads(meta_path.read_text())
    assert [i["action"] for i in first["invocations"]] == ["new"]
    assert first["invocations"][0]["trials_added"] == 1

    assert main(argv(tmp_path, "hist", "--grid", "mix.tau=0.05", "--seeds", "0,1",
                     "--extend")) == 0
    meta = json.loads(meta_path.read_text())
    # The study's own record still says how it began...
    for key in ("command", "started", "versions", "machine"):
        assert meta[key] == first[key], key
    # ... and each run is in its history, with what it added.
    runs = meta["invocations"]
    assert [i["action"] for i in runs] == ["new", "extend"]
    assert runs[0] == first["invocations"][0]
    assert runs[1]["trials_added"] == 1 and runs[1]["added"] == [
        {"mix.tau": 0.05, "runtime.seed": 1}]
    assert "--extend" in runs[1]["command"] and "--extend" not in runs[0]["command"]
    for run in runs:
        assert run["versions"]["lfm-ray"] and run["machine"]["cpus"] and run["started"]
    assert meta["seeds"] == [0, 1] and meta["status"] == "complete"

    # The same request with --extend adds nothing: said, and nothing is written.
    capsys.readouterr()
    before = files_of(tmp_path / "results")
    assert main(argv(tmp_path, "hist", "--grid", "mix.tau=0.05", "--seeds", "0,1",
                     "--extend")) == 2
    err = capsys.readouterr().err
    assert "adds no trials" in err and "nothing written" in err and err.count("\n") == 1
    assert files_of(tmp_path / "results") == before

    # A resume is recorded too.
    assert main(argv(tmp_path, "hist", "--grid", "mix.tau=0.05", "--seeds", "0,1")) == 0
    runs = json.loads(meta_path.read_text())["invocations"]
    assert [i["action"] for i in runs] == ["new", "extend", "resume"]
    assert runs[2]["trials_added"] == 0


@pytest.mark.slow
def test_an_extension_that_adds_nothing_from_python(tmp_path, local_ray):
    from lfm_ray import RunConfig, Study, run_study
    from lfm_ray.errors import LfmError

    base = RunConfig().override({"stage1.epochs": 1, "stage2.epochs": 1,
                                 "runtime.max_steps_per_epoch": 2, "runtime.num_workers": 0,
                                 "data.cache_dir": str(tmp_path / "cache")})
    study = Study(name="py", base=base, grid={"mix.tau": [0.05]}, seeds=[0],
                  results_dir=str(tmp_path / "results"))
    run_study(study)
    before = files_of(tmp_path / "results")
    with pytest.raises(LfmError, match="adds no trials"):
        run_study(study, extend=True)
    assert files_of(tmp_path / "results") == before


@pytest.mark.slow
def test_changed_data_refuses_a_resume_and_an_extension(tmp_path, capsys, local_ray):
    """The reported case: a study on a folder, then two test classes' folders swapped and a
    training image deleted, then more seeds with --extend: refused, naming what changed."""
    data = tmp_path / "data"
    write_folder(data)
    flags = ["--dataset", "folder", "--data-root", str(data), "--grid", "mix.tau=0.05"]
    assert main(argv(tmp_path, "fp", *flags, "--seeds", "0")) == 0
    meta_path = tmp_path / "results" / "fp" / "study.json"
    meta = json.loads(meta_path.read_text())
    record = meta["data"]["folder"]
    assert record["name"] == "folder" and len(record["fingerprint"]) == 16
    assert set(record["parts"]) == {"train/", "test/"}
    assert str(data) not in json.dumps(meta["data"])  # no path of this machine
    capsys.readouterr()

    (data / "train" / "ant" / "7.png").unlink()
    shutil.move(data / "test" / "bee", data / "test" / "tmp")
    shutil.move(data / "test" / "cow", data / "test" / "bee")
    shutil.move(data / "test" / "tmp", data / "test" / "cow")
    before = files_of(tmp_path / "results")
    for extra in (["--seeds", "0,1", "--extend"], ["--seeds", "0"]):
        assert main(argv(tmp_path, "fp", *flags, *extra)) == 2
        err = capsys.readouterr().err
        assert "the data changed since it ran" in err and err.count("\n") == 1
        assert "train/ changed: 1 files fewer (16 -> 15)" in err
        assert "test/ changed (9 files; files replaced, renamed or edited)" in err
        assert files_of(tmp_path / "results") == before
    # --dry-run checks it too.
    assert main(argv(tmp_path, "fp", *flags, "--seeds", "0", "--dry-run")) == 2
    assert "the data changed" in capsys.readouterr().err
    # --restart runs it afresh on the data as it is now.
    assert main(argv(tmp_path, "fp", *flags, "--seeds", "0,1", "--restart")) == 0
    after = json.loads(meta_path.read_text())["data"]["folder"]
    assert after["fingerprint"] != record["fingerprint"]
    assert len(pd.read_csv(tmp_path / "results" / "fp" / "trials.csv")) == 2


def dry_run_json(out: str) -> dict:
    """The dry run's JSON object: log lines of the earlier run's trial processes may reach
    stdout late (Ray forwards them asynchronously), before or after it."""
    start = next(i for i, line in enumerate(out.splitlines(keepends=True)) if line.startswith("{"))
    text = "".join(out.splitlines(keepends=True)[start:])
    return json.JSONDecoder().raw_decode(text)[0]


@pytest.mark.slow
def test_an_address_on_a_local_study_is_free(tmp_path, capsys, local_ray):
    """A study run on a local instance (each trial in its own process), rerun with --address
    (a worker group per trial): resumed and extended, not refused."""
    import ray

    address = ray.get_runtime_context().gcs_address
    assert main(argv(tmp_path, "addr", "--grid", "mix.tau=0.05", "--seeds", "0")) == 0
    capsys.readouterr()
    assert main(argv(tmp_path, "addr", "--grid", "mix.tau=0.05", "--seeds", "0",
                     "--address", address, "--dry-run")) == 0
    assert dry_run_json(capsys.readouterr().out)["action"] == "resume"
    assert main(argv(tmp_path, "addr", "--grid", "mix.tau=0.05", "--seeds", "0,1",
                     "--address", address, "--extend")) == 0
    err = capsys.readouterr().err
    assert "study 'addr' (extend)" in err and "worker group of 1" in err
    table = pd.read_csv(tmp_path / "results" / "addr" / "trials.csv")
    assert len(table) == 2 and (table["status"] == "TERMINATED").all()
    # A change that does decide results is still refused.
    assert main(argv(tmp_path, "addr", "--grid", "mix.tau=0.05", "--seeds", "0,1",
                     "--num-workers", "2", "--batch-size", "8")) == 2
    assert "runtime.num_workers: 1 -> 2" in capsys.readouterr().err
