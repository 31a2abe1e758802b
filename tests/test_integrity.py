"""Nothing lost, nothing mislabelled: `lfm-ray train` reruns (resume, refuse, --extend,
--restart), the data fingerprint behind the node cache and config.json, checkpoints read
without running code, and a killed or interrupted driver that leaves no Ray process behind
and resumes to the metrics of an uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lfm_ray.cli import main
from lfm_ray.config import DataConfig, RunConfig
from lfm_ray.data import data_fingerprint, load_arrays, run_data_fingerprint
from lfm_ray.errors import LfmError
from lfm_ray.driver.rerun import plan_train_rerun, record
from lfm_ray.safe_load import load_state_file
from test_bad_inputs import Payload

ROOT = Path(__file__).resolve().parents[1]


# ---- the data fingerprint ---------------------------------------------------------------
def write_folder_set(root: Path) -> None:
    """A tiny ImageFolder set: 2 classes, PNGs in train/ and test/."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def write_split_set(root: Path) -> None:
    """ImageNet-LT's layout: split files listing images under the root."""
    from PIL import Image

    (root / "train").mkdir(parents=True)
    for split in ("train", "val", "test"):
        lines = []
        for k in range(3):
            name = f"train/{split}_{k}.png"
            Image.fromarray(np.full((4, 4, 3), k * 40, np.uint8)).save(root / name)
            lines.append(f"{name} {k}")
        (root / f"ImageNet_LT_{split}.txt").write_text("\n".join(lines) + "\n")


def touch_like(path: Path, like: os.stat_result) -> None:
    os.utime(path, ns=(like.st_atime_ns, like.st_mtime_ns))


def test_fingerprint_follows_the_images_of_a_folder_set(tmp_path):
    write_folder_set(tmp_path / "a")
    before = data_fingerprint("folder", tmp_path / "a")
    assert data_fingerprint("folder", tmp_path / "a") == before  # stable
    # A copy that keeps modification times, at another root: the same data.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert data_fingerprint("folder", tmp_path / "b") == before
    # An image replaced (new bytes, new mtime): another data set.
    image = tmp_path / "a" / "train" / "cat" / "1.png"
    image.write_bytes((tmp_path / "a" / "train" / "dog" / "0.png").read_bytes())
    assert data_fingerprint("folder", tmp_path / "a") != before
    # An image added, or one removed.
    shutil.copy(tmp_path / "b" / "train" / "cat" / "0.png", tmp_path / "b" / "train" / "cat" / "9.png")
    assert data_fingerprint("folder", tmp_path / "b") != before


def test_fingerprint_hashes_split_files_and_stats_their_images(tmp_path):
    write_split_set(tmp_path)
    before = data_fingerprint("imagenet-lt", tmp_path)
    # A split file edited in place with its size and mtime kept: its hash still tells.
    split = tmp_path / "ImageNet_LT_val.txt"
    st = split.stat()
    split.write_text(split.read_text().replace("train/val_2.png 2", "train/val_1.png 2"))
    touch_like(split, st)
    assert split.stat().st_size == st.st_size and split.stat().st_mtime_ns == st.st_mtime_ns
    assert data_fingerprint("imagenet-lt", tmp_path) != before
    split.write_text(split.read_text().replace("train/val_1.png 2", "train/val_2.png 2"))
    touch_like(split, st)
    assert data_fingerprint("imagenet-lt", tmp_path) == before
    # A listed image replaced by one of the same size with a new mtime.
    image = tmp_path / "train" / "test_1.png"
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert data_fingerprint("imagenet-lt", tmp_path) != before


def test_fingerprint_of_cifar_and_digits(tmp_path):
    from test_data import write_cifar10

    base = write_cifar10(tmp_path)
    before = data_fingerprint("cifar10-lt", tmp_path)
    meta = base / "batches.meta"
    st = meta.stat()
    meta.write_bytes(meta.read_bytes().replace(b"airplane", b"aeroplan"))  # same size
    touch_like(meta, st)
    assert data_fingerprint("cifar10-lt", tmp_path) != before
    assert data_fingerprint("digits-lt") == data_fingerprint("digits-lt")
    assert run_data_fingerprint(RunConfig(data=DataConfig("digits-lt"))) == data_fingerprint("digits-lt")
    assert len(data_fingerprint("digits-lt")) == 16


