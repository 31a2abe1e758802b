"""Each loss against a direct computation, for hard labels and soft (mixed) targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lfm_ray.errors import LfmError
from lfm_ray.losses import LOSSES, build_loss

COUNTS = [100, 30, 10, 3]


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g) * 3
    hard = torch.tensor([0, 1, 2, 3, 1])
    soft = torch.zeros(5, 4)
    soft[torch.arange(5), hard] = 0.7
    soft[torch.arange(5), torch.tensor([1, 2, 3, 0, 1])] += 0.3
    return logits, hard, soft


def log_softmax_row(z):
    m = max(z)
    return [v - (m + math.log(sum(math.exp(w - m) for w in z))) for v in z]


def direct_soft_ce(logits, soft):
    total = 0.0
    for z, t in zip(logits.tolist(), soft.tolist()):
        lp = log_softmax_row(z)
        total += -sum(ti * li for ti, li in zip(t, lp))
    return total / len(logits)


def one_hot(hard, C=4):
    return torch.nn.functional.one_hot(hard, C).float()


def test_ce_soft_and_hard(batch):
    logits, hard, soft = batch
    loss = build_loss("ce", COUNTS)
    assert loss(logits, soft).item() == pytest.approx(direct_soft_ce(logits, soft), rel=1e-5)
    assert loss(logits, hard).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, hard).item(), rel=1e-5)


def test_balanced_softmax_is_ce_on_logits_plus_log_counts(batch):
    logits, hard, soft = batch
    shifted = logits + torch.log(torch.tensor(COUNTS, dtype=torch.float32))
    loss = build_loss("balce", COUNTS)
    assert loss(logits, soft).item() == pytest.approx(direct_soft_ce(shifted, soft), rel=1e-5)
    assert loss(logits, hard).item() == pytest.approx(direct_soft_ce(shifted, one_hot(hard)), rel=1e-5)


def test_focal_direct_and_gamma_zero_is_ce(batch):
    logits, hard, soft = batch
    gamma = 2.0
    total = 0.0
    for z, t in zip(logits.tolist(), soft.tolist()):
        lp = log_softmax_row(z)
        total += -sum(ti * (1 - math.exp(li)) ** gamma * li for ti, li in zip(t, lp))
    loss = build_loss("focal", COUNTS, gamma=gamma)
    assert loss(logits, soft).item() == pytest.approx(total / 5, rel=1e-5)
    assert build_loss("focal", COUNTS, gamma=0.0)(logits, hard).item() == pytest.approx(
        build_loss("ce", COUNTS)(logits, hard).item(), rel=1e-6)


def test_ldam_hard_is_the_textbook_ldam_and_soft_weights_the_margin(batch):
    logits, hard, soft = batch
    m = np.array(COUNTS, dtype=np.float64) ** -0.25
    m = m * (0.5 / m.max())
    scale = 30.0
    loss = build_loss("ldam", COUNTS, max_margin=0.5, logit_scale=scale)
    # Textbook LDAM: subtract scale·m_y from the true class's logit, then CE.
    textbook = logits.clone()
    textbook[torch.arange(5), hard] -= scale * torch.tensor(m, dtype=torch.float32)[hard]
    assert loss(logits, hard).item() == pytest.approx(
        torch.nn.functional.cross_entropy(textbook, hard).item(), rel=1e-5)
    shifted = logits - scale * soft * torch.tensor(m, dtype=torch.float32)
    assert loss(logits, soft).item() == pytest.approx(direct_soft_ce(shifted, soft), rel=1e-5)


def test_mms_soft_is_the_expectation_over_target_classes(batch):
    logits, hard, soft = batch
    g = torch.Generator().manual_seed(1)
    f = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    margin, temperature = 0.3, 0.01
    loss = build_loss("mms", COUNTS, text_features=f, margin=margin, logit_scale=1 / temperature)
    cos = (f @ f.t()).tolist()

    def direct_hard(z, c):
        adj = [z[k] + (margin * (1 - cos[c][k]) / temperature if k != c else 0.0) for k in range(4)]
        return -log_softmax_row(adj)[c]

    want_soft = np.mean([sum(t[c] * direct_hard(z, c) for c in range(4) if t[c] > 0)
                         for z, t in zip(logits.tolist(), soft.tolist())])
    want_hard = np.mean([direct_hard(z, c) for z, c in zip(logits.tolist(), hard.tolist())])
    assert loss(logits, soft).item() == pytest.approx(want_soft, rel=1e-5)
    assert loss(logits, hard).item() == pytest.approx(want_hard, rel=1e-5)
    with pytest.raises(LfmError, match="text features"):
        build_loss("mms", COUNTS)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_hard_label_equals_its_one_hot(batch, name):
    logits, hard, _ = batch
    f = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    loss = build_loss(name, COUNTS, text_features=f)
    assert loss(logits, hard).item() == pytest.approx(loss(logits, one_hot(hard)).item(), rel=1e-6)


def test_unknown_loss_and_parameter():
    with pytest.raises(LfmError, match="unknown loss 'hinge'; known: balce, cb, ce, focal, grw, "
                                       "lade, ldam, mms"):
        build_loss("hinge", COUNTS)
    with pytest.raises(LfmError, match="loss 'ce' takes no parameter 'gamma'"):
        build_loss("ce", COUNTS, gamma=2.0)


def test_mms_rows_naming_different_numbers_of_classes():
    # One hard row, one pair, one three-way mix: k = 3, the zero-weight padding adds nothing.
    g = torch.Generator().manual_seed(2)
    f = torch.nn.functional.normalize(torch.randn(5, 6, generator=g), dim=1)
    logits = torch.randn(3, 5, generator=g) * 4
    soft = torch.tensor([[0, 0, 1, 0, 0], [0.25, 0, 0, 0.75, 0], [0.2, 0.5, 0, 0, 0.3]])
    loss = build_loss("mms", [5, 4, 3, 2, 1], text_features=f, margin=0.2, logit_scale=1 / 0.05)
    cos = (f @ f.t()).tolist()

    def direct(z, c):
        adj = [z[k] + (0.2 * (1 - cos[c][k]) / 0.05 if k != c else 0.0) for k in range(5)]
        return -log_softmax_row(adj)[c]

    want = np.mean([sum(t[c] * direct(z, c) for c in range(5) if t[c] > 0)
                    for z, t in zip(logits.tolist(), soft.tolist())])
    assert loss(logits, soft).item() == pytest.approx(want, rel=1e-5)


def test_focal_hard_labels_direct(batch):
    logits, hard, _ = batch
    gamma = 1.5
    want = 0.0
    for z, y in zip(logits.tolist(), hard.tolist()):
        lp = log_softmax_row(z)[y]
        want += -(1 - math.exp(lp)) ** gamma * lp
    loss = build_loss("focal", COUNTS, gamma=gamma)
    assert loss(logits, hard).item() == pytest.approx(want / 5, rel=1e-5)


def test_ldam_margins_with_another_scale_and_max_margin(batch):
    logits, hard, soft = batch
    m = [n ** -0.25 for n in COUNTS]
    m = [v * 0.3 / max(m) for v in m]
    assert max(m) == pytest.approx(0.3) and m[-1] == pytest.approx(0.3)  # rarest: largest
    want = 0.0
    for z, t in zip(logits.tolist(), soft.tolist()):
        shifted = [z[k] - 10.0 * t[k] * m[k] for k in range(4)]
        want += -sum(t[k] * v for k, v in enumerate(log_softmax_row(shifted)))
    loss = build_loss("ldam", COUNTS, max_margin=0.3, logit_scale=10.0)
    assert loss(logits, soft).item() == pytest.approx(want / 5, rel=1e-5)


def test_bad_values_and_shapes():
    with pytest.raises(LfmError, match="focal gamma"):
        build_loss("focal", COUNTS, gamma=-1.0)
    with pytest.raises(LfmError, match="ldam max_margin"):
        build_loss("ldam", COUNTS, max_margin=0.0)
    with pytest.raises(LfmError, match="mms logit_scale=0.0 is not valid"):
        build_loss("mms", COUNTS, text_features=torch.eye(4), logit_scale=0.0)
    with pytest.raises(LfmError, match="ldam logit_scale=-1.0 is not valid"):
        build_loss("ldam", COUNTS, logit_scale=-1.0)
    with pytest.raises(LfmError, match="loss 'mms' takes no parameter 'gamma'; "
                                       "accepted: margin, logit_scale"):
        build_loss("mms", COUNTS, text_features=torch.eye(4), gamma=1.0)
    # The two parameters the logit scale replaced say so.
    with pytest.raises(LfmError, match=r"'temperature' \(temperature was replaced by logit_scale "
                                       r"\(= 1 / temperature\)\); accepted: margin, logit_scale"):
        build_loss("mms", COUNTS, text_features=torch.eye(4), temperature=0.01)
    with pytest.raises(LfmError, match="'scale' .scale was replaced by logit_scale"):
        build_loss("ldam", COUNTS, scale=30.0)
    with pytest.raises(ValueError, match="soft targets must have shape"):
        build_loss("ce", COUNTS)(torch.zeros(2, 4), torch.zeros(2, 3))


def test_losses_are_differentiable_and_finite_under_half_precision_logits(batch):
    logits, _, soft = batch
    f = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    for name in sorted(LOSSES):
        z = (logits * 10).to(torch.bfloat16).requires_grad_()
        value = build_loss(name, COUNTS, text_features=f)(z, soft)
        value.backward()
        assert value.dtype == torch.float32 and torch.isfinite(value)
        assert torch.isfinite(z.grad).all()


# ---- one logit scale for every loss -------------------------------------------------------
def direct_ldam(logits, soft, s, max_margin=0.5):
    """Soft CE of z − s·t_k·m_k, m_k = max_margin · n_k^(−1/4) / max_j n_j^(−1/4)."""
    m = [n ** -0.25 for n in COUNTS]
    m = [v * max_margin / max(m) for v in m]
    total = 0.0
    for z, t in zip(logits.tolist(), soft.tolist()):
        shifted = [z[k] - s * t[k] * m[k] for k in range(4)]
        total += -sum(t[k] * v for k, v in enumerate(log_softmax_row(shifted)))
    return total / len(logits)


def direct_mms(logits, soft, f, s, margin=0.3):
    """Σ_c t_c · (−log softmax(z + s·margin·(1 − cos(f_c, f_k)) for k ≠ c)_c), batch mean."""
    cos = (f.double() @ f.double().t()).tolist()

    def one(z, c):
        adj = [z[k] + (s * margin * (1 - cos[c][k]) if k != c else 0.0) for k in range(4)]
        return -log_softmax_row(adj)[c]

    return np.mean([sum(t[c] * one(z, c) for c in range(4) if t[c] > 0)
                    for z, t in zip(logits.tolist(), soft.tolist())])


def test_default_scales_are_the_authors_ldam_30_and_mms_1_over_0_01(batch):
    from lfm_ray.config import LOGIT_SCALE, RunConfig

    assert (LOGIT_SCALE["ldam"], LOGIT_SCALE["mms"]) == (30.0, 100.0)
    _, hard, soft = batch
    cos = torch.rand(5, 4, generator=torch.Generator().manual_seed(4)) * 2 - 1
    f = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)),
                                      dim=1)
    # LDAM as its authors: s·(cos_y − m_y) with s = 30, on the model's logits 30·cos.
    ldam = build_loss("ldam", COUNTS)
    assert ldam.logit_scale == 30.0
    m = np.array(COUNTS, dtype=np.float64) ** -0.25
    m = m * (0.5 / m.max())
    authors = 30 * cos.clone()
    authors[torch.arange(5), hard] = 30 * (cos[torch.arange(5), hard]
                                          - torch.tensor(m, dtype=torch.float32)[hard])
    assert ldam(30 * cos, hard).item() == pytest.approx(
        torch.nn.functional.cross_entropy(authors, hard).item(), rel=1e-5)
    # MMS as the LFM authors: CE of (cos + 0.3·(1 − cos(f_y, f_k))) / 0.01 on logits cos / 0.01.
    mms = build_loss("mms", COUNTS, text_features=f)
    ff = (f @ f.t())
    authors = (cos + 0.3 * (1 - ff[hard])) / 0.01
    assert mms(cos / 0.01, hard).item() == pytest.approx(
        torch.nn.functional.cross_entropy(authors, hard).item(), rel=1e-5)
    assert mms(cos / 0.01, soft).item() == pytest.approx(
        direct_mms(cos / 0.01, soft, f, 100.0), rel=1e-5)
    # The run passes its logit scale, whose default is the loss's.
    for name in ("ldam", "mms"):
        cfg = RunConfig().override({"loss.name": name})
        assert cfg.loss.params(cfg.logit_scale)["logit_scale"] == LOGIT_SCALE[name]
        assert cfg.loss.params()["logit_scale"] == LOGIT_SCALE[name]


@pytest.mark.parametrize("s", [1.0, 30.0])
def test_a_common_scale_puts_each_margin_on_it(batch, s):
    _, hard, soft = batch
    cos = torch.rand(5, 4, generator=torch.Generator().manual_seed(6)) * 2 - 1
    f = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(2)),
                                      dim=1)
    logits = s * cos  # what the model gives at logit scale s
    ldam = build_loss("ldam", COUNTS, logit_scale=s)
    mms = build_loss("mms", COUNTS, text_features=f, logit_scale=s)
    for targets in (soft, one_hot(hard)):
        assert ldam(logits, targets).item() == pytest.approx(direct_ldam(logits, targets, s),
                                                             rel=1e-5)
        assert mms(logits, targets).item() == pytest.approx(direct_mms(logits, targets, f, s),
                                                            rel=1e-5)
    # At s = 1 the largest LDAM margin is 0.5 on the logit (a cosine), not 30·0.5.
    assert float((ldam.logit_scale * ldam.margins).max()) == pytest.approx(0.5 * s)
    assert float(mms.margins.max()) <= 0.3 * 2 * s + 1e-6


# ---- class-balanced, generalised reweighting, LADE (LIFT's definitions) -------------------------
def direct_weighted_ce(logits, soft, w):
    """Σ_i Σ_k w_k t_ik (−log p_ik) / Σ_i Σ_k w_k t_ik, written out."""
    num = den = 0.0
    for z, t in zip(logits.tolist(), soft.tolist()):
        lp = log_softmax_row(z)
        num += -sum(w[k] * t[k] * lp[k] for k in range(len(z)))
        den += sum(w[k] * t[k] for k in range(len(z)))
    return num / den


def cb_weights(beta):
    w = [(1 - beta) / (1 - beta ** n) for n in COUNTS]
    return [v * len(w) / sum(w) for v in w]  # mean 1


def grw_weights(rho):
    w = [(n / sum(COUNTS)) ** -rho for n in COUNTS]
    return [v * len(w) / sum(w) for v in w]


def check_weighted_loss(loss, w, logits, hard, soft):
    """The loss's class weights are w; on hard labels it is PyTorch's class-weighted
    cross-entropy (a weighted mean, as LIFT's CB and GRW losses), on any target the direct
    weighted mean."""
    assert loss.weights.tolist() == pytest.approx(w, rel=1e-5)
    torch_weighted = torch.nn.functional.cross_entropy(logits, hard, weight=torch.tensor(w))
    assert loss(logits, hard).item() == pytest.approx(torch_weighted.item(), rel=1e-5)
    for targets in (one_hot(hard), soft):
        assert loss(logits, targets).item() == pytest.approx(
            direct_weighted_ce(logits, targets, w), rel=1e-5)


@pytest.mark.parametrize("beta", [0.9999, 0.99, 0.0])
def test_class_balanced_weights_are_the_inverse_effective_numbers(batch, beta):
    logits, hard, soft = batch
    loss = build_loss("cb", COUNTS, beta=beta)
    check_weighted_loss(loss, cb_weights(beta), logits, hard, soft)
    if beta == 0.0:  # every class alike: plain cross-entropy
        assert loss(logits, soft).item() == pytest.approx(direct_soft_ce(logits, soft), rel=1e-5)


@pytest.mark.parametrize("rho", [1.0, 0.5, 0.0])
def test_generalised_reweighting_weights_are_inverse_frequencies_to_the_rho(batch, rho):
    logits, hard, soft = batch
    w = grw_weights(rho)
    assert w[-1] > w[0] or rho == 0.0  # the rarest class weighs most
    check_weighted_loss(build_loss("grw", COUNTS, exponent=rho), w, logits, hard, soft)


def direct_lade(logits, soft, weight=0.1, lam=0.1):
    """LADE written out: balanced softmax + weight · (−Σ_c π_c (first_c − second_c − λ second_c²)),
    first_c the target-weighted mean logit of class c, second_c = log((1/B) Σ_i exp(z_ic) / (C π_c))."""
    B, C = logits.shape
    prior = [n / sum(COUNTS) for n in COUNTS]
    z, t = logits.tolist(), soft.tolist()
    balanced = direct_soft_ce(logits + torch.log(torch.tensor(prior)), soft)
    reg = 0.0
    for c in range(C):
        mass = sum(t[i][c] for i in range(B))
        first = sum(t[i][c] * z[i][c] for i in range(B)) / (mass + 1e-8)
        second = math.log(sum(math.exp(z[i][c]) / (C * prior[c]) for i in range(B)) / B)
        reg -= prior[c] * (first - second - lam * second ** 2)
    return balanced + weight * reg


def test_lade_against_its_definition_on_hard_and_soft_targets(batch):
    logits, hard, soft = batch
    loss = build_loss("lade", COUNTS)
    assert (loss.weight, loss.remine_lambda) == (0.1, 0.1)  # LIFT's
    assert loss(logits, hard).item() == pytest.approx(direct_lade(logits, one_hot(hard)), rel=1e-5)
    assert loss(logits, soft).item() == pytest.approx(direct_lade(logits, soft), rel=1e-5)
    other = build_loss("lade", COUNTS, weight=0.5, remine_lambda=0.0)
    assert other(logits, soft).item() == pytest.approx(direct_lade(logits, soft, 0.5, 0.0), rel=1e-5)
    # Weight 0: balanced softmax alone.
    assert build_loss("lade", COUNTS, weight=0.0)(logits, soft).item() == pytest.approx(
        build_loss("balce", COUNTS)(logits, soft).item(), rel=1e-6)


def test_lade_with_a_class_missing_from_the_batch(batch):
    logits, _, _ = batch
    hard = torch.tensor([0, 0, 1, 1, 2])  # class 3 absent: its first term is 0, as LIFT's
    assert build_loss("lade", COUNTS)(logits, hard).item() == pytest.approx(
        direct_lade(logits, one_hot(hard)), rel=1e-5)


def test_new_losses_refuse_bad_values():
    with pytest.raises(LfmError, match=r"cb beta=1.0 is not valid; expected a number in \[0, 1\)"):
        build_loss("cb", COUNTS, beta=1.0)
    with pytest.raises(LfmError, match="grw exponent=-1.0 is not valid"):
        build_loss("grw", COUNTS, exponent=-1.0)
    with pytest.raises(LfmError, match="lade weight=-0.1 is not valid"):
        build_loss("lade", COUNTS, weight=-0.1)
    with pytest.raises(LfmError, match="loss 'cb' takes no parameter 'tau'; accepted: beta"):
        build_loss("cb", COUNTS, tau=1.0)
    from lfm_ray.config import RunConfig

    for values, needle in [({"loss.cb_beta": 1.0}, "loss.cb_beta=1.0 is not valid"),
                           ({"loss.grw_exponent": -0.5}, "loss.grw_exponent=-0.5 is not valid"),
                           ({"loss.lade_weight": -1}, "loss.lade_weight=-1.0 is not valid"),
                           ({"loss.lade_remine_lambda": -1}, "loss.lade_remine_lambda=-1.0")]:
        with pytest.raises(LfmError, match=needle):
            RunConfig().override(values).validate()


def test_the_run_passes_the_new_losses_their_settings():
    from lfm_ray.config import RunConfig

    cfg = RunConfig().override({"loss.name": "cb", "loss.cb_beta": 0.99})
    assert cfg.loss.params(cfg.logit_scale) == {"beta": 0.99} and cfg.logit_scale == 1.0
    cfg = RunConfig().override({"loss.name": "grw", "loss.grw_exponent": 0.5})
    assert cfg.loss.params() == {"exponent": 0.5}
    cfg = RunConfig().override({"loss.name": "lade", "loss.lade_weight": 0.2})
    assert cfg.loss.params() == {"weight": 0.2, "remine_lambda": 0.1}
    for name in ("cb", "grw", "lade"):
        cfg = RunConfig().override({"loss.name": name})
        assert build_loss(name, COUNTS, **cfg.loss.params(cfg.logit_scale)) is not None
