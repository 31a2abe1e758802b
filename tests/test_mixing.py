"""Mixing formulas against direct computations; the alias sampler against P by a chi-square test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lfm_ray.errors import LfmError
from lfm_ray.config import MIX_BETA
from lfm_ray.mixing import (
    MIXERS, BalancedSampler, PairSampler, alias_distribution, alias_tables, build_mixer,
    cut_box, label_shift, local_sampling_matrix, remix_label, sample_beta,
    sample_classes_multinomial,
)


def text(C=6, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(C, d, generator=g), dim=1)


def test_label_shift_against_the_formula_and_clamp_edges():
    # λ_y = clamp(λ_x − α (n_i − n_j)/(n_i + n_j), 0, 1)
    assert float(label_shift(0.7, 100, 100, 1.0)) == pytest.approx(0.7)
    assert float(label_shift(0.7, 300, 100, 1.0)) == pytest.approx(0.7 - 0.5)
    assert float(label_shift(0.3, 900, 100, 1.0)) == 0.0          # clamped at 0
    assert float(label_shift(0.9, 10, 90, 1.0)) == 1.0            # clamped at 1
    assert float(label_shift(0.42, 900, 1, 0.0)) == 0.42          # α = 0: exactly λ_x
    assert float(label_shift(0.5, 75, 25, 1.0)) == 0.0             # lands on the edge: 0.5 − 0.5
    assert float(label_shift(0.5, 25, 75, 1.0)) == 1.0
    got = label_shift(torch.tensor([0.2, 0.8]), torch.tensor([50, 5]), torch.tensor([5, 50]), 0.5)
    want = [min(max(0.2 - 0.5 * 45 / 55, 0), 1), min(max(0.8 + 0.5 * 45 / 55, 0), 1)]
    assert got.tolist() == pytest.approx(want)


def test_sampling_matrix_against_a_double_loop():
    f = text()
    tau = 0.05
    P = local_sampling_matrix(f, tau)
    C = f.shape[0]
    direct = np.zeros((C, C))
    for i in range(C):
        logits = [math.exp(float(f[i] @ f[j]) / tau) if j != i else 0.0 for j in range(C)]
        direct[i] = np.array(logits) / sum(logits)
    assert np.allclose(P.double().numpy(), direct, atol=1e-6)
    assert torch.all(P.diagonal() == 0)
    assert torch.allclose(P.sum(dim=1), torch.ones(C), atol=1e-6)
    # τ = 0.002 (logits up to 500): finite, exact zero diagonal, still the direct formula
    tiny = local_sampling_matrix(f, 0.002).double()
    assert torch.isfinite(tiny).all() and torch.all(tiny.diagonal() == 0)
    assert torch.allclose(tiny.sum(dim=1), torch.ones(C, dtype=torch.float64), atol=1e-6)
    for i in range(C):
        s = [float(f[i] @ f[j]) / 0.002 for j in range(C) if j != i]
        m = max(s)
        want = [math.exp(v - m) / sum(math.exp(w - m) for w in s) for v in s]
        got = [float(tiny[i, j]) for j in range(C) if j != i]
        assert got == pytest.approx(want, abs=1e-6)
    with pytest.raises(LfmError):
        local_sampling_matrix(f, 0.0)


def test_alias_sampler_matches_P_by_chi_square():
    f = text(C=8)
    P = local_sampling_matrix(f, 0.5)
    labels = torch.arange(8).repeat_interleave(5)
    sampler = PairSampler(P, labels)
    g = torch.Generator().manual_seed(1)
    n = 200_000
    for row in (0, 5):
        classes = sampler.sample_classes(torch.full((n,), row), g)
        observed = torch.bincount(classes, minlength=8).numpy()
        assert observed[row] == 0  # the diagonal is never drawn
        mask = np.arange(8) != row
        expected = P[row].double().numpy()[mask] * n
        _, p = stats.chisquare(observed[mask], expected)
        assert p > 1e-3, (row, observed, expected)


def test_alias_tables_never_keep_or_alias_a_zero_class():
    P = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.1, 0.0, 0.0, 0.9], [1.0, 0.0, 0.0, 0.0],
                      [0.25, 0.25, 0.5, 0.0]])
    prob, alias = alias_tables(P)
    for r in range(4):
        K = 4
        # The exact probability of each class under the tables equals P.
        got = np.zeros(K)
        for k in range(K):
            got[k] += prob[r, k] / K
            got[alias[r, k]] += (1 - prob[r, k]) / K
        assert np.allclose(got, P[r].numpy(), atol=1e-12)


def test_partner_images_are_of_the_drawn_class_and_uniform_within_it():
    labels = torch.tensor([0, 1, 1, 2, 2, 2, 1, 0])
    P = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]])
    sampler = PairSampler(P, labels)
    g = torch.Generator().manual_seed(0)
    picks = sampler.sample(torch.zeros(30_000, dtype=torch.long), g)  # row 0 -> class 1
    assert torch.all(labels[picks] == 1)
    counts = torch.bincount(picks, minlength=8)[[1, 2, 6]].numpy()
    _, p = stats.chisquare(counts)
    assert p > 1e-3


def test_same_seed_same_pairs_and_multinomial_reference_agrees_in_law():
    f = text(C=5)
    P = local_sampling_matrix(f, 0.3)
    labels = torch.arange(5).repeat_interleave(4)
    sampler = PairSampler(P, labels)
    ys = torch.randint(5, (256,), generator=torch.Generator().manual_seed(3))
    a = sampler.sample(ys, torch.Generator().manual_seed(7))
    b = sampler.sample(ys, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    n = 100_000
    rows = torch.full((n,), 2)
    fast = torch.bincount(sampler.sample_classes(rows, torch.Generator().manual_seed(1)), minlength=5)
    plain = torch.bincount(sample_classes_multinomial(P, rows, torch.Generator().manual_seed(2)),
                           minlength=5)
    mask = np.arange(5) != 2
    _, p = stats.chi2_contingency(np.stack([fast.numpy()[mask], plain.numpy()[mask]]))[:2]
    assert p > 1e-3


def test_remix_two_cases_and_the_else_case():
    kappa, tau_r = 3.0, 0.5
    n_i = torch.tensor([300.0, 10.0, 100.0, 300.0])
    n_j = torch.tensor([10.0, 300.0, 100.0, 10.0])
    # i is the head class and the image is mostly the tail partner: label all partner.
    assert remix_label(0.3, n_i[:1], n_j[:1], kappa, tau_r).item() == 0.0
    # i is the tail class and the image is mostly i: label all i.
    assert remix_label(0.7, n_i[1:2], n_j[1:2], kappa, tau_r).item() == 1.0
    # balanced pair: plain mixup label
    assert remix_label(0.3, n_i[2:3], n_j[2:3], kappa, tau_r).item() == pytest.approx(0.3)
    # head class, image mostly the head: not rectified
    assert remix_label(0.7, n_i[3:4], n_j[3:4], kappa, tau_r).item() == pytest.approx(0.7)


# ConCutMix settings for the small test sets (the run configuration fills them per data set).
CONCUTMIX = {"concutmix_omega": 2 / 255, "concutmix_topk": 2, "concutmix_warmup": 0.0}


def _mixer(name, counts=(50, 20, 5), **kw):
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    if name == "concutmix":
        kw = {**CONCUTMIX, **kw}
    return build_mixer(name, class_counts=list(counts), train_labels=labels,
                       text_features=text(C=len(counts)), alpha=kw.pop("alpha", 1.0),
                       tau=0.1, beta=kw.pop("beta", 0.4), device="cpu", **kw), labels


def test_mixup_and_lfm_images_and_targets_follow_the_formulas():
    g = torch.Generator().manual_seed(0)
    x_i, x_j = torch.rand(4, 3, 8, 8, generator=g), torch.rand(4, 3, 8, 8, generator=g)
    y_i, y_j = torch.tensor([0, 1, 2, 0]), torch.tensor([2, 2, 0, 1])
    for name in ("mixup", "lfm"):
        mixer, _ = _mixer(name)
        lam = sample_beta(0.4, torch.Generator().manual_seed(5))
        x, t = mixer.mix(x_i, y_i, x_j, y_j, torch.Generator().manual_seed(5))
        assert torch.allclose(x, lam * x_i + (1 - lam) * x_j)
        assert torch.allclose(t.sum(dim=1), torch.ones(4))
        counts = torch.tensor([50.0, 20.0, 5.0])
        lam_y = label_shift(lam, counts[y_i], counts[y_j], 1.0) if name == "lfm" \
            else torch.full((4,), lam)
        for b in range(4):
            assert t[b, y_i[b]].item() == pytest.approx(float(lam_y[b]), abs=1e-6)


def test_lfm_partners_never_share_the_class():
    mixer, labels = _mixer("lfm")
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1, 2] * 100)
    partners = mixer.partners(torch.arange(300), y, g)
    assert torch.all(labels[partners] != y)


def test_cutmix_label_is_the_pasted_area():
    mixer, _ = _mixer("cutmix")
    g = torch.Generator().manual_seed(3)
    x_i, x_j = torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 16, 16)
    x, t = mixer.mix(x_i, torch.tensor([0, 1]), x_j, torch.tensor([1, 2]), g)
    share_j = x[0, 0].mean().item()  # fraction of pixels from x_j
    assert t[0, 1].item() == pytest.approx(share_j)
    assert t[0, 0].item() == pytest.approx(1 - share_j)
    y0, y1, x0, x1 = cut_box(0.75, 16, 16, torch.Generator().manual_seed(0))
    assert 0 <= y0 <= y1 <= 16 and 0 <= x0 <= x1 <= 16


def test_none_passes_through_and_unknown_names_are_listed():
    mixer, _ = _mixer("none")
    x = torch.rand(2, 3, 4, 4)
    assert mixer.partners(torch.arange(2), torch.tensor([0, 1]), torch.Generator()) is None
    out, t = mixer.mix(x, torch.tensor([0, 2]), None, None, torch.Generator())
    assert out is x and t.tolist() == [[1, 0, 0], [0, 0, 1]]
    with pytest.raises(LfmError, match="unknown mixing method 'manifold'.*lfm"):
        build_mixer("manifold", class_counts=[1, 2])


def test_beta_draws_follow_the_distribution():
    g = torch.Generator().manual_seed(0)
    draws = [sample_beta(0.2, g) for _ in range(4000)]
    _, p = stats.kstest(draws, stats.beta(0.2, 0.2).cdf)
    assert p > 1e-3


def test_pair_distribution_of_a_batch_matches_P_by_chi_square():
    # Pairs (y_i, j) for first samples drawn like a training batch: the joint law is
    # p(y_i)·P[y_i, j]; compare every cell with positive probability.
    C = 6
    P = local_sampling_matrix(text(C=C, seed=4), 0.2)
    labels = torch.arange(C).repeat_interleave(3)
    sampler = PairSampler(P, labels)
    g = torch.Generator().manual_seed(11)
    n = 200_000
    y = torch.randint(C, (n,), generator=g)
    j = sampler.sample_classes(y, g)
    observed = torch.bincount(y * C + j, minlength=C * C).double().numpy()
    expected = (torch.bincount(y, minlength=C).double()[:, None] * P.double()).flatten().numpy()
    assert observed[expected == 0].sum() == 0  # no pair outside P's support
    keep = expected > 0
    expected = expected[keep] * observed[keep].sum() / expected[keep].sum()
    _, p = stats.chisquare(observed[keep], expected)
    assert p > 1e-3


@pytest.mark.parametrize("tau", [0.002, 0.05, 1.0])
def test_alias_tables_are_exact_for_softmax_rows_with_underflowed_zeros(tau):
    P = local_sampling_matrix(text(C=60, d=8, seed=2), tau)
    prob, alias = alias_tables(P)
    Pd = P.double() / P.double().sum(dim=1, keepdim=True)
    assert torch.allclose(alias_distribution(prob, alias), Pd, atol=1e-12, rtol=0)
    zero = P == 0
    assert torch.all(prob[zero] == 0)                    # a zero column is never kept ...
    assert not torch.any(zero.gather(1, alias.long()) & (prob < 1))  # ... nor reached as an alias
    if tau == 0.002:
        assert zero.sum() > 60  # the case the guard exists for: many underflowed entries


def test_alias_tables_of_random_rows_with_exact_zeros():
    g = torch.Generator().manual_seed(5)
    P = torch.rand(40, 33, generator=g, dtype=torch.float64) ** 3
    P[torch.rand(40, 33, generator=g) < 0.4] = 0.0
    P[:, 0] += 1e-3  # every row keeps some mass
    P[3] = 0.0
    P[3, 7] = 2.5    # one certain class; unnormalised rows are normalised
    prob, alias = alias_tables(P)
    want = P / P.sum(dim=1, keepdim=True)
    assert torch.allclose(alias_distribution(prob, alias), want, atol=1e-12, rtol=0)
    draws = PairSampler(want[:33], torch.arange(33)).sample_classes(
        torch.full((5000,), 3), torch.Generator().manual_seed(0))
    assert torch.all(draws == 7)
    with pytest.raises(LfmError, match="positive entry"):
        alias_tables(torch.zeros(2, 3))


def test_zero_probability_and_empty_classes_are_never_drawn():
    P = local_sampling_matrix(text(C=30, d=6, seed=9), 0.002)
    labels = torch.arange(30).repeat_interleave(2)
    labels = labels[labels != 4]  # class 4 has no training image
    sampler = PairSampler(P, labels)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(30, (100_000,), generator=g)
    y = y[y != 4]
    j = sampler.sample_classes(y, g)
    Pd = P.double()
    assert torch.all(Pd[y, j] > 0) and torch.all(j != y) and torch.all(j != 4)
    partners = sampler.sample(y, g)
    assert torch.all(labels[partners] != 4)


def test_a_class_with_no_reachable_partner_is_a_clear_error():
    P = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]])
    with pytest.raises(LfmError, match="class 0 has no partner"):
        PairSampler(P, torch.tensor([0, 2]))  # class 0's only partner, 1, has no image


def test_plain_path_draws_the_same_law_for_whole_partners():
    C = 5
    P = local_sampling_matrix(text(C=C, seed=6), 0.3)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 1])
    sampler = PairSampler(P, labels)
    y = torch.full((60_000,), 1)
    fast = torch.bincount(sampler.sample(y, torch.Generator().manual_seed(1)), minlength=10)
    plain = torch.bincount(sampler.sample_plain(y, torch.Generator().manual_seed(2)), minlength=10)
    keep = (fast + plain) > 0
    assert torch.all(labels[keep.nonzero().squeeze(1)] != 1)
    table = np.stack([fast.numpy()[keep.numpy()], plain.numpy()[keep.numpy()]])
    _, p = stats.chi2_contingency(table)[:2]
    assert p > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_draws_on_the_generator_device_follow_P():
    P = local_sampling_matrix(text(C=8), 0.5)
    labels = torch.arange(8).repeat_interleave(5)
    sampler = PairSampler(P, labels, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    n = 200_000
    classes = sampler.sample_classes(torch.full((n,), 3), g)
    assert classes.device.type == "cuda"
    observed = torch.bincount(classes, minlength=8).cpu().numpy()
    mask = np.arange(8) != 3
    assert observed[3] == 0
    _, p = stats.chisquare(observed[mask], P[3].double().numpy()[mask] * n)
    assert p > 1e-3
    cpu = sampler.sample(torch.full((100,), 3), torch.Generator().manual_seed(0))
    assert cpu.device.type == "cpu" and torch.all(labels[cpu] != 3)


@pytest.mark.parametrize("name", ["mixup", "remix", "cutmix", "lfm", "concutmix"])
def test_same_seed_same_partners_images_and_targets(name):
    mixer, labels = _mixer(name)
    sim = lambda x: x.mean(dim=(2, 3))  # noqa: E731  (B, 3) pseudo-cosines, deterministic
    idx = torch.arange(len(labels))[::3]
    x_all = torch.rand(len(labels), 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        j = mixer.partners(idx, labels[idx], g)
        x, t = mixer.mix(x_all[idx], labels[idx], x_all[j], labels[j], g, similarity_fn=sim)
        return j, x, t

    mixer.set_epoch(0, 1)
    a, b, c = run(3), run(3), run(4)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    j, x, t = a
    assert t.shape == (len(idx), 3) and t.dtype == torch.float32
    assert torch.allclose(t.sum(dim=1), torch.ones(len(idx)), atol=1e-6)
    if name not in ("lfm", "concutmix"):  # a permutation of the batch
        assert sorted(j.tolist()) == idx.tolist()


def test_cutmix_images_follow_the_box_and_label_is_its_area():
    mixer, _ = _mixer("cutmix")
    g = torch.Generator().manual_seed(0)
    x_i, x_j = torch.rand(3, 3, 12, 12, generator=g), torch.rand(3, 3, 12, 12, generator=g)
    y_i, y_j = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])
    for seed in range(20):
        x, t = mixer.mix(x_i, y_i, x_j, y_j, torch.Generator().manual_seed(seed))
        # Replay the draws in their order: λ, then the box centre.
        replay = torch.Generator().manual_seed(seed)
        lam = sample_beta(0.4, replay)
        y0, y1, x0, x1 = cut_box(lam, 12, 12, replay)
        want = x_i.clone()
        want[..., y0:y1, x0:x1] = x_j[..., y0:y1, x0:x1]
        assert torch.equal(x, want)
        area = (y1 - y0) * (x1 - x0) / 144
        assert t[torch.arange(3), y_j].tolist() == pytest.approx([area] * 3)
        assert t[torch.arange(3), y_i].tolist() == pytest.approx([1 - area] * 3)


def test_remix_mixer_applies_the_rule_per_sample():
    mixer, _ = _mixer("remix", counts=(90, 30, 10))
    g = torch.Generator().manual_seed(0)
    x_i, x_j = torch.rand(3, 3, 4, 4, generator=g), torch.rand(3, 3, 4, 4, generator=g)
    y_i, y_j = torch.tensor([0, 2, 0]), torch.tensor([2, 0, 1])
    x, t = mixer.mix(x_i, y_i, x_j, y_j, torch.Generator().manual_seed(8))
    lam = sample_beta(0.4, torch.Generator().manual_seed(8))
    assert torch.allclose(x, lam * x_i + (1 - lam) * x_j)
    counts = torch.tensor([90.0, 30.0, 10.0])
    want = remix_label(lam, counts[y_i], counts[y_j], 3.0, 0.5)
    assert t[torch.arange(3), y_i].tolist() == pytest.approx(want.tolist(), abs=1e-6)


def test_mixer_parameters_and_values_are_checked():
    with pytest.raises(LfmError, match="takes no parameter 'kappa'; accepted: concutmix_omega, "
                                       "concutmix_prob, concutmix_topk, concutmix_warmup, "
                                       "remix_kappa, remix_tau"):
        _mixer("remix", kappa=3.0)
    with pytest.raises(LfmError, match="takes no parameter 'concutmix_weight'"):
        _mixer("concutmix", concutmix_weight=0.5)
    with pytest.raises(LfmError, match="beta=0"):
        build_mixer("mixup", class_counts=[1, 2], beta=0)
    with pytest.raises(LfmError, match="concutmix_prob=1.5 is not valid"):
        _mixer("concutmix", concutmix_prob=1.5)
    with pytest.raises(LfmError, match="concutmix_topk=2.5 is not valid"):
        _mixer("concutmix", concutmix_topk=2.5)
    with pytest.raises(LfmError, match="concutmix_warmup=-0.1 is not valid"):
        _mixer("concutmix", concutmix_warmup=-0.1)
    with pytest.raises(LfmError, match="lfm needs"):
        build_mixer("lfm", class_counts=[1, 2])
    assert set(MIXERS) == {"none", "mixup", "remix", "cutmix", "lfm", "concutmix"}


def test_beta_draws_with_a_tiny_parameter_stay_in_range():
    g = torch.Generator().manual_seed(0)
    draws = np.array([sample_beta(0.01, g) for _ in range(400)])
    assert np.all((draws >= 0) & (draws <= 1))
    # Beta(0.01, 0.01) is almost a fair coin on {0, 1}: no mass piles up at 1/2.
    assert np.mean((draws < 1e-3) | (draws > 1 - 1e-3)) > 0.9
    assert 0.3 < np.mean(draws > 0.5) < 0.7


# ---- ConCutMix -----------------------------------------------------------------------------
def direct_concutmix_target(cos, y_i, y_j, lam, counts, omega, k):
    """ConCutMix's target written out per sample in float64: ρ·ŷ_sem + (1 − ρ)·ỹ_area."""
    C = len(counts)
    sum_log = sum(math.log(n) for n in counts)
    out = []
    for b in range(len(y_i)):
        # distances to every class centre: ‖f − c‖ = sqrt(2 − 2 cos) for unit vectors
        dist = [math.sqrt(2.0 - 2.0 * float(cos[b][c])) for c in range(C)]
        nearest = sorted(range(C), key=lambda c: dist[c])[:k]
        inv = {c: 1.0 / dist[c] for c in nearest}
        sem = [inv.get(c, 0.0) / sum(inv.values()) for c in range(C)]
        a, bb = int(y_i[b]), int(y_j[b])
        area = [0.0] * C
        area[a] += lam
        area[bb] += 1.0 - lam
        rho = omega * math.log(lam * counts[a] + (1.0 - lam) * counts[bb]) / sum_log
        out.append([rho * sem[c] + (1.0 - rho) * area[c] for c in range(C)])
    return np.array(out)


