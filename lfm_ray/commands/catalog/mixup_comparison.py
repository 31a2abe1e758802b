"""Mixing comparison (paper Table 5): none, Mixup, Remix, CutMix, ConCutMix and LFM, with CE.

Each mixing method draws λ from its authors' law (see README). On CIFAR-100-LT the paper's
preset applies, with the paper's ViT-B/16 backbone for this table.
    python studies/mixup_comparison.py
    python studies/mixup_comparison.py --seeds 0,1,2
"""

from lfm_ray.commands.study_flags import ScriptPlan, run_script

SCRIPT = "studies/mixup_comparison.py"  # the script that runs it from a checkout

METHODS = ["none", "mixup", "remix", "cutmix", "concutmix", "lfm"]


def declare(args) -> ScriptPlan:
    return ScriptPlan(fixed={"loss.name": "ce"},
                      grid={"mix.method": ["none", "lfm"] if args.smoke else METHODS}, seeds=[0])


def main(argv=None, script_file: str = SCRIPT) -> int:
    """Run the study as `python {script_file}` would (its name, flags and command line)."""
    return run_script(declare, script_file, __doc__, argv)
