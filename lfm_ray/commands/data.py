"""`lfm-ray data DATASET`: a data set's class count table, imbalance statistics and LFM's
effective imbalance factor γ′ (lfm_ray.effective) for the run defaults' α, τ, β and model
or the ones given."""

from __future__ import annotations

import argparse

import numpy as np


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data", help="class count table and imbalance statistics of a data set",
        description="Print a data set's class counts, shot groups and imbalance, and LFM's "
                    "effective imbalance factor γ′ (the label mass per class after local "
                    "sampling and the label shift; paper appendix A.1) for the run defaults' "
                    "α, τ and model or the ones given. γ′ needs the model's text features: "
                    "its weights are read from the local cache only, never downloaded.")
    p.add_argument("dataset", help="fashion-lt, digits-lt, cifar10-lt, cifar100-lt, imagenet-lt, "
                                   "places-lt, inat2018, folder")
    # --data-root as well, the name train and study use (and error messages give).
    p.add_argument("--root", "--data-root", dest="root", help="data root (not needed for fashion-lt and digits-lt, "
                   "which are embedded; fashion-lt reads the official files from one)")
    p.add_argument("--imbalance-factor", "--data.imbalance_factor", dest="imbalance_factor",
                   type=float, help="n_max / n_min of the training split")
    p.add_argument("--max-count", "--data.max_count", dest="max_count", type=int,
                   help="the largest class's training images (fashion-lt)")
    # The names train and study use: --data.seed picks the long-tailed subset; --seed is
    # the run's training seed (a randomly initialised model's text features, which γ′ uses).
    p.add_argument("--data.seed", dest="data_seed", type=int,
                   help="seed of the long-tailed subset (data.seed)")
    p.add_argument("--download", action="store_true",
                   help="cifar10-lt/cifar100-lt: fetch the CIFAR files into --root with torchvision")
    gamma = p.add_argument_group("effective imbalance γ′ (defaults: the run defaults)")
    gamma.add_argument("--model", "--model.name", dest="model", help="the model (a CLIP model's "
                       "own tower gives P's text features unless --model.text says otherwise)")
    gamma.add_argument("--model.text", dest="text", help="text encoder of P's class features "
                       "(auto, clip, glove)")
    gamma.add_argument("--pretrained", "--model.pretrained", dest="pretrained",
                       help="its weights: an open_clip tag or a file")
    gamma.add_argument("--model.cache_dir", dest="model_cache_dir", help="open_clip's weight cache")
    gamma.add_argument("--template", dest="templates", action="append",
                       help="prompt template with {} (repeat for an ensemble)")
    gamma.add_argument("--alpha", "--mix.alpha", dest="alpha", help="label-shift strength α")
    gamma.add_argument("--tau", "--mix.tau", dest="tau", help="sampling temperature τ")
    gamma.add_argument("--beta", "--mix.beta", dest="beta", help="λ ~ Beta(β, β)")
    gamma.add_argument("--seed", "--runtime.seed", dest="seed", type=int,
                       help="the run's training seed: the initial weights of a randomly "
                            "initialised model (tiny), so its text features (runtime.seed)")
    gamma.add_argument("--no-gamma", action="store_true", help="skip γ′")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lfm_ray.data import build_dataset, shot_groups

    # Only the flags given are passed on: a flag the data set does not take (--data.seed for
    # imagenet-lt) is an error naming the options it does take, not silently ignored.
    given = {"imbalance_factor": args.imbalance_factor, "seed": args.data_seed,
             "max_count": args.max_count, "download": args.download or None}
    # γ′'s settings are checked before the data set is read (a bad τ fails at once).
    cfg = None if args.no_gamma else gamma_config(args, args.dataset)
    ds = build_dataset(args.dataset, args.root, **{k: v for k, v in given.items() if v is not None})
    val = None if ds.val_labels is None else np.asarray(ds.val_labels)
    print(format_table(ds.class_names, ds.class_counts, np.asarray(ds.test_labels), shot_groups,
                       val_labels=val))
    if cfg is not None:
        print()
        print(effective_lines(cfg, ds.class_names, ds.class_counts))
    return 0


