"""lfm-ray: studies of Local Feature Mixup (text-guided mixup) for long-tailed CLIP fine-tuning.

Data flows one way: data → model and mixing → trainer → study → analysis. The library never
imports its command line (`lfm_ray.cli`).

The Python API for notebooks (each name loads its module on first use, so `import lfm_ray`
stays light):

    from lfm_ray import RunConfig, Study, run_study, load_study, write_report

    study = Study(name="taus", base=RunConfig().override({"stage1.epochs": 5}),
                  grid={"mix.tau": [0.01, 0.05, 0.25]}, seeds=[0, 1])
    table = run_study(study)          # the trials table (pandas); study.result_grid: Tune's
    results = load_study("results/taus")   # a StudyResults: trials, epochs, meta
    write_report("results/taus")      # results/taus/report.html
"""

from __future__ import annotations

import importlib
from typing import Any

from lfm_ray.errors import LfmError

__version__ = "0.1.0"

_API = {
    "RunConfig": "lfm_ray.config",
    "ConfigLayers": "lfm_ray.config",
    "Study": "lfm_ray.study",
    "Dim": "lfm_ray.study",
    "run_study": "lfm_ray.study",
    "plan_study": "lfm_ray.study",
    "load_study": "lfm_ray.analysis",
    "StudyResults": "lfm_ray.analysis",
    "write_report": "lfm_ray.analysis",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'lfm_ray' has no attribute {name!r}")


__all__ = ["LfmError", "__version__", *_API]
