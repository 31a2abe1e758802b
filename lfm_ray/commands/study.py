"""`lfm-ray study`: run, or resume, a study declared on the command line.

    lfm-ray study --name taus --grid mix.tau=0.01,0.05,0.25 --seeds 0,1
    lfm-ray study --name search --search optuna --space stage1.lr=loguniform:1e-4:1e-2 \
        --space loss.name=choice:ce,mms --num-samples 16
    lfm-ray study --resume taus

On a local Ray instance without GPUs each trial trains in its own process (Ray Train's local
mode); --num-workers 1 or more gives every trial a Ray Train worker group instead, as
--address and GPUs do by default.
"""

from __future__ import annotations

import argparse

from lfm_ray.commands.run_flags import add_run_flags, config_from_args, flag_values
from lfm_ray.commands.study_flags import parse_seeds, write_study_report
from lfm_ray.errors import LfmError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="run or resume a study (Ray Tune over TorchTrainer runs)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", help="study name; the same name again resumes it")
    p.add_argument("--resume", metavar="NAME", help="resume the study NAME explicitly")
    p.add_argument("--search", default="grid", help="grid | optuna | random (default grid)")
    p.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                   help="a grid dimension (repeat for a 2-D grid)")
    p.add_argument("--space", action="append", default=[], metavar="FIELD=KIND:...",
                   help="a search dimension: loguniform:LOW:HIGH, uniform:LOW:HIGH, "
                        "int:LOW:HIGH or choice:A,B")
    p.add_argument("--seeds", help="comma-separated training seeds (default 0)")
    p.add_argument("--num-samples", type=int, default=8, help="optuna/random trials")
    p.add_argument("--metric", default="acc_all", help="what best means (default acc_all)")
    p.add_argument("--objectives", help="several metrics, e.g. acc_few,acc_many (Optuna, Pareto)")
    p.add_argument("--scheduler", default="none", help="none | asha")
    p.add_argument("--sampler", default="tpe", help="Optuna sampler: tpe | gp | cmaes | random")
    p.add_argument("--optuna-storage", help="Optuna storage URL, e.g. sqlite:///optuna.db")
    p.add_argument("--storage-path", default="results/ray", help="Tune storage path or URI")
    p.add_argument("--results-dir", default="results", help="where the tables go")
    p.add_argument("--max-concurrent", type=int, help="cap on concurrent trials")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    add_run_flags(p)
    p.set_defaults(func=run)


def _values(text: str) -> list:
    from lfm_ray.study import _literal

    return [_literal(v) for v in text.split(",") if v != ""]


def build_study(args: argparse.Namespace):
    from lfm_ray.study import Study, load_study_spec, parse_dim

    if args.resume:
        study = load_study_spec(args.results_dir, args.resume)
        if flag_values(args) or args.grid or args.space:
            raise LfmError("--resume takes the stored study as it is; drop the other flags")
        return study
    if not args.name:
        raise LfmError("give --name NAME (or --resume NAME)")
    grid, space = {}, {}
    for item in args.grid:
        name, sep, values = item.partition("=")
        if not sep:
            raise LfmError(f"--grid {item!r} is not valid; expected FIELD=V1,V2")
        grid[name] = _values(values)
    for item in args.space:
        name, sep, dim = item.partition("=")
        if not sep:
            raise LfmError(f"--space {item!r} is not valid; expected FIELD=KIND:...")
        space[name] = parse_dim(dim)
    objectives = [o for o in (args.objectives or "").split(",") if o]
    base = config_from_args(args)
    if "runtime.num_workers" not in flag_values(args) and not getattr(args, "config", None):
        from lfm_ray.launch import default_trial_workers

        base.runtime.num_workers = default_trial_workers(args.address,
                                                         base.runtime.gpus_per_worker)
    return Study(
        name=args.name, base=base, search=args.search, grid=grid,
        space=space, seeds=parse_seeds(args.seeds, [0]), num_samples=args.num_samples,
        metric=args.metric, mode="max", objectives=objectives, scheduler=args.scheduler,
        sampler=args.sampler, optuna_storage=args.optuna_storage,
        storage_path=args.storage_path, results_dir=args.results_dir,
        max_concurrent=args.max_concurrent, address=args.address,
    )


def run(args: argparse.Namespace) -> int:
    from lfm_ray.study import run_study

    study = build_study(args)
    if args.address:
        study.address = args.address
    run_study(study)
    if not args.no_report:
        write_study_report(study.result_dir)
    return 0
