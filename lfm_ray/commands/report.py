"""`lfm-ray report`: a study's self-contained HTML report, or a t-SNE of a checkpoint.

    lfm-ray report results/tau_sweep [--out report.html]
    lfm-ray report --tsne CHECKPOINT_DIR --classes 0,3,9 [--out tsne.html]
"""

from __future__ import annotations

import argparse

from lfm_ray.errors import LfmError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="HTML report of a study (Plotly), or a t-SNE of a checkpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", nargs="?", help="results/<name>/, a Tune experiment dir or a trials CSV")
    p.add_argument("--out", help="output HTML (default: report.html in the study directory)")
    p.add_argument("--tsne", metavar="CHECKPOINT", help="checkpoint directory (holding state.pt)")
    p.add_argument("--classes", help="comma-separated class indices for --tsne")
    p.add_argument("--per-class", type=int, default=200, help="--tsne: test images per class")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.tsne:
        from lfm_ray.tsne import write_tsne

        if not args.classes:
            raise LfmError("--tsne needs --classes, e.g. --classes 0,3,9")
        try:
            classes = [int(c) for c in args.classes.split(",") if c.strip()]
        except ValueError:
            raise LfmError(f"--classes {args.classes!r} is not valid; expected indices like 0,3,9") from None
        path = write_tsne(args.tsne, classes, out=args.out, per_class=args.per_class)
    else:
        if not args.study:
            raise LfmError("give a study directory (or --tsne CHECKPOINT --classes ...)")
        from lfm_ray.analysis import write_report

        path = write_report(args.study, args.out)
    print(f"wrote {path}")
    return 0
