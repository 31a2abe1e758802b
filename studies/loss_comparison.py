"""Loss comparison (paper Table 1): zero-shot, CE, BalCE, Focal, LDAM, MMS, LFM + CE, LFM + MMS.

Each method is a named bundle of settings; the grid runs over the method names.
    python studies/loss_comparison.py
"""

import sys

from lfm_ray.commands.study_flags import parse_seeds, run_script
from lfm_ray.config import RunConfig
from lfm_ray.study import Study

# method name -> (loss, mixing, zero-shot); the logit scale follows each loss's default.
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


def build(args, overrides) -> Study:
    names = ["CE", "LFM + CE"] if args.smoke else list(METHODS)
    base = RunConfig().override(overrides)
    return Study(name=args.name, base=base, grid={"method": names},
                 seeds=parse_seeds(args.seeds, [0]),
                 variants={n: {"loss.name": METHODS[n][0], "mix.method": METHODS[n][1],
                              "runtime.zero_shot": METHODS[n][2]} for n in names})


def main(argv=None) -> int:
    return run_script(build, "loss_comparison", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
