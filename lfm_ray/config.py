"""One run's configuration: the only place defaults live.

A `RunConfig` holds everything one training needs. It is plain dataclasses, so it turns into
JSON and back (`to_dict` / `from_dict`), and studies change it by dotted names
(`stage1.lr`, `mix.method`, `mix.tau`). Each field's help, unit, bounds and accepted names
are declared beside its default (`setting`); --help and `RunConfig.validate` read them there.

`mix.alpha`, `mix.tau` and `mix.beta` are shorthands that set both stages at once: the
paper's ablations sweep one value for the whole run, while its Places-LT preset gives each
stage its own α. Within one layer (one set of flags, one file) a stage's own field wins over
the shorthand, whatever their order; a higher layer's shorthand sets both stages.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from lfm_ray.errors import LfmError, unknown_name


def setting(default: Any, help: str, *, unit: str | None = None,
            at_least: float | None = None, above: float | None = None,
            at_most: float | None = None, below: float | None = None,
            choices: tuple[str, ...] | dict[str, tuple[str, ...]] | None = None,
            registry: str | None = None, null: str | None = None, note: str = "") -> Any:
    """A config field: its default and, in its metadata, everything said about it (the one
    place a field is described), which `--help`, the docs and `RunConfig.validate` read.

    help: meaning; unit: what a number counts (px, epochs); at_least/above and at_most/below:
    closed and open bounds of a number; choices: the accepted names (per section where the
    sections sharing a dataclass differ: {"stage1": ..., "stage2": ...}); registry: the table
    that checks the names itself (with its own message), so validation leaves them to it;
    null: what None means, for the message; note: said after the accepted values in a
    message. A list default is copied per instance."""
    bounds = {"at_least": at_least, "above": above, "at_most": at_most, "below": below}
    metadata = {"help": help, "unit": unit, "choices": choices, "registry": registry,
                "null": null, "note": note, **{k: v for k, v in bounds.items() if v is not None}}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# Closed sets of names. The registries hold the builders (lfm_ray.data.DATASETS,
# lfm_ray.mixing.MIXERS, lfm_ray.losses.LOSSES, lfm_ray.text.ENCODERS; a test keeps these equal
# to them), so --help needs no heavy import.
DATASET_NAMES = ("fashion-lt", "digits-lt", "cifar10-lt", "cifar100-lt", "imagenet-lt",
                 "places-lt", "inat2018", "folder")
MIX_METHODS = ("none", "mixup", "remix", "cutmix", "lfm", "concutmix")
LOSS_NAMES = ("ce", "balce", "focal", "ldam", "mms", "cb", "grw", "lade")
TEXT_ENCODERS = ("auto", "clip", "glove", "none")
# Stage 1's fine-tuning modes (lfm_ray.finetune.MODES holds their builders) and stage 2's one.
FINETUNE_MODES = ("full", "classifier", "bitfit", "lora", "adaptformer", "vpt", "ssf")
STAGE2_FINETUNE = "proj"
# The size fields of the lightweight modes, and the mode each belongs to.
FINETUNE_SIZES = {"lora_rank": "lora", "adapter_dim": "adaptformer", "vpt_length": "vpt"}
TTA_MODES = ("none", "flip", "fivecrop")
# How an epoch draws its images (lfm_ray.sampling.SAMPLERS holds the draws).
SAMPLERS = ("instance-balanced", "class-balanced", "square-root")
# Where trained class weights start (lfm_ray.head_init): auto is text for a CLIP model and
# the head's own initialisation for a timm model.
CLASSIFIER_INITS = ("auto", "text", "class-mean", "linear-probe")
SELECTION_SPLITS = ("auto", "val", "test")
# ---- category extrapolation ("Learning from Neighbors", Zhao et al., CVPR 2025) -------------
# Auxiliary classes train beside the target classes, each with its own head row, and are
# dropped before every prediction (lfm_ray.extrapolation). Off while aux.root is None.
AUX_SILENCE = ("none", "neighbours", "neighbours+aux")
SILENCING_LOSSES = ("ce", "balce")  # the softmax cross-entropies neighbour silencing applies to
# `lfm-ray aux` (lfm_ray.curation): k neighbours for the largest target class, at most max_k
# for any; an image is kept when its cosine to its class prototype is in [min_cos, max_cos]
# (the paper's 0.7 and 0.98).
AUX_CURATION = {"k": 3, "max_k": 10, "min_cos": 0.7, "max_cos": 0.98}


@dataclass
class DataConfig:
    name: str = setting("fashion-lt", "registry name, see lfm_ray.data.DATASETS",
                        choices=DATASET_NAMES, registry="lfm_ray.data.DATASETS")
    root: str | None = setting(None, "data root on disk (not needed for fashion-lt and digits-lt)")
    imbalance_factor: float | None = setting(None, "n_max / n_min; None: the data set's default",
                                             at_least=1, null="the data set's default")
    max_count: int | None = setting(None, "n_max, the largest class's training images (fashion-"
                                          "lt); None: the data set's default", unit="images",
                                    at_least=1, null="the data set's default")
    seed: int = setting(0, "picks the long-tailed subset (not the training seed)", at_least=0)
    cache_dir: str | None = setting(None, "node-local uint8 image cache; None: ~/.cache/lfm-ray")
    selection_split: str = setting(
        "auto", "split that model selection reads (val_acc_* every epoch); auto: val where the "
                "data set has one, else test. Test (acc_*) is always the reported split",
        choices=SELECTION_SPLITS)


@dataclass
class ModelConfig:
    name: str = setting("tiny", "open_clip architecture, e.g. ViT-B-32; \"tiny\" for tests")
    pretrained: str | None = setting(None, "open_clip tag (\"openai\"), a weights file, or None")
    # frozen text encoder of the class features (lfm_ray/text.py): auto (clip for CLIP models,
    # none for timm models) | clip (the CLIP model's own tower) | glove (GloVe word vectors) |
    # none (a timm model's linear head)
    text: str = setting("auto", "class features", choices=TEXT_ENCODERS,
                        registry="lfm_ray.text.ENCODERS")
    # Checked by `_check_templates` (each needs its {}), not by bounds.
    templates: list[str] = setting(["a photo of a {}"], "prompt templates, {} the class name; "
                                                        "several are averaged (an ensemble); "
                                                        "CLIP's tower only")
    logit_scale: float | None = setting(None, "s in z = s·cos; None: the loss's default "
                                              "(LOGIT_SCALE)", above=0,
                                        null="the loss's default")
    cache_dir: str | None = setting(None, "where open_clip caches weights; None: its default")
    image_size: int | None = setting(None, "timm models only: square input size; None: the "
                                           "model's own", unit="px", at_least=1,
                                     null="the model's own input size")
    # Where trained class weights start (stage1.finetune classifier; a timm model's stage-1
    # head): auto (text for CLIP, timm's own init for timm) | text | class-mean | linear-probe
    classifier_init: str = setting("auto", "start of trained class weights: auto, text, class-"
                                           "mean (the frozen tower's class means) or linear-probe",
                                   choices=CLASSIFIER_INITS)


@dataclass
class StageConfig:
    epochs: int = setting(20, "passes over the training set", unit="epochs", at_least=0)
    lr: float = setting(2e-3, "Adam learning rate at the start of the stage", above=0)
    min_lr: float = setting(1e-5, "cosine annealing ends here", at_least=0)
    alpha: float = setting(1.0, "label-shift strength α (paper Eq. 2)", at_least=0)
    tau: float = setting(0.05, "local-sampling temperature τ (paper Eq. 1)", above=0)
    beta: float | None = setting(None, "λ ~ Beta(beta, beta); None: the mixing method's own "
                                       "law (MIX_BETA)", above=0, null="the method's own law")
    # What the stage trains (lfm_ray/finetune.py). Stage 1: full (the whole image tower),
    # classifier (class weights, initialised as model.classifier_init says; the tower frozen),
    # bitfit (the tower's biases), or on a ViT tower lora, adaptformer, vpt or ssf. Stage 2:
    # proj (W_I).
    finetune: str = setting("full", "what the stage trains; stage 2 trains W_I only (proj)",
                            choices={"stage1": FINETUNE_MODES, "stage2": (STAGE2_FINETUNE,)})
    # Sizes of the lightweight modes, None for LIFT's defaults; LIFT's rule for a LoRA rank or
    # an adapter width is 2^max(0, floor(log2(C / (2 · blocks)))) for C classes.
    lora_rank: int | None = setting(None, "lora: rank r of ΔW on q and v, scaled 1/r; None: "
                                          "LIFT's", at_least=1, null="LIFT's default")
    adapter_dim: int | None = setting(None, "adaptformer: bottleneck width per block; None: "
                                            "LIFT's", at_least=1, null="LIFT's default")
    vpt_length: int | None = setting(None, "vpt: learned tokens added to the input; None: 10 "
                                           "(LIFT's)", unit="tokens", at_least=1,
                                     null="LIFT's default")
    # Which images an epoch draws (lfm_ray/sampling.py): instance-balanced (a shuffle of the
    # training set), class-balanced (class uniform, then an image of it) or square-root (class
    # ∝ √n_k); LFM's first sample is the paper's uniform draw, so LFM refuses the other two.
    sampler: str = setting("instance-balanced", "images an epoch draws: instance-balanced (a "
                                                "shuffle), class-balanced, square-root (class ∝ "
                                                "√n_k)", choices=SAMPLERS)


@dataclass
class MixConfig:
    method: str = setting("lfm", "the mixing method", choices=MIX_METHODS,
                          registry="lfm_ray.mixing.MIXERS")
    remix_kappa: float = setting(3.0, "Remix κ (count ratio threshold)", at_least=1)
    remix_tau: float = setting(0.5, "Remix τ_r (mixing-ratio threshold)", at_least=0, at_most=1)
    # ConCutMix's target is ρ·ŷ_sem + (1 − ρ)·ỹ_area, ρ = ω·log(λN_a + (1 − λ)N_b) / Σ_k log N_k;
    # None below: the data set's setting in CONCUTMIX_SETTINGS.
    concutmix_omega: float | None = setting(None, "ConCutMix ω (scales ρ)", at_least=0,
                                            null="the data set's")
    concutmix_topk: int | None = setting(None, "ConCutMix k nearest class centres in ŷ_sem",
                                         at_least=1, null="the data set's")
    concutmix_prob: float = setting(0.5, "probability that a batch is cut-mixed at all",
                                    at_least=0, at_most=1)
    concutmix_warmup: float | None = setting(None, "fraction of a stage's epochs with ỹ_area "
                                                   "alone", at_least=0, at_most=1,
                                             null="the data set's")
    # Where LFM's class similarity S comes from (P = softmax(S/τ)), see lfm_ray/similarity.py,
    # which checks the source (its own message).
    similarity: str = setting("auto", "LFM's S: auto (text for CLIP models, image-prototypes for "
                                      "timm models) | text | text:MODEL[:PRETRAINED] | image-"
                                      "prototypes | taxonomy[:FILE] | file:PATH | uniform")


# The mixing methods' own laws of λ ~ Beta(β, β), used when the stage's β is None: Mixup and
# Remix as the LFM authors' code runs them (rsamf/text-guided-mixup), CutMix as its authors'
# runs (clovaai/CutMix-PyTorch, --beta 1.0), LFM as the LFM authors' code (their paper's
# Algorithm 2 says 0.5), ConCutMix as its authors' code. "none" draws nothing.
MIX_BETA: dict[str, float | None] = {
    "none": None, "mixup": 1.0, "remix": 0.5, "cutmix": 1.0, "lfm": 0.2, "concutmix": 1.0,
}

# ConCutMix's settings per data set (PanHaulin/ConCutMix, run_files/), used where the
# mix.concutmix_* field is None. ω is their --scaling_factor a/b, k their --topk, the
# warm-up their --l_d_warm over --epochs. Here epoch e (0-based) of a stage of E epochs uses
# the area label alone while e < warmup·E; theirs while e <= l_d_warm (one epoch more).
# - cifar10-lt, cifar100-lt: their runs (ω = 2/255, k = 3; ω = 20/255, k = 30; 100 of 200).
# - imagenet-lt: their ResNet-50 run (ω = 200/255, k = 30, 70 of 100 epochs; the ResNeXt
#   runs use 2/3). inat2018: their run (ω = 1628/255, k = 30, 80 of 100 epochs).
# - places-lt (no run of theirs): every ω of theirs is ⌊C/5⌋/255 (C = 10, 100, 1000, 8142),
#   so ω = 73/255 for its 365 classes; k and the warm-up as ImageNet-LT.
# - digits-lt and fashion-lt (10 classes each): CIFAR-10-LT's.
# Other data sets (folder) have none: a concutmix run on them must set the fields.
CONCUTMIX_SETTINGS: dict[str, dict[str, float | int]] = {
    "digits-lt": {"omega": 2 / 255, "topk": 3, "warmup": 0.5},
    "fashion-lt": {"omega": 2 / 255, "topk": 3, "warmup": 0.5},
    "cifar10-lt": {"omega": 2 / 255, "topk": 3, "warmup": 0.5},
    "cifar100-lt": {"omega": 20 / 255, "topk": 30, "warmup": 0.5},
    "imagenet-lt": {"omega": 200 / 255, "topk": 30, "warmup": 0.7},
    "places-lt": {"omega": 73 / 255, "topk": 30, "warmup": 0.7},
    "inat2018": {"omega": 1628 / 255, "topk": 30, "warmup": 0.8},
}


# The authors' logit scales s (z = s·cos), so that a loss run with defaults reproduces theirs:
# LDAM's s = 30 (margin s·m_y), MMS's s = 100 = 1/T with T = 0.01 (margin s·margin·(1 − cos)).
# One `model.logit_scale` replaces them all for a comparison at one common scale.
# CB, GRW and LADE reweight or adjust CE: they take CE's scale (LIFT's cosine head runs at 25).
LOGIT_SCALE = {"ce": 1.0, "balce": 1.0, "focal": 1.0, "ldam": 30.0, "mms": 100.0,
               "cb": 1.0, "grw": 1.0, "lade": 1.0}


@dataclass
class LossConfig:
    name: str = setting("ce", "the loss", choices=LOSS_NAMES, registry="lfm_ray.losses.LOSSES")
    focal_gamma: float = setting(2.0, "Focal γ")
    ldam_max_margin: float = setting(0.5, "LDAM: largest class margin m (cosine units)")
    mms_margin: float = setting(0.3, "MMS: margin·(1 − cos(f_T[y], f_T[k])) (cosine units)")
    balce_tau: float = setting(1.0, "BalCE τ_b: logits + τ_b·log(n_k / Σn)", at_least=0)
    cb_beta: float = setting(0.9999, "CB: class weight (1 − β)/(1 − β^n_k)", at_least=0, below=1,
                            note=" (0 weighs every class alike)")
    grw_exponent: float = setting(1.0, "GRW: class weight (n_k / Σn)^(−ρ)", at_least=0)
    lade_weight: float = setting(0.1, "LADE: weight of its regulariser beside BalCE", at_least=0)
    lade_remine_lambda: float = setting(0.1, "LADE: ReMINE's λ on the squared log-partition "
                                             "term", at_least=0)
    # LDAM's scale and MMS's 1/temperature are the run's logit scale s (model.logit_scale,
    # defaults in LOGIT_SCALE): LDAM subtracts s·m_y, MMS adds s·margin·(1 − cos).

    def params(self, logit_scale: float | None = None) -> dict[str, float]:
        """Keyword parameters of `lfm_ray.losses.build_loss` for this loss; `logit_scale`
        is the scale of the logits it will get (the run's `RunConfig.logit_scale`), None for
        the loss's default (LOGIT_SCALE)."""
        scale = LOGIT_SCALE.get(self.name, 1.0) if logit_scale is None else float(logit_scale)
        return {
            "balce": {"tau": self.balce_tau},
            "focal": {"gamma": self.focal_gamma},
            "ldam": {"max_margin": self.ldam_max_margin, "logit_scale": scale},
            "mms": {"margin": self.mms_margin, "logit_scale": scale},
            "cb": {"beta": self.cb_beta},
            "grw": {"exponent": self.grw_exponent},
            "lade": {"weight": self.lade_weight, "remine_lambda": self.lade_remine_lambda},
        }.get(self.name, {})


@dataclass
class RuntimeConfig:
    batch_size: int = setting(32, "global batch (per optimiser step, all workers)",
                              unit="images", at_least=1)
    eval_batch_size: int = setting(256, "per worker", unit="images", at_least=1)
    num_workers: int = setting(1, "Ray Train workers (DDP ranks)", at_least=0)
    cpus_per_worker: float = setting(1.0, "what each worker (or in-process trial) holds",
                                    unit="CPUs", above=0)
    gpus_per_worker: float = setting(0.0, "fractions pack several one-worker trials on a GPU",
                                    unit="GPUs", at_least=0)
    seed: int = setting(0, "training seed (init, shuffling, mixing draws)", at_least=0)
    zero_shot: bool = setting(False, "evaluate the text classifier only, no training")
    max_steps_per_epoch: int | None = setting(None, "cap for smoke runs; None: full epochs",
                                               unit="steps", at_least=1)
    threads: int | None = setting(None, "torch CPU threads per worker; None: cpus_per_worker",
                                   at_least=1, null="cpus_per_worker")
    compile: bool | None = setting(None, "torch.compile the image tower; None: on GPUs only")
    save_confusion: bool | None = setting(
        None, "confusion.npz (C×C test counts and P) beside metrics.json and in checkpoints; "
              "None: only for data sets of at most confusion.MAX_CLASSES (1,000) classes")
    # Gradient accumulation: batch_size stays the global batch of one optimiser step, split
    # into num_workers × accumulate equal micro-batches (one mixing draw each).
    accumulate: int = setting(1, "micro-batches per optimiser step and worker", at_least=1)


@dataclass
class EvalConfig:
    # Test-time augmentation of every evaluation (val and test), logits averaged over views.
    tta: str = setting("none", "views: none | flip (image and mirror) | fivecrop (corners, "
                               "centre)", choices=TTA_MODES)
    # fivecrop: the evaluation images are resized to this side (the node cache keeps them so)
    # and cut into four corner crops and a centre crop at the model's input size S; LIFT
    # resizes to 224 + 24 = 248 px for its 224 px models, which None scales to any S.
    fivecrop_resize: int | None = setting(None, "fivecrop's resize (larger than S); None: "
                                                "round(S · 248/224)", unit="px", at_least=1,
                                          null="round(S · 248/224)")
    # Post-hoc logit adjustment (Menon et al. 2021) of every evaluation: the argmax of
    # z_k − τ·log(n_k / Σn), n_k the training counts; 0 leaves the logits as they are.
    logit_adjust_tau: float = setting(0.0, "post-hoc adjustment τ on val and test logits",
                                     at_least=0, note=" (0: no adjustment)")


@dataclass
class AuxConfig:
    # root: a folder root/<auxiliary class>/* of the user's, or an embedded set for digits-lt
    # (digits-aux: digits turned a quarter turn, the neighbours; digits-aux-scrambled:
    # pixel-scrambled digits, unrelated extra data). neighbours: a JSON file
    # {target class: [auxiliary classes]}.
    root: str | None = setting(None, "auxiliary images root/<class>/*, or digits-aux(-scrambled)")
    neighbours: str | None = setting(None, "neighbour map (JSON); None: an embedded set's own")
    max_per_class: int = setting(50, "per auxiliary class per epoch (a fresh subset)",
                                 unit="images", at_least=1)
    silence: str = setting("neighbours", "classes a sample's softmax and target drop",
                           choices=AUX_SILENCE)

    def check(self, loss_name: str) -> None:
        """One LfmError for a combination neighbour silencing cannot run (each field's own
        bounds are checked with the others', `check_fields`)."""
        if self.root is None:
            if self.neighbours is not None:
                raise LfmError(f"aux.neighbours={self.neighbours!r} is set but aux.root is not; "
                               "give the auxiliary images too (--aux-root)")
            return
        if self.silence != "none" and loss_name not in SILENCING_LOSSES:
            raise LfmError(
                f"aux.silence={self.silence!r} needs loss ce or balce (neighbour silencing "
                f"drops logits from a softmax cross-entropy); loss {loss_name!r} trains with "
                "auxiliary classes only with aux.silence none")


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "stage1": StageConfig,
    "stage2": StageConfig,
    "mix": MixConfig,
    "loss": LossConfig,
    "runtime": RuntimeConfig,
    "eval": EvalConfig,
    "aux": AuxConfig,
}
STAGE_SHORTHANDS = ("alpha", "tau", "beta")
# config.json's section of values derived from the others (the model family, the resolved
# similarity source: lfm_ray.similarity.resolved_choices); reading a config back skips it.
DERIVED_SECTION = "resolved"

