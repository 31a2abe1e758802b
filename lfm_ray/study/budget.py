"""`--budget-hours`: a study stops launching trials once its measured cost would pass the
budget (lfm_ray.study.cost defines the cost); the trials running finish, and the study is
marked stopped by budget, resumable with a larger budget.

Tune's stoppers end running trials too, so the gate sits in the search algorithm instead:
its `next_trial` gives no trial once the budget refuses one, and `is_finished` then tells
Tune the experiment has nothing more to run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.basic_variant import BasicVariantGenerator

from lfm_ray.errors import LfmError
from lfm_ray.study.cost import cost_unit, gpus_per_trial, measured_cost, trial_cost_hours
from lfm_ray.study.spec import Study


# ---- the budget ----------------------------------------------------------------------------------
@dataclass
class Budget:
    """`--budget-hours`: a new trial is launched only while the measured cost so far, plus
    the expected cost of the trials running and of the new one (the mean of the ended trials'
    costs), stays within `hours`. Once a launch is refused the run launches no more; the
    trials running finish."""

    hours: float
    unit_gpus: float                      # GPUs per trial (0: cost in trial-hours)
    spent_before: float = 0.0             # ended trials of earlier runs (trials.csv)
    costs_before: list[float] = field(default_factory=list)
    costs: dict[str, float] = field(default_factory=dict)    # ended this run
    last_wall: dict[str, float] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    stopped: bool = False                 # a launch was refused

    @property
    def spent(self) -> float:
        return self.spent_before + sum(self.costs.values())

    def expected(self) -> float:
        every = [*self.costs_before, *self.costs.values()]
        return sum(every) / len(every) if every else 0.0

    def allows_launch(self) -> bool:
        if self.stopped:
            return False
        if self.spent + (len(self.running) + 1) * self.expected() > self.hours:
            self.stopped = True
        return not self.stopped

    def launched(self, trial_id: str) -> None:
        self.running.add(trial_id)

    def result(self, trial_id: str, result: dict[str, Any] | None) -> None:
        wall = (result or {}).get("time_total_s")
        if wall is not None:
            self.last_wall[trial_id] = float(wall)

    def ended(self, trial_id: str, result: dict[str, Any] | None) -> None:
        self.result(trial_id, result)
        self.running.discard(trial_id)
        self.costs[trial_id] = trial_cost_hours(self.last_wall.get(trial_id, 0.0),
                                                self.unit_gpus)


def budget_for(study: Study, table: Any) -> Budget | None:
    """The study's budget with what its stored trials already spent; refuses a budget that
    is not positive, or one already spent (nothing is launched then)."""
    if study.budget_hours is None:
        return None
    unit = cost_unit(study.base)
    if not study.budget_hours > 0:
        raise LfmError(f"--budget-hours {study.budget_hours:g} is not valid; expected a number "
                       f"of {unit} > 0")
    spent, costs = measured_cost(study, table)
    budget = Budget(study.budget_hours, gpus_per_trial(study.base), spent, costs)
    if not budget.allows_launch():
        raise LfmError(
            f"study {study.name!r}: its budget of {study.budget_hours:g} {unit} is already "
            f"exhausted ({spent:.4g} {unit} measured over {len(costs)} ended trials"
            + (f", about {budget.expected():.4g} more per trial" if costs else "")
            + "); nothing run. Rerun with a larger --budget-hours to go on")
    budget.stopped = False
    return budget


# The budget of each experiment running in this process, by its name under the storage path:
# Tune saves an experiment's search algorithm with it, so a resumed run (perhaps with another
# budget) reaches the current budget through this key, as the run's TrialWatch does.
BUDGETS: dict[str, Budget] = {}


class _BudgetGate:
    """Mixed into Tune's search algorithm: no new trial once the budget of the experiment
    (BUDGETS[budget_key]) refuses one; no budget registered, no limit."""

    budget_key: str = ""

    def _budget(self) -> Budget | None:
        return BUDGETS.get(self.budget_key)

    def next_trial(self):
        budget = self._budget()
        if budget is not None and not budget.allows_launch():
            return None
        trial = super().next_trial()
        if trial is not None and budget is not None:
            budget.launched(trial.trial_id)
        return trial

    def is_finished(self) -> bool:
        budget = self._budget()
        return super().is_finished() or (budget is not None and budget.stopped)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        super().on_trial_result(trial_id, result)
        budget = self._budget()
        if budget is not None:
            budget.result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        super().on_trial_complete(trial_id, result=result, error=error)
        budget = self._budget()
        if budget is not None:
            budget.ended(trial_id, result)


class BudgetedVariants(_BudgetGate, BasicVariantGenerator):
    """Tune's variant generator (a grid's listed points, a random search) behind the gate."""

    def __init__(self, budget_key: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.budget_key = budget_key


class BudgetedSearch(_BudgetGate, SearchGenerator):
    """An Optuna searcher behind the gate."""

    def __init__(self, budget_key: str, searcher: Any):
        super().__init__(searcher)
        self.budget_key = budget_key


def gated(alg: Any, key: str, slots: int) -> Any:
    """Tune's search algorithm of an experiment (lfm_ray.study.search's) behind its budget
    gate: a grid's or a random search's variant generator as it is (it keeps to `slots`
    itself), or the Optuna searcher `alg` under a ConcurrencyLimiter of `slots`, as Tune's
    max_concurrent_trials would wrap it."""
    if isinstance(alg, BasicVariantGenerator):
        alg.__class__ = BudgetedVariants  # the same object, its two methods gated
        alg.budget_key = key
        return alg
    return BudgetedSearch(key, ConcurrencyLimiter(alg, max_concurrent=slots) if slots else alg)