def test_concutmix_target_against_the_formula_written_out():
    counts = (400, 120, 40, 9, 3, 2)
    C, k, omega = len(counts), 3, 0.6  # ω large enough that ρ is far from 0 here
    mixer, _ = _mixer("concutmix", counts=counts, beta=None, concutmix_omega=omega,
                      concutmix_topk=k, concutmix_prob=1.0, concutmix_warmup=0.0)
    g = torch.Generator().manual_seed(0)
    B, H, W = 5, 12, 10
    x_i, x_j = torch.rand(B, 3, H, W, generator=g), torch.rand(B, 3, H, W, generator=g)
    y_i, y_j = torch.tensor([0, 1, 5, 3, 2]), torch.tensor([4, 1, 0, 2, 5])
    unit = lambda n: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(n, 8, generator=g, dtype=torch.float64), dim=1)
    cos = unit(B) @ unit(C).t()  # mixed images' features against the class centres
    seen = []
    for seed in range(12):
        x, t = mixer.mix(x_i, y_i, x_j, y_j, torch.Generator().manual_seed(seed),
                         similarity_fn=lambda images: cos.float())
        # Replay the draws: the cut coin, λ ~ Beta(1, 1), then the box centre.
        replay = torch.Generator().manual_seed(seed)
        assert float(torch.rand((), generator=replay, dtype=torch.float64)) < 1.0
        lam = sample_beta(1.0, replay)
        y0, y1, x0, x1 = cut_box(lam, H, W, replay)
        want_x = x_i.clone()
        want_x[..., y0:y1, x0:x1] = x_j[..., y0:y1, x0:x1]
        assert torch.equal(x, want_x)
        kept = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)  # the area x_i keeps after clipping
        want = direct_concutmix_target(cos.float().double().tolist(), y_i, y_j, kept,
                                       counts, omega, k)
        assert np.allclose(t.double().numpy(), want, atol=1e-6)
        assert np.allclose(t.sum(dim=1).numpy(), 1.0, atol=1e-6)
        seen.append(kept)
    assert len({round(v, 6) for v in seen}) > 5  # boxes of many sizes, some clipped


