"""Run every study of the paper with its defaults and write results/<study>/ (the demo results).

    python studies/run_all.py            # all six, one local Ray instance, about 25 minutes on 2 cores
    python studies/run_all.py tau_sweep  # some of them
"""

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STUDIES = ["tau_sweep", "alpha_sweep", "loss_comparison", "mixup_comparison",
           "imbalance_sweep", "optuna_search"]


def main(argv=None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or STUDIES
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        print(f"run_all: error: unknown study {unknown[0]!r}; known: {', '.join(STUDIES)}",
              file=sys.stderr)
        return 2
    for name in names:
        print(f"=== {name}", flush=True)
        code = importlib.import_module(name).main([])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
