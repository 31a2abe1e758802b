"""How many seeds a claim needs: the minimum detectable difference of the paired (and the
two-sample) t-test at 95 % two-sided and 80 % power, checked against the textbook
formula, the large-sample normal value, the noncentral t computed here, and a simulation;
and the sentence every "no configuration is better" verdict carries."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lfm_ray.analysis import better_than_rest, load_study, write_report
from lfm_ray.analysis.figures import NO_BEST, verdict_text
from lfm_ray.analysis.power import (
    Design, detectable_difference, power_sentence, seeds_needed, t_test_power,
)

from study_fixtures import GROUPS, TAUS, make_study  # noqa: E402


def textbook(sd: float, n: int) -> float:
    """(t_{0.975, n−1} + t_{0.80, n−1}) · s / √n: the usual shortcut for a paired design."""
    return (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.80, n - 1)) * sd / math.sqrt(n)


def test_large_samples_reach_the_normal_value_and_the_textbook_formula():
    # (z_0.975 + z_0.80) = 1.95996 + 0.84162 = 2.80159: MDD ≈ 2.80 s / √n for large n.
    assert detectable_difference(1.0, 4000) * math.sqrt(4000) == pytest.approx(2.8016, abs=2e-3)
    for n in (30, 100):
        assert detectable_difference(0.7, n) == pytest.approx(textbook(0.7, n), rel=5e-3)
    # At 2-3 seeds the shortcut has less power than it claims; ours is larger, at 80 %.
    for n in (2, 3):
        assert detectable_difference(1.0, n) > textbook(1.0, n) * 1.02


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_power_at_the_detectable_difference_is_80_percent(n):
    sd = 0.013
    mdd = detectable_difference(sd, n)
    df, crit = n - 1, stats.t.ppf(0.975, n - 1)
    nc = mdd / (sd / math.sqrt(n))
    direct = stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)
    assert direct == pytest.approx(0.80, abs=1e-6)
    assert t_test_power(mdd, sd, n) == pytest.approx(0.80, abs=1e-6)
    # Linear in the spread: twice the noise, twice the difference.
    assert detectable_difference(2 * sd, n) == pytest.approx(2 * mdd, rel=1e-6)


@pytest.mark.parametrize("paired", [True, False])
def test_a_simulated_t_test_detects_the_difference_80_percent_of_the_time(paired):
    rng = np.random.default_rng(0)
    n, sd, runs = 3, 1.0, 40_000
    mdd = detectable_difference(sd, n, Design(paired=paired))
    if paired:
        d = rng.normal(mdd, sd, size=(runs, n))
        t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
        crit = stats.t.ppf(0.975, n - 1)
    else:
        a, b = rng.normal(mdd, sd, size=(runs, n)), rng.normal(0, sd, size=(runs, n))
        pooled = np.sqrt((a.var(1, ddof=1) + b.var(1, ddof=1)) / 2)
        t = (a.mean(1) - b.mean(1)) / (pooled * math.sqrt(2 / n))
        crit = stats.t.ppf(0.975, 2 * n - 2)
    rejected = float(np.mean(np.abs(t) > crit))
    assert rejected == pytest.approx(0.80, abs=0.01)   # binomial sd at 40,000 runs: 0.002
    # and the shortcut formula, at three seeds, falls short of 80 %:
    if paired:
        d = rng.normal(textbook(sd, n), sd, size=(runs, n))
        t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
        assert float(np.mean(np.abs(t) > crit)) < 0.78


def test_seeds_needed_is_the_smallest_count_that_detects_the_difference():
    sd = 0.02
    for delta in (0.005, 0.01, 0.03):
        n = seeds_needed(delta, sd)
        assert detectable_difference(sd, n) <= delta
        assert n == 2 or detectable_difference(sd, n - 1) > delta
    # Normal approximation for small differences: n ≈ (2.80 s / δ)²; here 2.80² · 4² ≈ 126.
    assert seeds_needed(0.005, 0.02) == pytest.approx((2.8016 * 4) ** 2, rel=0.03)
    assert seeds_needed(1e-9, 1.0) is None        # more than 10,000 seeds
    assert seeds_needed(0.01, 0.0) == 2           # no spread: any difference shows
    assert math.isnan(detectable_difference(0.01, 1))


def test_the_sentence_names_the_method_and_its_numbers():
    text = power_sentence(0.02, 3, True, diff=0.004)
    mdd = detectable_difference(0.02, 3) * 100
    assert f"could have detected a difference of {mdd:.2f} points" in text
    assert "paired t-test" in text and "95 % two-sided" in text and "80 % power" in text
    assert f"the observed difference of 0.40 points would need about {seeds_needed(0.004, 0.02)} seeds" in text
    assert f"a difference of 1.00 points would need about {seeds_needed(0.01, 0.02)} seeds" in text


def test_a_no_better_verdict_carries_the_detectable_difference():
    values = {"a": [0.61, 0.64, 0.60], "b": [0.60, 0.62, 0.61]}
    seeds = {"a": [0, 1, 2], "b": [0, 1, 2]}
    sep = better_than_rest(values, seeds)
    assert not sep.separated and sep.test == "paired"
    diffs = np.subtract(values["a"], values["b"])
    assert sep.sd == pytest.approx(diffs.std(ddof=1))
    text = verdict_text(sep)
    mdd = detectable_difference(diffs.std(ddof=1), 3) * 100
    assert text.startswith(NO_BEST) and f"detected a difference of {mdd:.2f} points" in text
    # Unpaired (no shared seeds): the two-sample test, said to be a lower bound.
    sep = better_than_rest({"a": [0.61, 0.64], "b": [0.60, 0.62]}, {"a": [0, 1], "b": [2, 3]})
    assert sep.test == "unpaired" and "two-sample" in verdict_text(sep)
    assert "lower bound" in verdict_text(sep)
    # A separated verdict carries none.
    sep = better_than_rest({"a": [0.70, 0.71, 0.72], "b": [0.60, 0.61, 0.62]},
                           {"a": [0, 1, 2], "b": [0, 1, 2]})
    assert sep.separated and "detect" not in verdict_text(sep)


def overlapping(params, seed):
    jitter = {0: 0.10, 1: -0.10, 2: 0.0}[seed] * (1 if params["mix.tau"] != 0.05 else -1)
    b = {0.002: 0.50, 0.05: 0.53, 1.25: 0.51}[float(params["mix.tau"])] + jitter
    return {f"acc_{g}": b for g in GROUPS}


def test_the_report_says_what_these_seeds_could_detect(tmp_path):
    d = make_study(tmp_path, "ovl", {"mix.tau": TAUS}, seeds=(0, 1, 2), acc=overlapping)
    page = write_report(d, png=False).read_text()
    best = page.split(">Best configuration</h2>")[1].split("</table>")[0]
    assert NO_BEST in best and "minimum detectable difference: paired t-test" in best
    # τ = 0.05 against the runner-up τ = 1.25: diffs over seeds 0,1,2 are −0.18, +0.22, +0.02.
    sd = float(np.std([0.53 - 0.10 - 0.61, 0.53 + 0.10 - 0.41, 0.53 - 0.51], ddof=1))
    assert f"{detectable_difference(sd, 3) * 100:.2f} points" in best
    assert "no cell is bold" in page and "column all" in page
    assert "it is shown as the highest value, not as a winner. Against the runner-up" in page
    study = load_study(d)
    assert study.finished.shape[0] == 9
