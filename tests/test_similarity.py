"""LFM's class similarity sources (mix.similarity): S of each source against a direct
computation, the files' errors, and a training on the embedded set with each source."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lfm_ray.config import DataConfig, RunConfig
from lfm_ray.errors import LfmError
from lfm_ray.mixing import build_mixer, class_sampling_matrix, local_sampling_matrix
from lfm_ray.resolved import resolved_choices
from lfm_ray.similarity import (
    Source, check_similarity, cosine_similarity, image_prototype_similarity, parse_similarity,
    read_similarity_file, read_taxonomy_file, similarity_source,
    taxonomy_similarity,
)

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# A made-up hierarchy of the ten digits by their strokes, for the taxonomy source.
DIGIT_TAXONOMY = {
    "zero": ["closed", "round", "zero"], "six": ["closed", "round", "six"],
    "eight": ["closed", "round", "eight"], "nine": ["closed", "round", "nine"],
    "four": ["closed", "angled", "four"], "one": ["open", "straight", "one"],
    "seven": ["open", "straight", "seven"], "two": ["open", "curved", "two"],
    "three": ["open", "curved", "three"], "five": ["open", "curved", "five"],
}


# ---- the values ----------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("text", Source("text")),
    ("text:ViT-B-32:openai", Source("text", model="ViT-B-32", pretrained="openai")),
    ("text:tiny", Source("text", model="tiny")),
    ("text:hf-hub:org/bio-clip", Source("text", model="hf-hub:org/bio-clip")),
    ("text:ViT-B-16:/w/model.pt", Source("text", model="ViT-B-16", pretrained="/w/model.pt")),
    ("image-prototypes", Source("image-prototypes")),
    ("taxonomy", Source("taxonomy")),
    ("taxonomy:/t/tree.json", Source("taxonomy", path="/t/tree.json")),
    ("file:/s/S.npy", Source("file", path="/s/S.npy")),
    ("file:emb.csv", Source("file", path="emb.csv")),
    ("uniform", Source("uniform")),
])
def test_similarity_values_parse(text, expected):
    assert parse_similarity(text) == expected
    assert str(parse_similarity(text)) == text


@pytest.mark.parametrize("text,message", [
    ("bogus", "mix.similarity='bogus' is not valid; expected auto, text"),
    ("text:", "names no model"),
    ("file:", "names no file"),
    ("file", "names no file"),
    ("file:S.txt", "a similarity file is .npy or .csv"),
    ("taxonomy:", "names no file"),
])
def test_bad_similarity_values_are_refused(text, message):
    with pytest.raises(LfmError, match=message):
        parse_similarity(text)


def test_auto_is_text_for_clip_and_image_prototypes_for_timm(tmp_path):
    clip = RunConfig(data=DataConfig("digits-lt"))
    timm = RunConfig(data=DataConfig("digits-lt")).override({"model.name": "timm:test_vit"})
    assert similarity_source(clip) == Source("text")
    assert similarity_source(timm) == Source("image-prototypes")
    assert resolved_choices(clip) == {"model.family": "clip", "model.text": "clip",
                                      "mix.similarity": "text",
                                      "model.classifier_init": "text"}
    assert resolved_choices(timm) == {"model.family": "timm", "model.text": "none",
                                      "mix.similarity": "image-prototypes",
                                      "model.classifier_init": "random"}
    # A file path is recorded absolute.
    (tmp_path / "S.npy").write_bytes(b"")
    rel = RunConfig(data=DataConfig("digits-lt")).override({"mix.similarity": "file:S.npy"})
    import os

    here = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert resolved_choices(rel)["mix.similarity"] == f"file:{tmp_path / 'S.npy'}"
    finally:
        os.chdir(here)


def test_checks_refuse_what_a_run_cannot_have(tmp_path):
    timm = RunConfig(data=DataConfig("digits-lt")).override({"model.name": "timm:test_vit", "mix.similarity": "text"})
    with pytest.raises(LfmError, match="needs the run's class text features, which the vision-only"):
        check_similarity(timm)
    with pytest.raises(LfmError, match="mix.similarity='text:ViT-B-23'.*unknown model 'ViT-B-23'"):
        check_similarity(RunConfig(data=DataConfig("digits-lt")).override({"mix.similarity": "text:ViT-B-23"}))
    with pytest.raises(LfmError, match="data set 'digits-lt' has no class hierarchy of its own"):
        check_similarity(RunConfig(data=DataConfig("digits-lt")).override({"mix.similarity": "taxonomy"}))
    with pytest.raises(LfmError, match="similarity file .*missing.npy' does not exist"):
        check_similarity(RunConfig(data=DataConfig("digits-lt")).override(
            {"mix.similarity": f"file:{tmp_path / 'missing.npy'}"}))
    # Offline, a text tower whose weights are not cached is refused before the run.
    cfg = RunConfig(data=DataConfig("digits-lt")).override({"mix.similarity": "text:ViT-B-32:openai",
                                "model.cache_dir": str(tmp_path / "hub")})
    import lfm_ray.model
    import lfm_ray.weights

    saved = lfm_ray.weights.hub_reachable
    lfm_ray.weights.hub_reachable = lambda timeout_s=3.0: False
    try:
        with pytest.raises(LfmError, match="text:ViT-B-32:openai.*are not cached"):
            check_similarity(cfg, weights=True)
    finally:
        lfm_ray.weights.hub_reachable = saved


# ---- S against direct computations --------------------------------------------------------
def test_class_sampling_matrix_is_the_off_diagonal_softmax_of_s_over_tau():
    rng = np.random.default_rng(0)
    S = rng.normal(size=(5, 5))
    S = (S + S.T) / 2
    tau = 0.3
    P = class_sampling_matrix(torch.as_tensor(S), tau).numpy()
    for i in range(5):
        others = [j for j in range(5) if j != i]
        weights = np.array([math.exp(S[i, j] / tau) for j in others])
        for j, w in zip(others, weights / weights.sum()):
            assert P[i, j] == pytest.approx(w, rel=1e-12)
        assert P[i, i] == 0.0
    # The text path is the same law with S = f_T f_Tᵀ.
    f = torch.nn.functional.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1)
    assert torch.allclose(local_sampling_matrix(f, 0.05), class_sampling_matrix(f @ f.t(), 0.05))
    # S = 0 (uniform): each other class 1/(C - 1).
    U = class_sampling_matrix(torch.zeros(4, 4), 1.0)
    assert torch.allclose(U, (1 - torch.eye(4, dtype=torch.float64)) / 3)


def test_lfm_mixer_draws_from_softmax_of_the_given_similarity():
    S = torch.tensor([[0.0, 0.9, 0.1], [0.9, 0.0, 0.2], [0.1, 0.2, 0.0]], dtype=torch.float64)
    mixer = build_mixer("lfm", class_counts=[4, 2, 1], train_labels=[0, 0, 0, 0, 1, 1, 2],
                        class_similarity=S, tau=0.5)
    assert torch.allclose(mixer.P, class_sampling_matrix(S, 0.5))
    with pytest.raises(LfmError, match="class similarity of shape \\(2, 2\\) for 3 classes"):
        build_mixer("lfm", class_counts=[4, 2, 1], train_labels=[0, 0, 0, 0, 1, 1, 2],
                    class_similarity=torch.zeros(2, 2))


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_taxonomy_similarity_is_the_depth_of_the_common_ancestor_over_the_full_depth():
    paths = [
        ("Animalia", "Chordata", "Aves", "Corvus", "Corvus corax"),
        ("Animalia", "Chordata", "Aves", "Corvus", "Corvus corone"),
        ("Animalia", "Chordata", "Mammalia", "Vulpes", "Vulpes vulpes"),
        ("Plantae", "Tracheophyta", "Pinopsida", "Abies", "Abies alba"),
        # A genus named as another's, in another class: a different node.
        ("Animalia", "Arthropoda", "Insecta", "Corvus", "Corvus insect"),
        ("Fungi", "Amanita"),  # a shorter path
    ]
    S = taxonomy_similarity(paths).numpy()
    D = 5
    for i, a in enumerate(paths):
        for j, b in enumerate(paths):
            assert S[i, j] == pytest.approx(_common_prefix(a, b) / D), (i, j)
    assert S[0, 1] == pytest.approx(4 / 5) and S[0, 3] == 0.0 and S[0, 4] == pytest.approx(1 / 5)
    assert S.min() >= 0 and S.max() <= 1 and np.allclose(S, S.T)


def test_cosines_of_an_embedding():
    E = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0], [-3.0, 0.0, 0.0]])
    S = cosine_similarity(E).numpy()
    for i in range(4):
        for j in range(4):
            cos = E[i] @ E[j] / (np.linalg.norm(E[i]) * np.linalg.norm(E[j]))
            assert S[i, j] == pytest.approx(cos)


def test_image_prototypes_are_the_cosines_of_the_class_means_of_unit_features():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(12, 4)) * rng.uniform(0.5, 3, size=(12, 1))
    labels = np.array([0, 0, 1, 2, 1, 0, 2, 2, 1, 0, 1, 2])
    S = image_prototype_similarity(lambda pos: torch.as_tensor(feats[pos.numpy()]),
                                   torch.as_tensor(labels), 3, torch.arange(12), batch_size=5)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    means = np.stack([unit[labels == k].mean(axis=0) for k in range(3)])
    for i in range(3):
        for j in range(3):
            cos = means[i] @ means[j] / (np.linalg.norm(means[i]) * np.linalg.norm(means[j]))
            assert S[i, j].item() == pytest.approx(cos, rel=1e-12)
    # Split over two workers, the sums added: the same S.
    halves = [torch.arange(0, 12, 2), torch.arange(1, 12, 2)]
    partial = {}

    def features(pos):
        return torch.as_tensor(feats[pos.numpy()])

    def reduce_with_other(t):  # what an all-reduce over the two halves gives
        key = "sums" if t.dim() == 2 else "counts"
        return t + partial[key]

    other_sums = torch.zeros(3, 4, dtype=torch.float64)
    other_counts = torch.zeros(3, dtype=torch.float64)
    for p in halves[1].tolist():
        other_sums[labels[p]] += torch.as_tensor(unit[p])
        other_counts[labels[p]] += 1
    partial.update(sums=other_sums, counts=other_counts)
    split = image_prototype_similarity(features, torch.as_tensor(labels), 3, halves[0], 4,
                                       reduce_with_other)
    assert torch.allclose(split, S)


# ---- files -----------------------------------------------------------------------------------
def test_a_square_file_is_s_and_any_other_an_embedding(tmp_path):
    S = np.array([[1.0, 0.2, -0.5], [0.2, 1.0, 0.3], [-0.5, 0.3, 1.0]])
    np.save(tmp_path / "S.npy", S)
    assert np.array_equal(read_similarity_file(str(tmp_path / "S.npy"), 3).numpy(), S)
    E = np.array([[1.0, 2.0], [0.5, -1.0], [3.0, 0.1]])
    np.savetxt(tmp_path / "E.csv", E, delimiter=",")
    got = read_similarity_file(str(tmp_path / "E.csv"), 3).numpy()
    assert np.allclose(got, cosine_similarity(E).numpy())


@pytest.mark.parametrize("name,content,message", [
    ("asym.npy", np.array([[1.0, 0.5, 0.0], [0.1, 1.0, 0.0], [0.0, 0.0, 1.0]]),
     "is not symmetric"),
    ("nan.npy", np.array([[1.0, np.nan], [np.nan, 1.0], [0.0, 1.0]]), "not finite"),
    ("rows.npy", np.ones((4, 2)), "has 4 rows, but the data set has 3 classes"),
    ("flat.npy", np.ones(3), "shape \\(3,\\); expected a C×C matrix"),
    ("zero.npy", np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]), "all-zero embedding"),
    ("words.csv", "a,b\n1,2\n3,4\n", "cannot be read as numbers"),
    ("missing.npy", None, "does not exist"),
])
def test_bad_similarity_files_are_refused_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        np.save(path, content)
    with pytest.raises(LfmError, match=f"similarity file '{path}'.*{message}"):
        read_similarity_file(str(path), 3)


def test_taxonomy_files_map_names_or_list_paths(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps(DIGIT_TAXONOMY))
    paths = read_taxonomy_file(str(tmp_path / "t.json"), DIGITS)
    assert paths[0] == ("closed", "round", "zero") and paths[1] == ("open", "straight", "one")
    (tmp_path / "l.json").write_text(json.dumps([DIGIT_TAXONOMY[n] for n in DIGITS]))
    assert read_taxonomy_file(str(tmp_path / "l.json"), DIGITS) == paths
    cases = {
        "partial.json": ({"zero": ["a", "zero"]}, "has no path for class 'one'"),
        "same.json": ({**DIGIT_TAXONOMY, "one": ["open", "straight", "seven"]},
                      "classes 'one' and 'seven' have the same path"),
        "short.json": ([["a"]] * 3, "lists 3 paths, but the data set has 10 classes"),
        "bad.json": ({**DIGIT_TAXONOMY, "two": "open/curved/two"}, "must be a non-empty list"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(LfmError, match=f"taxonomy file '.*{name}'.*{message}"):
            read_taxonomy_file(str(tmp_path / name), DIGITS)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(LfmError, match="broken.json' cannot be read as JSON"):
        read_taxonomy_file(str(tmp_path / "broken.json"), DIGITS)


# ---- each source trains on the embedded set --------------------------------------------------
def _run(cfg):
    from lfm_ray.worker.loop import Run
    from lfm_ray.worker.distributed import WorkerInfo

    torch.set_num_threads(1)
    return Run(cfg.validate(), WorkerInfo(rank=0, world_size=1, device=torch.device("cpu")))


def _direct_s(source: str, run, tmp_path) -> torch.Tensor:
    """S computed here, not through lfm_ray.similarity."""
    C = run.num_classes
    if source == "uniform":
        return torch.zeros(C, C, dtype=torch.float64)
    if source.startswith("file:"):
        E = np.load(source[5:]) if source.endswith(".npy") else np.loadtxt(source[5:],
                                                                          delimiter=",")
        if E.shape == (C, C):
            return torch.as_tensor(E)
        unit = E / np.linalg.norm(E, axis=1, keepdims=True)
        return torch.as_tensor(unit @ unit.T)
    if source.startswith("taxonomy:"):
        paths = [DIGIT_TAXONOMY[n] for n in run.class_names]
        D = max(len(p) for p in paths)
        return torch.tensor([[_common_prefix(a, b) / D for b in paths] for a in paths],
                            dtype=torch.float64)
    if source == "image-prototypes":
        with torch.no_grad():
            run.model.eval()
            feats = run.model.encode(run.build(run.train_images.gather(
                torch.arange(len(run.train_images))))).double()
        unit = torch.nn.functional.normalize(feats, dim=1)
        means = torch.stack([unit[run.train_labels == k].mean(0) for k in range(C)])
        means = torch.nn.functional.normalize(means, dim=1)
        return means @ means.t()
    if source.startswith("text"):  # text:tiny, seeded as the run: the run's own tower again
        f = run.text_features.double()
        return f @ f.t()
    raise AssertionError(source)


SOURCES = ["text", "text:tiny", "image-prototypes", "taxonomy:{tmp}/digits.json",
           "file:{tmp}/S.npy", "file:{tmp}/emb.csv", "uniform"]


@pytest.mark.parametrize("source", SOURCES)
def test_each_source_gives_s_and_trains_lfm_end_to_end(tmp_path, source):
    from test_train import fit_local, small_config

    (tmp_path / "digits.json").write_text(json.dumps(DIGIT_TAXONOMY))
    rng = np.random.default_rng(3)
    A = rng.normal(size=(10, 10))
    np.save(tmp_path / "S.npy", (A + A.T) / 2)
    np.savetxt(tmp_path / "emb.csv", rng.normal(size=(10, 5)), delimiter=",")
    source = source.format(tmp=tmp_path)
    cfg = small_config(tmp_path, **{"mix.method": "lfm", "mix.similarity": source,
                                    "runtime.max_steps_per_epoch": 2})
    run = _run(cfg)
    if source == "text":
        assert run.class_similarity is None  # P straight from the text features, as before
        S = run.text_features.double() @ run.text_features.double().t()
    else:
        S = run.class_similarity
        assert torch.allclose(S, _direct_s(source, run, tmp_path), atol=1e-10)
    P = class_sampling_matrix(S, cfg.stage1.tau).float()
    assert torch.allclose(run.sampling_matrix(), P, atol=1e-6)
    # The stage's mixer draws from the same P, and the whole two-stage run trains.
    from lfm_ray.worker.loop import _mixer, stage_plan

    assert torch.allclose(_mixer(run, stage_plan(cfg)[0]).P.float(), P, atol=1e-6)
    result = fit_local(cfg, tmp_path / "ckpt")
    assert result.metrics["epoch"] == 2 and math.isfinite(result.metrics["train_loss"])
    from lfm_ray import confusion

    saved = confusion.read(tmp_path / "ckpt" / "epoch_0002")
    assert np.allclose(saved["sampling_matrix"], P.numpy(), atol=1e-6)


def test_a_wrong_file_for_the_data_set_fails_naming_it(tmp_path):
    np.save(tmp_path / "S.npy", np.eye(4))
    cfg = RunConfig(data=DataConfig("digits-lt")).override({"mix.similarity": f"file:{tmp_path / 'S.npy'}",
                                "data.cache_dir": str(tmp_path / "cache")})
    with pytest.raises(LfmError, match="S.npy' has 4 rows, but the data set has 10 classes"):
        _run(cfg)


# ---- the study script ----------------------------------------------------------------------------
def _plan(argv):
    import sys
    from pathlib import Path
    from lfm_ray.commands.catalog import similarity_sources

    from lfm_ray.commands.study_flags import add_study_flags, requested_datasets
    from lfm_ray.commands.run_flags import new_parser

    parser = new_parser()
    add_study_flags(parser)
    args = parser.parse_args(argv)
    args.datasets = requested_datasets(args)
    return similarity_sources.declare(args)


def test_the_study_compares_the_sources_the_model_and_data_can_have(tmp_path):
    from test_inat import fabricate

    plan = _plan([])
    assert plan.grid == {"method": ["CE", "LFM text", "LFM image prototypes", "LFM uniform"]}
    assert plan.variants["LFM image prototypes"] == {
        "loss.name": "ce", "mix.method": "lfm", "mix.similarity": "image-prototypes"}
    assert plan.variants["CE"]["mix.method"] == "none"
    # A vision-only model has no text tower of its own; with a text encoder it has text
    # features (fashion-lt's preset: GloVe's).
    timm = _plan(["--model", "timm:test_vit", "--dataset", "digits-lt"])
    assert timm.grid["method"] == ["CE", "LFM image prototypes", "LFM uniform"]
    glove = _plan(["--model", "timm:test_vit", "--dataset", "digits-lt", "--model.text", "glove"])
    assert "LFM text" in glove.grid["method"]
    # iNaturalist has a taxonomy.
    root = fabricate(tmp_path / "inat")
    inat = _plan(["--dataset", "inat2018", "--data-root", str(root)])
    assert "LFM taxonomy" in inat.grid["method"]
    assert inat.variants["LFM taxonomy"]["mix.similarity"] == "taxonomy"
    assert _plan(["--smoke"]).grid["method"] == ["LFM image prototypes", "LFM uniform"]


def test_the_study_script_help_imports_nothing_heavy():
    from test_config_path import script_help  # tests/ is on sys.path (pyproject.toml)

    out = script_help("similarity_sources.py", ("torch", "ray", "pandas", "open_clip", "timm"),
                      timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--mix.similarity" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_check_before_a_run_reads_only_the_header_of_a_npy(tmp_path):
    np.save(tmp_path / "flat.npy", np.ones(3))
    np.save(tmp_path / "ok.npy", np.ones((3, 2)))
    (tmp_path / "junk.npy").write_text("not numpy")
    check_similarity(RunConfig(data=DataConfig("digits-lt")).override({"mix.similarity": f"file:{tmp_path / 'ok.npy'}"}))
    with pytest.raises(LfmError, match="flat.npy' holds a float64 array of shape \\(3,\\)"):
        check_similarity(RunConfig(data=DataConfig("digits-lt")).override({"mix.similarity": f"file:{tmp_path / 'flat.npy'}"}))
    with pytest.raises(LfmError, match="junk.npy' cannot be read as a .npy array"):
        check_similarity(RunConfig(data=DataConfig("digits-lt")).override({"mix.similarity": f"file:{tmp_path / 'junk.npy'}"}))


def test_relative_files_are_read_from_where_the_run_was_started(tmp_path, monkeypatch):
    """Ray runs trials and workers in folders of their own: the trainer reads a relative
    similarity file from the launch folder it is given (launch.launch_dir)."""
    from lfm_ray.driver.launch import launch_dir
    from lfm_ray.worker.loop import Run
    from lfm_ray.worker.distributed import WorkerInfo

    S = np.eye(10) * 0.5
    np.save(tmp_path / "S.npy", S)
    cfg = RunConfig(data=DataConfig("digits-lt")).override({"mix.similarity": "file:S.npy", "mix.method": "lfm",
                                "data.cache_dir": str(tmp_path / "cache")}).validate()
    elsewhere = tmp_path / "trial"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(LfmError, match="trial/S.npy' does not exist"):
        check_similarity(cfg)
    run = Run(cfg, WorkerInfo(rank=0, world_size=1, device=torch.device("cpu")),
              launch_dir=str(tmp_path))
    assert torch.equal(run.class_similarity, torch.as_tensor(S))
    monkeypatch.setenv("TUNE_ORIG_WORKING_DIR", str(tmp_path))
    assert launch_dir() == str(tmp_path)
    assert resolved_choices(cfg)["mix.similarity"] == f"file:{elsewhere / 'S.npy'}"
