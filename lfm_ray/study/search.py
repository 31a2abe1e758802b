"""How Tune explores a study: the trials' parameters, Optuna's sampler and storage, ASHA, and
how many trials run at once."""

from __future__ import annotations

from typing import Any

from lfm_ray.config import RunConfig
from lfm_ray.errors import LfmError
from lfm_ray.study.spec import SEED, Dim, Study



def param_space(study: Study, points: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Tune's param_space: the trials' swept values under "params" (and a grid point's index).

    A grid study lists its trials explicitly (`points`, default every grid point crossed
    with the seeds), so extending a study runs exactly the points it lacks."""
    from ray import tune

    if study.search == "grid":
        # Each swept parameter is its own column in Tune's table; the trials themselves are
        # exactly the grid's points (grid_points), given to the searcher (see search_alg).
        points = points if points is not None else study.grid_points()
        values: dict[str, list[Any]] = {}
        for point in points:
            for key, value in point.items():
                if value not in values.setdefault(key, []):
                    values[key].append(value)
        return {"params": {k: tune.choice(v) for k, v in values.items()}}
    if study.search == "random":
        params: dict[str, Any] = random_space(study)
        if len(study.seeds) > 1:
            # Crossed with each sample; search_alg keeps the sample's values over its seeds.
            params[SEED] = tune.grid_search(list(study.seeds))
        return {"params": params}
    return {}  # Optuna fills config["params"] (define-by-run); SeedRepeater adds the seed


def random_space(study: Study) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for name, dim in study.space.items():
        if dim.kind == "loguniform":
            out[name] = tune.loguniform(dim.low, dim.high)
        elif dim.kind == "uniform":
            out[name] = tune.uniform(dim.low, dim.high)
        elif dim.kind == "int":
            out[name] = tune.randint(int(dim.low), int(dim.high) + 1)
        else:
            out[name] = tune.choice(list(dim.choices))
    return out


def trials_per_sample(study: Study) -> int:
    """Tune trials per configuration an Optuna or random search samples: one per seed."""
    return len(study.seeds)


def search_alg(study: Study, points: list[dict[str, Any]] | None = None, slots: int = 0):
    """Tune's searcher, at most `slots` trials at once (Tune's max_concurrent_trials does
    not reach its basic generator):

    - a grid: Tune's basic generator running exactly the listed points (every grid point
      crossed with the seeds, or an extension's new ones);
    - a random search: the basic generator; with several seeds each sample's random values
      are drawn once and kept over its seeds (`constant_grid_search`);
    - an Optuna search: Optuna; with several seeds wrapped in a SeedRepeater, which trains
      each configuration Optuna suggests once per seed and tells Optuna its mean over them.
    """
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if study.search == "grid":
        points = points if points is not None else study.grid_points()
        return BasicVariantGenerator(points_to_evaluate=[{"params": p} for p in points],
                                     max_concurrent=slots)
    if study.search == "random":
        return BasicVariantGenerator(max_concurrent=slots,
                                     constant_grid_search=len(study.seeds) > 1)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    seed = study.seeds[0]
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }
    from lfm_ray.study.optuna_storage import open_storage

    storage = open_storage(study)  # a journal file, a database the user gave, or memory
    objectives = study.objectives if len(study.objectives) > 1 else None
    optuna_search = OptunaSearch(
        space=DefineByRun(study.space, study.base.to_dict()),
        metric=objectives or study.metric,
        mode=[study.mode] * len(objectives) if objectives else study.mode,
        sampler=samplers[study.sampler](),
        study_name=study.name,
        storage=storage,
        # a warm start's points (lfm_ray.study.warm), enqueued as Optuna's first trials
        points_to_evaluate=[{"params/" + k: v for k, v in p.items()}
                            for p in study.warm_points] or None,
    )
    if len(study.seeds) == 1:
        return optuna_search
    from lfm_ray.study.seed_search import SeedRepeater

    return SeedRepeater(optuna_search, study.seeds, objectives or [study.metric])


class DefineByRun:
    """Optuna's define-by-run space: a conditional dimension is suggested only in trials
    whose earlier choices (or the base config) meet its `when`. A class, not a closure, so
    Tune can save it with the experiment state."""

    def __init__(self, space: dict[str, Dim], base: dict[str, Any]):
        self.space, self.base = space, base

    def __call__(self, trial) -> None:
        base = RunConfig.from_dict(self.base)
        chosen: dict[str, Any] = {}
        for name, dim in self.space.items():
            if dim.when and any(chosen.get(k, base.get(k)) != v for k, v in dim.when.items()):
                continue
            key = "params/" + name
            if dim.kind == "loguniform":
                chosen[name] = trial.suggest_float(key, dim.low, dim.high, log=True)
            elif dim.kind == "uniform":
                chosen[name] = trial.suggest_float(key, dim.low, dim.high)
            elif dim.kind == "int":
                chosen[name] = trial.suggest_int(key, int(dim.low), int(dim.high))
            else:
                chosen[name] = trial.suggest_categorical(key, list(dim.choices))
        return None


def scheduler(study: Study):
    if study.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", metric=study.metric, mode=study.mode,
                         max_t=max(1, study.total_epochs()), grace_period=1, reduction_factor=2)


def concurrency(study: Study) -> int:
    """Trials at once: what the cluster's CPUs and GPUs hold, capped by max_concurrent."""
    import ray

    rt = study.base.runtime
    total = ray.cluster_resources()
    workers = max(1, rt.num_workers)
    fits = [int(total.get("CPU", 1) // (workers * rt.cpus_per_worker))]
    if rt.gpus_per_worker > 0:
        fits.append(int(total.get("GPU", 0) // (workers * rt.gpus_per_worker) + 1e-9))
    n = max(1, min(fits))
    return min(n, study.max_concurrent) if study.max_concurrent else n