def test_the_node_cache_is_rebuilt_when_the_files_change(tmp_path):
    from lfm_ray.model import ImageSpec

    write_folder_set(tmp_path / "data")
    spec = ImageSpec(size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    cache = tmp_path / "cache"
    first = load_arrays("folder", root=tmp_path / "data", image=spec, cache_dir=cache)
    old = np.array(first.train_images[0])
    src = tmp_path / "data" / "train" / "cat" / "0.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src)
    second = load_arrays("folder", root=tmp_path / "data", image=spec, cache_dir=cache)
    assert len([p for p in cache.iterdir() if p.name.startswith("folder-")]) == 2
    assert not np.array_equal(np.array(second.train_images[0]), old)
    assert np.array_equal(np.array(second.train_images[0]), np.zeros((8, 8, 3), np.uint8))


# ---- planning a rerun (no training) ------------------------------------------------------
def stored_run(out: Path, cfg: RunConfig, fingerprint: str = "f" * 16) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(record(cfg, fingerprint, [])))


def small(**changes) -> RunConfig:
    return RunConfig(data=DataConfig("digits-lt")).override({"stage1.epochs": 1, "stage2.epochs": 1, **changes})


def test_plan_resume_refuse_extend_restart(tmp_path):
    out = tmp_path / "run"
    assert plan_train_rerun(out, small(), "f" * 16).action == "new"
    stored_run(out, small())
    assert plan_train_rerun(out, small(), "f" * 16).action == "resume"
    # Where things live and how fast they run may change on a resume.
    assert plan_train_rerun(out, small(**{"runtime.threads": 3, "data.cache_dir": "/x"}),
                            "f" * 16).action == "resume"
    with pytest.raises(LfmError, match=r'loss.name: "ce" -> "focal"; mix.method: "lfm" -> '
                                       r'"none"\. To proceed, give another --output, or add '
                                       r"--restart"):
        plan_train_rerun(out, small(**{"loss.name": "focal", "mix.method": "none"}), "f" * 16)
    with pytest.raises(LfmError, match=r"data_fingerprint: \"f{16}\" -> \"e{16}\""):
        plan_train_rerun(out, small(), "e" * 16)
    with pytest.raises(LfmError, match="the data set's files changed"):
        plan_train_rerun(out, small(), "e" * 16, extend=True)
    # More stage-2 epochs: refused with the hint, extended on request.
    with pytest.raises(LfmError, match="stage2.epochs: 1 -> 3.*add --extend"):
        plan_train_rerun(out, small(**{"stage2.epochs": 3}), "f" * 16)
    plan = plan_train_rerun(out, small(**{"stage2.epochs": 3}), "f" * 16, extend=True)
    assert plan.action == "extend"
    assert [e["changed"] for e in plan.extensions] == [{"stage2.epochs": [1, 3]}]
    # Stage 1 is not the last stage: more of it cannot continue a stage-2 checkpoint.
    with pytest.raises(LfmError, match=r"cannot be extended: --extend only adds epochs to the "
                                       r"last stage \(stage2.epochs\); it cannot change "
                                       r"stage1.epochs"):
        plan_train_rerun(out, small(**{"stage1.epochs": 3}), "f" * 16, extend=True)
    with pytest.raises(LfmError, match="only adds epochs; stage2.epochs goes from 1 to 0"):
        plan_train_rerun(out, small(**{"stage2.epochs": 0}), "f" * 16, extend=True)
    assert plan_train_rerun(out, small(**{"loss.name": "focal"}), "f" * 16,
                            restart=True).action == "restart"
    # A run without stage 2 may extend stage 1, or gain a stage 2 with its own settings.
    stored_run(out, small(**{"stage2.epochs": 0}))
    assert plan_train_rerun(out, small(**{"stage2.epochs": 0, "stage1.epochs": 4}), "f" * 16,
                            extend=True).action == "extend"
    assert plan_train_rerun(out, small(**{"stage2.epochs": 2, "stage2.lr": 0.5}), "f" * 16,
                            extend=True).action == "extend"


