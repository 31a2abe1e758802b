"""α ablation (paper Fig. 9): LFM with τ = 0.05 for α from 0 to 2.

Defaults: digits-lt, the tiny model, a local Ray instance, seeds 0 and 1.
    python studies/alpha_sweep.py
"""

import sys

from lfm_ray.commands.study_flags import parse_seeds, run_script
from lfm_ray.config import RunConfig
from lfm_ray.study import Study

ALPHAS = [0.0, 0.25, 0.5, 1.0, 1.5, 2.0]


def build(args, overrides) -> Study:
    base = RunConfig().override({"mix.method": "lfm", "mix.tau": 0.05, **overrides})
    return Study(name=args.name, base=base,
                 grid={"mix.alpha": [0.0, 1.0] if args.smoke else ALPHAS},
                 seeds=parse_seeds(args.seeds, [0, 1]))


def main(argv=None) -> int:
    return run_script(build, "alpha_sweep", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