def test_concutmix_semantic_label_keeps_the_k_nearest_centres_only():
    from lfm_ray.mixing import concutmix_semantic_label

    cos = torch.tensor([[0.9, 0.1, 0.5, -0.3, 0.2], [0.0, 1.0, 0.3, 0.2, 0.1]], dtype=torch.float64)
    label = concutmix_semantic_label(cos, 2)
    inv = lambda c: 1 / math.sqrt(2 - 2 * c)  # noqa: E731
    assert label[0].tolist() == pytest.approx(
        [inv(0.9) / (inv(0.9) + inv(0.5)), 0, inv(0.5) / (inv(0.9) + inv(0.5)), 0, 0])
    # A feature on a centre (distance 0) labels that class alone, finitely.
    assert torch.isfinite(label).all() and float(label[1, 1]) > 1 - 1e-5


def test_balanced_foreground_sampler_law():
    # Classes 0..4 with 50, 20, 5, 0, 1 images: a uniform class among {0, 1, 2, 4}, then a
    # uniform image of it, so image i of class c has probability 1 / (4 · n_c).
    counts = [50, 20, 5, 0, 1]
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    sampler = BalancedSampler(labels, 5)
    n = 200_000
    picks = sampler.sample(n, torch.Generator().manual_seed(1))
    per_image = torch.bincount(picks, minlength=len(labels)).double().numpy()
    n_c = np.array(counts, dtype=np.float64)[labels.numpy()]
    expected = n / (4 * n_c)
    _, p = stats.chisquare(per_image, expected)
    assert p > 1e-3
    per_class = torch.bincount(labels[picks], minlength=5).numpy()
    assert per_class[3] == 0
    _, p = stats.chisquare(per_class[[0, 1, 2, 4]])
    assert p > 1e-3
    a = sampler.sample(64, torch.Generator().manual_seed(5))
    assert torch.equal(a, sampler.sample(64, torch.Generator().manual_seed(5)))
    # The mixer's partners are these draws, one per batch sample.
    mixer, mix_labels = _mixer("concutmix", counts=(50, 20, 5, 0, 1))
    j = mixer.partners(torch.arange(300), mix_labels[:300], torch.Generator().manual_seed(2))
    assert j.shape == (300,) and torch.all(mix_labels[j] != 3)


