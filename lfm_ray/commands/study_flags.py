"""The flags every study script and `lfm-ray study` share, and the one path from them to a
running study: layers → Study → dry run or run → report.

A study script declares what makes it that study (`ScriptPlan`: its own settings, grid or
space, default seeds) and calls `run_script`; everything else is common. Only light modules
are imported before the flags are parsed, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lfm_ray.commands.run_flags import (
    add_run_flags, announce_presets, config_layers, flag_values, new_parser,
)
from lfm_ray.errors import LfmError
from lfm_ray.study.spec import DEFAULT_RESULTS_DIR

TRACKER_NAMES = ("tensorboard", "mlflow", "wandb")
PROTOCOLS = ("branch", "full")


@dataclass
class ScriptPlan:
    """What a study script declares: its own settings (a layer above --config and below
    --smoke and flags), what it sweeps, and its default seeds."""

    fixed: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    search: str = "grid"
    space: dict[str, Any] = field(default_factory=dict)    # name -> lfm_ray.study.Dim
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_samples: int = 8
    metric: str | None = None   # None: the selection split's acc_all (val_acc_all or acc_all)
    # The paper's ablation protocol: one stage 1 per stage-1 configuration, stage 2 branched
    # from it (lfm_ray.study.Study.share_stage1); `protocol` names it in the banner.
    share_stage1: bool = False
    protocol: str | None = None  # "branch" | "full" for the α and τ sweeps


def add_study_flags(parser: argparse.ArgumentParser, default_name: str | None = None) -> None:
    g = parser.add_argument_group("study")
    g.add_argument("--name", default=default_name,
                   help="study name; the same name again resumes it (default: %(default)s)")
    g.add_argument("--seeds", help="comma-separated training seeds, e.g. 0,1,2 (crossed with "
                                   "the grid)")
    g.add_argument("--seed", type=int, help="one training seed (= --seeds N)")
    g.add_argument("--metric", help="what the study selects on (best.json, ASHA, Optuna)")
    g.add_argument("--objectives", metavar="M1,M2",
                   help="several metrics, e.g. acc_many,acc_few: a multi-objective Optuna "
                        "search, told each one's mean over the seeds; best.json holds the "
                        "Pareto set")
    g.add_argument("--scheduler", choices=("none", "asha"), help="stop weak trials early "
                   "with ASHA on the global epoch (default none)")
    g.add_argument("--num-samples", type=int, help="trials of an Optuna or random search")
    g.add_argument("--protocol", choices=PROTOCOLS,
                   help="α and τ sweeps: 'branch' trains stage 1 once per seed and sweeps the "
                        "value in stage 2 on it (the paper's Figs. 9 and 10; default on the "
                        "paper data sets and fashion-lt), 'full' retrains both stages per "
                        "value (default elsewhere)")
    g.add_argument("--address", help="Ray cluster address, e.g. auto (default: RAY_ADDRESS "
                   "or a local Ray instance)")
    g.add_argument("--storage-path",
                   help="where Ray's state goes (Tune experiments, checkpoints; a folder per "
                        "study): a local path, NFS path or s3:// / gs:// URI (default: "
                        "<results-dir>/ray)")
    g.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR,
                   help="where <name>/ with trials.csv, best.json, study.json and the report "
                        "goes (default: %(default)s, git-ignored; studies/run_all.py writes "
                        "the committed demo results to results)")
    g.add_argument("--max-concurrent", type=int,
                   help="cap on trials at once (default: what the cluster's resources allow)")
    g.add_argument("--tracker", action="append", choices=TRACKER_NAMES, default=[],
                   help="also log to this tracker (repeatable): TensorBoard event files or an "
                        "MLflow SQLite store in the storage folder, or W&B")
    g.add_argument("--optuna-storage", metavar="URL",
                   help="a database for an Optuna search's Optuna study, e.g. "
                        "postgresql://user@host/db (checked before the study starts); default: "
                        "Optuna's journal file <storage>/<name>/optuna.journal, safe for "
                        "several drivers at once")
    g.add_argument("--warm-start", metavar="STUDY[:K]",
                   help="an Optuna search's first trials: the K best configurations (default "
                        "1; of a multi-objective study, its Pareto set) of an earlier study, "
                        "its name in --results-dir or its folder")
    g.add_argument("--budget-hours", type=float, metavar="H",
                   help="stop launching trials once the measured cost would pass H: GPU-hours "
                        "(trial wall time x GPUs per trial), or trial-hours when trials hold "
                        "no GPU; the running trials finish and the study is marked stopped by "
                        "budget (exit status 3), resumable with a larger H")
    g.add_argument("--smoke", action="store_true",
                   help="a quick check that the study runs: fewer values, one epoch per "
                        "stage of a few steps")
    g.add_argument("--dry-run", action="store_true",
                   help="check everything and print the resolved study as JSON, with its "
                        "number of trials and their estimated cost from earlier timings in "
                        "the results folder; train nothing")
    g.add_argument("--extend", action="store_true",
                   help="rerun a stored study with added seeds or grid values: only the new "
                        "trials run, the finished ones are kept")
    g.add_argument("--restart", action="store_true",
                   help="discard the stored study's trials and results and run it afresh")
    g.add_argument("--no-report", action="store_true", help="skip the HTML report")
    g.add_argument("--verbose", action="store_true",
                   help="show Ray's own start-up and per-report lines")
    add_run_flags(parser, seed_alias=False)


def parse_seeds(text: str | None, default: list[int]) -> list[int]:
    if text is None:
        return list(default)
    try:
        seeds = [int(s) for s in text.split(",") if s.strip() != ""]
    except ValueError:
        raise LfmError(f"--seeds {text!r} is not valid; expected integers like 0,1,2") from None
    if not seeds:
        raise LfmError("--seeds is empty; give at least one seed")
    if any(s < 0 for s in seeds):
        raise LfmError(f"--seeds {text!r} is not valid; seeds are integers >= 0")
    return seeds


def study_seeds(args: argparse.Namespace, default: list[int]) -> list[int]:
    if args.seed is not None and args.seeds is not None:
        raise LfmError("give --seeds or --seed, not both")
    if args.seed is not None:
        return parse_seeds(str(args.seed), default)
    return parse_seeds(args.seeds, default)


def study_from_args(args: argparse.Namespace, plan: ScriptPlan, *, script: str | None = None,
                    command: list[str] | None = None, called_by: list[str] | None = None):
    """The Study the flags and a script's plan describe, its base config resolved in layers."""
    from lfm_ray.driver.launch import default_trial_workers
    from lfm_ray.study import Dim, Study

    flags = flag_values(args, several_datasets=True)
    several = flags.get("data.name") if isinstance(flags.get("data.name"), list) else None
    if several:
        del flags["data.name"]
    datasets = several or []
    layers = config_layers(args, fixed=plan.fixed, smoke=args.smoke, study=script, flags=flags)
    grid, space = dict(plan.grid), dict(plan.space)
    if len(datasets) > 1:
        if plan.search == "grid":
            grid = {"data.name": datasets, **grid}
        else:
            space["data.name"] = Dim.choice(datasets)
    first = datasets[0] if datasets else None  # a swept data set's preset applies per trial
    probe = layers.resolve(first)
    if not any("runtime.num_workers" in layer for layer in
               (layers.file, layers.fixed, layers.smoke, layers.flags)):
        layers.defaults["runtime.num_workers"] = default_trial_workers(
            args.address, probe.runtime.gpus_per_worker)
    if args.num_samples is not None and plan.search == "grid":
        raise LfmError("--num-samples is for an Optuna or random search; this study is a grid")
    if args.protocol is not None and plan.protocol is None:
        raise LfmError("--protocol is for the α and τ sweeps (alpha_sweep.py, tau_sweep.py)")
    objectives = [o.strip() for o in (args.objectives or "").split(",") if o.strip()]
    return Study(
        name=args.name, base=layers.resolve(first), layers=layers, search=plan.search,
        objectives=objectives,
        grid=grid, space=space, variants=plan.variants, seeds=study_seeds(args, plan.seeds),
        num_samples=args.num_samples if args.num_samples is not None else plan.num_samples,
        metric=args.metric or plan.metric, scheduler=args.scheduler or "none",
        optuna_storage=args.optuna_storage, storage_path=args.storage_path,
        results_dir=args.results_dir, max_concurrent=args.max_concurrent,
        address=args.address, trackers=list(dict.fromkeys(args.tracker)),
        verbose=args.verbose, command=command or list(sys.argv), called_by=called_by,
        share_stage1=plan.share_stage1, protocol=plan.protocol,
        warm_start=args.warm_start, budget_hours=args.budget_hours,
    )


