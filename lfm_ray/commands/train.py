"""`lfm-ray train`: one two-stage training on Ray Train, from flags, a preset or a file.

    lfm-ray train                                   # the tiny model on digits-lt
    lfm-ray train --dataset cifar100-lt --data-root /data/cifar   # the paper's preset
    lfm-ray train --preset none --dataset cifar100-lt --data-root /data/cifar --stage1.lr 1e-3
    lfm-ray train --config run.yaml --loss mms --dry-run

Writes config.json, history.csv and metrics.json to --output. An output folder holds one
configuration and one data set: the same command again resumes the run from its last
checkpoint; another configuration (or changed data files) is refused, naming each
difference, unless --extend (more epochs of the last stage, trained from the last
checkpoint) or --restart (discard that output's run and train afresh).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from lfm_ray.commands.run_flags import (
    HelpFormatter, add_run_flags, announce_presets, config_layers,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one run (both stages) on Ray Train",
                       description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--output", help="output directory (default runs/<dataset>-<time>)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything and print the resolved configuration as JSON; "
                        "train nothing")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own start-up and per-report lines")
    p.add_argument("--smoke", action="store_true",
                   help="a quick check that the run works: one epoch per stage of a few steps "
                        "(a layer below the flags)")
    rerun = p.add_mutually_exclusive_group()
    rerun.add_argument("--extend", action="store_true",
                       help="--output holds this run with fewer epochs in its last stage: "
                            "train the added epochs from its last checkpoint")
    rerun.add_argument("--restart", action="store_true",
                       help="discard the run in --output (its checkpoints and results) and "
                            "train afresh")
    add_run_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lfm_ray.driver.launch import (
        check_inputs, check_local_resources, config_json, fit_run, is_local,
    )

    layers = config_layers(args, smoke=args.smoke)
    cfg = layers.resolve().validate()
    if args.dry_run:
        check_inputs(cfg)
        if is_local(args.address):
            check_local_resources(cfg)
        announce_presets(layers, [cfg.data.name])
        print(config_json(cfg))  # as config.json: with the resolved model family and similarity
        return 0
    output = args.output or f"runs/{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"

    def announce() -> None:  # once every input is checked
        announce_presets(layers, [cfg.data.name])
        print(f"training {cfg.model.name} on {cfg.data.name}: loss {cfg.loss.name}, "
              f"mix {cfg.mix.method}, {cfg.stage1.epochs}+{cfg.stage2.epochs} epochs "
              f"→ {output}", file=sys.stderr, flush=True)

    final = fit_run(cfg, output, address=args.address, verbose=args.verbose,
                    announce=announce, extend=args.extend, restart=args.restart)
    print(format_table(final))
    written = ["history.csv", "metrics.json"]
    if (Path(output) / "confusion.npz").is_file():
        written.append("confusion.npz")
    print(f"wrote {Path(output) / 'config.json'}, {', '.join(written)}", file=sys.stderr)
    return 0


def format_table(metrics: dict) -> str:
    """Top-1 of the final epoch in percent: the test split (reported), and the val split
    the run selected on where it has one."""
    cols = ("many", "medium", "few", "all")

    def cells(prefix: str) -> str:
        vals = []
        for c in cols:
            v = metrics.get(f"{prefix}acc_{c}")
            vals.append("    n/a" if v is None or (isinstance(v, float) and math.isnan(v))
                        else f"{100 * v:6.2f}%")
        return "  ".join(vals)

    head = "      " + "  ".join(f"{c:>7}" for c in cols)
    test_epoch = metrics.get("test_epoch")
    lines = [f"top-1 accuracy after epoch {metrics.get('epoch', '?')} (the last), "
             f"selected on {metrics.get('selection_split', 'test')}", head,
             f"test  {cells('')}" + (f"  (epoch {test_epoch})"
                                     if test_epoch not in (None, metrics.get("epoch")) else "")]
    if metrics.get("selection_split") == "val":
        lines.append(f"val   {cells('val_')}")
    return "\n".join(lines)
