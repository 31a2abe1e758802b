"""Imbalance factors (paper Table 2): γ ∈ {10, 50, 100} × {CE, LFM + CE, LFM + MMS}.

On fashion-lt the largest class keeps its 600 training images and the others follow the
profile (γ = 100: 6 images in the rarest class, γ = 10: 60); on digits-lt the largest class
has about 130, so γ = 100 leaves the rarest classes one image each.
    python studies/imbalance_sweep.py
    python studies/imbalance_sweep.py --dataset cifar100-lt --data-root /data ...
"""

from lfm_ray.commands.study_flags import ScriptPlan, run_script

SCRIPT = "studies/imbalance_sweep.py"  # the script that runs it from a checkout

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


def main(argv=None, script_file: str = SCRIPT) -> int:
    """Run the study as `python {script_file}` would (its name, flags and command line)."""
    return run_script(declare, script_file, __doc__, argv)
