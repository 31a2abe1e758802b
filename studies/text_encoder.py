"""LFM with a pretrained text encoder on a vision-only backbone, against the same backbone

Declared in lfm_ray/commands/catalog/text_encoder.py (`--help` says what it sweeps and how)."""

import sys

from lfm_ray.commands.catalog import text_encoder as study
from lfm_ray.commands.catalog.text_encoder import *  # noqa: F401,F403 - its declarations


def main(argv=None) -> int:
    return study.main(argv, script_file=__file__)


if __name__ == "__main__":
    sys.exit(main())
