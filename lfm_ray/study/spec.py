"""What a study is: the trials it runs (a grid crossed with seeds, or a search space), what it
selects on and where it keeps results; and the checks made before anything starts.

Light on purpose (no Ray, pandas or torch), so the study scripts' `--help` stays fast.
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lfm_ray.config import ConfigLayers, RunConfig
from lfm_ray.errors import LfmError

ALWAYS_COLUMNS = ("data.name", "model.name", "loss.name", "mix.method")
SEARCHES = ("grid", "optuna", "random")
SCHEDULERS = ("none", "asha")
SAMPLERS = ("tpe", "gp", "cmaes", "random")
TRACKERS = ("tensorboard", "mlflow", "wandb")
METHOD = "method"  # the grid parameter that picks a named bundle from Study.variants
SEED = "runtime.seed"
DEFAULT_RESULTS_DIR = "runs"  # git-ignored: a user's studies never touch the committed results/
STORAGE_FOLDER = "ray"        # the default storage path inside a results folder


def default_storage(results_dir: str) -> str:
    """The default storage path: a `ray` folder inside the results folder."""
    if "://" in results_dir:
        return results_dir.rstrip("/") + "/" + STORAGE_FOLDER
    return str(Path(results_dir) / STORAGE_FOLDER)


# ---- search spaces -------------------------------------------------------------------------
@dataclass
class Dim:
    """One dimension of an Optuna or random search space.

    `when` makes it conditional (define-by-run): `Dim.uniform(0, 5, when={"loss.name":
    "focal"})` exists only in trials whose loss is focal.
    """

    kind: str                          # loguniform | uniform | int | choice
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    when: dict[str, Any] | None = None

    @classmethod
    def loguniform(cls, low: float, high: float, when: dict | None = None) -> "Dim":
        return cls("loguniform", float(low), float(high), when=when)

    @classmethod
    def uniform(cls, low: float, high: float, when: dict | None = None) -> "Dim":
        return cls("uniform", float(low), float(high), when=when)

    @classmethod
    def int(cls, low: int, high: int, when: dict | None = None) -> "Dim":
        return cls("int", low, high, when=when)

    @classmethod
    def choice(cls, choices: list[Any], when: dict | None = None) -> "Dim":
        return cls("choice", choices=tuple(choices), when=when)

    def check(self, name: str) -> None:
        if self.kind not in ("loguniform", "uniform", "int", "choice"):
            raise LfmError(f"space {name}: unknown kind {self.kind!r}; "
                           "known: choice, int, loguniform, uniform")
        if self.kind == "choice":
            if not self.choices:
                raise LfmError(f"space {name}: a choice needs at least one value")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise LfmError(f"space {name}: needs low < high, got {self.low!r}, {self.high!r}")
        elif self.kind == "loguniform" and self.low <= 0:
            raise LfmError(f"space {name}: loguniform needs low > 0, got {self.low!r}")

    def values_to_check(self) -> list[Any]:
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "low": self.low, "high": self.high,
                "choices": list(self.choices), "when": self.when}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Dim":
        return cls(raw["kind"], raw.get("low"), raw.get("high"),
                   tuple(raw.get("choices") or ()), raw.get("when"))


def parse_dim(text: str) -> Dim:
    """`loguniform:0.002:31.25`, `uniform:0:2`, `int:1:10` or `choice:ce,mms` (CLI form)."""
    kind, _, rest = text.partition(":")
    try:
        if kind == "choice":
            return Dim.choice([literal(v) for v in rest.split(",") if v != ""])
        low, high = rest.split(":")
        return Dim(kind, float(low), float(high))
    except ValueError:
        raise LfmError(f"search dimension {text!r} is not valid; expected loguniform:LOW:HIGH, "
                       "uniform:LOW:HIGH, int:LOW:HIGH or choice:A,B,...") from None


def literal(text: str) -> Any:
    """A command-line value as the number it spells, else the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


