"""τ ablation (paper Fig. 10): LFM with α = 1 for τ ∈ {0.002, 0.01, 0.05, 0.25, 1.25, 6.25, 31.25}.

Declared in lfm_ray/commands/catalog/tau_sweep.py (`--help` says what it sweeps and how)."""

import sys

from lfm_ray.commands.catalog import tau_sweep as study
from lfm_ray.commands.catalog.tau_sweep import *  # noqa: F401,F403 - its declarations


def main(argv=None) -> int:
    return study.main(argv, script_file=__file__)


if __name__ == "__main__":
    sys.exit(main())
