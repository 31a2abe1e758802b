"""`lfm-ray`: the command line. Each subcommand lives in `lfm_ray/commands/<name>.py`.

`main(argv)` takes a list so tests call it directly; it returns the exit status. Errors a
user can cause (`LfmError`) print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lfm_ray import __version__
from lfm_ray.commands.run_flags import ExactParser
from lfm_ray.errors import LfmError

# Subcommand name -> module under lfm_ray.commands with `register(subparsers)`.
COMMANDS = ("data", "train", "study", "report", "compare", "bench", "aux")
# Where a command's module has another name (AUX is a reserved file name on Windows).
MODULES = {"aux": "auxiliary"}


def build_parser() -> argparse.ArgumentParser:
    parser = ExactParser(
        prog="lfm-ray",
        description="Studies of Local Feature Mixup for long-tailed CLIP fine-tuning on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"lfm-ray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        path = f"lfm_ray.commands.{MODULES.get(name, name)}"
        try:
            module = importlib.import_module(path)
        except ModuleNotFoundError as exc:
            if exc.name != path:
                raise
            continue  # a subcommand not built yet
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except LfmError as exc:  # a bad flag: its parser's one line (see ExactParser)
        print(str(exc), file=sys.stderr)
        return 2
    args.argv = argv  # what the study records as its command
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except LfmError as exc:
        print(f"lfm-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        from lfm_ray.commands.study_flags import interrupted_text

        print(f"lfm-ray {args.command}: {interrupted_text(exc)}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
