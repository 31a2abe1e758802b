"""Fine-tuning modes (LIFT, ICML 2024): full fine-tuning of the image tower against the

Declared in lfm_ray/commands/catalog/finetune_modes.py (`--help` says what it sweeps and how)."""

import sys

from lfm_ray.commands.catalog import finetune_modes as study
from lfm_ray.commands.catalog.finetune_modes import *  # noqa: F401,F403 - its declarations


def main(argv=None) -> int:
    return study.main(argv, script_file=__file__)


if __name__ == "__main__":
    sys.exit(main())
