"""Run every study on the embedded data set and write results/<study>/ afresh (the demo
results): each with --restart --results-dir results (a study run by hand goes to the
git-ignored runs/) and seeds 0, 1 and 2 (the Optuna search trains each sampled
configuration on all three).

    python studies/run_all.py            # all of them, one local Ray instance
    python studies/run_all.py tau_sweep  # some of them
    python studies/run_all.py tau_sweep -- --smoke   # flags after -- go to every study
"""

import importlib
import sys
from pathlib import Path

from lfm_ray.commands.catalog import STUDIES

HERE = Path(__file__).resolve().parent
FLAGS = ["--restart", "--results-dir", "results"]  # the committed demo results
SEEDS = ["--seeds", "0,1,2"]


def main(argv=None) -> int:
    args = list(argv if argv is not None else sys.argv[1:])
    extra = args[args.index("--") + 1:] if "--" in args else []
    names = (args[:args.index("--")] if "--" in args else args) or STUDIES
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        print(f"run_all: error: unknown study {unknown[0]!r}; known: {', '.join(STUDIES)}",
              file=sys.stderr)
        return 2
    for name in names:
        print(f"=== {name}", file=sys.stderr, flush=True)
        study = importlib.import_module(f"lfm_ray.commands.catalog.{name}")
        code = study.main([*FLAGS, *SEEDS, *extra], script_file=str(HERE / f"{name}.py"))
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
