"""One run's configuration: the only place defaults live.

A `RunConfig` holds everything one training needs. It is plain dataclasses, so it turns into
JSON and back (`to_dict` / `from_dict`), and studies change it by dotted names
(`stage1.lr`, `mix.method`, `mix.tau`). Units are stated beside each field.

`mix.alpha`, `mix.tau` and `mix.beta` are shorthands that set both stages at once: the
paper's ablations sweep one value for the whole run, while its Places-LT preset gives each
stage its own α.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lfm_ray.errors import LfmError, unknown_name


@dataclass
class DataConfig:
    name: str = "digits-lt"            # registry name, see lfm_ray.data.DATASETS
    root: str | None = None            # data root on disk (not needed for digits-lt)
    imbalance_factor: float | None = None  # n_max / n_min; None: the data set's default
    seed: int = 0                      # picks the long-tailed subset (not the training seed)
    cache_dir: str | None = None       # node-local uint8 image cache; None: ~/.cache/lfm-ray
    # Split that model selection reads (val_acc_* every epoch): auto | val | test; auto: val
    # where the data set has one, else test. Test (acc_*) is always the reported split.
    selection_split: str = "auto"


@dataclass
class ModelConfig:
    name: str = "tiny"                 # open_clip architecture, e.g. ViT-B-32; "tiny" for tests
    pretrained: str | None = None      # open_clip tag ("openai"), a weights file, or None
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    logit_scale: float | None = None   # s in z = s·cos; None: the loss's default (LOGIT_SCALE)
    cache_dir: str | None = None       # where open_clip caches weights; None: its default


@dataclass
class StageConfig:
    epochs: int = 20                   # passes over the training set
    lr: float = 2e-3                   # Adam learning rate at the start of the stage
    min_lr: float = 1e-5               # cosine annealing ends here
    alpha: float = 1.0                 # label-shift strength α (paper Eq. 2), >= 0
    tau: float = 0.05                  # local-sampling temperature τ (paper Eq. 1), > 0
    beta: float = 0.2                  # λ_x ~ Beta(beta, beta), > 0


@dataclass
class MixConfig:
    method: str = "lfm"                # none | mixup | remix | cutmix | lfm | concutmix
    remix_kappa: float = 3.0           # Remix κ (count ratio threshold)
    remix_tau: float = 0.5             # Remix τ_r (mixing-ratio threshold)
    concutmix_weight: float = 0.5      # ConCutMix: weight of the semantic label vs the area label


@dataclass
class LossConfig:
    name: str = "ce"                   # ce | balce | focal | ldam | mms
    focal_gamma: float = 2.0           # Focal γ
    ldam_max_margin: float = 0.5       # LDAM: largest class margin (cosine units)
    ldam_scale: float = 30.0           # LDAM: scale the margin is multiplied by
    mms_margin: float = 0.3            # MMS: margin·(1 − cos(f_T[y], f_T[k]))
    mms_temperature: float = 0.01      # MMS: softmax temperature (1/100)

    def params(self) -> dict[str, float]:
        """Keyword parameters of `lfm_ray.losses.build_loss` for this loss."""
        return {
            "focal": {"gamma": self.focal_gamma},
            "ldam": {"max_margin": self.ldam_max_margin, "scale": self.ldam_scale},
            "mms": {"margin": self.mms_margin, "temperature": self.mms_temperature},
        }.get(self.name, {})


@dataclass
class RuntimeConfig:
    batch_size: int = 32               # global batch (images per optimiser step, all workers)
    eval_batch_size: int = 256         # per worker
    num_workers: int = 1               # Ray Train workers (DDP ranks)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0       # fractions pack several one-worker trials on a GPU
    seed: int = 0                      # training seed (init, shuffling, mixing draws)
    zero_shot: bool = False            # evaluate the text classifier only, no training
    max_steps_per_epoch: int | None = None  # cap for smoke runs; None: full epochs
    threads: int | None = None         # torch CPU threads per worker; None: cpus_per_worker
    compile: bool | None = None        # torch.compile the image tower; None: on GPUs only
    # confusion.npz (C×C test counts and P) beside metrics.json and in checkpoints; None:
    # only for data sets of at most confusion.MAX_CLASSES (1,000) classes
    save_confusion: bool | None = None


# The authors' logit scales, so that a loss run with defaults reproduces theirs.
LOGIT_SCALE = {"ce": 1.0, "balce": 1.0, "focal": 1.0, "ldam": 30.0, "mms": 100.0}

SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "stage1": StageConfig,
    "stage2": StageConfig,
    "mix": MixConfig,
    "loss": LossConfig,
    "runtime": RuntimeConfig,
}
STAGE_SHORTHANDS = ("alpha", "tau", "beta")


def _default_stage2() -> StageConfig:
    return StageConfig(epochs=5, lr=1e-2, min_lr=1e-4)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=_default_stage2)
    mix: MixConfig = field(default_factory=MixConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    # ---- conversion -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        """Build from a nested dict (as `to_dict` writes) and/or dotted keys."""
        cfg = cls()
        nested = {k: v for k, v in raw.items() if "." not in k}
        dotted = {k: v for k, v in raw.items() if "." in k}
        for section, values in nested.items():
            if section not in SECTIONS:
                raise unknown_name("config section", section, list(SECTIONS))
            if not isinstance(values, dict):
                raise LfmError(f"config section {section!r} must be a mapping, got {values!r}")
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value)
        cfg.override(dotted)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise LfmError(f"config file {str(path)!r} does not exist")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                raw = yaml.safe_load(text) or {}
            else:
                raw = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - any parse error becomes one message
            raise LfmError(f"config file {str(path)!r} could not be parsed: {exc}") from None
        if not isinstance(raw, dict):
            raise LfmError(f"config file {str(path)!r} must hold a mapping of sections")
        return cls.from_dict(raw)

    def copy(self) -> "RunConfig":
        return copy.deepcopy(self)

    # ---- dotted access ----------------------------------------------------------------
    def set(self, dotted: str, value: Any) -> None:
        """Set one field by dotted name; `mix.alpha|tau|beta` set both stages."""
        section, _, key = dotted.partition(".")
        if section == "mix" and key in STAGE_SHORTHANDS:
            self.set(f"stage1.{key}", value)
            self.set(f"stage2.{key}", value)
            return
        if section not in SECTIONS or not key:
            raise unknown_name("config field", dotted, known_fields())
        target = getattr(self, section)
        fields = {f.name: f for f in dataclasses.fields(target)}
        if key not in fields:
            raise unknown_name("config field", dotted, known_fields())
        setattr(target, key, _coerce(dotted, fields[key], value))

    def get(self, dotted: str) -> Any:
        section, _, key = dotted.partition(".")
        if section == "mix" and key in STAGE_SHORTHANDS:
            return getattr(self.stage1, key)
        if section not in SECTIONS or not hasattr(getattr(self, section), key):
            raise unknown_name("config field", dotted, known_fields())
        return getattr(getattr(self, section), key)

    def override(self, values: dict[str, Any]) -> "RunConfig":
        for dotted, value in values.items():
            self.set(dotted, value)
        return self

    # ---- meaning ----------------------------------------------------------------------
    @property
    def logit_scale(self) -> float:
        if self.model.logit_scale is not None:
            return float(self.model.logit_scale)
        return LOGIT_SCALE.get(self.loss.name, 1.0)

    def validate(self) -> "RunConfig":
        """Raise one LfmError for the first bad value; names are checked by the registries."""
        for name in ("stage1", "stage2"):
            stage: StageConfig = getattr(self, name)
            _check(stage.epochs >= 0, f"{name}.epochs", stage.epochs, "an integer >= 0")
            _check(stage.lr > 0, f"{name}.lr", stage.lr, "a number > 0")
            _check(stage.min_lr >= 0, f"{name}.min_lr", stage.min_lr, "a number >= 0")
            _check(stage.alpha >= 0, f"{name}.alpha", stage.alpha, "a number >= 0")
            _check(stage.tau > 0, f"{name}.tau", stage.tau, "a number > 0")
            _check(stage.beta > 0, f"{name}.beta", stage.beta, "a number > 0")
        rt = self.runtime
        _check(rt.batch_size >= 1, "runtime.batch_size", rt.batch_size, "an integer >= 1")
        _check(rt.eval_batch_size >= 1, "runtime.eval_batch_size", rt.eval_batch_size, "an integer >= 1")
        _check(rt.num_workers >= 0, "runtime.num_workers", rt.num_workers, "an integer >= 0")
        _check(rt.gpus_per_worker >= 0, "runtime.gpus_per_worker", rt.gpus_per_worker, "a number >= 0")
        _check(rt.cpus_per_worker > 0, "runtime.cpus_per_worker", rt.cpus_per_worker, "a number > 0")
        if rt.num_workers > 1 and 0 < rt.gpus_per_worker < 1:
            raise LfmError(
                f"runtime.gpus_per_worker={rt.gpus_per_worker} with num_workers={rt.num_workers}: "
                "fractional GPUs are for one-worker trials (NCCL refuses two ranks on one GPU); "
                "use num_workers=1 or whole GPUs"
            )
        if rt.num_workers > 1:
            _check(
                rt.batch_size % rt.num_workers == 0, "runtime.batch_size", rt.batch_size,
                f"a multiple of num_workers={rt.num_workers} (it is the global batch)",
            )
        if rt.max_steps_per_epoch is not None:
            _check(rt.max_steps_per_epoch >= 1, "runtime.max_steps_per_epoch",
                   rt.max_steps_per_epoch, "an integer >= 1 or null")
        if self.data.imbalance_factor is not None:
            _check(self.data.imbalance_factor >= 1, "data.imbalance_factor",
                   self.data.imbalance_factor, "a number >= 1")
        _check(self.data.selection_split in ("auto", "val", "test"), "data.selection_split",
               self.data.selection_split, "'auto', 'val' or 'test'")
        if self.model.logit_scale is not None:
            _check(self.model.logit_scale > 0, "model.logit_scale", self.model.logit_scale, "a number > 0")
        _check(0 <= self.mix.concutmix_weight <= 1, "mix.concutmix_weight",
               self.mix.concutmix_weight, "a number in [0, 1]")
        _check(self.mix.remix_kappa >= 1, "mix.remix_kappa", self.mix.remix_kappa, "a number >= 1")
        _check(0 <= self.mix.remix_tau <= 1, "mix.remix_tau", self.mix.remix_tau, "a number in [0, 1]")
        _check(bool(self.model.templates) and all("{}" in t for t in self.model.templates),
               "model.templates", self.model.templates, "a non-empty list of strings with '{}'")
        return self


def known_fields() -> list[str]:
    names = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    return names + [f"mix.{k}" for k in STAGE_SHORTHANDS]


def _check(ok: bool, name: str, value: Any, accepted: str) -> None:
    if not ok:
        raise LfmError(f"{name}={value!r} is not valid; expected {accepted}")


def _coerce(dotted: str, fld: dataclasses.Field, value: Any) -> Any:
    """Turn CLI strings and JSON numbers into the field's type, with a clear error."""
    kind = str(fld.type)
    if value is None:
        if "None" in kind:
            return None
        raise LfmError(f"{dotted} may not be null")
    try:
        if kind.startswith("list"):
            if isinstance(value, str):
                return [value]
            return [str(v) for v in value]
        if isinstance(value, str) and value.strip().lower() in ("none", "null") and "None" in kind:
            return None
        if "bool" in kind:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind.startswith("int"):
            as_float = float(value)
            if not as_float.is_integer():
                raise ValueError(value)
            return int(as_float)
        if kind.startswith("float"):
            out = float(value)
            if math.isnan(out):
                raise ValueError(value)
            return out
        return str(value)
    except (TypeError, ValueError):
        expected = kind.replace(" | None", " or null")
        raise LfmError(f"{dotted}={value!r} is not valid; expected {expected}") from None


