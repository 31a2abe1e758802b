"""α ablation (paper Fig. 9): LFM with τ = 0.05 for α from 0 to 2.

Defaults: digits-lt, the tiny model, a local Ray instance, seeds 0 and 1. On CIFAR-100-LT
the paper's preset applies, with the paper's RN50 backbone for this figure.
    python studies/alpha_sweep.py
    python studies/alpha_sweep.py --dataset cifar100-lt --data-root /data --seeds 0,1,2
"""

import sys

from lfm_ray.commands.study_flags import ScriptPlan, run_script

ALPHAS = [0.0, 0.25, 0.5, 1.0, 1.5, 2.0]


def declare(args) -> ScriptPlan:
    return ScriptPlan(fixed={"mix.method": "lfm", "mix.tau": 0.05},
                      grid={"mix.alpha": [0.0, 1.0] if args.smoke else ALPHAS}, seeds=[0, 1])


def main(argv=None) -> int:
    return run_script(declare, __file__, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
