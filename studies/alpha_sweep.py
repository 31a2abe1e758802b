"""α ablation (paper Fig. 9): LFM with τ = 0.05 for α from 0 to 2.

Declared in lfm_ray/commands/catalog/alpha_sweep.py (`--help` says what it sweeps and how)."""

import sys

from lfm_ray.commands.catalog import alpha_sweep as study
from lfm_ray.commands.catalog.alpha_sweep import *  # noqa: F401,F403 - its declarations


def main(argv=None) -> int:
    return study.main(argv, script_file=__file__)


if __name__ == "__main__":
    sys.exit(main())