# ---- the study -----------------------------------------------------------------------------
@dataclass
class Study:
    """A study's specification. `run_study(study)` runs it; `load_study(path)` reads results."""

    name: str
    base: RunConfig = field(default_factory=RunConfig)
    search: str = "grid"                 # grid | optuna | random
    grid: dict[str, list[Any]] = field(default_factory=dict)   # dotted name -> values
    space: dict[str, Dim] = field(default_factory=dict)        # optuna / random
    seeds: list[int] = field(default_factory=lambda: [0])      # crossed with the grid
    num_samples: int = 8                 # optuna / random: trials to run
    # What the study selects on (best.json, ASHA, Optuna); None: val_acc_all where the data
    # set has a validation split, else acc_all (test). Test figures are reported beside it.
    metric: str | None = None
    mode: str = "max"
    objectives: list[str] = field(default_factory=list)  # >1: multi-objective Optuna
    # Named bundles of settings swept as one parameter, "method" (e.g. "LFM + MMS" ->
    # {"loss.name": "mms", "mix.method": "lfm"}): the rows of the paper's comparison tables.
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    scheduler: str = "none"              # none | asha (on the global epoch)
    sampler: str = "tpe"                 # Optuna sampler
    # Optuna's storage: a database URL; None: a journal file in the study's storage folder
    # (lfm_ray.study.optuna_storage), in memory for a cloud storage path
    optuna_storage: str | None = None
    # trials.csv, best.json, study.json and the report go to <results_dir>/<name> (runs/ is
    # git-ignored; studies/run_all.py writes the committed demo results to results/)
    results_dir: str = DEFAULT_RESULTS_DIR
    # Ray's state (Tune experiments, checkpoints): <storage_path>/<name>/, a local path or a
    # URI; None: <results_dir>/ray
    storage_path: str | None = None
    max_concurrent: int | None = None    # cap on concurrent trials; None: what resources allow
    max_failures: int = 1                # retries of a crashed trial from its checkpoint
    address: str | None = None           # Ray cluster; None: RAY_ADDRESS or a local instance
    prepare_data: bool = True            # build the node data cache in the driver first
    callbacks: list[Any] = field(default_factory=list)  # extra ray.tune.Callback objects
    trackers: list[str] = field(default_factory=list)   # tensorboard | mlflow | wandb
    # How `base` was made (preset, config file, script settings, flags). With it, a swept
    # data set gets its own paper preset; without it (a Study built in Python), `base` is used
    # as it is for every trial.
    layers: ConfigLayers | None = None
    # The paper's ablation protocol: trials that agree on everything stage 1 depends on
    # (stage1_key) share one stage-1 run and branch their stage 2 from its checkpoint.
    share_stage1: bool = False
    protocol: str | None = None          # "branch" | "full" for the α and τ sweeps: recorded
    verbose: bool = False                # Ray's own start-up and per-report lines
    # An Optuna search's first points: an earlier study's best ("STUDY" or "STUDY:K"; see
    # lfm_ray.study.warm), resolved into `warm_points` and `warm_record` when the study starts
    warm_start: str | None = None
    # Stop launching trials once the measured cost (GPU-hours, or trial-hours without GPUs;
    # lfm_ray.study.cost) would pass this; None: no limit
    budget_hours: float | None = None
    command: list[str] = field(default_factory=lambda: list(sys.argv))
    called_by: list[str] | None = None   # the command that ran this study's script, if another
    # Tune's ResultGrid of the last run_study (not part of the specification).
    result_grid: Any = field(default=None, repr=False, compare=False)
    warm_points: list[dict[str, Any]] = field(default_factory=list, compare=False)
    warm_record: dict[str, Any] | None = field(default=None, compare=False)
    # "val" or "test", found by `resolve_selection` from the data sets (not set by hand).
    selection_split: str | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.storage_path is None:
            self.storage_path = default_storage(self.results_dir)

    @property
    def result_dir(self) -> Path:
        return Path(self.results_dir) / self.name

    @property
    def experiment_path(self) -> str:
        """The study's own folder under the storage path (its Tune experiments live in it)."""
        return join_path(self.storage_path, self.name)

    @property
    def swept(self) -> list[str]:
        names = list(self.grid) if self.search == "grid" else list(self.space)
        if self.search == "grid" or len(self.seeds) > 1:
            names.append(SEED)
        return list(dict.fromkeys(names))

    def config_for(self, params: dict[str, Any]) -> RunConfig:
        """One trial's RunConfig: its base (a swept data set's own preset where the study knows
        its layers), then the trial's method bundle, then its swept values."""
        if self.layers is not None and "data.name" in params:
            base = self.layers.resolve(dataset=str(params["data.name"]))
        else:
            base = self.base
        return config_for(base.to_dict(), self.variants, params, names_from=base)

    def datasets(self) -> list[str]:
        """Every data set the study trains on."""
        swept = self.grid.get("data.name") if self.search == "grid" else None
        if swept is None and "data.name" in self.space:
            swept = list(self.space["data.name"].choices)
        return [str(d) for d in swept] if swept else [self.base.data.name]

    def base_configs(self) -> dict[str, RunConfig]:
        """The base configuration of each data set's trials (before swept values)."""
        return {d: self.config_for({"data.name": d}) for d in self.datasets()}

    def grid_points(self) -> list[dict[str, Any]]:
        """Every trial of a grid study: each combination of grid values, crossed with seeds."""
        combos = itertools.product(*self.grid.values()) if self.grid else [()]
        return [{**dict(zip(self.grid, combo)), SEED: seed}
                for combo in combos for seed in self.seeds]

    def total_epochs(self, params: dict[str, Any] | None = None) -> int:
        cfg = self.config_for(params or {})
        return cfg.stage1.epochs + cfg.stage2.epochs


