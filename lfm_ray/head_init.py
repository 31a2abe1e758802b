"""Where trained class weights start (`model.classifier_init`): LIFT's head initialisations.

Two kinds of run train class weights in stage 1: an open_clip ViT in `stage1.finetune
classifier` (weights w_k in z_k = s·cos(W_I F_I(x), w_k), W_I the identity during stage 1)
and a timm model without a text encoder (its linear head z = s·(W f + b), trained with the
backbone). Every other run classifies with its frozen class text features. The choices:

- text: w_k = f_T[k], the class text features (a model with them only; LIFT's default, and
  lfm-ray's).
- class-mean: w_k = m_k / ‖m_k‖, m_k the mean feature of class k's training images under
  the tower as it is before stage 1 trains (LIFT's `init_head_class_mean`).
- linear-probe: w_k = c_k / ‖c_k‖, c_k the coefficients of a logistic regression fitted
  first on those features (scikit-learn's L-BFGS, L2 penalty with C = 1, at most 100
  iterations, classes weighted to balance: LIFT's `init_head_linear_probe`); its intercept is
  dropped, as LIFT's.
- auto: text for a model with class text features (a CLIP model, or any tower with a text
  encoder, model.text); a timm model's linear head as built (PyTorch's Linear
  initialisation) without one.

A timm head's bias starts at 0 under class-mean and linear-probe. The features are
`model.encode` of the unflipped training images (as evaluation sees them), computed once
when stage 1 starts afresh (a resumed run or a branch from a shared stage 1 reads its class
weights from the checkpoint), shared out over the workers.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lfm_ray.errors import LfmError

# What `auto` is for a timm head: the head as built.
TIMM_DEFAULT = "random"
# LIFT's logistic regression (scikit-learn): L-BFGS, L2 with C = 1, 100 iterations, balanced.
PROBE = {"C": 1.0, "max_iter": 100, "class_weight": "balanced"}


def resolved_init(cfg) -> str:
    """`model.classifier_init` with auto resolved: text where the model has class text
    features (CLIP's own or a text encoder's), else random (a timm head as built)."""
    from lfm_ray.text import has_text

    init = cfg.model.classifier_init
    if init != "auto":
        return init
    return "text" if has_text(cfg.model) else TIMM_DEFAULT


def check_classifier_init(cfg, family: str) -> None:
    """One LfmError where the run has no trained class weights for the chosen start, or the
    model family cannot give it (backbones.check_family calls it; RunConfig.validate checks
    what needs no model family)."""
    from lfm_ray.text import has_text

    init = cfg.model.classifier_init
    if has_text(cfg.model) and init in ("class-mean", "linear-probe") \
            and cfg.stage1.finetune != "classifier":
        # A model with class text features (CLIP's own or a text encoder's, on any image
        # tower) classifies with them frozen; only the classifier mode trains class weights.
        raise LfmError(
            f"model.classifier_init={init!r} starts trained class weights, but with "
            f"stage1.finetune={cfg.stage1.finetune!r} the {cfg.model.name} model's class "
            "weights are the frozen class text features; use stage1.finetune classifier (an "
            "open_clip ViT), or model.classifier_init auto")
    if not has_text(cfg.model) and init == "text":
        raise LfmError(
            f"model.classifier_init='text' needs class text features, which the vision-only "
            f"model {cfg.model.name} has not without a text encoder; use auto (the head as "
            "built), class-mean or linear-probe, or give it one (model.text glove)")


def class_mean_weights(means: torch.Tensor) -> torch.Tensor:
    """The unit class means (C, d), float32."""
    return F.normalize(means.float(), dim=-1)


def linear_probe_weights(features: np.ndarray, labels: np.ndarray, num_classes: int,
                         log: Any = None) -> torch.Tensor:
    """The unit coefficient rows (C, d) of LIFT's logistic regression on (features, labels),
    float32. Every class needs a training image. `log(line)` hears when L-BFGS stopped at its
    iteration limit before converging."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    present = np.unique(labels)
    if len(present) != num_classes:
        missing = sorted(set(range(num_classes)) - set(present.tolist()))
        raise LfmError(f"class {missing[0]} has no training image to fit its linear-probe "
                       "weights on; use model.classifier_init text or auto")
    probe = LogisticRegression(solver="lbfgs", **PROBE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe.fit(features, labels)
    if log is not None and any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log(f"model.classifier_init=linear-probe: L-BFGS stopped at {PROBE['max_iter']} "
            "iterations before converging (LIFT's limit); the weights are its last iterate")
    coef = torch.as_tensor(probe.coef_, dtype=torch.float64)
    if num_classes == 2:  # scikit-learn keeps one row, for class 1 against class 0
        coef = torch.cat([-coef, coef])
    order = torch.as_tensor(np.argsort(probe.classes_))
    return F.normalize(coef[order], dim=-1).float()


def set_class_weights(model: torch.nn.Module, weights: torch.Tensor) -> None:
    """Start the model's trained class weights at `weights` (C, d): a CLIP classifier's
    class_weights, or a timm head's W with its bias at 0."""
    with torch.no_grad():
        if getattr(model, "class_weights", None) is not None:
            model.class_weights.copy_(weights.to(model.class_weights))
            return
        head = model.proj
        if head.weight.shape != weights.shape:
            raise ValueError(f"class weights of shape {tuple(weights.shape)} for a head of "
                             f"shape {tuple(head.weight.shape)}")
        head.weight.copy_(weights.to(head.weight))
        head.bias.zero_()


def initialise_classifier(run) -> str:
    """Start a trainer's `Run` class weights as `model.classifier_init` says, before stage 1
    trains; returns the resolved choice. text and random leave the model as built."""
    from lfm_ray.similarity import class_feature_means, training_features

    init = resolved_init(run.cfg)
    if init not in ("class-mean", "linear-probe"):
        return init
    C, batch = len(run.train_counts), run.cfg.runtime.eval_batch_size
    with training_features(run) as (features, positions, reduce):
        if init == "class-mean":
            means = class_feature_means(features, run.train_labels, C, positions, batch, reduce,
                                        unit=False, what="class-mean start")
            weights = class_mean_weights(means)
        else:
            weights = _probe_on_rank0(run, features, positions, reduce, C, batch)
    set_class_weights(run.model, weights)
    return init


def _probe_on_rank0(run, features, positions, reduce, num_classes: int,
                    batch: int) -> torch.Tensor:
    """Every worker's features gathered (each fills its rows, the sum over workers is the
    whole matrix), the probe fitted on rank 0 and its weights shared with the others."""
    rows = []
    for start in range(0, len(positions), batch):
        rows.append(features(positions[start:start + batch]).cpu())
    mine = torch.cat(rows) if rows else torch.zeros(0, 0)
    total = len(run.train_labels)
    matrix = torch.zeros(total, mine.shape[1] if mine.numel() else 0)
    if mine.numel():
        matrix[positions] = mine
    if reduce is not None:
        matrix = reduce(matrix)
    weights = torch.zeros(num_classes, matrix.shape[1])
    if run.info.rank == 0:
        weights = linear_probe_weights(matrix.numpy(), run.train_labels.numpy(), num_classes,
                                       log=lambda line: print(line, flush=True))
    return reduce(weights) if reduce is not None else weights