def test_concutmix_warmup_uses_the_area_label_then_the_semantic_one():
    mixer, _ = _mixer("concutmix", beta=None, concutmix_prob=1.0, concutmix_warmup=0.5,
                      concutmix_omega=1.0)
    cut, _ = _mixer("cutmix", beta=None)  # both Beta(1, 1)
    x_i, x_j = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    y_i, y_j = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])
    cos = torch.tensor([[0.9, 0.2, 0.1], [0.1, 0.8, 0.3], [0.2, 0.3, 0.7]])

    def not_called(images):
        raise AssertionError("the similarity must not be computed in the warm-up")

    with pytest.raises(LfmError, match="set_epoch"):  # never a silent default
        mixer.mix(x_i, y_i, x_j, y_j, torch.Generator().manual_seed(0), similarity_fn=not_called)
    for epoch in range(4):  # 4 epochs, warm-up 0.5: epochs 0 and 1 use the area label alone
        mixer.set_epoch(epoch, 4)
        # CutMix's draws after ConCutMix's coin: the same λ and box.
        coin = torch.Generator().manual_seed(epoch)
        torch.rand((), generator=coin, dtype=torch.float64)
        x_area, t_area = cut.mix(x_i, y_i, x_j, y_j, coin)
        if epoch < 2:
            assert mixer.in_warmup
            x, t = mixer.mix(x_i, y_i, x_j, y_j, torch.Generator().manual_seed(epoch),
                             similarity_fn=not_called)
            assert torch.equal(x, x_area) and torch.equal(t, t_area)
        else:
            assert not mixer.in_warmup
            with pytest.raises(LfmError, match="needs the model's image-text similarity"):
                mixer.mix(x_i, y_i, x_j, y_j, torch.Generator().manual_seed(epoch))
            x, t = mixer.mix(x_i, y_i, x_j, y_j, torch.Generator().manual_seed(epoch),
                             similarity_fn=lambda images: cos)
            assert torch.equal(x, x_area) and not torch.allclose(t, t_area, atol=1e-3)
    # No warm-up: no stage progress needed.
    no_warmup, _ = _mixer("concutmix", concutmix_prob=1.0)
    no_warmup.mix(x_i, y_i, x_j, y_j, torch.Generator().manual_seed(0),
                  similarity_fn=lambda images: cos)


