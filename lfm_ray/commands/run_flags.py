"""Flags that set RunConfig fields, shared by `lfm-ray train` and the study scripts.

Every config field has a dotted flag (`--stage1.lr 1e-3`, `--mix.tau 0.05`); the common ones
also have short names (`--dataset`, `--model`, `--loss`, `--mix`).
"""

from __future__ import annotations

import argparse
from typing import Any

from lfm_ray.config import RunConfig, known_fields, preset

SHORT_NAMES = {
    "--dataset": "data.name",
    "--data-root": "data.root",
    "--imbalance-factor": "data.imbalance_factor",
    "--model": "model.name",
    "--pretrained": "model.pretrained",
    "--logit-scale": "model.logit_scale",
    "--loss": "loss.name",
    "--mix": "mix.method",
    "--alpha": "mix.alpha",
    "--tau": "mix.tau",
    "--batch-size": "runtime.batch_size",
    "--num-workers": "runtime.num_workers",
    "--cpus-per-worker": "runtime.cpus_per_worker",
    "--gpus-per-worker": "runtime.gpus_per_worker",
    "--seed": "runtime.seed",
}
PREFIX = "set:"  # argparse dest prefix of config flags


def add_run_flags(parser: argparse.ArgumentParser, short: bool = True) -> None:
    group = parser.add_argument_group("run configuration (any field as --section.field VALUE)")
    group.add_argument("--config", help="JSON or YAML config file; flags override it")
    group.add_argument("--preset", help="the paper's hyperparameters for a data set "
                       "(cifar10-lt, cifar100-lt, imagenet-lt, places-lt)")
    if short:
        for flag, dotted in SHORT_NAMES.items():
            group.add_argument(flag, dest=PREFIX + dotted, metavar=dotted.split(".")[-1].upper(),
                               help=f"= --{dotted}")
        group.add_argument("--template", dest=PREFIX + "model.templates", action="append",
                           help="prompt template with {} (repeat for an ensemble)")
        group.add_argument("--zero-shot", dest=PREFIX + "runtime.zero_shot",
                           action="store_const", const=True, help="evaluate without training")
    taken = set(SHORT_NAMES.values()) if short else set()
    for dotted in known_fields():
        if dotted in taken and dotted != "model.templates":
            continue
        if dotted == "model.templates" and short:
            continue
        group.add_argument(f"--{dotted}", dest=PREFIX + dotted, metavar="V",
                           help=f"set {dotted}")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Preset, then config file, then flags: later ones win."""
    cfg = preset(args.preset) if getattr(args, "preset", None) else RunConfig()
    if getattr(args, "config", None):
        from_file = RunConfig.from_file(args.config)
        cfg = _merge(cfg, from_file)
    cfg.override(flag_values(args))
    return cfg.validate()


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    return {k[len(PREFIX):]: v for k, v in vars(args).items()
            if k.startswith(PREFIX) and v is not None}


def _merge(base: RunConfig, top: RunConfig) -> RunConfig:
    """Fields of `top` that differ from the defaults replace those of `base`."""
    default = RunConfig().to_dict()
    merged = base.copy()
    for section, values in top.to_dict().items():
        for key, value in values.items():
            if value != default[section][key]:
                merged.set(f"{section}.{key}", value)
    return merged
