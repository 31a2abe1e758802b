"""Joint Optuna search over α, τ, both learning rates and the loss, across data sets.

Declared in lfm_ray/commands/catalog/optuna_search.py (`--help` says what it sweeps and how)."""

import sys

from lfm_ray.commands.catalog import optuna_search as study
from lfm_ray.commands.catalog.optuna_search import *  # noqa: F401,F403 - its declarations


def main(argv=None) -> int:
    return study.main(argv, script_file=__file__)


if __name__ == "__main__":
    sys.exit(main())
