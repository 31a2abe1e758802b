"""End to end on the embedded benchmark: a broken LFM is noticed (slow: `pytest --slow -m slow`).

On fashion-lt with GloVe's class similarity, LFM at α = 1, τ = 0.05 sends most of T-shirt's
partners to Shirt (the closest name: cosine 0.76), and the label shift moves those mixed
samples' label mass to Shirt, the rarer class (600 against 27 training images). After a short
stage 1 almost every T-shirt test image is predicted Shirt; with uniform partners (the same
run, `mix.similarity uniform`) far fewer are. So the difference of that rate between the two
runs measures both halves of the method at once: it vanishes when the partner draw ignores
the similarity (both runs then draw uniformly) and when the label shift is switched off (a
T-shirt mixed with a shirt then keeps most of its own label).

Measured at these settings (stage 1 only, 10 epochs, the preset otherwise; seeds 0, 1, 2):
T-shirt → Shirt 82, 92, 90 % with GloVe's partners and 42, 9, 19 % with uniform ones, a paired
difference of 40, 83, 71 points (mean 65, sd 22; the mean of three has sd 13). The test asks
the mean difference to be at least MARGIN = 25 points: the measured mean less three standard
deviations of a three-seed mean, so a change of random draws alone does not fail it, while a
broken LFM does: with the partner draw made uniform whatever S is, the difference was 0;
with the label shift switched off (λ_y = λ_x), 12 points (results/fashion_recipe.md).
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SEEDS = [0, 1, 2]
MARGIN = 0.25          # the least mean paired difference of the T-shirt → Shirt rate
T_SHIRT, SHIRT = 0, 6  # fashion-lt's class indices


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from lfm_ray.driver.launch import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def tshirt_as_shirt(study, row) -> float:
    """The fraction of T-shirt's test images a trial predicted as Shirt."""
    from lfm_ray import confusion
    from lfm_ray.analysis.load import trial_confusion

    path = trial_confusion(study, row)
    assert path is not None, f"trial {row['trial_id']} kept no confusion matrix"
    counts = confusion.read(path)["counts"]
    assert confusion.read(path)["class_names"][SHIRT] == "Shirt"
    return counts[T_SHIRT, SHIRT] / counts[T_SHIRT].sum()


def test_lfm_sends_t_shirts_label_mass_to_shirt_only_with_semantic_partners(tmp_path, local_ray):
    from lfm_ray import RunConfig, Study, load_study, run_study
    from lfm_ray.config import ConfigLayers

    # The default benchmark (fashion-lt with its preset), LFM + CE, a short stage 1 alone.
    base = ConfigLayers(flags={"mix.method": "lfm", "loss.name": "ce", "mix.alpha": 1.0,
                               "mix.tau": 0.05, "stage1.epochs": 10, "stage2.epochs": 0,
                               "runtime.num_workers": 0,  # trials in their own process
                               "data.cache_dir": str(tmp_path / "cache")}).resolve()
    assert isinstance(base, RunConfig) and base.data.name == "fashion-lt"
    assert base.model.text == "glove"
    study = Study(name="e2e", base=base, grid={"mix.similarity": ["text", "uniform"]},
                  seeds=SEEDS, storage_path=str(tmp_path / "ray"),
                  results_dir=str(tmp_path / "results"))
    run_study(study)
    results = load_study(tmp_path / "results" / "e2e")
    done = results.finished
    assert len(done) == 2 * len(SEEDS)
    rate = {(row["mix.similarity"], int(row["runtime.seed"])): tshirt_as_shirt(results, row)
            for _, row in done.iterrows()}
    diffs = np.array([rate["text", s] - rate["uniform", s] for s in SEEDS])
    shown = ", ".join(f"seed {s}: {100 * rate['text', s]:.0f} % vs {100 * rate['uniform', s]:.0f} %"
                      for s in SEEDS)
    assert diffs.mean() >= MARGIN, (
        f"T-shirt test images predicted Shirt, GloVe partners vs uniform partners: {shown}; "
        f"mean difference {100 * diffs.mean():.0f} points, expected at least "
        f"{100 * MARGIN:.0f}: LFM's partners do not follow the class similarity, or its "
        "label shift does not move the mass to the rarer class")