def test_plan_refuses_leftovers_without_a_record_and_a_broken_record(tmp_path):
    out = tmp_path / "run"
    (out / "run.checkpoints").mkdir(parents=True)
    with pytest.raises(LfmError, match="holds run.checkpoints but no config.json"):
        plan_train_rerun(out, small(), None)
    with pytest.raises(LfmError, match="will not delete them"):  # nor with --restart
        plan_train_rerun(out, small(), None, restart=True)
    (out / "config.json").write_text("{not json")
    with pytest.raises(LfmError, match="cannot be read as a run's configuration"):
        plan_train_rerun(out, small(), None)


# ---- reruns of lfm-ray train, end to end ---------------------------------------------------
@pytest.fixture(scope="module")
def ray_instance():
    import ray

    from lfm_ray.driver.launch import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def quick_flags(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", "digits-lt", "--output", str(out), "--num-workers", "0",
            "--stage1.epochs", "1",
            "--stage2.epochs", "1", "--runtime.max_steps_per_epoch", "2",
            "--data.cache_dir", str(tmp_path / "cache"), *extra]


def files_of(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `folder` with its mtime and bytes (to see that nothing changed)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def history(out: Path) -> list[tuple[int, int, float]]:
    return [(int(r["epoch"]), int(r["stage"]), float(r["train_loss"]))
            for r in csv.DictReader((out / "history.csv").open())]


@pytest.mark.slow
def test_train_reruns_end_to_end(tmp_path, capsys, ray_instance):
    out = tmp_path / "run"
    assert main(quick_flags(tmp_path, out)) == 0
    capsys.readouterr()
    stored = json.loads((out / "config.json").read_text())
    assert stored["data_fingerprint"] == data_fingerprint("digits-lt")
    first = history(out)
    assert [(e, s) for e, s, _ in first] == [(1, 1), (2, 2)]
    snapshot = files_of(out)

    # Another configuration: refused, each field named, nothing written.
    code = main(quick_flags(tmp_path, out, "--loss", "focal", "--mix", "none"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert 'loss.name: "ce" -> "focal"; mix.method: "lfm" -> "none"' in err
    assert "training tiny" not in err  # no banner for a refused run
    assert files_of(out) == snapshot
    # More stage-1 epochs after stage 2 trained: refused, with --extend too.
    for extra in ([], ["--extend"]):
        assert main(quick_flags(tmp_path, out, "--stage1.epochs", "3", *extra)) == 2
        assert "stage1.epochs: 1 -> 3" in capsys.readouterr().err
        assert files_of(out) == snapshot

    # The same configuration: resumes the finished run, trains nothing.
    assert main(quick_flags(tmp_path, out)) == 0
    assert "resuming the run" in capsys.readouterr().err
    assert history(out) == first

    # --extend: two more stage-2 epochs from the last checkpoint.
    assert main(quick_flags(tmp_path, out, "--stage2.epochs", "3", "--extend")) == 0
    capsys.readouterr()
    extended = history(out)
    assert [(e, s) for e, s, _ in extended] == [(1, 1), (2, 2), (3, 2), (4, 2)]
    assert extended[:2] == first
    stored = json.loads((out / "config.json").read_text())
    assert stored["stage2"]["epochs"] == 3
    assert stored["extensions"][0]["changed"] == {"stage2.epochs": [1, 3]}
    assert stored["extensions"][0]["schedule"]["epochs"] == [3, 4]  # tests/test_extend_schedule.py
    # The record is still a config file: given back as --config, it is this configuration.
    assert main(["train", "--config", str(out / "config.json"), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["stage2"]["epochs"] == 3

    # --restart: the folder's run is discarded and trained afresh, as in a new folder.
    (out / "notes.txt").write_text("mine")
    assert main(quick_flags(tmp_path, out, "--loss", "focal", "--restart")) == 0
    fresh = tmp_path / "fresh"
    assert main(quick_flags(tmp_path, fresh, "--loss", "focal")) == 0
    capsys.readouterr()
    assert history(out) == history(fresh)
    assert (out / "notes.txt").read_text() == "mine"  # only what lfm-ray wrote is removed
    assert "extensions" not in json.loads((out / "config.json").read_text())

    # Changed data files: the fingerprint differs, the rerun is refused naming it.
    import lfm_ray.data

    real = lfm_ray.data.run_data_fingerprint
    try:
        lfm_ray.data.run_data_fingerprint = lambda cfg: "0" * 16
        assert main(quick_flags(tmp_path, out, "--loss", "focal")) == 2
        assert f'data_fingerprint: "{real(RunConfig(data=DataConfig("digits-lt")))}" -> "{"0" * 16}"' \
            in capsys.readouterr().err
    finally:
        lfm_ray.data.run_data_fingerprint = real


# ---- checkpoints run no code -------------------------------------------------------------
def test_checkpoint_loaders_refuse_a_payload(tmp_path, capsys, ray_instance):
    proof = tmp_path / "ran"
    out = tmp_path / "run"
    assert main(quick_flags(tmp_path, out)) == 0
    capsys.readouterr()
    good = out / "run.checkpoints" / "epoch_0002" / "state.pt"
    state = load_state_file(good)  # a real trainer checkpoint reads weights-only
    assert state["epoch"] == 2 and state["stage"] == 2
    assert all(isinstance(v, torch.Tensor) for v in state["visual"].values())

    evil = tmp_path / "evil.pt"
    torch.save({**state, "history": [Payload(proof)]}, evil)
    with pytest.raises(LfmError, match="is refused: it names posix.system"):
        load_state_file(evil)

    from lfm_ray.analysis.load import _dataset_class_info
    from lfm_ray.worker.checkpoint import load_stage1
    from lfm_ray.worker.checkpoint import load_state

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    shutil.copy(evil, bad_dir / "state.pt")
    with pytest.raises(LfmError, match="refused"):
        load_state(bad_dir, torch.device("cpu"))
    with pytest.raises(LfmError, match="stage1_from file .* is refused"):
        load_stage1(small(), bad_dir)
    assert _dataset_class_info(bad_dir) is None

    # The resume path: a crafted checkpoint in the run's folder stops the rerun, unrun.
    crafted = out / "run.checkpoints" / "epoch_0003"
    shutil.copytree(out / "run.checkpoints" / "epoch_0002", crafted)  # complete, but for state.pt
    shutil.copy(evil, crafted / "state.pt")
    code = main(quick_flags(tmp_path, out))
    err = capsys.readouterr().err
    assert code == 2 and "is refused: it names posix.system" in err and "Traceback" not in err
    assert not proof.exists()


# ---- a killed or interrupted driver ------------------------------------------------------
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def children(pid: int) -> set[int]:
    """Every live descendant of `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie holds nothing and runs nothing


def session_pids(driver: int) -> set[int]:
    """Pids the driver's Ray instance started, from the log file names of its session folder
    (/tmp/ray/session_<time>_<driver pid>)."""
    pids: set[int] = set()
    for session in Path("/tmp/ray").glob(f"session_*_{driver}"):
        for log in (session / "logs").glob("*"):
            m = re.search(r"[-_](\d+)\.(log|out|err)$", log.name)
            if m and m.group(1) != "01000000":
                pids.add(int(m.group(1)))
    return pids - {driver}


def start_train(out: Path, cache: Path, epochs: int) -> tuple[list[str], subprocess.Popen]:
    command = [sys.executable, "-m", "lfm_ray.cli", "train", "--dataset", "digits-lt",
               "--output", str(out), "--stage1.epochs", str(epochs), "--stage2.epochs", "2",
               "--data.cache_dir", str(cache)]
    return command, subprocess.Popen(command, cwd=out.parent, env=ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)


def wait_for_epoch(proc: subprocess.Popen, out: Path, epoch: int) -> set[int]:
    """Poll until the run has checkpointed `epoch`; returns every pid seen below the driver."""
    seen: set[int] = set()
    deadline = time.time() + 300
    target = out / "run.ray" / "run" / f"epoch_{epoch:04d}"
    while time.time() < deadline and proc.poll() is None:
        seen |= children(proc.pid)
        if target.is_dir():
            return seen | children(proc.pid)
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint of epoch {epoch} before the deadline "
                         f"(exit {proc.poll()}): {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}")


def assert_instance_gone(pids: set[int], timeout_s: float = 20.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    left = {p: Path(f"/proc/{p}/comm").read_text().strip() for p in pids if alive(p)}
    assert not left, f"Ray processes of the killed driver's instance survive: {left}"


@pytest.mark.slow
def test_killed_driver_leaves_no_ray_process_and_resumes_to_the_same_metrics(tmp_path):
    out, cache = tmp_path / "killed", tmp_path / "cache"
    command, proc = start_train(out, cache, epochs=8)
    try:
        pids = wait_for_epoch(proc, out, 2) | session_pids(proc.pid)
        assert len(pids) >= 5  # GCS, raylet, Train controller, worker, ...
        proc.kill()  # SIGKILL: no handler, no atexit
        proc.wait(timeout=30)
        at_kill = {p.name for p in (out / "run.ray" / "run").glob("epoch_*")}
        assert_instance_gone(pids | session_pids(proc.pid))
        # At most the epoch being written at the kill lands after it; training stopped.
        after = {p.name for p in (out / "run.ray" / "run").glob("epoch_*")}
        assert len(after - at_kill) <= 1 and "epoch_0010" not in after
    finally:
        if proc.poll() is None:
            proc.kill()
    resumed = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming the run" in resumed.stderr
    whole = tmp_path / "whole"
    command_whole = [c if c != str(out) else str(whole) for c in command]
    uninterrupted = subprocess.run(command_whole, cwd=tmp_path, env=ENV, capture_output=True,
                                   text=True, timeout=400)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    a = json.loads((out / "metrics.json").read_text())
    b = json.loads((whole / "metrics.json").read_text())
    for key in ("epoch", "acc_all", "acc_many", "acc_medium", "acc_few", "per_class_acc"):
        assert a[key] == b[key], key
    assert [r[:2] for r in history(out)] == [r[:2] for r in history(whole)]
    assert [r[2] for r in history(out)] == pytest.approx([r[2] for r in history(whole)])


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path):
    out, cache = tmp_path / "interrupted", tmp_path / "cache"
    command, proc = start_train(out, cache, epochs=40)
    try:
        pids = wait_for_epoch(proc, out, 1) | session_pids(proc.pid)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; run the same command again to resume" in err
    assert "Traceback" not in err
    assert_instance_gone(pids | session_pids(proc.pid))
    assert json.loads((out / "config.json").read_text())["stage1"]["epochs"] == 40


def test_a_half_written_kept_checkpoint_is_passed_over(tmp_path, capsys, ray_instance):
    """A driver killed while writing a checkpoint (local mode keeps them in the run's folder)
    leaves a folder without its history.json: the rerun resumes from the last whole one."""
    out = tmp_path / "run"
    assert main(quick_flags(tmp_path, out)) == 0
    before = history(out)
    partial = out / "run.checkpoints" / "epoch_0003"
    partial.mkdir()
    (partial / "state.pt").write_bytes((out / "run.checkpoints" / "epoch_0002" / "state.pt")
                                       .read_bytes()[:100])
    assert main(quick_flags(tmp_path, out)) == 0
    assert "resuming the run" in capsys.readouterr().err
    assert history(out) == before
