"""`lfm-ray compare`: several studies side by side in one HTML page and a text summary.

    lfm-ray compare results/tau_sweep results/tau_sweep_vitb16 [--out compare.html]
                    [--metric acc_few]

Each STUDY is what `lfm-ray report` takes (results/<name>/, a Tune experiment directory or a
trials CSV). The page shows what differs between the studies' base configurations (data
set, backbone, preset, commit, and every other differing field read from each study.json),
and each configuration the studies share with its mean and 95 % t-interval over seeds per
study. The summary is printed and written beside the page (.txt). A study that does not
exist or has no finished trial is one error line (exit 2); an interrupted one is compared
and marked INCOMPLETE, as `lfm-ray report` marks it.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="several studies side by side (HTML + text summary)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("studies", nargs="+", metavar="STUDY",
                   help="two or more results/<name>/ folders, Tune experiments or trials CSVs")
    p.add_argument("--out", help="output HTML (default: compare.html here); the summary goes "
                                 "beside it as .txt")
    p.add_argument("--metric", help="the metric compared (default: the studies' selection "
                                    "metric when they share one, else acc_all)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lfm_ray.analysis.compare import write_comparison
    from lfm_ray.commands.paths import check_output_file

    if args.out:
        check_output_file(args.out, "--out", (".html", ".htm"))
    path, text = write_comparison(args.studies, args.out, metric=args.metric)
    print(text)
    print(f"wrote {path} and {path.with_suffix('.txt')}")
    return 0
