"""Where LFM's class similarity comes from: LFM + CE with S from each source (mix.similarity).

Declared in lfm_ray/commands/catalog/similarity_sources.py (`--help` says what it sweeps and how)."""

import sys

from lfm_ray.commands.catalog import similarity_sources as study
from lfm_ray.commands.catalog.similarity_sources import *  # noqa: F401,F403 - its declarations


def main(argv=None) -> int:
    return study.main(argv, script_file=__file__)


if __name__ == "__main__":
    sys.exit(main())