# Fields that no longer exist, and what replaced them (a config that sets one is refused
# with this, rather than run with a setting that would silently mean nothing).
REMOVED_FIELDS = {
    "loss.ldam_scale": "LDAM's scale is the run's logit scale: set model.logit_scale "
                       "(its default for ldam is 30, LOGIT_SCALE)",
    "loss.mms_temperature": "MMS's temperature is 1 / the run's logit scale: set "
                            "model.logit_scale (its default for mms is 100 = 1/0.01, LOGIT_SCALE)",
    "mix.concutmix_weight": "ConCutMix's label is ρ·ŷ_sem + (1 − ρ)·ỹ_area with ρ set by "
                            "mix.concutmix_omega (and mix.concutmix_topk, mix.concutmix_prob, "
                            "mix.concutmix_warmup); it has no weight",
    "data.eval_split": "runs select on data.selection_split (auto: val where the data set "
                       "has one, else test) and always report the test split",
}


def _default_stage2() -> StageConfig:
    return StageConfig(epochs=5, lr=1e-2, min_lr=1e-4, finetune=STAGE2_FINETUNE)



@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=_default_stage2)
    mix: MixConfig = field(default_factory=MixConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    aux: AuxConfig = field(default_factory=AuxConfig)

    # ---- conversion -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        """Build from a nested dict (as `to_dict` writes) and/or dotted keys; a run's
        config.json reads back too (its derived section and record keys are skipped)."""
        nested = {k: v for k, v in raw.items()
                  if "." not in k and k != DERIVED_SECTION and k not in RECORD_KEYS}
        values: dict[str, Any] = {}
        for section, items in nested.items():
            if section not in SECTIONS:
                raise unknown_name("config section", section, list(SECTIONS))
            if not isinstance(items, dict):
                raise LfmError(f"config section {section!r} must be a mapping, got {items!r}")
            values.update({f"{section}.{key}": value for key, value in items.items()})
        values.update({k: v for k, v in raw.items() if "." in k})
        return cls().override(values)  # one layer: a stage's own field beats a shorthand

    @classmethod
    def from_file(cls, path: str | Path) -> "RunConfig":
        """Defaults with a JSON or YAML file's values on top (see `read_config_file`)."""
        return cls().override(read_config_file(path))

    def copy(self) -> "RunConfig":
        return copy.deepcopy(self)

    # ---- dotted access ----------------------------------------------------------------
    def set(self, dotted: str, value: Any) -> None:
        """Set one field by dotted name; `mix.alpha|tau|beta` set both stages."""
        section, _, key = dotted.partition(".")
        if is_shorthand(dotted):
            try:
                self.set(f"stage1.{key}", value)
            except LfmError as exc:  # name the field as it was given
                raise LfmError(str(exc).replace(f"stage1.{key}", dotted, 1)) from None
            self.set(f"stage2.{key}", value)
            set_through = vars(self).setdefault("_set_through", {})
            set_through.update({f"stage1.{key}": dotted, f"stage2.{key}": dotted})
            return
        if dotted in REMOVED_FIELDS:
            raise LfmError(f"config field {dotted!r} was removed: {REMOVED_FIELDS[dotted]}")
        if section not in SECTIONS or not key:
            raise unknown_name("config field", dotted, known_fields())
        target = getattr(self, section)
        fields = {f.name: f for f in dataclasses.fields(target)}
        if key not in fields:
            raise unknown_name("config field", dotted, known_fields())
        setattr(target, key, _coerce(dotted, type(target), key, value))
        vars(self).get("_set_through", {}).pop(dotted, None)

    def get(self, dotted: str) -> Any:
        section, _, key = dotted.partition(".")
        if section == "mix" and key in STAGE_SHORTHANDS:
            return getattr(self.stage1, key)
        if section not in SECTIONS or not hasattr(getattr(self, section), key):
            raise unknown_name("config field", dotted, known_fields())
        return getattr(getattr(self, section), key)

    def override(self, values: dict[str, Any]) -> "RunConfig":
        """Set the given fields as one layer: the stage shorthands (`mix.alpha|tau|beta`)
        first, so a stage's own field among the same values wins, whatever their order."""
        ordered = sorted(values.items(), key=lambda item: not is_shorthand(item[0]))
        for dotted, value in ordered:
            self.set(dotted, value)
        return self

    # ---- meaning ----------------------------------------------------------------------
    @property
    def logit_scale(self) -> float:
        if self.model.logit_scale is not None:
            return float(self.model.logit_scale)
        return LOGIT_SCALE.get(self.loss.name, 1.0)

    def mixer_params(self) -> dict[str, Any]:
        """Keyword parameters of `lfm_ray.mixing.build_mixer` besides the per-stage ones:
        the mixing section with the data set's ConCutMix settings (CONCUTMIX_SETTINGS) where
        a field is None. A concutmix run on a data set without settings must set them."""
        mix = self.mix
        table = CONCUTMIX_SETTINGS.get(self.data.name, {})
        params: dict[str, Any] = {"remix_kappa": mix.remix_kappa, "remix_tau": mix.remix_tau,
                                  "concutmix_prob": mix.concutmix_prob}
        for key in ("omega", "topk", "warmup"):
            value = getattr(mix, f"concutmix_{key}")
            if value is None:
                value = table.get(key)
            if value is None and mix.method == "concutmix":
                raise LfmError(
                    f"mix.concutmix_{key} is not set and data set {self.data.name!r} has no "
                    f"ConCutMix setting (those with one: {', '.join(sorted(CONCUTMIX_SETTINGS))}); "
                    f"set mix.concutmix_{key}")
            params[f"concutmix_{key}"] = value
        if params["concutmix_topk"] is not None:
            params["concutmix_topk"] = int(params["concutmix_topk"])
        return params

    def validate(self) -> "RunConfig":
        """Raise one LfmError for the first bad value: each field against the bounds and
        choices declared beside its default (`check_fields`), then the rules that join
        fields; names a registry holds (data sets, losses, ...) are checked by it."""
        self._check_stage2_trains_w_i()  # before its fields: "proj" is its one choice
        for section in SECTIONS:
            check_fields(getattr(self, section), section, self.given_name)
        self._check_templates()
        self._check_worker_split()
        self.mixer_params()  # a concutmix run needs every ConCutMix setting resolved
        self._check_samplers()
        self._check_classifier_init()
        self.aux.check(self.loss.name)
        return self

    def given_name(self, dotted: str) -> str:
        """The name `dotted` was set by: `mix.tau` for stage1.tau and stage2.tau set through
        that shorthand (and not since by their own names), so a message names what was
        given. (Kept beside the fields, not as one: it is no setting.)"""
        return vars(self).get("_set_through", {}).get(dotted, dotted)

    def keep_given_names(self, other: "RunConfig") -> "RunConfig":
        """Take `other`'s record of the fields set through a shorthand (this config was
        built from `other`'s dict, which holds values, not how they were given)."""
        vars(self)["_set_through"] = dict(vars(other).get("_set_through", {}))
        return self

    def _check_stage2_trains_w_i(self) -> None:
        # Stage 2 trains W_I on a frozen tower: nothing else to choose there.
        _check(self.stage2.finetune == STAGE2_FINETUNE, "stage2.finetune", self.stage2.finetune,
               f"{STAGE2_FINETUNE!r} (stage 2 trains W_I only; stage1.finetune chooses what "
               "stage 1 trains)")
        for key, mode in FINETUNE_SIZES.items():
            _check(getattr(self.stage2, key) is None, f"stage2.{key}", getattr(self.stage2, key),
                   f"null (stage 2 adds no modules; set stage1.{key} for stage1.finetune={mode})")

    def _check_templates(self) -> None:
        _check(bool(self.model.templates) and all("{}" in t for t in self.model.templates),
               "model.templates", self.model.templates, "a non-empty list of strings with '{}'")

    def _check_worker_split(self) -> None:
        """The global batch splits evenly over workers and micro-batches; a fractional GPU
        holds one worker."""
        rt = self.runtime
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
        parts = max(1, rt.num_workers) * rt.accumulate
        _check(rt.batch_size % parts == 0, "runtime.batch_size", rt.batch_size,
               f"a multiple of num_workers × accumulate = {parts} (the global batch of one "
               "optimiser step, split into equal micro-batches)")

    def _check_samplers(self) -> None:
        for name in ("stage1", "stage2"):
            sampler = getattr(self, name).sampler
            if sampler != SAMPLERS[0] and self.mix.method == "lfm":
                raise LfmError(
                    f"{name}.sampler={sampler!r} with mix.method='lfm': LFM draws its first "
                    "sample uniformly over the training images (paper Eq. 1) and rebalances "
                    "through its partner law and label shift, which another sampler would "
                    f"change; use {name}.sampler instance-balanced with LFM, or another mixing "
                    "method (none for a cRT-style classifier stage)")

    def _check_classifier_init(self) -> None:
        init = self.model.classifier_init
        if init in ("auto", "text"):
            return
        if self.runtime.zero_shot:
            raise LfmError(f"model.classifier_init={init!r} with runtime.zero_shot: a zero-shot "
                           "run classifies with the text features and trains nothing; use "
                           "model.classifier_init auto")
        if self.aux.root is not None:
            raise LfmError(f"model.classifier_init={init!r} with auxiliary classes (aux.root): "
                           "their images are drawn anew each epoch, so they have no fixed set "
                           "to start their class weights from; use model.classifier_init auto")
        if self.stage1.epochs == 0:
            raise LfmError(f"model.classifier_init={init!r} with stage1.epochs=0: the class "
                           "weights train in stage 1 only; give stage 1 epochs or use auto")


# ---- each field against what is declared beside it ------------------------------------------
def field_choices(meta: Mapping[str, Any], section: str) -> tuple[str, ...] | None:
    """The names a field takes in `section` (its `setting(choices=...)`), or None."""
    choices = meta.get("choices")
    return choices.get(section) if isinstance(choices, dict) else choices


def bounds_text(meta: Mapping[str, Any]) -> str | None:
    """A field's bounds as a message and --help say them: ">= 0", "> 0", "in [0, 1)"; None
    for a field without bounds."""
    low, high = meta.get("at_least", meta.get("above")), meta.get("at_most", meta.get("below"))
    if low is not None and high is not None:
        return (f"in {'[' if 'at_least' in meta else '('}{low:g}, "
                f"{high:g}{']' if 'at_most' in meta else ')'}")
    if low is not None:
        return f"{'>=' if 'at_least' in meta else '>'} {low:g}"
    if high is not None:
        return f"{'<=' if 'at_most' in meta else '<'} {high:g}"
    return None


def within_bounds(meta: Mapping[str, Any], value: float) -> bool:
    return all((("at_least" not in meta or value >= meta["at_least"]),
                ("above" not in meta or value > meta["above"]),
                ("at_most" not in meta or value <= meta["at_most"]),
                ("below" not in meta or value < meta["below"])))


def accepted_text(cls: type, f: dataclasses.Field, section: str) -> str | None:
    """What a field accepts, as its error message says it ("an integer >= 1, or null for
    LIFT's default"); None where its type alone decides."""
    meta = f.metadata
    choices = field_choices(meta, section)
    if choices is not None:
        text = repr(choices[0]) if len(choices) == 1 else f"one of {', '.join(choices)}"
    else:
        bounds = bounds_text(meta)
        if bounds is None:
            return None
        kind = "an integer" if field_type(cls, f.name)[0] is int else "a number"
        text = f"{kind} {bounds}"
    text += meta.get("note", "")
    if field_type(cls, f.name)[1]:
        text += f", or null for {meta['null']}" if meta.get("null") else ", or null"
    return text


def check_fields(obj: Any, section: str, given_name: Callable[[str], str] = str) -> None:
    """One LfmError for the first field of a section (`obj`, a section's dataclass) outside
    the bounds or choices its `setting` declares, named as `given_name` says it was given.
    A null is accepted where the field may be null; names a registry checks are left to it."""
    cls = type(obj)
    for f in dataclasses.fields(cls):
        meta, value = f.metadata, getattr(obj, f.name)
        if value is None or meta.get("registry"):
            continue
        choices = field_choices(meta, section)
        if choices is not None:
            ok = value in choices
        else:
            ok = bounds_text(meta) is None or within_bounds(meta, value)
        _check(ok, given_name(f"{section}.{f.name}"), value, accepted_text(cls, f, section) or "")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted path: value} (`cfg.to_dict()` → {"stage1.lr": ..., ...}); an
    empty dict stays one value. Reruns, study records and stage-1 keys all compare this."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def same_value(a: Any, b: Any) -> bool:
    """Equal as settings: numbers by value (1 and 1.0), booleans never as numbers."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def diff(old: dict[str, Any], new: dict[str, Any], absent: Any = None
         ) -> list[tuple[str, Any, Any]]:
    """(path, old, new) for every flat path whose values differ (`absent` where a side has
    none), in path order."""
    return [(k, old.get(k, absent), new.get(k, absent)) for k in sorted(set(old) | set(new))
            if not same_value(old.get(k), new.get(k))]


def is_shorthand(dotted: str) -> bool:
    """`mix.alpha`, `mix.tau` or `mix.beta`: a name that sets both stages' field."""
    section, _, key = dotted.partition(".")
    return section == "mix" and key in STAGE_SHORTHANDS


