"""Loss comparison (paper Table 1): zero-shot, CE, BalCE, Focal, LDAM, MMS, LFM + CE, LFM + MMS.

Each method is a named bundle of settings; the grid runs over the method names. Each loss
runs at its own default logit scale (see README); `--logit-scale S` compares them at one.
    python studies/loss_comparison.py
    python studies/loss_comparison.py --logit-scale 30 --name loss_comparison_s30
"""

import sys

from lfm_ray.commands.study_flags import ScriptPlan, run_script

# method name -> (loss, mixing, zero-shot)
METHODS = {
    "zero-shot": ("ce", "none", True),
    "CE": ("ce", "none", False),
    "BalCE": ("balce", "none", False),
    "Focal": ("focal", "none", False),
    "LDAM": ("ldam", "none", False),
    "MMS": ("mms", "none", False),
    "LFM + CE": ("ce", "lfm", False),
    "LFM + MMS": ("mms", "lfm", False),
}


def declare(args) -> ScriptPlan:
    names = ["CE", "LFM + CE"] if args.smoke else list(METHODS)
    return ScriptPlan(grid={"method": names}, seeds=[0],
                      variants={n: {"loss.name": METHODS[n][0], "mix.method": METHODS[n][1],
                                    "runtime.zero_shot": METHODS[n][2]} for n in names})


def main(argv=None) -> int:
    return run_script(declare, __file__, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