def test_concutmix_cuts_a_batch_with_its_probability():
    # β = 50 keeps λ near 1/2, so a cut batch always has a non-empty box.
    x_i, x_j = torch.zeros(4, 3, 16, 16), torch.ones(4, 3, 16, 16)
    y_i, y_j = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 2])
    cos = torch.rand(4, 3)
    for prob in (0.0, 0.3, 1.0):
        mixer, _ = _mixer("concutmix", beta=50.0, concutmix_prob=prob)
        g = torch.Generator().manual_seed(7)
        n, cuts = 2000, 0
        for _ in range(n):
            x, t = mixer.mix(x_i, y_i, x_j, y_j, g, similarity_fn=lambda images: cos)
            if bool((x > 0).any()):
                cuts += 1
                assert 0 < float(t[0, 0]) < 1
            else:  # not cut: ConCutMix trains on the images as they are, one-hot targets
                assert x is x_i
                assert torch.equal(t, torch.nn.functional.one_hot(y_i, 3).float())
        if prob in (0.0, 1.0):
            assert cuts == n * prob
        else:
            assert stats.binomtest(cuts, n, prob).pvalue > 1e-3


def test_concutmix_refuses_what_it_cannot_run():
    with pytest.raises(LfmError, match="concutmix needs concutmix_omega"):
        build_mixer("concutmix", class_counts=[5, 3], train_labels=torch.tensor([0, 1]),
                    concutmix_topk=1, concutmix_warmup=0.0)
    with pytest.raises(LfmError, match="concutmix_topk=4 is not valid for 3 classes"):
        _mixer("concutmix", concutmix_topk=4)
    # ω · max log N / Σ log N > 1 would give negative targets: refused, naming the bound.
    bound = sum(math.log(n) for n in (50, 20, 5)) / math.log(50)
    with pytest.raises(LfmError, match=f"expected ω <= {bound:.6g}"):
        _mixer("concutmix", concutmix_omega=bound * 1.01)
    _mixer("concutmix", concutmix_omega=bound * 0.99)
    with pytest.raises(LfmError, match="training labels"):
        build_mixer("concutmix", class_counts=[5, 3], **{**CONCUTMIX, "concutmix_topk": 1})
    mixer, _ = _mixer("concutmix")
    with pytest.raises(LfmError, match="set_epoch"):
        mixer.set_epoch(-1, 3)


