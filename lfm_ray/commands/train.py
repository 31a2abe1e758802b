"""`lfm-ray train`: one TorchTrainer run from flags or a config file."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from lfm_ray.commands.run_flags import add_run_flags, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train one run (both stages) on Ray Train",
        description="Train one LFM run with Ray Train and write config.json, history.csv "
                    "and metrics.json to --output. With no flags: the tiny model on digits-lt.",
    )
    add_run_flags(p)
    p.add_argument("--output", help="output directory (default runs/<dataset>-<time>)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lfm_ray.launch import fit_run

    cfg = config_from_args(args)
    output = args.output or f"runs/{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"training {cfg.model.name} on {cfg.data.name}: loss {cfg.loss.name}, mix "
          f"{cfg.mix.method}, {cfg.stage1.epochs}+{cfg.stage2.epochs} epochs → {output}",
          flush=True)
    final = fit_run(cfg, output, address=args.address)
    print(format_table(final))
    written = ["history.csv", "metrics.json"]
    if (Path(output) / "confusion.npz").is_file():
        written.append("confusion.npz")
    print(f"wrote {Path(output) / 'config.json'}, {', '.join(written)}")
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
