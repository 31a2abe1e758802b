"""Every bad input a user can give: one line on stderr, exit 2, no traceback, nothing
written, and no training started (each case fails before Ray starts, so the module is fast).
Inputs that used to be accepted are refused here too; a few that are accepted on purpose
(`--mix.tau` is a flag) are checked to stay so."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

from lfm_ray.cli import main
from lfm_ray.data import build_dataset
from test_data import read_pickle, write_cifar10, write_pickle


class Payload:
    """Unpickled, it would create the file it names: proof that it ran."""

    def __init__(self, proof: Path):
        self.proof = str(proof)

    def __reduce__(self):
        return (os.system, (f"touch {self.proof}",))


def one_line(capsys, code: int, needle: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def digits_train_count() -> int:
    return len(build_dataset("digits-lt").train_labels)


# ---- lfm-ray train ------------------------------------------------------------------------
@pytest.mark.parametrize("flags,needle", [
    (["--data.seed", "-1"], "data.seed=-1 is not valid; expected an integer >= 0"),
    (["--seed", "-3"], "runtime.seed=-3 is not valid"),
    (["--runtime.threads", "-2"], "runtime.threads=-2 is not valid"),
    (["--stage1.lr", "inf"], "stage1.lr='inf' is not valid"),
    (["--stage2.lr", "nan"], "stage2.lr='nan' is not valid"),
    (["--data.selection_split", "val"], "data set 'digits-lt' has no validation split"),
    (["--stage1.epochs", "0", "--stage2.epochs", "0"], "the run would train nothing"),
    (["--stage1.epoch", "3"], "unrecognized arguments: --stage1.epoch 3"),  # no abbreviations
    (["--mix.ta", "0.1"], "unrecognized arguments: --mix.ta 0.1"),
    (["--extend", "--restart"], "not allowed with argument"),
])
def test_train_flags(tmp_path, capsys, flags, needle):
    out = tmp_path / "out"
    code = main(["train", "--dataset", "digits-lt", "--output", str(out), "--data.cache_dir", str(tmp_path / "c"), *flags])
    one_line(capsys, code, needle)
    assert not out.exists()


def test_batch_larger_than_the_training_set_names_both_numbers(tmp_path, capsys):
    n = digits_train_count()
    out = tmp_path / "out"
    code = main(["train", "--dataset", "digits-lt", "--output", str(out), "--batch-size", str(n + 1),
                 "--data.cache_dir", str(tmp_path / "c")])
    one_line(capsys, code, f"runtime.batch_size={n + 1} is larger than the {n} training images "
                           "of digits-lt")
    assert not out.exists()
    # --dry-run checks it as well.
    one_line(capsys, main(["train", "--dataset", "digits-lt", "--dry-run", "--batch-size", str(n + 1)]),
             f"is larger than the {n} training images")


def test_a_json_true_is_not_an_integer(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"stage1": {"epochs": True}}))
    code = main(["train", "--config", str(config), "--output", str(tmp_path / "out")])
    one_line(capsys, code, "stage1.epochs=True is not valid; expected int")


def test_dotted_stage_shorthand_is_a_flag(capsys):
    assert main(["train", "--dataset", "digits-lt", "--mix.tau", "0.05", "--stage1.epochs", "1", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["stage1"]["tau"] == 0.05 and cfg["stage2"]["tau"] == 0.05


def test_a_cache_folder_that_cannot_be_created(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    bad = blocker / "cache"
    for extra in (["--dry-run"], ["--output", str(tmp_path / "out")]):
        code = main(["train", "--dataset", "digits-lt", "--data.cache_dir", str(bad), *extra])
        one_line(capsys, code, f"the image cache folder {str(bad)!r} (data.cache_dir) cannot be "
                               "created")
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("mine")
    one_line(capsys, main(["train", "--dataset", "digits-lt", "--output", str(target)]), "is a file, not a folder")
    assert target.read_text() == "mine"


# ---- weights files ------------------------------------------------------------------------
def test_weights_file_that_is_text_names_it(tmp_path, capsys):
    text = tmp_path / "weights.pt"
    text.write_text("not weights\n")
    code = main(["train", "--dataset", "digits-lt", "--pretrained", str(text), "--output", str(tmp_path / "o"),
                 "--data.cache_dir", str(tmp_path / "c")])
    err = one_line(capsys, code, "it is not a PyTorch weights file")
    assert "weights_only" not in err  # torch's advice to load it unsafely is not passed on
    assert not (tmp_path / "o").exists()


def test_weights_of_another_model_say_so(tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(4, 4), "head.bias": torch.zeros(4)}, other)
    code = main(["train", "--dataset", "digits-lt", "--pretrained", str(other), "--output", str(tmp_path / "o"),
                 "--data.cache_dir", str(tmp_path / "c")])
    err = one_line(capsys, code, "its tensors do not fit this model")
    assert "missing keys" in err and "2 unexpected keys (e.g. 'encoder.weight')" in err


def test_weights_file_with_a_payload_is_refused_and_never_runs(tmp_path, capsys):
    proof = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"visual.proj": torch.zeros(2), "x": Payload(proof)}, evil)
    code = main(["train", "--dataset", "digits-lt", "--pretrained", str(evil), "--output", str(tmp_path / "o"),
                 "--data.cache_dir", str(tmp_path / "c")])
    one_line(capsys, code, "refused")
    assert not proof.exists()


def test_a_folder_given_as_weights_file(tmp_path, capsys):
    one_line(capsys, main(["train", "--dataset", "digits-lt", "--pretrained", str(tmp_path), "--dry-run"]),
             f"weights file {str(tmp_path)!r} for tiny is a directory")


# ---- lfm-ray data -------------------------------------------------------------------------
@pytest.mark.parametrize("flags,needle", [
    (["--data.seed", "-1"], "seed=-1 is not valid; expected an integer >= 0"),
    (["--seed", "-1"], "runtime.seed=-1 is not valid"),
    (["--imbalance-factor", "nan"], "imbalance_factor=nan is not valid"),
    (["--imbalance-factor", "inf"], "imbalance_factor=inf is not valid"),
    (["--tau", "0"], "mix.tau=0.0 is not valid"),
])
def test_data_flags(capsys, flags, needle):
    one_line(capsys, main(["data", "digits-lt", *flags]), needle)


def test_data_seed_and_training_seed_are_separate_flags(capsys, monkeypatch):
    """--data.seed picks the subset; --seed seeds the random tiny model (γ′ changes)."""
    import lfm_ray.data

    real, given = lfm_ray.data.build_dataset, []
    monkeypatch.setattr(lfm_ray.data, "build_dataset",
                        lambda name, root=None, **o: given.append(o) or real(name, root, **o))
    assert main(["data", "digits-lt", "--data.seed", "2", "--no-gamma"]) == 0
    assert given == [{"seed": 2}]
    capsys.readouterr()
    gammas = []
    for seed in ("0", "5"):
        assert main(["data", "digits-lt", "--seed", seed]) == 0
        gammas.append(capsys.readouterr().out.split("effective imbalance")[1])
    assert gammas[0] != gammas[1]


def test_a_gzipped_split_file(tmp_path, capsys):
    (tmp_path / "ImageNet_LT_train.txt").write_bytes(gzip.compress(b"train/a.jpg 0\n"))
    code = main(["data", "imagenet-lt", "--root", str(tmp_path), "--no-gamma"])
    one_line(capsys, code, "ImageNet_LT_train.txt is gzip-compressed; a split file is plain text")


def test_a_split_file_that_is_not_text(tmp_path, capsys):
    (tmp_path / "ImageNet_LT_train.txt").write_bytes(b"train/a.jpg 0\n\xff\xfe\x00\n")
    code = main(["data", "imagenet-lt", "--root", str(tmp_path), "--no-gamma"])
    one_line(capsys, code, "ImageNet_LT_train.txt is not a UTF-8 text file")


@pytest.mark.parametrize("damage,needle", [
    ("meta_list", "batches.meta holds a list, not the dict of a CIFAR python file"),
    ("short_rows", "'data' rows are 3000 bytes long"),
    ("extra_images", "holds 50 images but 49 labels"),
])
def test_damaged_cifar_files(tmp_path, capsys, damage, needle):
    base = write_cifar10(tmp_path)
    if damage == "meta_list":
        write_pickle(base / "batches.meta", ["airplane", "automobile"])
    elif damage == "short_rows":
        batch = read_pickle(base / "data_batch_2")
        write_pickle(base / "data_batch_2", {**batch, "data": batch["data"][:, :3000].copy()})
    else:  # a test batch with more images than labels
        test = read_pickle(base / "test_batch")
        write_pickle(base / "test_batch", {**test, "labels": test["labels"][:-1]})
    code = main(["data", "cifar10-lt", "--root", str(tmp_path), "--imbalance-factor", "10",
                 "--no-gamma"])
    one_line(capsys, code, needle)


# ---- lfm-ray report -----------------------------------------------------------------------
@pytest.fixture
def study_dir(tmp_path):
    """A study folder (the report is not built: --out is refused first)."""
    folder = tmp_path / "study"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("where,needle", [
    ("missing/r.html", "the folder"),
    ("blocker/r.html", "is a file, not a folder"),
    ("r.txt", "must name a .html or .htm file"),
])
def test_report_out_is_checked_first(tmp_path, capsys, monkeypatch, study_dir, where, needle):
    import lfm_ray.analysis

    (tmp_path / "blocker").write_text("")
    monkeypatch.setattr(lfm_ray.analysis, "write_report",
                        lambda *a, **k: pytest.fail("the report was built before --out was checked"))
    one_line(capsys, main(["report", str(study_dir), "--out", str(tmp_path / where)]), needle)


def test_tsne_device_is_checked(tmp_path, capsys):
    one_line(capsys, main(["report", "--tsne", str(tmp_path), "--classes", "0,1",
                           "--device", "foo"]), "--device 'foo' is not a torch device")


def test_tsne_checkpoint_that_is_not_one(tmp_path, capsys):
    ckpt = tmp_path / "epoch_0001"
    ckpt.mkdir()
    (ckpt / "state.pt").write_text("text, not a checkpoint")
    one_line(capsys, main(["report", "--tsne", str(ckpt), "--classes", "0,1"]),
             "is not a PyTorch checkpoint")
    one_line(capsys, main(["report", "--tsne", str(tmp_path / "nothing"), "--classes", "0,1"]),
             "is not a checkpoint directory")


def test_tsne_checkpoint_with_a_payload_is_refused_and_never_runs(tmp_path, capsys):
    proof = tmp_path / "ran"
    ckpt = tmp_path / "epoch_0001"
    ckpt.mkdir()
    torch.save({"visual": {}, "proj": {}, "config": {}, "x": Payload(proof)}, ckpt / "state.pt")
    err = one_line(capsys, main(["report", "--tsne", str(ckpt), "--classes", "0,1"]),
                   "is refused: it names posix.system")
    assert "could run code" in err
    assert not proof.exists()


# ---- lfm-ray bench ------------------------------------------------------------------------
def test_bench_json_path_is_checked_before_the_benchmark(tmp_path, capsys, monkeypatch):
    import lfm_ray.commands.benchmarks

    monkeypatch.setattr(lfm_ray.commands.benchmarks, "run_bench",
                        lambda **k: pytest.fail("the benchmark ran before --json was checked"))
    one_line(capsys, main(["bench", "--json", str(tmp_path / "no" / "b.json")]),
             "the folder")
    one_line(capsys, main(["bench", "--json", str(tmp_path)]), "is a folder")


@pytest.mark.parametrize("only,needle", [
    ("", "--only '' names no part; accepted: sampler, sampler_inat, cache_build, cache_memory, stage_cost"),
    (" , ", "names no part"),
    ("sampler,nope", "--only: unknown part 'nope'; accepted: sampler"),
])
def test_bench_only_must_name_parts(capsys, monkeypatch, only, needle):
    import lfm_ray.commands.benchmarks

    parts = []
    monkeypatch.setattr(lfm_ray.commands.benchmarks, "bench_sampler", lambda **k: parts.append("ran") or {})
    one_line(capsys, main(["bench", "--only", only]), needle)
    assert parts == []  # refused before any part ran


# ---- lfm-ray study ------------------------------------------------------------------------
def test_bad_optuna_storage_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["study", "--name", "s", "--search", "optuna", "--space",
                 "mix.tau=loguniform:0.01:1", "--optuna-storage", "bogus://x",
                 "--storage-path", str(tmp_path / "ray"), "--results-dir", str(tmp_path / "res")])
    one_line(capsys, code, "--optuna-storage 'bogus://x' is not a database URL")
    assert list(tmp_path.iterdir()) == []


def test_negative_max_concurrent(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["study", "--name", "s", "--grid", "mix.tau=0.05", "--max-concurrent", "-1",
                 "--storage-path", str(tmp_path / "ray"), "--results-dir", str(tmp_path / "res")])
    one_line(capsys, code, "max_concurrent=-1 is not valid")
    assert list(tmp_path.iterdir()) == []


def test_tsne_checkpoint_of_another_model(tmp_path, capsys):
    from lfm_ray.config import DataConfig, RunConfig

    ckpt = tmp_path / "epoch_0001"
    ckpt.mkdir()
    cfg = RunConfig(data=DataConfig("digits-lt")).override({"data.cache_dir": str(tmp_path / "cache")})
    torch.save({"visual": {"conv.weight": torch.zeros(2)}, "proj": {}, "config": cfg.to_dict()},
               ckpt / "state.pt")
    one_line(capsys, main(["report", "--tsne", str(ckpt), "--classes", "0,1"]),
             "the checkpoint's weights do not fit the model its config names (tiny)")
