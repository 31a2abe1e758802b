"""A study checked before Ray starts and before anything is written: one clear error for the
first problem (names, searches, schedulers, trackers, metrics, folders, each base config)."""

from __future__ import annotations

from lfm_ray.config import known_fields
from lfm_ray.contract import OBJECTIVE_KEYS
from lfm_ray.driver.launch import check_names
from lfm_ray.errors import LfmError, unknown_name
from lfm_ray.study.spec import (
    METHOD, SAMPLERS, SCHEDULERS, SEARCHES, SEED, TRACKERS, Study, check_storage, corner_points,
)
from lfm_ray.study.storage import check_folders, check_name


def validate(study: Study) -> None:
    """One clear error for the first problem, before Ray starts and before anything is written."""
    check_name(study.name)
    if study.search not in SEARCHES:
        raise unknown_name("search", study.search, SEARCHES)
    if study.scheduler not in SCHEDULERS:
        raise unknown_name("scheduler", study.scheduler, SCHEDULERS)
    if study.sampler not in SAMPLERS:
        raise unknown_name("Optuna sampler", study.sampler, SAMPLERS)
    for tracker in study.trackers:
        if tracker not in TRACKERS:
            raise unknown_name("tracker", tracker, TRACKERS)
    if study.share_stage1 and study.search != "grid":
        raise LfmError("a shared stage 1 needs a grid study (its trials are known in advance); "
                       f"this is a {study.search} search")
    if study.mode not in ("max", "min"):
        raise LfmError(f"mode {study.mode!r} is not valid; expected 'max' or 'min'")
    if study.max_concurrent is not None and study.max_concurrent < 1:
        raise LfmError(f"max_concurrent={study.max_concurrent} is not valid; expected an "
                       "integer >= 1 (or leave it out: as many as the resources allow)")
    if study.max_failures < 0:
        raise LfmError(f"max_failures={study.max_failures} is not valid; expected >= 0")
    for m in [study.metric, *study.objectives]:
        if m is not None and m not in OBJECTIVE_KEYS:
            raise unknown_name("metric", m, OBJECTIVE_KEYS)
    if study.scheduler == "asha" and len(study.objectives) > 1:
        raise LfmError("ASHA stops trials on one metric; use scheduler 'none' with several objectives")
    if len(study.objectives) > 1 and study.search != "optuna":
        raise LfmError("several objectives need search 'optuna' (its Pareto front)")
    if not study.seeds:
        raise LfmError("seeds is empty; give at least one seed")
    if len(set(study.seeds)) != len(study.seeds):
        raise LfmError(f"seeds {study.seeds} repeat a seed; give each seed once")
    if study.search != "grid" and study.scheduler == "asha" and len(study.seeds) > 1:
        raise LfmError(f"ASHA stops each trial on its own, so the seeds {study.seeds} of one "
                       "sampled configuration would end at different epochs and their mean "
                       "would mix budgets; give one seed with --scheduler asha, or drop ASHA")
    fields = set(known_fields())
    if study.search == "grid":
        if not study.grid:
            raise LfmError("the grid is empty; give at least one parameter with values")
        for name, values in study.grid.items():
            if not isinstance(values, (list, tuple)) or len(values) == 0:
                raise LfmError(f"grid parameter {name!r} has no values; give a non-empty list")
            if len(set(map(repr, values))) != len(values):
                raise LfmError(f"grid parameter {name!r} repeats a value: {list(values)}")
            if name == METHOD:
                missing = [v for v in values if v not in study.variants]
                if missing:
                    raise unknown_name("method", missing[0], list(study.variants))
                continue
            if name not in fields:
                raise unknown_name("study parameter", name, sorted(fields))
            if name == SEED:
                raise LfmError("give seeds with --seeds (the study's seeds), not as a grid "
                               "parameter")
    else:
        if not study.space:
            raise LfmError(f"search {study.search!r} needs a space; give at least one dimension")
        if study.num_samples < 1:
            raise LfmError(f"num_samples={study.num_samples} is not valid; expected >= 1")
        for name, dim in study.space.items():
            if name not in fields:
                raise unknown_name("study parameter", name, sorted(fields))
            dim.check(name)
            for key in (dim.when or {}):
                if key not in fields:
                    raise unknown_name(f"condition of {name}", key, sorted(fields))
    # Every value a trial could get must make a valid config with known names.
    for params in corner_points(study):
        cfg = study.config_for(params).validate()
        check_names(cfg)
    check_storage(study.storage_path, "storage path")
    check_storage(study.results_dir, "results directory")
    check_folders(study)