def requested_datasets(args: argparse.Namespace) -> list[str]:
    """The data sets the flags (or the config file) ask for, before the script's plan."""
    flags = flag_values(args, several_datasets=True)
    if isinstance(flags.get("data.name"), list):
        return list(flags["data.name"])
    return [config_layers(args, flags=flags).dataset()]


def paper_protocol(args: argparse.Namespace) -> str:
    """--protocol, else "branch" when a data set has a preset (the paper's four and the
    embedded fashion-lt), else "full" (digits-lt, folders)."""
    from lfm_ray.config import PRESETS

    if args.protocol:
        return args.protocol
    datasets = getattr(args, "datasets", None) or requested_datasets(args)
    return "branch" if any(d in PRESETS for d in datasets) else "full"


def execute(study, args: argparse.Namespace) -> int:
    """--dry-run: print the checked plan as JSON on stdout; else run the study and report."""
    from lfm_ray.study import plan_study, run_study

    def announce() -> None:  # once the request is checked: an error stays one line
        if study.layers is not None:
            announce_presets(study.layers, study.datasets())

    if args.dry_run:
        import json

        plan = plan_study(study, extend=args.extend, restart=args.restart)
        announce()
        print(json.dumps(plan, indent=2, default=str))
        return 0
    run_study(study, extend=args.extend, restart=args.restart, announce=announce)
    if not args.no_report:
        write_study_report(study.result_dir)
    return STOPPED_BY_BUDGET_EXIT if stopped_by_budget(study) else 0


