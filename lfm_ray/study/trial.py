"""One study trial: a Tune function trainable that runs one TorchTrainer.

The trial's own config holds only its swept values (`config["params"]`), so Tune's table and
files show what varies; everything else travels in a `TrialPlan` bound with
`tune.with_parameters` (stored once in Ray's object store, not in every trial's config).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from lfm_ray.config import RunConfig
from lfm_ray.study.spec import Study, config_for

PLAN_FILE = "lfm_ray_plan.json"  # a TrialPlan beside Tune's files in the experiment folder


@dataclass
class TrialPlan:
    """What every trial of a study shares: the base config of each data set it trains on,
    its method bundles, where Ray Train keeps worker-group runs, and the retry budget."""

    bases: dict[str, dict[str, Any]]   # data set name -> base RunConfig dict
    default_dataset: str
    variants: dict[str, dict[str, Any]]
    train_storage: str
    max_failures: int
    verbose: bool = False
    # "both" stages; "stage1" only (a shared stage 1); a branch starts stage 2 from the
    # shared stage-1 checkpoint of its stage1_key (`stage1_checkpoints`, not None).
    stage: str = "both"
    stage1_checkpoints: dict[str, str] | None = None

    @classmethod
    def of(cls, study: Study, stage: str = "both",
           stage1_checkpoints: dict[str, str] | None = None) -> "TrialPlan":
        from lfm_ray.study.storage import train_storage

        return cls(bases={d: c.to_dict() for d, c in study.base_configs().items()},
                   default_dataset=study.base.data.name, variants=study.variants,
                   train_storage=train_storage(study),
                   max_failures=study.max_failures, verbose=study.verbose, stage=stage,
                   stage1_checkpoints=dict(stage1_checkpoints)
                   if stage1_checkpoints is not None else None)

    def stage_extra(self, cfg: RunConfig) -> dict[str, Any]:
        """The train loop's options for this trial's part in a shared-stage-1 study."""
        if self.stage == "stage1":
            return {"stop_after_stage1": True}
        if self.stage1_checkpoints is None:
            return {}
        from lfm_ray.errors import LfmError
        from lfm_ray.stage1 import stage1_key

        key = stage1_key(cfg)
        if key not in self.stage1_checkpoints:
            raise LfmError(f"the shared stage-1 checkpoint of this trial (stage1_key {key}) "
                           "is missing: its stage-1 run failed or has not run; run the study "
                           "again to retry it and then this branch")
        return {"stage1_from": self.stage1_checkpoints[key]}

    def config_for(self, params: dict[str, Any]) -> RunConfig:
        base = self.bases[str(params.get("data.name", self.default_dataset))]
        return config_for(base, self.variants, params)


def trial_driver(config: dict[str, Any], plan: TrialPlan) -> None:
    """Runs in a Tune trial: one TorchTrainer run of the trial's config.

    A worker-group trial reports through TuneReportCallback; restored, it reuses its Train
    run name, so Ray Train resumes it from its latest checkpoint in `train_storage`. A trial
    with num_workers=0 trains right here and reports to Tune itself; restored, it resumes
    from the checkpoint Tune kept."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from lfm_ray.driver.launch import make_trainer, quiet_ray_logs, unwrap_training_error

    if not plan.verbose:
        quiet_ray_logs()
    cfg = plan.config_for(config["params"])
    trial_id = ray.tune.get_context().get_trial_id()
    in_trial = cfg.runtime.num_workers == 0
    with contextlib.ExitStack() as stack:
        extra: dict[str, Any] = plan.stage_extra(cfg)
        if in_trial:
            # Ray logs a notice about local mode for every run; the study's banner says it once.
            logging.getLogger("ray.train.v2.api.config").setLevel(logging.WARNING)
            extra["report_to_tune"] = True
            checkpoint = ray.tune.get_checkpoint()
            if checkpoint is not None:
                extra["resume_from"] = stack.enter_context(checkpoint.as_directory())
            callbacks: list[Any] = []
        else:
            callbacks = [TuneReportCallback()]
        trainer = make_trainer(
            cfg, name=f"train_{trial_id}", storage_path=plan.train_storage,
            callbacks=callbacks, extra=extra, max_failures=plan.max_failures,
        )
        try:
            trainer.fit()
        except Exception as exc:  # noqa: BLE001 - keep the worker's own message for the table
            inner = unwrap_training_error(exc)
            if inner is not exc:
                raise RuntimeError(f"{type(inner).__name__}: {inner}") from None
            raise


def trial_resources(study: Study) -> dict[str, float]:
    """What a trial's own actor holds. A worker-group trial only waits on its TorchTrainer,
    whose workers hold the CPUs and GPUs, so it asks for a token of memory and no CPU a
    worker needs; a trial that trains in its own process (num_workers=0) holds one
    worker's CPUs and GPUs itself."""
    rt = study.base.runtime
    if rt.num_workers == 0:
        out = {"cpu": rt.cpus_per_worker}
        if rt.gpus_per_worker > 0:
            out["gpu"] = rt.gpus_per_worker
        return out
    return {"cpu": 0, "memory": 1024}


class TrialNamer:
    """Trial names after the study and the trial's swept values ("tau_sweep_mix.tau=0.05_seed=1");
    folder names add Tune's trial id, which keeps them unique. A class, so Tune can save it."""

    def __init__(self, study_name: str, folder: bool = False):
        self.study_name, self.folder = study_name, folder

    def __call__(self, trial: Any) -> str:
        params = (trial.config or {}).get("params") or {}
        parts = [self.study_name]
        for key, value in params.items():
            short = "seed" if key == "runtime.seed" else key
            parts.append(f"{short}={_short(value)}")
        name = "_".join(parts)
        if self.folder:
            safe = "".join(c if c.isalnum() or c in "._=-" else "-" for c in name)[:120]
            return f"{safe}_{trial.trial_id}"
        return name


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
