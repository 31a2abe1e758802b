"""Loss comparison (paper Table 1, with the long-tail baselines of LIFT and cRT): zero-shot, CE,

Declared in lfm_ray/commands/catalog/loss_comparison.py (`--help` says what it sweeps and how)."""

import sys

from lfm_ray.commands.catalog import loss_comparison as study
from lfm_ray.commands.catalog.loss_comparison import *  # noqa: F401,F403 - its declarations


def main(argv=None) -> int:
    return study.main(argv, script_file=__file__)


if __name__ == "__main__":
    sys.exit(main())
