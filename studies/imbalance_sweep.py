"""Imbalance factors (paper Table 2): γ ∈ {10, 50, 100} × {CE, LFM + CE, LFM + MMS}.

On fashion-lt the largest class keeps its 600 training images and the others follow the
profile (γ = 100: 6 images in the rarest class, γ = 10: 60); on digits-lt the largest class
has about 130, so γ = 100 leaves the rarest classes one image each.
    python studies/imbalance_sweep.py
    python studies/imbalance_sweep.py --dataset cifar100-lt --data-root /data ...
"""

import sys

from lfm_ray.commands.study_flags import ScriptPlan, run_script

METHODS = {
    "CE": {"loss.name": "ce", "mix.method": "none"},
    "LFM + CE": {"loss.name": "ce", "mix.method": "lfm"},
    "LFM + MMS": {"loss.name": "mms", "mix.method": "lfm"},
}


def declare(args) -> ScriptPlan:
    factors = [10, 100] if args.smoke else [10, 50, 100]
    methods = ["CE", "LFM + CE"] if args.smoke else list(METHODS)
    return ScriptPlan(grid={"data.imbalance_factor": factors, "method": methods},
                      variants=METHODS, seeds=[0])


def main(argv=None) -> int:
    return run_script(declare, __file__, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
