"""Long-tailed data sets: a registry by name, class counts and shot groups, the node cache.

    build_dataset("fashion-lt")                    # embedded (the default), no files needed
    build_dataset("digits-lt")                     # embedded, tiny (fast tests)
    build_dataset("cifar100-lt", root="/data", imbalance_factor=100)
    build_dataset("imagenet-lt", root="/data/imagenet")
"""

from lfm_ray.data.base import ImageList, LongTailDataset
from lfm_ray.data.cache import ArraySet, load_arrays
from lfm_ray.data.counts import long_tail_counts, shot_groups
from lfm_ray.data.fingerprint import data_fingerprint, run_data_fingerprint
from lfm_ray.data.registry import (
    DATASETS, build_dataset, has_validation_split, options_for, resolve_options, run_options,
)

__all__ = [
    "DATASETS", "ArraySet", "ImageList", "LongTailDataset", "build_dataset", "data_fingerprint",
    "has_validation_split", "load_arrays", "long_tail_counts", "options_for",
    "resolve_options", "run_options", "run_data_fingerprint", "shot_groups",
]