def format_table(names, counts, test_labels, shot_groups, val_labels=None) -> str:
    """The class table: training count, shot group, val images (where the data set has a
    val split) and test images per class, then the totals and imbalance."""
    counts = np.asarray(counts)
    groups = shot_groups(counts)
    group_of = {int(k): g for g, idx in groups.items() for k in idx}
    test = np.bincount(test_labels, minlength=len(counts))
    val = None if val_labels is None else np.bincount(val_labels, minlength=len(counts))
    width = max(12, max(len(n) for n in names))
    head = f"{'class':>5}  {'name':<{width}}  {'train':>6}  {'group':<6}"
    lines = [head + (f"  {'val':>5}" if val is not None else "") + f"  {'test':>5}"]
    for k, (name, n) in enumerate(zip(names, counts)):
        row = f"{k:>5}  {name:<{width}}  {n:>6}  {group_of[k]:<6}"
        lines.append(row + (f"  {val[k]:>5}" if val is not None else "") + f"  {test[k]:>5}")
    lines.append("")
    lines.append(f"classes {len(counts)}, training images {counts.sum()}, "
                 + (f"val images {val.sum()}, " if val is not None else "")
                 + f"test images {test.sum()}")
    lines.append(f"largest class {counts.max()}, smallest {counts.min()}, "
                 f"imbalance ratio {counts.max() / counts.min():.1f}")
    lines.append("shot groups (many > 100, medium 20..100, few < 20): "
                 + ", ".join(f"{g} {len(idx)} classes / {counts[idx].sum()} images"
                             for g, idx in groups.items()))
    return "\n".join(lines)


# ---- γ′ ---------------------------------------------------------------------------------------
def gamma_config(args: argparse.Namespace, dataset: str | None = None):
    """The configuration a run on `dataset` gets by default (the built-in defaults with the
    data set's preset where it has one, as `lfm-ray train` resolves it) with the flags given,
    checked."""
    from lfm_ray.config import CHOICES, ConfigLayers
    from lfm_ray.model import check_model_name

    values = {"model.name": args.model, "model.pretrained": args.pretrained,
              "model.text": args.text,
              "model.cache_dir": args.model_cache_dir, "model.templates": args.templates,
              "mix.alpha": args.alpha, "mix.tau": args.tau, "mix.beta": args.beta,
              "runtime.seed": args.seed}
    flags = {k: v for k, v in values.items() if v is not None}
    if dataset in CHOICES["data.name"]:  # an unknown name is the data set's own error, later
        flags["data.name"] = dataset
    cfg = ConfigLayers(flags=flags).resolve().validate()
    from lfm_ray.backbones import check_backbone
    from lfm_ray.families import model_family

    if model_family(cfg.model.name) == "clip":
        check_model_name(cfg.model.name, cfg.model.pretrained)  # a typo is an error, not a skip
    else:
        check_backbone(cfg.model)
    from lfm_ray.text import check_text

    check_text(cfg)
    return cfg


def _lfm_beta(beta: float | None) -> float:
    """The stage's β, or LFM's own law where the stage leaves it to the method."""
    if beta is not None:
        return float(beta)
    from lfm_ray.config import MIX_BETA  # the mixing methods' own laws of λ

    return float(MIX_BETA["lfm"])


def effective_lines(cfg, class_names, class_counts) -> str:
    """γ′ per distinct (α, τ, β) of the two stages, or one line saying why it is skipped."""
    from lfm_ray.effective import effective_imbalance, imbalance_factor, sampling_matrix
    from lfm_ray.errors import LfmError
    from lfm_ray.text import describe, has_text, standalone_features

    model = cfg.model.name + (f"/{cfg.model.pretrained}" if cfg.model.pretrained else "")
    if not has_text(cfg.model):
        return (f"effective imbalance γ′: skipped, {model} has no class text features "
                "(model.text none); γ′ here reads P from the run's text features")
    try:
        # Seeded as the trainer seeds, so a randomly initialised model (tiny) gives the
        # text features a run with these settings trains with.
        feats = standalone_features(cfg.model, class_names, cfg.runtime.seed)
    except LfmError as exc:
        return (f"effective imbalance γ′: skipped, the {describe(cfg.model)} cannot be loaded "
                f"from this machine (lfm-ray data never downloads weights): {exc}")
    stages: dict[tuple[float, float, float], list[str]] = {}
    for name in ("stage1", "stage2"):
        s = getattr(cfg, name)
        stages.setdefault((s.alpha, s.tau, _lfm_beta(s.beta)), []).append(name[-1])
    lines = [f"effective imbalance of LFM (paper appendix A.1), {describe(cfg.model)}; "
             f"training counts γ = {imbalance_factor(class_counts):.2f}"]
    for (alpha, tau, beta), which in stages.items():
        P = sampling_matrix(feats, tau)
        with_shift = effective_imbalance(class_counts, P, alpha, beta)
        pairs_only = effective_imbalance(class_counts, P, 0.0, beta)
        lines.append(f"  stage {' and '.join(which)}: α {alpha:g}, τ {tau:g}, "
                     f"λ ~ Beta({beta:g}, {beta:g}): γ′ = {with_shift:.2f} "
                     f"(partners alone, α = 0: {pairs_only:.2f})")
    return "\n".join(lines)