# ---- each method's own law of λ ----------------------------------------------------------
def test_each_method_draws_lambda_from_its_own_law_unless_beta_is_set():
    want = {"none": None, "mixup": 1.0, "remix": 0.5, "cutmix": 1.0, "lfm": 0.2, "concutmix": 1.0}
    assert MIX_BETA == want
    for name, beta in want.items():
        mixer, _ = _mixer(name, beta=None)
        assert mixer.beta == beta and mixer.settings()["beta"] == beta
        assert _mixer(name, beta=0.7)[0].beta == 0.7
    # The draw itself: Mixup's λ is a Beta(1, 1) draw, Remix's a Beta(0.5, 0.5) one.
    x_i, x_j = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    y = torch.tensor([0, 1])
    for name in ("mixup", "remix", "lfm"):
        mixer, _ = _mixer(name, beta=None)
        x, _t = mixer.mix(x_i, y, x_j, y, torch.Generator().manual_seed(3))
        lam = sample_beta(want[name], torch.Generator().manual_seed(3))
        assert float(x[0, 0, 0, 0]) == pytest.approx(1 - lam)
    g = torch.Generator().manual_seed(0)
    draws = [sample_beta(MIX_BETA["remix"], g) for _ in range(3000)]
    assert stats.kstest(draws, stats.beta(0.5, 0.5).cdf).pvalue > 1e-3
    assert _mixer("remix")[0].settings() == {"method": "remix", "beta": 0.4,
                                             "remix_kappa": 3.0, "remix_tau": 0.5}


