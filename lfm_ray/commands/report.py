"""`lfm-ray report`: a study's self-contained HTML report, or a 3-D t-SNE of checkpoints.

    lfm-ray report results/tau_sweep [--out report.html] [--param mix.tau] [--band std]
    lfm-ray report --tsne CHECKPOINT [CHECKPOINT ...] --classes 0,3,9 [--out tsne.html]

STUDY is a results directory (results/<name>/ with study.json and trials.csv), a Tune
experiment directory, or a trials CSV. Each trial's per-class accuracy, learning curve and
confusion matrix are read from the copies under results/<name>/trials/ (so a moved or
downloaded results folder renders fully), else from its checkpoint. The report embeds
plotly.js (it opens with no network) and a PNG of each headline figure is written beside it
(kaleido with a Chrome or Chromium; without one, a one-line warning and the HTML alone). For --tsne, a CHECKPOINT is
a trainer checkpoint directory (holding state.pt); the word zero-shot stands for the first
checkpoint's model before training (paper Fig. 3: zero-shot vs CE vs CE + LFM).
"""

from __future__ import annotations

import argparse

from lfm_ray.errors import LfmError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="HTML report of a study (Plotly), or a t-SNE of checkpoints",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", nargs="?",
                   help="results/<name>/, a Tune experiment directory, or a trials CSV")
    p.add_argument("--out", help="output HTML (default: report.html in the study directory; "
                                 "for --tsne, tsne_<checkpoint>.html beside the checkpoint)")
    p.add_argument("--param", action="append", metavar="NAME",
                   help="draw the ablation curve of this swept parameter (repeatable); "
                        "default: every swept number of a grid study")
    p.add_argument("--band", choices=("auto", "ci", "std"), default="auto",
                   help="ablation error bars over seeds: 95%% t-interval of the mean (ci), "
                        "± std, or auto: ci with 3 or more seeds, else std (none with one)")
    p.add_argument("--front", metavar="X,Y",
                   help="also draw the configurations as a trade-off front in two metrics, "
                        "e.g. acc_many,acc_few (the α sweep's many- against few-shot "
                        "accuracy), each point with its seed intervals")
    p.add_argument("--no-png", action="store_true", help="skip the PNG files")
    p.add_argument("--tsne", nargs="+", metavar="CHECKPOINT",
                   help="t-SNE of the image features of these checkpoint directories")
    p.add_argument("--classes", help="--tsne: class indices or names, e.g. 0,3,9")
    p.add_argument("--per-class", type=int, default=200,
                   help="--tsne: evaluation images per class (default 200)")
    p.add_argument("--device", default="cpu", help="--tsne: torch device (default cpu)")
    p.set_defaults(func=run)


def check_device(device: str) -> None:
    """A torch device this machine has ('cpu', 'cuda', 'cuda:1'), or one LfmError."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise LfmError(f"--device {device!r} is not a torch device; give cpu, cuda or "
                       "cuda:N") from None
    if dev.type == "cuda":
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= have:
            raise LfmError(f"--device {device!r}: this machine has {have} CUDA GPUs; use cpu")
    elif dev.type != "cpu":
        raise LfmError(f"--device {device!r}: t-SNE features run on cpu or cuda")


def run(args: argparse.Namespace) -> int:
    from lfm_ray.commands.paths import check_output_file

    if args.out:
        check_output_file(args.out, "--out", (".html", ".htm"))
    if args.tsne:
        from lfm_ray.analysis.tsne import write_tsne

        if args.study:
            raise LfmError(f"give either a study ({args.study!r}) or --tsne, not both")
        if not args.classes:
            raise LfmError("--tsne needs --classes, e.g. --classes 0,3,9")
        check_device(args.device)
        if args.per_class < 1:
            raise LfmError(f"--per-class {args.per_class} is not valid; expected at least 1")
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        path = write_tsne(args.tsne, classes, out=args.out, per_class=args.per_class,
                          device=args.device)
    else:
        if not args.study:
            raise LfmError("give a study directory (results/<name>/), a Tune experiment "
                           "directory or a trials CSV; or --tsne CHECKPOINT --classes ...")
        from lfm_ray.analysis import write_report

        path = write_report(args.study, args.out, params=args.param, band=args.band,
                            png=not args.no_png, front=args.front)
    print(f"wrote {path}")
    return 0
