"""Mixing comparison (paper Table 5): none, Mixup, Remix, CutMix, ConCutMix and LFM, with CE.

    python studies/mixup_comparison.py
"""

import sys

from lfm_ray.commands.study_flags import parse_seeds, run_script
from lfm_ray.config import RunConfig
from lfm_ray.study import Study

METHODS = ["none", "mixup", "remix", "cutmix", "concutmix", "lfm"]


def build(args, overrides) -> Study:
    base = RunConfig().override({"loss.name": "ce", **overrides})
    return Study(name=args.name, base=base,
                 grid={"mix.method": ["none", "lfm"] if args.smoke else METHODS},
                 seeds=parse_seeds(args.seeds, [0]))


def main(argv=None) -> int:
    return run_script(build, "mixup_comparison", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
