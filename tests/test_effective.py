"""LFM's effective imbalance factor γ′ against direct computations, the real mixer's labels,
and `lfm-ray data`'s γ′ line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from lfm_ray.cli import main
from lfm_ray.effective import (
    effective_imbalance, effective_imbalance_sweep, imbalance_factor, label_mass,
    sampling_matrix, shifted_lambda_mean,
)
from lfm_ray.errors import LfmError
from lfm_ray.mixing import build_mixer, local_sampling_matrix

COUNTS = [500, 120, 40, 9, 3]


def features(C: int = len(COUNTS), d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(C, d, generator=g, dtype=torch.float64),
                                         dim=1)


def expectation_by_quadrature(delta: float, beta: float) -> float:
    """E[h(λ)] for h(x) = clamp(x − δ, 0, 1), λ ~ Beta(β, β), integrated by parts:
    h(0) + ∫ h'(x) (1 − F(x)) dx, h' = 1 on (max(0, δ), min(1, 1 + δ))."""
    lo, hi = max(0.0, delta), min(1.0, 1.0 + delta)
    tail = 0.0
    if hi > lo:
        tail, _ = integrate.quad(lambda x: stats.beta.sf(x, beta, beta), lo, hi,
                                 epsabs=1e-13, epsrel=1e-12, limit=200)
    return min(max(-delta, 0.0), 1.0) + tail


@pytest.mark.parametrize("beta", [0.2, 1.0, 3.0])
def test_shifted_lambda_mean_is_the_exact_expectation(beta):
    deltas = [-1.7, -1.0, -0.6, -0.2, 0.0, 0.05, 0.3, 0.9, 1.0, 1.4]
    closed = shifted_lambda_mean(np.array(deltas), beta)
    for d, value in zip(deltas, closed):
        assert value == pytest.approx(expectation_by_quadrature(d, beta), abs=1e-9), d
    assert closed[4] == pytest.approx(0.5)  # no shift: E[λ] = 1/2


def slow_label_mass(counts, P, alpha, beta) -> list[float]:
    """Per pair (i, j): probability p_i P[i, j]; class i keeps E[λ_y], class j gets the rest."""
    N, C = sum(counts), len(counts)
    mass = [0.0] * C
    for i in range(C):
        for j in range(C):
            pair = counts[i] / N * float(P[i][j])
            delta = alpha * (counts[i] - counts[j]) / (counts[i] + counts[j])
            kept = expectation_by_quadrature(delta, beta)
            mass[i] += pair * kept
            mass[j] += pair * (1.0 - kept)
    return mass


@pytest.mark.parametrize("alpha,tau,beta", [(1.0, 0.05, 0.2), (0.5, 1.0, 1.0), (2.0, 0.25, 0.2),
                                            (0.0, 0.05, 0.2)])
def test_label_mass_and_gamma_match_a_per_pair_loop(alpha, tau, beta):
    P = local_sampling_matrix(features(), tau).numpy()
    fast = label_mass(COUNTS, P, alpha, beta)
    slow = slow_label_mass(COUNTS, P, alpha, beta)
    assert fast == pytest.approx(slow, abs=1e-9)
    assert fast.sum() == pytest.approx(1.0)
    gamma = effective_imbalance(COUNTS, P, alpha, beta)
    if alpha == 2.0:
        # Every partner of the head class is rarer and |δ| >= 1: its label goes wholly to the
        # rarer class, so the head class gets no label mass at all.
        assert slow[0] == 0.0 and fast[0] == 0.0 and gamma == math.inf
    else:
        assert gamma == pytest.approx(max(slow) / min(slow), rel=1e-7)


def test_without_label_shift_both_images_count_alike():
    """α = 0: m = (p + pᵀP) / 2, the class frequency of first images and partners."""
    P = local_sampling_matrix(features(), 0.05).numpy()
    p = np.array(COUNTS) / sum(COUNTS)
    assert label_mass(COUNTS, P, 0.0, 0.2) == pytest.approx((p + p @ P) / 2, abs=1e-12)
    # Uniform partners (every other class alike): m_k = (p_k + (1 − p_k) / (C − 1)) / 2.
    C = len(COUNTS)
    uniform = (np.ones((C, C)) - np.eye(C)) / (C - 1)
    expect = (p + (1 - p) / (C - 1)) / 2
    gamma = effective_imbalance(COUNTS, uniform, 0.0, 0.5)
    assert gamma == pytest.approx(expect.max() / expect.min())
    assert imbalance_factor(COUNTS) == pytest.approx(500 / 3)


def test_label_mass_is_the_mean_label_of_the_real_lfm_mixer():
    """The trainer's own LFM mixer, run for many batches: its mean soft target per class is
    label_mass within five standard errors (one λ per batch: batches are the samples)."""
    counts = [60, 25, 10, 4]
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    feats = features(len(counts), seed=1).float()
    alpha, tau, beta = 1.0, 0.5, 0.2
    mixer = build_mixer("lfm", class_counts=counts, train_labels=labels, text_features=feats,
                        alpha=alpha, tau=tau, beta=beta)
    gen = torch.Generator().manual_seed(0)
    batch, batches = 64, 3000
    means = []
    x = torch.zeros(batch, 1)
    for _ in range(batches):
        idx = torch.randint(len(labels), (batch,), generator=gen)
        y_i = labels[idx]
        y_j = labels[mixer.partners(idx, y_i, gen).cpu()]
        _, targets = mixer.mix(x, y_i, x, y_j, gen)
        means.append(targets.double().mean(0))
    means = torch.stack(means).numpy()
    expect = label_mass(counts, sampling_matrix(feats, tau), alpha, beta)
    se = means.std(axis=0, ddof=1) / math.sqrt(batches)
    assert np.all(np.abs(means.mean(axis=0) - expect) <= 5 * se + 1e-6), (means.mean(0), expect)


def test_sweep_and_bad_input():
    feats = features()
    taus = [0.01, 0.05, 1.0]
    swept = effective_imbalance_sweep(COUNTS, feats, "mix.tau", taus, alpha=1.0, tau=0.05,
                                      beta=0.2)
    assert swept == [effective_imbalance(COUNTS, sampling_matrix(feats, t), 1.0, 0.2)
                     for t in taus]
    alphas = effective_imbalance_sweep(COUNTS, feats, "alpha", [0.0, 1.0], alpha=9.0, tau=0.05,
                                       beta=0.2)
    P = sampling_matrix(feats, 0.05)
    assert alphas == [effective_imbalance(COUNTS, P, a, 0.2) for a in (0.0, 1.0)]
    with pytest.raises(LfmError, match="γ′ sweeps alpha or tau; got 'stage1.lr'"):
        effective_imbalance_sweep(COUNTS, feats, "stage1.lr", [1.0], alpha=1, tau=1, beta=1)
    with pytest.raises(LfmError, match="expected \\(5, 5\\)"):
        label_mass(COUNTS, np.eye(4), 1.0, 0.2)
    with pytest.raises(LfmError, match="beta=0"):
        shifted_lambda_mean(0.1, 0)


# ---- `lfm-ray data` -----------------------------------------------------------------------------
def command_gamma(counts, class_names, alpha, tau, beta) -> float:
    """γ′ as the command computes it: the tiny model's text features, seeded as a run."""
    from lfm_ray.config import DataConfig, RunConfig
    from lfm_ray.model import build_clip, text_features

    cfg = RunConfig(data=DataConfig("digits-lt"))
    torch.manual_seed(cfg.runtime.seed)
    clip, _ = build_clip(cfg.model.name)
    feats = text_features(clip, class_names, cfg.model.templates)
    return effective_imbalance(counts, sampling_matrix(feats, tau), alpha, beta)