def _vose_sweep(row: list[float]) -> tuple[list[float], list[int]]:
    """Vose's sweep written out one column at a time: the direct computation the prefix-sum
    build must equal."""
    K = len(row)
    s = [p / sum(row) * K for p in row]
    lights = [k for k in range(K) if s[k] < 1.0]
    heavies = [k for k in range(K) if s[k] >= 1.0]
    prob, alias = [1.0] * K, list(range(K))
    li, hj = 0, 0
    if not heavies:
        return prob, alias
    w = s[heavies[0]]
    while hj < len(heavies):
        if w > 1.0:
            if li == len(lights):
                break
            prob[lights[li]], alias[lights[li]] = s[lights[li]], heavies[hj]
            w -= 1.0 - s[lights[li]]
            li += 1
        else:
            if hj + 1 == len(heavies):
                break
            prob[heavies[hj]], alias[heavies[hj]] = w, heavies[hj + 1]
            w = s[heavies[hj + 1]] + w - 1.0
            hj += 1
    return prob, alias


def test_alias_tables_are_vose_sweep_and_draw_each_row_exactly():
    """The prefix-sum build gives the tables of Vose's sweep run column by column (an alias
    counts where its column's prob is below 1: elsewhere it is never taken), and the
    distribution they draw equals each row: Dirichlet rows from flat to nearly one-hot,
    uniform rows, rows with zeros, one column, every column but one tiny."""
    rng = np.random.default_rng(7)
    rows = [rng.dirichlet(np.full(K, a)) for K in (1, 2, 3, 10, 57, 300)
            for a in (0.05, 1.0, 50.0)]
    rows += [np.full(20, 0.05), np.r_[np.zeros(5), rng.random(10), np.zeros(3)],
             np.r_[1.0, np.full(30, 1e-9)]]
    for row in rows:
        P = torch.tensor(row, dtype=torch.float64)[None]
        prob, alias = alias_tables(P)
        want_prob, want_alias = _vose_sweep(list(row))
        assert torch.allclose(prob[0], torch.tensor(want_prob, dtype=torch.float64),
                              atol=1e-9, rtol=0), len(row)
        used = [k for k in range(len(row)) if want_prob[k] < 1.0 - 1e-9]  # prob 1: unused
        assert [alias[0, k].item() for k in used] == [want_alias[k] for k in used], len(row)
        assert torch.all((prob >= 0) & (prob <= 1))
        assert torch.allclose(alias_distribution(prob, alias)[0], P[0] / P[0].sum(),
                              atol=1e-12, rtol=0), len(row)


