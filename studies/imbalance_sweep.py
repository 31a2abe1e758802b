"""Imbalance factors (paper Table 2): γ ∈ {10, 50, 100} × {CE, LFM + CE, LFM + MMS}.

Declared in lfm_ray/commands/catalog/imbalance_sweep.py (`--help` says what it sweeps and how)."""

import sys

from lfm_ray.commands.catalog import imbalance_sweep as study
from lfm_ray.commands.catalog.imbalance_sweep import *  # noqa: F401,F403 - its declarations


def main(argv=None) -> int:
    return study.main(argv, script_file=__file__)


if __name__ == "__main__":
    sys.exit(main())