def test_data_command_prints_gamma_for_the_run_defaults_and_given_values(capsys):
    from lfm_ray.config import RunConfig
    from lfm_ray.data import build_dataset

    from lfm_ray.config import MIX_BETA

    ds = build_dataset("digits-lt")
    s = RunConfig().stage1
    beta = MIX_BETA["lfm"] if s.beta is None else s.beta  # LFM's own law of λ
    assert main(["data", "digits-lt"]) == 0
    out = capsys.readouterr().out
    expect = command_gamma(ds.class_counts, ds.class_names, s.alpha, s.tau, beta)
    assert f"stage 1 and 2: α {s.alpha:g}, τ {s.tau:g}" in out
    assert f"γ′ = {expect:.2f}" in out and "text features of tiny" in out
    assert main(["data", "digits-lt", "--mix.alpha", "0.5", "--tau", "1.25"]) == 0
    out = capsys.readouterr().out
    expect = command_gamma(ds.class_counts, ds.class_names, 0.5, 1.25, beta)
    assert "α 0.5, τ 1.25" in out and f"γ′ = {expect:.2f}" in out


def test_data_command_skips_gamma_in_one_line_without_the_weights(capsys, monkeypatch):
    import lfm_ray.model
    import lfm_ray.weights

    # As on a machine whose hub cache lacks the weights (the command never downloads).
    monkeypatch.setattr(lfm_ray.weights, "missing_files", lambda hub, cache_dir: list(hub.needed))
    assert main(["data", "digits-lt", "--model", "ViT-B-32", "--pretrained", "openai"]) == 0
    out = capsys.readouterr().out
    assert "imbalance ratio" in out and "γ′ =" not in out
    skipped = [line for line in out.splitlines() if "γ′" in line]
    assert len(skipped) == 1 and "skipped" in skipped[0] and "ViT-B-32/openai" in skipped[0]
    assert main(["data", "digits-lt", "--model", "ViT-Q"]) == 2  # a typo is an error
    assert "unknown model 'ViT-Q'" in capsys.readouterr().err
