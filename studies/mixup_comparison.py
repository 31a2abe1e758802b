"""Mixing comparison (paper Table 5): none, Mixup, Remix, CutMix, ConCutMix and LFM, with CE.

Declared in lfm_ray/commands/catalog/mixup_comparison.py (`--help` says what it sweeps and how)."""

import sys

from lfm_ray.commands.catalog import mixup_comparison as study
from lfm_ray.commands.catalog.mixup_comparison import *  # noqa: F401,F403 - its declarations


def main(argv=None) -> int:
    return study.main(argv, script_file=__file__)


if __name__ == "__main__":
    sys.exit(main())
