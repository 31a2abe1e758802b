"""What a run's "auto" choices resolve to, recorded beside its settings (config.json's and
study.json's `resolved` section, `--dry-run`): the model family, the text encoder, LFM's
similarity source and where the class weights start."""

from __future__ import annotations

from lfm_ray.families import model_family
from lfm_ray.head_init import resolved_init
from lfm_ray.similarity import similarity_source
from lfm_ray.text import record


def resolved_choices(cfg) -> dict[str, str]:
    """What config.json and study.json record of a run beside its settings: the model family,
    the similarity source its LFM uses ('auto' resolved, file paths absolute) and where its
    class weights start ('auto' resolved, lfm_ray.head_init)."""
    return {"model.family": model_family(cfg.model.name), **record(cfg.model),
            "mix.similarity": similarity_source(cfg).resolved(),
            "model.classifier_init": resolved_init(cfg)}