def known_fields() -> list[str]:
    names = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    return names + [f"mix.{k}" for k in STAGE_SHORTHANDS]


def _check(ok: bool, name: str, value: Any, accepted: str) -> None:
    if not ok:
        raise LfmError(f"{name}={value!r} is not valid; expected {accepted}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_type(cls: type, name: str) -> tuple[Any, bool]:
    """(the field's type without None, whether it may be None), from its annotation."""
    tp = _hints(cls)[name]
    args = typing.get_args(tp)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def type_name(cls: type, name: str) -> str:
    """The field's type as --help shows it: "float", "int | None", "list[str]"."""
    tp, nullable = field_type(cls, name)
    shown = "list[str]" if typing.get_origin(tp) is list else tp.__name__
    return f"{shown} | None" if nullable else shown


def _coerce(dotted: str, cls: type, name: str, value: Any) -> Any:
    """Turn CLI strings and JSON numbers into the field's type, with a clear error."""
    tp, nullable = field_type(cls, name)
    expected = type_name(cls, name).replace(" | None", " or null")
    if value is None:
        if nullable:
            return None
        raise LfmError(f"{dotted} may not be null")
    is_list = typing.get_origin(tp) is list
    if isinstance(value, bool) and not (tp is bool or is_list):
        # JSON/YAML `true` is an int to Python; a number field must not take it as 1.
        raise LfmError(f"{dotted}={value!r} is not valid; expected {expected}")
    try:
        if is_list:
            if isinstance(value, str):
                return [value]
            return [str(v) for v in value]
        if isinstance(value, str) and value.strip().lower() in ("none", "null") and nullable:
            return None
        if tp is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            as_float = float(value)
            if not math.isfinite(as_float) or not as_float.is_integer():
                raise ValueError(value)
            return int(as_float)
        if tp is float:
            out = float(value)
            if not math.isfinite(out):  # nan and inf are never a setting
                raise ValueError(value)
            return out
        return str(value)
    except (TypeError, ValueError):
        raise LfmError(f"{dotted}={value!r} is not valid; expected {expected}") from None


# Paper Table 6 (design.md). The batch is the global batch: 96 = 3 GPUs × 32.
PAPER_PRESETS: dict[str, dict[str, Any]] = {
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

# The embedded benchmark's recipe: chosen by measurement on CE alone (no mixing), selecting on
# the val split, before any LFM comparison (results/fashion_recipe.md has every candidate and
# the commands). An image tower sized for 28 px trained from scratch, its features bridged to
# the frozen GloVe class features (lfm_ray/text.py).
EMBEDDED_PRESETS: dict[str, dict[str, Any]] = {
    "fashion-lt": {
        "data.name": "fashion-lt", "model.name": "timm:test_byobnet", "model.pretrained": None,
        "model.image_size": 28, "model.text": "glove", "model.logit_scale": 32.0,
        "stage1.epochs": 40, "stage1.lr": 3e-2, "stage1.min_lr": 1e-5,
        "stage2.epochs": 5, "stage2.lr": 1e-2, "stage2.min_lr": 1e-4,
        "runtime.batch_size": 64, "stage1.alpha": 1.0, "stage2.alpha": 1.0, "mix.tau": 0.05,
    },
}
PRESETS: dict[str, dict[str, Any]] = {**PAPER_PRESETS, **EMBEDDED_PRESETS}


# The backbone the paper used for an ablation (Fig. 9: α on RN50; Fig. 10 and Table 5: τ and
# the mixing methods on ViT-B/16; all on CIFAR-100-LT at imbalance factor 100). A study script
# on that data set adds these to the data set's preset, so it runs the paper's experiment.
STUDY_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "alpha_sweep": {"cifar100-lt": {"model.name": "RN50", "model.pretrained": "openai",
                                    "data.imbalance_factor": 100}},
    "tau_sweep": {"cifar100-lt": {"model.name": "ViT-B-16", "model.pretrained": "openai",
                                  "data.imbalance_factor": 100}},
    "mixup_comparison": {"cifar100-lt": {"model.name": "ViT-B-16", "model.pretrained": "openai",
                                         "data.imbalance_factor": 100}},
}
NO_PRESET = "none"  # --preset none: built-in defaults even on a paper data set

# What --smoke sets: one epoch per stage of a few steps, to check that a study runs.
SMOKE: dict[str, Any] = {"stage1.epochs": 1, "stage2.epochs": 1, "runtime.max_steps_per_epoch": 3}


def preset(name: str, study: str | None = None) -> RunConfig:
    """A data set's hyperparameters (the paper's Table 6 for its data sets, the embedded
    benchmark's recipe for fashion-lt; seed 0, Adam, cosine per stage), with the paper's
    backbone for `study` (a study script's name) where it used another."""
    return RunConfig().override(preset_values(name, study))


def preset_values(name: str, study: str | None = None) -> dict[str, Any]:
    if name not in PRESETS:
        raise unknown_name("preset", name, [*PRESETS, NO_PRESET])
    return {**PRESETS[name], **STUDY_PRESETS.get(study or "", {}).get(name, {})}


# ---- one configuration path for every entry point --------------------------------------------
# What `lfm-ray train` records in a run's config.json beside the sections (the data set's
# fingerprint, the run's extensions): a record, not settings, so a config.json given back as
# --config FILE skips them.
RECORD_KEYS = ("data_fingerprint", "extensions")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The dotted values a JSON or YAML file sets ({"stage1": {"lr": 1e-6}} or
    {"stage1.lr": 1e-6}), each checked against its field. Every value the file names is kept,
    also one equal to a default: a file is a layer, not a diff."""
    path = Path(path)
    if path.is_dir():
        raise LfmError(f"config file {str(path)!r} is a directory; give a .json or .yaml file")
    if not path.is_file():
        raise LfmError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raw = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any read or parse error becomes one message
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LfmError(f"config file {str(path)!r} could not be read: {reason}") from None
    if not isinstance(raw, dict):
        raise LfmError(f"config file {str(path)!r} must hold a mapping of sections")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in RECORD_KEYS:
            continue
        if "." in str(key):
            values[str(key)] = value
        elif key == DERIVED_SECTION:
            continue  # derived from the other values (a config.json read back as a file)
        elif key in SECTIONS and isinstance(value, dict):
            values.update({f"{key}.{k}": v for k, v in value.items()})
        elif key in SECTIONS:
            raise LfmError(f"config file {str(path)!r}: section {key!r} must be a mapping, "
                           f"got {value!r}")
        else:
            raise unknown_name(f"config section in {str(path)!r}:", key, list(SECTIONS))
    try:
        RunConfig().override(values)  # every name and value checked now, naming the file
    except LfmError as exc:
        raise LfmError(f"config file {str(path)!r}: {exc}") from None
    return values


@dataclass
class ConfigLayers:
    """How an entry point's configuration is made, lowest layer first: built-in defaults <
    the preset < `--config FILE` < the study script's own settings < `--smoke` < dotted flags;
    a study's swept values go on top, per trial.

    `preset` is a PRESETS name, "none", or None for "the data set's preset where it has one"
    (the paper's four and the embedded fashion-lt), so a study over several data sets gives each data set's trials their own preset.
    """

    preset: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # where-it-runs defaults, lowest
    file: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    smoke: dict[str, Any] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)
    study: str | None = None          # the study script, for its paper backbone (STUDY_PRESETS)

    def _above_preset(self) -> list[dict[str, Any]]:
        return [self.file, self.fixed, self.smoke, self.flags]

    def dataset(self) -> str:
        """The data set these layers train on when no study sweeps it."""
        for layer in reversed(self._above_preset()):
            if "data.name" in layer:
                return str(layer["data.name"])
        if self.preset and self.preset != NO_PRESET:
            return str(preset_values(self.preset)["data.name"])
        return DataConfig().name

    def preset_for(self, dataset: str | None = None) -> str | None:
        """The preset applied for `dataset` (default: this configuration's own), or None."""
        if self.preset == NO_PRESET:
            return None
        if self.preset is not None:
            preset_values(self.preset)  # an unknown name fails here, naming the choices
            return self.preset
        name = dataset or self.dataset()
        return name if name in PRESETS else None

    def resolve(self, dataset: str | None = None) -> RunConfig:
        """The RunConfig of these layers; `dataset` is a swept data set (its preset applies)."""
        name = self.preset_for(dataset)
        cfg = RunConfig().override(self.defaults)
        if name:
            cfg.override(preset_values(name, self.study))
        for layer in self._above_preset():
            cfg.override(layer)
        if dataset is not None:
            cfg.set("data.name", dataset)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ConfigLayers":
        return cls(**{f.name: raw.get(f.name, f.default if f.default is not dataclasses.MISSING
                                      else {}) for f in dataclasses.fields(cls)})


# Fields that name files or folders on the machine that runs the trainer.
PATH_FIELDS = ("data.root", "data.cache_dir", "model.cache_dir", "model.pretrained",
               "aux.root", "aux.neighbours")


def with_absolute_paths(cfg: "RunConfig", base: str | os.PathLike | None) -> "RunConfig":
    """A copy whose relative file paths are read from `base` (the folder a run or study was
    started from: Ray runs trials and workers in folders of their own), for opening files
    only; the configuration as given stays what is recorded and compared. A value that is a
    name rather than a path (a pretrained tag, an embedded auxiliary set) is left alone."""
    if base is None:
        return cfg
    out = cfg.copy()
    for dotted in PATH_FIELDS:
        value = out.get(dotted)
        if not isinstance(value, str) or "://" in value or os.path.isabs(os.path.expanduser(value)):
            continue
        candidate = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
        names_a_path = dotted != "model.pretrained" and dotted != "aux.root" \
            or os.sep in value or value.startswith(".") or os.path.exists(candidate)
        if names_a_path:
            out.set(dotted, candidate)
    return out


# ---- field documentation (for --help) ------------------------------------------------------------
# Closed sets of names per dotted field, from each field's `setting(choices=...)`.
CHOICES: dict[str, tuple[str, ...]] = {
    f"{section}.{f.name}": field_choices(f.metadata, section)
    for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
    if field_choices(f.metadata, section) is not None
}


def field_docs() -> dict[str, dict[str, Any]]:
    """Per dotted field: type, default, help, unit, bounds and accepted names (its `setting`
    metadata), for --help, the docs and the messages."""
    defaults = RunConfig().to_dict()
    out: dict[str, dict[str, Any]] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            dotted = f"{section}.{f.name}"
            out[dotted] = {"type": type_name(cls, f.name), "default": defaults[section][f.name],
                           "help": f.metadata.get("help", ""), "unit": f.metadata.get("unit"),
                           "bounds": bounds_text(f.metadata), "choices": CHOICES.get(dotted)}
    for key in STAGE_SHORTHANDS:
        doc = out[f"stage1.{key}"]
        out[f"mix.{key}"] = {**doc, "help": f"sets stage1.{key} and stage2.{key}: {doc['help']}"}
    return out