def test_alias_tables_built_in_row_chunks_equal_one_build():
    """The chunked build (bounded memory at iNaturalist's 8,142 classes) gives the tables of
    one build over all rows, and a column mask equals zeroing those columns first."""
    P = local_sampling_matrix(text(C=50, d=8, seed=4), 0.05)
    prob, alias = alias_tables(P, chunk_rows=len(P))
    for chunk in (1, 7, 16):
        p, a = alias_tables(P, chunk_rows=chunk)
        assert torch.equal(p, prob) and torch.equal(a, alias)
    assert alias.dtype == torch.int16  # 2 bytes per entry below 32,768 classes
    mask = torch.ones(50, dtype=torch.bool)
    mask[[3, 17]] = False
    p, a = alias_tables(P, column_mask=mask, chunk_rows=9)
    want = P.double() * mask.double()
    want = want / want.sum(dim=1, keepdim=True)
    assert torch.allclose(alias_distribution(p, a), want, atol=1e-12, rtol=0)
    assert torch.all(p[:, [3, 17]] == 0)


def test_pair_sampler_keeps_only_its_tables_and_draws_the_renormalised_rows():
    P = local_sampling_matrix(text(C=12, d=8, seed=6), 0.25)
    labels = torch.arange(12).repeat_interleave(3)
    labels = labels[labels != 5]  # class 5 has no image: never drawn, its row never asked
    sampler = PairSampler(P, labels)
    want = P.double() * (torch.arange(12) != 5).double()
    want = want / want.sum(dim=1, keepdim=True)
    assert torch.allclose(sampler.P[torch.arange(12) != 5], want[torch.arange(12) != 5],
                          atol=1e-12, rtol=0)
    assert torch.allclose(alias_distribution(sampler.prob, sampler.alias)[[0, 4, 11]],
                          want[[0, 4, 11]], atol=1e-12, rtol=0)
    assert sampler.table_bytes() == 12 * 12 * (8 + 2) + 12 * 8 * 2 + len(labels) * 8
