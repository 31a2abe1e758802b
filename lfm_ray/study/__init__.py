"""Studies: a Ray Tune experiment whose trials each run one TorchTrainer.

    spec.py    what a study is (Study, Dim) and the checks made before anything starts
    search.py  how Tune explores it: parameters, Optuna, ASHA, concurrency
    trial.py   one trial: a Tune function trainable running one TorchTrainer
    tables.py  trials.csv and best.json, kept current as trials end
    record.py  study.json, and what a rerun under the same name may do
    storage.py where a study's files live, whose a folder is, what a restart removes
    run.py     run_study: check, decide new / resume / extend / restart, run, write tables
    warm.py    an Optuna search started from an earlier study's best points
    cost.py    a study's cost: the estimate before, the measured cost after
    budget.py  --budget-hours: no new trial once the measured cost would pass it

The specification imports nothing heavy; the running parts load Ray and pandas on first use,
so a study script's --help stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from lfm_ray.study.spec import (
    METHOD, SAMPLERS, SCHEDULERS, SEARCHES, TRACKERS, Dim, Study, config_for, literal,
    parse_dim,
)

_LAZY = {
    "run_study": "run", "plan_study": "run", "check_study": "run",
    "best_configs": "tables", "trial_row": "tables", "trial_rows": "tables",
    "write_tables": "tables", "trial_resources": "trial", "trial_driver": "trial",
    "TrialPlan": "trial", "load_study_spec": "record", "study_meta": "record",
    "plan_rerun": "record", "request": "record", "StudyInterrupted": "run",
    "validate": "checks",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"lfm_ray.study.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lfm_ray.study' has no attribute {name!r}")


__all__ = ["METHOD", "SAMPLERS", "SCHEDULERS", "SEARCHES", "TRACKERS", "Dim", "Study",
           "config_for", "literal", "parse_dim", *_LAZY]
