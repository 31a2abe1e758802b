"""A search over seeds: every configuration a searcher suggests is trained once per seed,
each seed its own Tune trial (its own row in trials.csv, its own checkpoint and records), and
the searcher is told the configuration's mean over its seeds once every seed has ended.

`SeedRepeater` wraps the searcher (Optuna's) as Tune's ConcurrencyLimiter does: Tune asks
it for trials; it asks the searcher for a new configuration only when every seed of the
ones it holds has been handed out, so a configuration's seeds run next to each other. The
searcher never sees a single seed's result: per-epoch reports are not passed on (they
would interleave the seeds of one configuration), and a configuration with a failed seed,
or one without a value, is told as failed (its mean would rest on fewer seeds than the
others').

Tune's own Repeater does not fit: it averages one metric (not a multi-objective search's
several), drops a failed repeat from the mean (nanmean), and numbers the repeats in a config
key of its own where the study's trials carry their seed among their swept values.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from ray.tune.search import Searcher

from lfm_ray.study.spec import SEED


class SeedRepeater(Searcher):
    """Each configuration `searcher` suggests, once per seed of `seeds` (config["params"]
    gets SEED); `metrics` (the searcher's objectives) are averaged over the seeds and told
    to it under the first seed's trial id, the id it was asked with."""

    def __init__(self, searcher: Searcher, seeds: list[int], metrics: list[str]):
        self.searcher = searcher
        self.seeds = list(seeds)
        self.metrics = list(metrics)
        self.waiting: list[tuple[str, int]] = []   # (configuration, seed) not yet handed out
        self.configs: dict[str, dict[str, Any]] = {}  # configuration id -> suggested config
        self.seed_results: dict[str, dict[str, dict[str, float] | None]] = {}  # id -> trial -> values
        self.config_of: dict[str, str] = {}        # trial id -> its configuration id
        self.told: set[str] = set()                # configurations the searcher was told
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict | None:
        if self.waiting:
            config_id, seed = self.waiting.pop(0)
        else:
            suggested = self.searcher.suggest(trial_id)
            if suggested is None or suggested == Searcher.FINISHED:
                return suggested
            config_id, seed = trial_id, self.seeds[0]
            self.configs[config_id] = suggested
            self.seed_results[config_id] = {}
            self.waiting.extend((config_id, s) for s in self.seeds[1:])
        config = copy.deepcopy(self.configs[config_id])
        config.setdefault("params", {})[SEED] = seed
        self.config_of[trial_id] = config_id
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return None  # the searcher hears of a configuration only through its seeds' mean

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        config_id = self.config_of.get(trial_id)
        if config_id is None or config_id in self.told:
            return
        values = None
        if result and not error:
            values = {m: result.get(m) for m in self.metrics}
            if any(not _is_number(v) for v in values.values()):
                values = None
        self.seed_results[config_id][trial_id] = values
        ended = self.seed_results[config_id]
        if len(ended) < len(self.seeds):
            return
        self.told.add(config_id)
        if any(v is None for v in ended.values()):
            self.searcher.on_trial_complete(config_id, result=None, error=True)
            return
        means = {m: sum(float(v[m]) for v in ended.values()) / len(ended)
                 for m in self.metrics}
        self.searcher.on_trial_complete(config_id, result=means, error=False)

    # Tune saves a wrapper as it saves its own (ConcurrencyLimiter, Repeater): the wrapper's
    # state without the searcher (get_state), and the searcher itself (save, restore).
    def get_state(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["searcher"]
        return copy.deepcopy(state)

    def set_state(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)


def _is_number(value: Any) -> bool:
    try:
        return not math.isnan(float(value))
    except (TypeError, ValueError):
        return False
