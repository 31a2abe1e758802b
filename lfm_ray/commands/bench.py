"""`lfm-ray bench`: speed figures against a reference-style pipeline, measured side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lfm_ray.errors import LfmError


# lfm_ray.commands.benchmarks.PARTS, named here so that --help imports nothing heavy (a test keeps the two
# lists equal).
PART_NAMES = ("sampler", "sampler_inat", "cache_build", "cache_memory", "stage_cost",
              "data_share", "sweep", "laptop", "shared_stage1", "study_overhead",
              "worker_group", "gpu", "report_scale", "cluster", "study_scale")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="speed benchmarks against a reference-style pipeline",
        description="Measure each figure beside its baseline in one run; "
                    "see lfm_ray/commands/benchmarks.py for what each claims.")
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes: 1,200 JPEGs, a 200-trial study, a smaller τ study, no "
                        "worker-group trials (about 10 minutes on 2 cores)")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--only", help="comma-separated parts: " + ", ".join(PART_NAMES)
                   + " (cluster, a simulated 16-node cluster, and study_scale, a study of "
                     "10,000 smoke trials, run only when named)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # test-suite sizes
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lfm_ray.commands.benchmarks import PARTS, run_bench, summary
    from lfm_ray.commands.paths import check_output_file

    only = None
    if args.only is not None:
        only = [s.strip() for s in args.only.split(",") if s.strip()]
        if not only:  # --only "" would otherwise run every part
            raise LfmError(f"--only {args.only!r} names no part; accepted: {', '.join(PARTS)}")
    if args.json:  # checked now: the figures would be lost after the run
        check_output_file(args.json, "--json")
    result = run_bench(quick=args.quick, tiny=args.tiny, only=only)
    print(summary(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0
