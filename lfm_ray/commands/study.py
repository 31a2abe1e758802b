"""`lfm-ray study`: run, resume or extend a study declared on the command line.

    lfm-ray study --name taus --grid mix.tau=0.01,0.05,0.25 --seeds 0,1
    lfm-ray study --name taus --grid mix.tau=0.01,0.05,0.25 --seeds 0,1,2 --extend
    lfm-ray study --name search --search optuna --space stage1.lr=loguniform:1e-4:1e-2 \
        --space loss.name=choice:ce,mms --num-samples 16
    lfm-ray study --resume taus

The same name again resumes the study if the request is the same, and refuses otherwise
(naming each difference): --extend runs only added seeds or grid values, --restart runs it
afresh. On a local Ray instance without GPUs each trial trains in its own process (Ray
Train's local mode); --num-workers 1 or more gives every trial a Ray Train worker group
instead, as --address and GPUs do by default.
"""

from __future__ import annotations

import argparse

from lfm_ray.commands.run_flags import HelpFormatter, flag_values
from lfm_ray.commands.study_flags import ScriptPlan, add_study_flags, execute, study_from_args
from lfm_ray.errors import LfmError

SEARCH_NAMES = ("grid", "optuna", "random")
SAMPLER_NAMES = ("tpe", "gp", "cmaes", "random")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="run, resume or extend a study (Ray Tune over "
                       "TorchTrainer runs)", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--resume", metavar="NAME", help="resume the stored study NAME as it is")
    p.add_argument("--search", default="grid", choices=SEARCH_NAMES,
                   help="grid, optuna or random (default grid)")
    p.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                   help="a grid dimension (repeat for a 2-D grid)")
    p.add_argument("--space", action="append", default=[], metavar="FIELD=KIND:...",
                   help="a search dimension: loguniform:LOW:HIGH, uniform:LOW:HIGH, "
                        "int:LOW:HIGH or choice:A,B")
    p.add_argument("--sampler", default="tpe", choices=SAMPLER_NAMES,
                   help="Optuna sampler (default tpe)")
    add_study_flags(p)
    p.set_defaults(func=run)


def _values(text: str) -> list:
    from lfm_ray.study import literal

    return [literal(v) for v in text.split(",") if v != ""]


def _dimensions(flag: str, items: list[str], form: str) -> list[tuple[str, str]]:
    """(field, text) of each repeated --grid or --space; a field named twice is refused
    (which of the two was meant cannot be told)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep:
            raise LfmError(f"{flag} {item!r} is not valid; expected {form}")
        if name in out:
            raise LfmError(f"{flag} {name} is given twice ({name}={out[name]} and "
                           f"{name}={text}); give each field once, with all its values")
        out[name] = text
    return list(out.items())


def build_study(args: argparse.Namespace):
    from lfm_ray.study import load_study_spec, parse_dim

    command = ["lfm-ray", *getattr(args, "argv", [])]
    if args.resume:
        if args.name and args.name != args.resume:
            raise LfmError(f"--resume {args.resume!r} and --name {args.name!r} disagree; give one")
        study = load_study_spec(args.results_dir, args.resume)
        if (flag_values(args, several_datasets=True) or args.grid or args.space or args.config
                or args.warm_start):
            raise LfmError("--resume takes the stored study as it is; drop the other flags "
                           "(or give the full request with --name to extend it)")
        study.address, study.command = args.address, command
        study.max_concurrent, study.verbose = args.max_concurrent, args.verbose
        study.budget_hours = args.budget_hours
        return study
    if not args.name:
        raise LfmError("give --name NAME (or --resume NAME)")
    grid = {name: _values(values) for name, values in _dimensions("--grid", args.grid,
                                                                  "FIELD=V1,V2")}
    space = {name: parse_dim(dim) for name, dim in _dimensions("--space", args.space,
                                                               "FIELD=KIND:...")}
    if args.search == "grid" and space:
        raise LfmError("--space is for --search optuna or random; a grid takes --grid")
    if args.search != "grid" and grid:
        raise LfmError(f"--grid is for a grid search; --search {args.search} takes --space")
    plan = ScriptPlan(grid=grid, space=space, search=args.search)
    study = study_from_args(args, plan, command=command)
    study.sampler = args.sampler
    return study


def run(args: argparse.Namespace) -> int:
    return execute(build_study(args), args)
