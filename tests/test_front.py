"""A grid study as a trade-off front (`lfm-ray report NAME --front acc_many,acc_few`), on
fabricated α sweeps: the front of the means, intervals per point, and a configuration named
non-dominated only where the paired intervals allow it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lfm_ray.analysis import load_study
from lfm_ray.analysis.front import front_points, front_view
from lfm_ray.cli import main

from study_fixtures import make_study  # noqa: E402

# α -> (many, few): a trade-off, plus α = 3 worse than α = 2 in both, and α = 1.05 within
# the seeds' noise of α = 1.
SHAPE = {0.0: (0.80, 0.20), 0.5: (0.75, 0.30), 1.0: (0.70, 0.40), 1.05: (0.701, 0.399),
         2.0: (0.60, 0.50), 3.0: (0.55, 0.45)}


def tradeoff(params, seed):
    many, few = SHAPE[float(params["mix.alpha"])]
    common = 0.01 * (seed - 1)                      # each seed moves every α alike
    wobble = 0.004 * math.sin(7 * seed + 13 * float(params["mix.alpha"]))  # and a little apart
    many, few = many + common + wobble, few + common - wobble
    return {"acc_many": many, "acc_medium": (many + few) / 2, "acc_few": few,
            "acc_all": (many + few) / 2}


def sweep(tmp_path, seeds=(0, 1, 2), alphas=tuple(SHAPE)):
    return make_study(tmp_path, "alphas", {"mix.alpha": list(alphas)}, seeds=seeds,
                      acc=tradeoff)


def test_front_of_the_means_and_who_is_named(tmp_path):
    study = load_study(sweep(tmp_path))
    points = {p["key"][0]: p for p in front_points(study, "acc_many", "acc_few", ["mix.alpha"])}
    assert not points[3.0]["front"]                       # dominated by α = 2
    assert all(points[a]["front"] for a in (0.0, 0.5, 2.0))
    assert all(points[a]["named"] for a in (0.0, 0.5, 2.0))
    # α = 1 and α = 1.05 cannot be told apart in either metric: drawn, not named.
    assert points[1.0]["front"] or points[1.05]["front"]
    assert not points[1.0]["named"] and not points[1.05]["named"]
    # Means and intervals are those of the seeds, in percent.
    many = [tradeoff({"mix.alpha": 0.5}, s)["acc_many"] * 100 for s in (0, 1, 2)]
    half = stats.t.ppf(0.975, 2) * np.std(many, ddof=1) / math.sqrt(3)
    p = points[0.5]
    assert (p["x"], p["x_high"] - p["x"]) == (pytest.approx(np.mean(many)), pytest.approx(half))


def test_named_means_separated_by_the_paired_interval_in_one_metric(tmp_path):
    """α = 0.5 against α = 0 by hand: the paired t-interval of acc_few over the shared seeds
    excludes 0 (so α = 0 cannot dominate α = 0.5)."""
    d = np.array([tradeoff({"mix.alpha": 0.5}, s)["acc_few"] -
                  tradeoff({"mix.alpha": 0.0}, s)["acc_few"] for s in (0, 1, 2)])
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    assert d.mean() - half > 0
    d = np.array([tradeoff({"mix.alpha": 1.0}, s)["acc_many"] -
                  tradeoff({"mix.alpha": 1.05}, s)["acc_many"] for s in (0, 1, 2)])
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    assert d.mean() - half < 0 < d.mean() + half           # hence α = 1 is not named


def test_one_seed_names_nothing(tmp_path):
    study = load_study(sweep(tmp_path, seeds=(0,), alphas=(0.0, 1.0, 2.0)))
    points = front_points(study, "acc_many", "acc_few", ["mix.alpha"])
    assert all(p["front"] for p in points) and not any(p["named"] for p in points)
    _, caption = front_view(study, "acc_many", "acc_few", ["mix.alpha"])
    assert caption.startswith("One seed per configuration")


def test_report_draws_the_front_and_bad_axes_are_one_line(tmp_path, capsys):
    d = sweep(tmp_path)
    assert main(["report", str(d), "--front", "acc_many,acc_few", "--no-png"]) == 0
    page = (d / "report.html").read_text()
    assert "Trade-off front: acc_few against acc_many" in page
    assert "non-dominated at 95 %" in page
    assert "On the front of the means but not named" in page
    capsys.readouterr()
    assert main(["report", str(d), "--front", "acc_many,acc_rare", "--no-png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no metric 'acc_rare'" in err[0]
    assert main(["report", str(d), "--front", "acc_many", "--no-png"]) == 2