# Paper Table 6 (design.md). The batch is the global batch: 96 = 3 GPUs × 32.
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10-lt": {
        "data.name": "cifar10-lt", "model.name": "ViT-B-32", "model.pretrained": "openai",
        "stage1.epochs": 10, "stage1.lr": 1e-9, "stage1.min_lr": 1e-12,
        "stage2.epochs": 10, "stage2.lr": 5e-1, "stage2.min_lr": 5e-4,
        "runtime.batch_size": 32, "stage1.alpha": 1.0, "stage2.alpha": 1.0, "mix.tau": 0.05,
    },
    "cifar100-lt": {
        "data.name": "cifar100-lt", "model.name": "ViT-B-32", "model.pretrained": "openai",
        "stage1.epochs": 50, "stage1.lr": 1e-6, "stage1.min_lr": 1e-9,
        "stage2.epochs": 10, "stage2.lr": 1e-2, "stage2.min_lr": 1e-5,
        "runtime.batch_size": 32, "stage1.alpha": 1.0, "stage2.alpha": 1.0, "mix.tau": 0.05,
    },
    "imagenet-lt": {
        "data.name": "imagenet-lt", "model.name": "ViT-B-16", "model.pretrained": "openai",
        "stage1.epochs": 30, "stage1.lr": 5e-6, "stage1.min_lr": 5e-9,
        "stage2.epochs": 10, "stage2.lr": 1e-2, "stage2.min_lr": 1e-5,
        "runtime.batch_size": 96, "stage1.alpha": 1.0, "stage2.alpha": 1.0, "mix.tau": 0.05,
    },
    "places-lt": {
        "data.name": "places-lt", "model.name": "ViT-B-16", "model.pretrained": "openai",
        "stage1.epochs": 30, "stage1.lr": 1e-7, "stage1.min_lr": 1e-10,
        "stage2.epochs": 10, "stage2.lr": 5e-4, "stage2.min_lr": 5e-7,
        "runtime.batch_size": 96, "stage1.alpha": 1.25, "stage2.alpha": 1.5, "mix.tau": 1.0,
    },
}


def preset(name: str) -> RunConfig:
    """The paper's hyperparameters for one data set (seed 0, Adam, cosine per stage)."""
    if name not in PRESETS:
        raise unknown_name("preset", name, list(PRESETS))
    return RunConfig().override(PRESETS[name])
