"""The flags every study script and `lfm-ray study` share, and what they set on a Study."""

from __future__ import annotations

import argparse
from typing import Any

from lfm_ray.errors import LfmError


def add_study_flags(parser: argparse.ArgumentParser, default_name: str | None = None) -> None:
    g = parser.add_argument_group("study")
    g.add_argument("--name", default=default_name,
                   help="study name; the same name again resumes it (default: %(default)s)")
    g.add_argument("--dataset", action="append",
                   help="data set (repeat where the study takes several; default digits-lt)")
    g.add_argument("--data-root", help="data root on every node (not needed for digits-lt)")
    g.add_argument("--model", help="open_clip architecture (default tiny)")
    g.add_argument("--pretrained", help="open_clip pretrained tag or weights file")
    g.add_argument("--address", help="Ray cluster address, e.g. auto (default: RAY_ADDRESS "
                   "or a local Ray instance)")
    g.add_argument("--storage-path", default="results/ray",
                   help="Tune storage: a local path, NFS path or s3:// / gs:// URI")
    g.add_argument("--results-dir", default="results",
                   help="where trials.csv, best.json and the report go")
    g.add_argument("--seeds", default=None, help="comma-separated training seeds, e.g. 0,1")
    g.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPU per trial worker; 0.25 packs four one-worker trials on a GPU")
    g.add_argument("--cpus-per-trial", type=float, default=None, help="CPUs per trial worker")
    g.add_argument("--trial-workers", type=int, default=None,
                   help="Ray Train workers per trial: 0 trains in the trial's own process "
                        "(Ray Train's local mode), 1 or more runs a worker group (DDP). "
                        "Default: 0 on a local instance without GPUs, else 1")
    g.add_argument("--max-concurrent", type=int, default=None,
                   help="cap on trials at once (default: what the cluster's resources allow)")
    g.add_argument("--smoke", action="store_true",
                   help="two values, one epoch per stage, a few steps: for tests")
    g.add_argument("--no-report", action="store_true", help="skip the HTML report")


def parse_seeds(text: str | None, default: list[int]) -> list[int]:
    if text is None:
        return list(default)
    try:
        seeds = [int(s) for s in text.split(",") if s.strip() != ""]
    except ValueError:
        raise LfmError(f"--seeds {text!r} is not valid; expected integers like 0,1,2") from None
    if not seeds:
        raise LfmError("--seeds is empty; give at least one seed")
    return seeds


def base_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """RunConfig fields the common flags set."""
    out: dict[str, Any] = {}
    if args.dataset:
        out["data.name"] = args.dataset[0]
    if args.data_root:
        out["data.root"] = args.data_root
    if args.model:
        out["model.name"] = args.model
    if args.pretrained:
        out["model.pretrained"] = args.pretrained
    if args.gpus_per_trial is not None:
        out["runtime.gpus_per_worker"] = args.gpus_per_trial
    if args.cpus_per_trial is not None:
        out["runtime.cpus_per_worker"] = args.cpus_per_trial
    out["runtime.num_workers"] = trial_workers(args)
    if args.smoke:
        out.update({"stage1.epochs": 1, "stage2.epochs": 1, "runtime.max_steps_per_epoch": 3})
    return out


def trial_workers(args: argparse.Namespace) -> int:
    """--trial-workers, else the default for where the study runs (see
    `lfm_ray.launch.default_trial_workers`)."""
    from lfm_ray.launch import default_trial_workers

    if args.trial_workers is not None:
        if args.trial_workers < 0:
            raise LfmError(f"--trial-workers {args.trial_workers} is not valid; expected 0 "
                           "(in the trial's process) or a number of workers >= 1")
        return args.trial_workers
    return default_trial_workers(args.address, args.gpus_per_trial or 0.0)


def run_script(build, default_name: str, description: str, argv: list[str] | None = None) -> int:
    """Parse the common flags, let `build(args, overrides)` declare the Study, run it, report.

    Returns the exit status: 0 done, 2 for a user error (one line, no traceback).
    """
    import sys

    from lfm_ray.study import run_study

    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_flags(parser, default_name=default_name)
    args = parser.parse_args(argv)
    try:
        study = build(args, base_overrides(args))
        study.address = args.address
        study.storage_path = args.storage_path
        study.results_dir = args.results_dir
        study.max_concurrent = args.max_concurrent
        study.command = ["python", sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
        run_study(study)
        if not args.no_report:
            write_study_report(study.result_dir)
    except LfmError as exc:
        print(f"{default_name}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def write_study_report(result_dir) -> None:
    """The HTML report of a finished study, where the analysis module is present."""
    try:
        from lfm_ray.analysis import write_report
    except ImportError:
        return
    path = write_report(result_dir)
    print(f"wrote {path}", flush=True)
