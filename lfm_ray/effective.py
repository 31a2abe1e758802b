"""The effective imbalance factor γ′ of LFM: how imbalanced the labels a run trains on are
once local sampling and the label shift have acted (paper appendix A.1, Table 7's last row).

One LFM sample draws its first image uniformly, so its class i has probability p_i = n_i / N;
its partner class j has probability P[i, j] (paper Eq. 1); λ_x ~ Beta(β, β) and the mixed
label gives λ_y = clamp(λ_x − α (n_i − n_j) / (n_i + n_j), 0, 1) to class i and 1 − λ_y to
class j (paper Eq. 2). The label mass class k receives per sample, in expectation, is

    m_k = Σ_j p_k P[k, j] E[λ_y | k, j] + Σ_i p_i P[i, k] (1 − E[λ_y | i, k]),

and γ′ = max_k m_k / min_k m_k, the imbalance factor (n_max / n_min) of those masses: the
training counts' γ when nothing is mixed. With α = 0 the label is split by λ_x, whose mean
is 1/2, so m = (p + pᵀP) / 2: the class frequency of both images of a pair counted alike,
which is what the authors' graphs.py computes as the "new imbalance factor" (their
get_sample_prob, at commit efdb7bb; it indexes P's rows unsorted against sorted p, which
this module does not repeat). The label shift moves mass from head to tail classes, so γ′
falls with α until the tail classes overtake the head; past that it rises again (γ′ is
max/min, whichever classes they are), and where a class keeps no mass at all it is inf.

E[clamp(λ − δ, 0, 1)] is exact: with g(c) = E[(λ − c)⁺] = E[λ] (1 − I_c(β + 1, β)) −
c (1 − I_c(β, β)) for c in [0, 1] (I the regularized incomplete beta function),
clamp(λ − δ, 0, 1) = (λ − δ)⁺ − (λ − (1 + δ))⁺ gives g(δ) − g(1 + δ). No sampling.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from lfm_ray.errors import LfmError

SWEEPABLE = ("alpha", "tau")


def shifted_lambda_mean(delta: np.ndarray | float, beta: float) -> np.ndarray:
    """E[clamp(λ − δ, 0, 1)] for λ ~ Beta(β, β), elementwise over δ (exact)."""
    from scipy.special import betainc

    if not beta > 0:
        raise LfmError(f"beta={beta} is not valid; expected a number > 0")
    delta = np.asarray(delta, dtype=np.float64)
    mean = 0.5  # E[λ] of a symmetric Beta

    def excess(c: np.ndarray) -> np.ndarray:
        """E[(λ − c)⁺]: E[λ] − c below 0, nothing above 1, the incomplete beta between."""
        inside = np.clip(c, 0.0, 1.0)
        between = mean * (1.0 - betainc(beta + 1.0, beta, inside)) \
            - inside * (1.0 - betainc(beta, beta, inside))
        return np.where(c <= 0.0, mean - c, np.where(c >= 1.0, 0.0, between))

    value = np.clip(excess(delta) - excess(1.0 + delta), 0.0, 1.0)
    # Exact where the shift saturates: the whole label to one side, no rounding residue.
    return np.where(delta <= -1.0, 1.0, np.where(delta >= 1.0, 0.0, value))


def label_mass(class_counts: Sequence[int], P: np.ndarray | torch.Tensor, alpha: float,
               beta: float) -> np.ndarray:
    """m_k: the expected label mass of class k per LFM sample (sums to 1)."""
    n = np.asarray(class_counts, dtype=np.float64)
    P = np.asarray(P.detach().cpu().double() if isinstance(P, torch.Tensor) else P,
                   dtype=np.float64)
    C = len(n)
    if C < 2 or P.shape != (C, C):
        raise LfmError(f"the sampling matrix has shape {P.shape}; expected ({C}, {C}) for "
                       f"{C} classes (at least 2)")
    if (n <= 0).any():
        raise LfmError("every class needs at least one training image for γ′")
    if not alpha >= 0:
        raise LfmError(f"alpha={alpha} is not valid; expected a number >= 0")
    p = n / n.sum()
    delta = alpha * (n[:, None] - n[None, :]) / (n[:, None] + n[None, :])
    first = shifted_lambda_mean(delta, beta)        # E[λ_y | i, j]: mass kept by class i
    pairs = p[:, None] * P                           # probability of (i, j)
    return (pairs * first).sum(axis=1) + (pairs * (1.0 - first)).sum(axis=0)


def effective_imbalance(class_counts: Sequence[int], P: np.ndarray | torch.Tensor,
                        alpha: float, beta: float) -> float:
    """γ′ = max_k m_k / min_k m_k (inf when a class receives no label mass at all)."""
    m = label_mass(class_counts, P, alpha, beta)
    low = float(m.min())
    return float(m.max()) / low if low > 0 else float("inf")


def imbalance_factor(class_counts: Sequence[int]) -> float:
    """γ = n_max / n_min of the training counts."""
    n = np.asarray(class_counts, dtype=np.float64)
    return float(n.max() / n.min())


def sampling_matrix(text_features: torch.Tensor, tau: float) -> np.ndarray:
    """P at τ from the class text features, in float64 (as LFM's mixer builds it)."""
    from lfm_ray.mixing import local_sampling_matrix

    return local_sampling_matrix(text_features.detach().cpu().double(), tau).numpy()


def effective_imbalance_sweep(class_counts: Sequence[int], text_features: torch.Tensor,
                              param: str, values: Sequence[float], *, alpha: float,
                              tau: float, beta: float) -> list[float]:
    """γ′ for each value of a swept α or τ (`param` "alpha" or "tau", or a dotted config
    name ending in one), the other held at the given value; for the γ′-vs-α/τ figure."""
    name = param.rsplit(".", 1)[-1]
    if name not in SWEEPABLE:
        raise LfmError(f"γ′ sweeps alpha or tau; got {param!r}")
    out = []
    fixed_P = sampling_matrix(text_features, tau) if name == "alpha" else None
    for v in values:
        if name == "alpha":
            out.append(effective_imbalance(class_counts, fixed_P, float(v), beta))
        else:
            out.append(effective_imbalance(class_counts, sampling_matrix(text_features, float(v)),
                                           alpha, beta))
    return out