def config_for(base: dict[str, Any], variants: dict[str, dict[str, Any]],
               params: dict[str, Any], names_from: RunConfig | None = None) -> RunConfig:
    """One trial's config from the base's dict, its method bundle and its swept values;
    `names_from` (the base as a RunConfig) keeps the names its values were given by, so a
    bad `mix.tau` is named as given."""
    cfg = RunConfig.from_dict(base)
    if names_from is not None:
        cfg.keep_given_names(names_from)
    if METHOD in params:
        cfg.override(variants[params[METHOD]])
    return cfg.override({k: v for k, v in params.items() if k != METHOD})


def join_path(root: str, name: str) -> str:
    if "://" in root:
        return root.rstrip("/") + "/" + name
    return str(Path(root).resolve() / name)


def resolve_selection(study: Study) -> str:
    """Set the study's selection split (val where its data sets have one, else test) and its
    metric (default val_acc_all or acc_all); refuse a metric on the other split, and data
    sets that would select on different splits. Reads the data sets' layout only."""
    from lfm_ray.data import has_validation_split
    from lfm_ray.contract import ACCURACY_KEYS, resolve_selection_split, selection_metric

    splits = {}
    for name, cfg in study.base_configs().items():
        has_val = has_validation_split(cfg.data.name, cfg.data.root)
        splits[name] = resolve_selection_split(cfg.data.selection_split, has_val, name)
    if len(set(splits.values())) > 1:
        listed = ", ".join(f"{d}: {s}" for d, s in splits.items())
        raise LfmError(f"the study's data sets would select on different splits ({listed}); "
                       "a study selects on one split: set data.selection_split test for all, "
                       "or study them separately")
    split = next(iter(splits.values()))
    metric = study.metric or selection_metric("acc_all", split)
    if split == "val" and metric in ACCURACY_KEYS:
        raise LfmError(f"metric {metric!r} would select on the test split this study reports; "
                       f"its data has a validation split: select on {selection_metric(metric, split)!r} "
                       "(the default), or set data.selection_split test")
    if split == "test" and metric.startswith("val_"):
        raise LfmError(f"metric {metric!r} needs a validation split, which "
                       f"{', '.join(splits)} lacks; select on {metric[4:]!r} (test)")
    study.metric, study.selection_split = metric, split
    return split


def selection_note(study: Study) -> str:
    """What the study selects on, and on which split it reports (banner, study.json, report)."""
    if study.selection_split == "val":
        return (f"selected on {study.metric} (the validation split); test figures (acc_*) "
                "reported beside it")
    if any(c.data.selection_split == "test" for c in study.base_configs().values()):
        return (f"selected on {study.metric} (test): selected on test, as "
                "data.selection_split test chose (any validation split is not used)")
    return (f"selected on {study.metric} (test): selected on test: this data set has no "
            "validation split")


def corner_points(study: Study) -> list[dict[str, Any]]:
    if study.search == "grid":
        points = [dict(zip(study.grid, combo)) for combo in itertools.product(*study.grid.values())]
    else:
        points = [{name: v} for name, dim in study.space.items() for v in dim.values_to_check()]
    return [{**p, SEED: s} for p in points for s in study.seeds[:1]]


def check_storage(path: str, what: str) -> None:
    """A URI's scheme and credentials, or a local path that is, or can become, a writable
    directory; nothing is created."""
    if "://" in path:
        try:
            import pyarrow.fs

            pyarrow.fs.FileSystem.from_uri(path)
        except Exception as exc:  # noqa: BLE001 - any scheme or credential problem
            raise LfmError(f"{what} {path!r} cannot be used: {exc}") from None
        return
    p = Path(path).expanduser().absolute()
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise LfmError(f"{what} {path!r} cannot be written: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LfmError(f"{what} {path!r} cannot be written: no write permission in {existing}")