STOPPED_BY_BUDGET_EXIT = 3  # the study stopped launching trials at its --budget-hours


def stopped_by_budget(study) -> bool:
    from lfm_ray.study.record import read_stored
    from lfm_ray.study.run import STOPPED_BY_BUDGET

    return (read_stored(study) or {}).get("status") == STOPPED_BY_BUDGET


def script_command(script_file: str, argv: list[str] | None) -> tuple[list[str], list[str] | None]:
    """(this script's command as run, the calling command when another program called it)."""
    path = Path(script_file).resolve()
    try:
        shown = str(path.relative_to(Path.cwd()))
    except ValueError:
        shown = str(path)
    args = list(argv) if argv is not None else sys.argv[1:]
    caller = None
    if argv is not None and Path(sys.argv[0]).resolve() != path:
        caller = [Path(sys.executable).name, *sys.argv]
    return ["python", shown, *args], caller


def run_script(declare: Callable[[argparse.Namespace], ScriptPlan], script_file: str,
               description: str, argv: list[str] | None = None) -> int:
    """Parse the common flags, let `declare(args)` say what the study sweeps, run it, report.

    Returns the exit status: 0 done, 2 for a user error (one line, no traceback)."""
    name = Path(script_file).stem
    parser = new_parser(prog=f"{name}.py", description=description)
    add_study_flags(parser, default_name=name)
    try:
        args = parser.parse_args(argv)
    except LfmError as exc:  # a bad flag: the parser's own one line
        print(exc, file=sys.stderr)
        return 2
    try:
        args.datasets = requested_datasets(args)
        plan = declare(args)
        command, caller = script_command(script_file, argv)
        study = study_from_args(args, plan, script=name, command=command, called_by=caller)
        return execute(study, args)
    except LfmError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"{name}: {interrupted_text(exc)}", file=sys.stderr)
        return 130


def interrupted_text(exc: KeyboardInterrupt) -> str:
    """What to say when Ctrl-C stopped a command: a stopped study's own note (what ran, what
    is missing, the command that resumes it), else how to resume."""
    return str(exc) if str(exc) else "interrupted; run the same command again to resume"


def write_study_report(result_dir) -> None:
    """The HTML report of a finished study, where the analysis module is present."""
    try:
        from lfm_ray.analysis import write_report
    except ImportError:
        return
    path = write_report(result_dir)
    print(f"wrote {path}", file=sys.stderr, flush=True)
