"""Category extrapolation: the neighbour-silencing loss against the formula, the silenced sets,
the auxiliary inputs and their checks, the embedded sets, each epoch's auxiliary subsets,
and training with auxiliary classes (evaluated on the target classes only)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lfm_ray.config import DataConfig, RunConfig
from lfm_ray.data.auxiliary import (
    EMBEDDED, aux_source, embedded_set, load_aux_arrays, name_key, read_neighbour_map,
)
from lfm_ray.errors import LfmError
from lfm_ray.losses import (
    BalancedSoftmax, NeighbourSilencing, build_loss, build_silencing_loss, silenced_sets,
)

TARGETS = ["cat", "dog", "fox"]


# ---- the silenced sets and the loss ----------------------------------------------------------
# Three targets (0, 1, 2), three auxiliary classes (3, 4, 5 = aux 0, 1, 2):
# N(cat) = {aux 0, aux 1}, N(dog) = {aux 1}, N(fox) = {} ; so A(aux 0) = {cat},
# A(aux 1) = {cat, dog}, A(aux 2) = {} (an auxiliary class only a map's typo would leave out,
# allowed here at the formula's level).
NEIGHBOURS = [[0, 1], [1], []]


def expected_sets(mode: str) -> list[set[int]]:
    C_t, aux = 3, {3, 4, 5}
    n = {0: {3, 4}, 1: {4}, 2: set()}
    a = {3: {0}, 4: {0, 1}, 5: set()}
    out = [n[t] if mode != "none" else set() for t in range(C_t)]
    for k in sorted(aux):
        s = set() if mode == "none" else set(a[k])
        if mode == "neighbours+aux":
            s |= aux - {k}
        out.append(s)
    return out


@pytest.mark.parametrize("mode", ["none", "neighbours", "neighbours+aux"])
def test_silenced_sets_follow_the_neighbour_map(mode):
    S = silenced_sets(NEIGHBOURS, 3, mode)
    assert S.shape == (6, 6) and S.dtype == torch.bool
    for y, want in enumerate(expected_sets(mode)):
        assert set(torch.nonzero(S[y]).flatten().tolist()) == want, (mode, y)


def test_silenced_sets_refuse_bad_input():
    with pytest.raises(LfmError, match="silence mode 'all' is not valid"):
        silenced_sets(NEIGHBOURS, 3, "all")
    with pytest.raises(LfmError, match="not an auxiliary class index"):
        silenced_sets([[3]], 3, "neighbours")


def direct_loss(z, t, y, counts, tau, sets) -> float:
    """The formula, one sample at a time in float64: z'_j = z_j + τ log(n_j / Σn); K = the
    classes not in S(y); −Σ_{j∈K} t_j (z'_j − log Σ_{k∈K} exp z'_k); the batch mean."""
    total = 0.0
    n_sum = sum(counts)
    for b in range(len(z)):
        kept = [j for j in range(len(counts)) if j not in sets[int(y[b])]]
        zp = {j: float(z[b, j]) + tau * math.log(counts[j] / n_sum) for j in kept}
        top = max(zp.values())
        lse = top + math.log(sum(math.exp(v - top) for v in zp.values()))
        total += -sum(float(t[b, j]) * (zp[j] - lse) for j in kept)
    return total / len(z)


@pytest.mark.parametrize("mode", ["neighbours", "neighbours+aux"])
@pytest.mark.parametrize("loss,tau", [("balce", 1.0), ("balce", 0.5), ("ce", 0.0)])
def test_neighbour_silencing_equals_the_formula_on_soft_targets(mode, loss, tau):
    g = torch.Generator().manual_seed(3)
    counts = [120, 30, 8, 50, 50, 17]
    B, C = 12, 6
    z = torch.randn(B, C, generator=g, dtype=torch.float64) * 3
    y = torch.arange(B) % C                      # every class is some sample's label
    # Mixed labels: mass on y and on a partner, which is often a silenced class (mass that
    # the formula drops without renormalising).
    partner = (y + 1 + torch.randint(0, C - 1, (B,), generator=g)) % C
    lam = torch.rand(B, generator=g, dtype=torch.float64)
    t = torch.zeros(B, C, dtype=torch.float64)
    t[torch.arange(B), y] += lam
    t[torch.arange(B), partner] += 1 - lam
    S = silenced_sets(NEIGHBOURS, 3, mode)
    module = build_silencing_loss(loss, counts, S, balce_tau=tau)
    got = float(module(z.float(), t.float(), y))
    want = direct_loss(z, t, y, counts, tau, expected_sets(mode))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    dropped = sum(float(t[b, j]) for b in range(B) for j in expected_sets(mode)[int(y[b])])
    assert dropped > 0  # the test exercises target mass on silenced classes


def test_silencing_gradients_are_finite_and_zero_on_silenced_logits():
    S = silenced_sets(NEIGHBOURS, 3, "neighbours")
    module = NeighbourSilencing([10, 10, 10, 5, 5, 5], S, tau=1.0)
    z = torch.randn(6, 6, requires_grad=True)
    y = torch.arange(6)
    t = torch.full((6, 6), 1 / 6)            # mass on every class, silenced ones included
    module(z, t, y).backward()
    assert torch.isfinite(z.grad).all()
    assert torch.equal(z.grad[S[y]], torch.zeros(int(S[y].sum())))


def test_nothing_silenced_is_balanced_softmax_and_hard_labels_work():
    counts = [100, 20, 5, 40]
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 1])
    none = NeighbourSilencing(counts, torch.zeros(4, 4, dtype=torch.bool), tau=0.7)
    assert float(none(z, y, y)) == pytest.approx(float(BalancedSoftmax(counts, 0.7)(z, y)),
                                                 rel=1e-6)


def test_balce_tau_is_the_logit_adjustment_strength():
    counts = [100, 20, 5]
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2])
    for tau in (0.0, 0.5, 2.0):
        prior = tau * torch.log(torch.tensor(counts, dtype=torch.float64) / sum(counts))
        want = torch.nn.functional.cross_entropy(z + prior, y)
        assert float(build_loss("balce", counts, tau=tau)(z.float(), y)) == \
            pytest.approx(float(want), rel=1e-5)


def test_silencing_is_refused_for_other_losses():
    S = torch.zeros(3, 3, dtype=torch.bool)
    with pytest.raises(LfmError, match="neighbour silencing needs loss ce or balce, got 'focal'"):
        build_silencing_loss("focal", [1, 2, 3], S)
    cfg = RunConfig(data=DataConfig("digits-lt")).override({"aux.root": "digits-aux", "loss.name": "ldam"})
    with pytest.raises(LfmError, match="aux.silence='neighbours' needs loss ce or balce"):
        cfg.validate()
    cfg.override({"aux.silence": "none"}).validate()          # no silencing: any loss
    RunConfig(data=DataConfig("digits-lt")).override({"loss.name": "ldam"}).validate()      # no auxiliary classes


@pytest.mark.parametrize("values,needle", [
    ({"aux.neighbours": "map.json"}, "aux.neighbours='map.json' is set but aux.root is not"),
    ({"aux.root": "digits-aux", "aux.max_per_class": 0}, "aux.max_per_class=0 is not valid"),
    ({"aux.root": "digits-aux", "aux.silence": "all"}, "aux.silence='all' is not valid"),
    ({"loss.balce_tau": -1}, "loss.balce_tau=-1.0 is not valid"),
])
def test_aux_values_are_checked(values, needle):
    with pytest.raises(LfmError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        RunConfig(data=DataConfig("digits-lt")).override(values).validate()


def test_short_flags_set_the_aux_fields():
    from lfm_ray.commands.run_flags import add_run_flags, flag_values, new_parser

    parser = new_parser("t")
    add_run_flags(parser)
    args = parser.parse_args(["--aux-root", "/data/aux", "--aux-neighbours", "/data/map.json",
                              "--aux.max_per_class", "20", "--aux.silence", "neighbours+aux"])
    assert flag_values(args) == {"aux.root": "/data/aux", "aux.neighbours": "/data/map.json",
                                 "aux.max_per_class": "20", "aux.silence": "neighbours+aux"}
    with pytest.raises(LfmError, match="invalid choice: 'everything'"):
        parser.parse_args(["--aux.silence", "everything"])


# ---- the user's folder and map -------------------------------------------------------------
def write_png(path: Path, value: int, size: int = 8) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size, size, 3), value, dtype=np.uint8)
    pixels[::2, ::3] = 255 - value
    Image.fromarray(pixels).save(path)


def aux_folder(tmp_path: Path, classes: dict[str, int]) -> Path:
    root = tmp_path / "aux"
    for c, (name, n) in enumerate(classes.items()):
        for i in range(n):
            write_png(root / name / f"{i}.png", 10 * c + i)
    (root / "notes.txt").write_text("files beside the class folders are not classes")
    return root


def write_map(tmp_path: Path, mapping) -> str:
    path = tmp_path / "map.json"
    path.write_text(json.dumps(mapping))
    return str(path)


def folder_config(tmp_path, root, mapping=None, **values) -> RunConfig:
    cfg = RunConfig(data=DataConfig("digits-lt")).override({"aux.root": str(root), "data.cache_dir": str(tmp_path / "c"),
                                **values})
    if mapping is not None:
        cfg.aux.neighbours = write_map(tmp_path, mapping)
    return cfg


def test_folder_and_map_resolve_to_names_labels_and_neighbours(tmp_path):
    root = aux_folder(tmp_path, {"snow_leopard": 3, "red-fox": 2, "wolf": 4})
    cfg = folder_config(tmp_path, root, {"Cat": ["snow leopard"], "dog": ["wolf", "Red Fox"],
                                         "fox": ["red fox"]})
    src = aux_source(cfg, TARGETS)
    assert src.class_names == ["red fox", "snow leopard", "wolf"]
    assert src.labels.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert src.neighbours == [[1], [2, 0], [0]]


@pytest.mark.parametrize("mapping,needle", [
    ({"cow": ["wolf"]}, "unknown target class 'cow'"),
    ({"cat": ["ocelot", "lynx"], "dog": ["wolf"]},
     "neighbour 'ocelot' of 'cat' is not an auxiliary class"),
    ({"cat": ["dog"], "dog": ["wolf"]}, "neighbour 'dog' of 'cat' is a target class"),
    ({"wolf": ["wolf"]}, "'wolf' is an auxiliary class, not a target class"),
    ({"cat": ["wolf"]}, "auxiliary class 'lynx' is no target class's neighbour"),
    ({"cat": "wolf"}, "the neighbours of 'cat' must be a list"),
    (["cat", "wolf"], "must be a JSON object"),
])
def test_bad_maps_are_one_clear_message(tmp_path, mapping, needle):
    root = aux_folder(tmp_path, {"wolf": 2, "lynx": 2})
    cfg = folder_config(tmp_path, root, mapping)
    with pytest.raises(LfmError, match=needle):
        aux_source(cfg, TARGETS)


def test_bad_folders_are_one_clear_message(tmp_path):
    cfg = folder_config(tmp_path, tmp_path / "missing", **{"aux.silence": "none"})
    with pytest.raises(LfmError, match="is not a folder"):
        aux_source(cfg, TARGETS)
    empty = aux_folder(tmp_path / "e", {"wolf": 2})
    (empty / "lynx").mkdir()
    with pytest.raises(LfmError, match=r"auxiliary class 'lynx' \(.*\) has no images"):
        aux_source(folder_config(tmp_path, empty, **{"aux.silence": "none"}), TARGETS)
    clash = aux_folder(tmp_path / "t", {"wolf": 2, "Dog": 1})
    with pytest.raises(LfmError, match="auxiliary class 'Dog' .* is also a target class"):
        aux_source(folder_config(tmp_path, clash, **{"aux.silence": "none"}), TARGETS)
    twice = aux_folder(tmp_path / "w", {"grey_wolf": 1, "grey-wolf": 1})
    with pytest.raises(LfmError, match="name one auxiliary class"):
        aux_source(folder_config(tmp_path, twice, **{"aux.silence": "none"}), TARGETS)
    with pytest.raises(LfmError, match="has no class folders"):
        (tmp_path / "bare").mkdir()
        aux_source(folder_config(tmp_path, tmp_path / "bare", **{"aux.silence": "none"}),
                   TARGETS)


def test_silencing_needs_a_map_and_names_the_one_beside_the_images(tmp_path):
    root = aux_folder(tmp_path, {"wolf": 2})
    (root / "neighbours.json").write_text(json.dumps({"dog": ["wolf"]}))
    with pytest.raises(LfmError, match=r"needs a neighbour map: .*--aux-neighbours .*neighbours"):
        aux_source(folder_config(tmp_path, root), TARGETS)
    assert aux_source(folder_config(tmp_path, root, **{"aux.silence": "none"}),
                      TARGETS).neighbours is None


def test_map_file_problems(tmp_path):
    with pytest.raises(LfmError, match="is not a file"):
        read_neighbour_map(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{cat: wolf")
    with pytest.raises(LfmError, match="is not readable JSON"):
        read_neighbour_map(tmp_path / "bad.json")


def test_folder_images_are_cached_as_the_model_sees_them(tmp_path):
    from lfm_ray.data.preprocess import preprocess_file
    from lfm_ray.model import build_clip

    _, spec = build_clip("tiny")
    root = aux_folder(tmp_path, {"wolf": 2, "lynx": 3})
    cfg = folder_config(tmp_path, root, {"cat": ["lynx"], "dog": ["wolf"]})
    arrays = load_aux_arrays(cfg, TARGETS, spec, cfg.data.cache_dir)
    assert arrays.images.shape == (5, spec.size, spec.size, 3)
    assert arrays.class_names == ["lynx", "wolf"] and arrays.labels.tolist() == [0, 0, 0, 1, 1]
    assert np.array_equal(arrays.images[3], preprocess_file(str(root / "wolf" / "0.png"), spec))
    # The second load maps the cache (the images are not decoded again).
    (root / "wolf" / "0.png").write_bytes(b"changed")
    again = load_aux_arrays(cfg, TARGETS, spec, cfg.data.cache_dir)
    assert np.array_equal(again.images, arrays.images)


def test_an_unreadable_image_is_one_message_naming_it(tmp_path):
    from lfm_ray.model import build_clip

    _, spec = build_clip("tiny")
    root = aux_folder(tmp_path, {"wolf": 2})
    (root / "wolf" / "broken.png").write_bytes(b"not a png")
    cfg = folder_config(tmp_path, root, **{"aux.silence": "none"})
    with pytest.raises(LfmError, match=r"aux.root .*cannot read image .*broken.png"):
        load_aux_arrays(cfg, TARGETS, spec, cfg.data.cache_dir)


# ---- the embedded sets ---------------------------------------------------------------------
def test_digits_aux_is_every_non_test_digit_turned_a_quarter_turn():
    from sklearn.datasets import load_digits

    from lfm_ray.data.digits import DIGIT_NAMES, build_digits_lt

    names, images, labels, mapping = embedded_set("digits-aux", seed=0)
    assert names == [f"rotated {d}" for d in DIGIT_NAMES]
    assert mapping == {d: [f"rotated {d}"] for d in DIGIT_NAMES}
    test = build_digits_lt(seed=0).test_images
    digits = load_digits()
    every = np.repeat(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None], 3, 3)
    # Turned back, each image is a digit of its label, and none is a test image.
    back = np.rot90(images, k=1, axes=(1, 2))
    test_bytes = {t.tobytes() for t in test}
    assert not any(b.tobytes() in test_bytes for b in back)
    pool = {}
    for img, y in zip(every, digits.target):
        pool.setdefault(img.tobytes(), set()).add(int(y))
    assert all(int(y) in pool[b.tobytes()] for b, y in zip(back, labels))
    # Every digit image that is no test image is used (1797 − 500 test, up to repeats).
    assert len(images) == sum(1 for img in every if img.tobytes() not in test_bytes)
    again = embedded_set("digits-aux", seed=0)[1]
    assert np.array_equal(images, again)                  # deterministic


def test_digits_aux_scrambled_is_one_fixed_pixel_permutation():
    _, turned, labels_t, _ = embedded_set("digits-aux", seed=1)
    names, scrambled, labels, mapping = embedded_set("digits-aux-scrambled", seed=1)
    assert names[3] == "scrambled three" and mapping["three"] == ["scrambled three"]
    assert np.array_equal(labels, labels_t)
    source = np.rot90(turned, k=1, axes=(1, 2)).reshape(len(turned), 64, 3)
    flat = scrambled.reshape(len(scrambled), 64, 3)
    # The same permutation of the 64 pixels for every image, and not the identity.
    perm = [int(np.flatnonzero((source[:, :, 0] == flat[:, [j], 0]).all(axis=0))[0])
            if (source[:, :, 0] == flat[:, [j], 0]).all(axis=0).any() else -1 for j in range(64)]
    assert -1 not in perm and not np.array_equal(flat, source)
    assert np.array_equal(flat, source[:, perm])


def test_embedded_sets_are_for_their_own_data_set_only():
    assert set(EMBEDDED) == {"digits-aux", "digits-aux-scrambled", "fashion-aux",
                             "fashion-aux-scrambled"}
    assert {name: dataset for name, (dataset, _) in EMBEDDED.items()} == {
        "digits-aux": "digits-lt", "digits-aux-scrambled": "digits-lt",
        "fashion-aux": "fashion-lt", "fashion-aux-scrambled": "fashion-lt"}
    cfg = RunConfig(data=DataConfig("digits-lt")).override({"aux.root": "digits-aux", "data.name": "cifar10-lt"})
    with pytest.raises(LfmError, match="embedded auxiliary set of digits-lt"):
        aux_source(cfg, TARGETS)


def test_name_key_reads_underscores_dashes_and_case_alike():
    assert name_key("Snow_Leopard") == name_key("snow-leopard") == name_key(" snow  leopard ")


# ---- each epoch's auxiliary subsets --------------------------------------------------------
def embedded_training(tmp_path, cap):
    from lfm_ray.extrapolation import AuxTraining

    cfg = RunConfig(data=DataConfig("digits-lt")).override({"aux.root": "digits-aux", "aux.max_per_class": cap,
                                "data.cache_dir": str(tmp_path / "c"), "runtime.seed": 5})
    from lfm_ray.data.digits import DIGIT_NAMES

    arrays = load_aux_arrays(cfg, DIGIT_NAMES, None, cfg.data.cache_dir)
    return AuxTraining(cfg, arrays, len(DIGIT_NAMES)), arrays


def test_each_epoch_takes_a_fresh_capped_subset_of_each_class(tmp_path):
    aux, arrays = embedded_training(tmp_path, cap=50)
    sizes = np.bincount(arrays.labels)
    assert aux.counts == [min(int(n), 50) for n in sizes] and aux.images_per_epoch == 500
    first, again, second = aux.epoch_choice(1), aux.epoch_choice(1), aux.epoch_choice(2)
    assert torch.equal(first, again) and not torch.equal(first, second)
    for choice in (first, second):
        for a, (start, count) in enumerate(zip(aux.offsets, aux.counts)):
            picked = choice[start:start + count].numpy()
            assert len(set(picked.tolist())) == count                 # without replacement
            assert (arrays.labels[picked] == a).all()                 # of its own class
    # Over epochs the subsets cover more of a class than one epoch does.
    assert len(set(first[:50].tolist()) | set(second[:50].tolist())) > 50
    # A cap above a class's size takes the whole class every epoch.
    small, arrays = embedded_training(tmp_path, cap=1000)
    assert small.counts == np.bincount(arrays.labels).tolist()


def test_epoch_images_put_each_auxiliary_image_where_its_label_says(tmp_path):
    from lfm_ray.augment import DeviceImages
    from lfm_ray.data import load_arrays

    aux, arrays = embedded_training(tmp_path, cap=7)
    target = load_arrays("digits-lt", cache_dir=str(tmp_path / "c"))
    images, labels = aux.join(DeviceImages(target.train_images, torch.device("cpu")),
                              torch.as_tensor(target.train_labels), 8,
                              type("Spec", (), {"size": 8, "interpolation": "bicubic"}),
                              torch.device("cpu"))
    n_t = len(target.train_labels)
    assert len(images) == n_t + 70 and len(labels) == n_t + 70
    assert labels[n_t:].tolist() == sorted(list(range(10, 20)) * 7)
    aux.start_epoch(3)
    chosen = aux.epoch_choice(3)
    positions = torch.tensor([n_t + 8, 0, n_t + 69, 5, n_t])
    batch = images.gather(positions).numpy()
    want = [arrays.images[chosen[8]], target.train_images[0], arrays.images[chosen[69]],
            target.train_images[5], arrays.images[chosen[0]]]
    for got, expected in zip(batch, want):
        assert np.array_equal(got, expected)
    assert int(arrays.labels[chosen[69]]) + 10 == int(labels[n_t + 69])


def test_parts_stored_at_other_sizes_come_out_at_the_models_size(tmp_path):
    """A target set kept at its native size (8 px here) beside auxiliary images cached at the
    model's (32 px): the target images are resized as the batch builder would, and flipping
    before or after that resize gives the same images."""
    from lfm_ray.augment import DeviceImages
    from lfm_ray.data import load_arrays
    from lfm_ray.data.preprocess import resize_square, resize_uint8
    from lfm_ray.model import build_clip

    _, spec = build_clip("tiny")
    cfg = RunConfig(data=DataConfig("digits-lt")).override({"aux.root": "digits-aux", "data.cache_dir": str(tmp_path / "c")})
    from lfm_ray.data.digits import DIGIT_NAMES
    from lfm_ray.extrapolation import AuxTraining

    arrays = load_aux_arrays(cfg, DIGIT_NAMES, spec, cfg.data.cache_dir)
    assert arrays.images.shape[1] == spec.size == 32
    aux = AuxTraining(cfg, arrays, 10)
    target = load_arrays("digits-lt", cache_dir=str(tmp_path / "c"))   # 8 × 8, not resized
    images, _ = aux.join(DeviceImages(target.train_images, torch.device("cpu")),
                         torch.as_tensor(target.train_labels), 8, spec, torch.device("cpu"))
    n_t = len(target.train_labels)
    batch = images.gather(torch.tensor([3, n_t + 1, 0])).numpy()
    want = resize_uint8(np.asarray(target.train_images[[3, 0]]), 32, spec.interpolation)
    assert np.array_equal(batch[0], want[0]) and np.array_equal(batch[2], want[1])
    assert np.array_equal(batch[1], arrays.images[int(aux.images.chosen[1])])
    x = torch.from_numpy(np.array(target.train_images[:4])).permute(0, 3, 1, 2).float()
    assert torch.equal(resize_square(x.flip(-1), 32, spec.interpolation),
                       resize_square(x, 32, spec.interpolation).flip(-1))


# ---- training with auxiliary classes -----------------------------------------------------------


def small(tmp_path, **values) -> RunConfig:
    from test_train import small_config

    return small_config(tmp_path, **{"aux.root": "digits-aux", "loss.name": "balce", **values})


def test_training_with_auxiliary_classes_reports_the_target_classes(tmp_path):
    from lfm_ray import confusion
    from test_train import fit_local

    cfg = small(tmp_path, **{"mix.method": "lfm"})
    result = fit_local(cfg, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "epoch_0002" / "result.json").read_text())
    assert saved["aux_classes"] == 10 and saved["aux_images"] == 500
    assert len(saved["per_class_acc"]) == 10 and len(saved["class_names"]) == 10
    assert len(saved["class_counts"]) == 10 and saved["class_names"][3] == "three"
    assert math.isfinite(result.metrics["train_loss"])
    conf = confusion.read(tmp_path / "ckpt" / "epoch_0002")
    assert conf["counts"].shape == (10, 10) and conf["counts"].sum() == 500
    assert conf["sampling_matrix"].shape == (10, 10)


def test_a_run_without_auxiliary_classes_records_none(tmp_path):
    from test_train import fit_local, small_config

    fit_local(small_config(tmp_path, **{"stage2.epochs": 0}), tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "epoch_0001" / "result.json").read_text())
    assert saved["aux_classes"] == 0 and saved["aux_images"] == 0


def worker_run(cfg):
    from lfm_ray.worker.loop import Run
    from lfm_ray.worker.distributed import WorkerInfo

    return Run(cfg, WorkerInfo(rank=0, world_size=1, device=torch.device("cpu")))


def test_the_head_loss_and_mixer_span_all_classes_and_inference_only_the_targets(tmp_path):
    from lfm_ray.worker.loop import _mixer, stage_plan

    cfg = small(tmp_path, **{"mix.method": "lfm"})
    run = worker_run(cfg)
    assert run.text_features.shape[0] == 20 and run.num_classes == 10
    assert run.train_counts[10:] == [50] * 10
    loss = run.loss_fn()
    assert isinstance(loss, NeighbourSilencing) and loss.silenced[3, 13] and loss.silenced[13, 3]
    mixer = _mixer(run, stage_plan(cfg)[0])
    assert mixer.P.shape == (20, 20) and float(mixer.P[3, 13]) > 0  # a tail class's neighbour
    # Inference: the auxiliary rows never win, whatever their logits.
    weight = torch.randn(10, 3 * 32 * 32, generator=torch.Generator().manual_seed(0))

    def logits(x):
        targets = x.flatten(1) @ weight.t()
        return torch.cat([targets, torch.full((len(x), 10), 1e4)], dim=1)

    run.model.forward = logits
    out = run.evaluate("test")
    images, labels = run.eval_sets["test"]
    pred = logits(run.build(images.gather(torch.arange(len(images)))))[:, :10].argmax(1)
    per_class = [float((pred[labels == k] == k).float().mean()) for k in range(10)]
    assert out["per_class_acc"] == pytest.approx(per_class)
    assert out["acc_all"] == pytest.approx(float((pred == labels).float().mean()))
    assert out["acc_all"] > 0   # an argmax over all 20 rows would score 0


def test_silence_none_trains_the_configured_loss_over_all_classes(tmp_path):
    cfg = small(tmp_path, **{"aux.silence": "none", "loss.name": "focal"})
    loss = worker_run(cfg).loss_fn()
    assert not getattr(loss, "needs_labels", False) and type(loss).__name__ == "Focal"


def test_a_resumed_run_draws_the_subsets_an_uninterrupted_one_does(tmp_path):
    from lfm_ray.worker.checkpoint import load_state
    from test_train import fit_local

    cfg = small(tmp_path, **{"stage1.epochs": 2, "stage2.epochs": 1, "aux.max_per_class": 5})
    full = fit_local(cfg, tmp_path / "full")
    fit_local(cfg, tmp_path / "part", stop_after_epoch=1)
    resumed = fit_local(cfg, tmp_path / "part", resume_from=str(tmp_path / "part" / "epoch_0001"))
    a = load_state(tmp_path / "full" / "epoch_0003", torch.device("cpu"))
    b = load_state(tmp_path / "part" / "epoch_0003", torch.device("cpu"))
    for k in a["visual"]:
        assert torch.allclose(a["visual"][k], b["visual"][k], atol=1e-6), k
    assert resumed.metrics["train_loss"] == pytest.approx(full.metrics["train_loss"], abs=1e-6)
