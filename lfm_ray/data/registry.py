"""The data sets by name: each name's builder, the options it takes, and the options a
RunConfig gives it."""


from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Callable

from lfm_ray.data.base import LongTailDataset
from lfm_ray.data.cifar import build_cifar_lt
from lfm_ray.data.digits import build_digits_lt
from lfm_ray.data.fashion import build_fashion_lt
from lfm_ray.data.folder import build_folder
from lfm_ray.data.inat import build_inat2018
from lfm_ray.data.split_files import build_split_set
from lfm_ray.errors import LfmError, unknown_name


def _cifar(name: str) -> Callable[..., LongTailDataset]:
    def build(root=None, imbalance_factor: float = 100.0, seed: int = 0, download: bool = False):
        return build_cifar_lt(name, root, imbalance_factor=imbalance_factor, seed=seed,
                              download=download)
    return build


def _split_set(name: str) -> Callable[..., LongTailDataset]:
    def build(root=None):
        return build_split_set(name, root)
    return build


DATASETS: dict[str, Callable[..., LongTailDataset]] = {
    "fashion-lt": build_fashion_lt,
    "digits-lt": build_digits_lt,
    "cifar10-lt": _cifar("cifar10-lt"),
    "cifar100-lt": _cifar("cifar100-lt"),
    "imagenet-lt": _split_set("imagenet-lt"),
    "places-lt": _split_set("places-lt"),
    "inat2018": build_inat2018,
    "folder": build_folder,
}


def resolve_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every option of data set `name`, the given ones checked and the rest at their defaults.

    None means "the default". The node cache keys on this, so `seed=0` and no seed (whose
    default is 0) share one cache.
    """
    if name not in DATASETS:
        raise unknown_name("data set", name, list(DATASETS))
    params = {k: p for k, p in inspect.signature(DATASETS[name]).parameters.items() if k != "root"}
    for key, value in options.items():
        if key not in params:
            raise LfmError(f"data set {name!r} takes no option {key!r}; "
                           f"accepted: {', '.join(params) or 'none'}")
        if key == "imbalance_factor" and value is not None and not _number_at_least(value, 1):
            raise LfmError(f"imbalance_factor={value} is not valid; expected a number >= 1")
        if key == "seed" and value is not None and not (
                isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0):
            raise LfmError(f"seed={value!r} is not valid; expected an integer >= 0")
    resolved = {k: p.default for k, p in params.items()}
    resolved.update({k: v for k, v in options.items() if v is not None})
    return resolved


def _number_at_least(value: Any, low: float) -> bool:
    """A finite number >= low (NaN compares false to everything, so it is refused too)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and number >= low


def build_dataset(name: str, root=None, **options: Any) -> LongTailDataset:
    """The data set `name` (see DATASETS); options are the builder's keyword arguments."""
    resolved = resolve_options(name, options)  # checks the name first
    return DATASETS[name](root=root, **resolved)


def options_for(name: str, **candidates: Any) -> dict[str, Any]:
    """The candidates (seed, imbalance_factor, ...) that data set `name` takes, None dropped."""
    if name not in DATASETS:
        raise unknown_name("data set", name, list(DATASETS))
    accepted = inspect.signature(DATASETS[name]).parameters
    return {k: v for k, v in candidates.items() if k in accepted and v is not None}


def run_options(data) -> dict[str, Any]:
    """The builder options of a run's data section (DataConfig): seed and imbalance factor
    where the data set takes them, and max_count, which only some take (refused elsewhere
    rather than ignored)."""
    if data.max_count is not None and "max_count" not in inspect.signature(
            DATASETS.get(data.name, build_dataset)).parameters:
        takers = [n for n, b in DATASETS.items() if "max_count" in inspect.signature(b).parameters]
        raise LfmError(f"data.max_count={data.max_count} is not an option of data set "
                       f"{data.name!r}; data sets that take it: {', '.join(takers)}")
    return options_for(data.name, seed=data.seed, imbalance_factor=data.imbalance_factor,
                       max_count=data.max_count)


def has_validation_split(name: str, root=None) -> bool:
    """Whether data set `name` under `root` has a validation split, from its layout alone
    (no image is read): ImageNet-LT and Places-LT with their _val split file, a folder with
    images in val/ (a val/ without any is refused), iNat2018 always (its hold-out from
    train2018), fashion-lt always (held out from the official training images). The CIFAR sets
    and digits-lt have none."""
    from pathlib import Path

    from lfm_ray.data.split_files import SPLIT_SETS, find_split

    if name not in DATASETS:
        raise unknown_name("data set", name, list(DATASETS))
    if name in ("inat2018", "fashion-lt"):
        return True  # carved from the training images (lfm_ray.data.inat, .fashion)
    if root is None:
        return False
    root_path = Path(root).expanduser()
    if name in SPLIT_SETS:
        return find_split(root_path, SPLIT_SETS[name][0], "val") is not None
    if name == "folder":
        from lfm_ray.data.folder import has_val

        return has_val(root_path)  # a val/ without images is refused here
    return False
