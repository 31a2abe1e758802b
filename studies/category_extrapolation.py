"""Category extrapolation ("Learning from Neighbors", Zhao et al., CVPR 2025), as its ablation:

Declared in lfm_ray/commands/catalog/category_extrapolation.py (`--help` says what it sweeps and how)."""

import sys

from lfm_ray.commands.catalog import category_extrapolation as study
from lfm_ray.commands.catalog.category_extrapolation import *  # noqa: F401,F403 - its declarations


def main(argv=None) -> int:
    return study.main(argv, script_file=__file__)


if __name__ == "__main__":
    sys.exit(main())
