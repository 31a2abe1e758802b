"""The run-configuration flags of every entry point (`lfm-ray train`, `lfm-ray study`, the
study scripts), and how they resolve.

Every RunConfig field is a dotted flag (`--stage1.lr 1e-6`, `--mix.tau 0.05`) whose help
gives its type, default and unit; the common ones also have a short alias (`--loss NAME` is
`--loss.name NAME`). The configuration is resolved in layers, lowest first (see
`lfm_ray.config.ConfigLayers`): built-in defaults < the preset (on a paper data set its own,
unless `--preset none`) < `--config FILE` < a study script's own settings < `--smoke` <
dotted flags < a study's swept values. Flags are exact: abbreviations are refused.

Only the standard library and lfm_ray.config are imported here, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lfm_ray.config import (
    EMBEDDED_PRESETS, NO_PRESET, PAPER_PRESETS, PRESETS, SMOKE, ConfigLayers, field_docs,
    read_config_file,
)
from lfm_ray.errors import LfmError

# Short alias -> dotted field. Each alias and its dotted flag set the same field.
SHORT_NAMES = {
    "--dataset": "data.name",
    "--data-root": "data.root",
    "--imbalance-factor": "data.imbalance_factor",
    "--model": "model.name",
    "--pretrained": "model.pretrained",
    "--logit-scale": "model.logit_scale",
    "--loss": "loss.name",
    "--mix": "mix.method",
    "--alpha": "mix.alpha",
    "--tau": "mix.tau",
    "--batch-size": "runtime.batch_size",
    "--num-workers": "runtime.num_workers",
    "--cpus-per-worker": "runtime.cpus_per_worker",
    "--gpus-per-worker": "runtime.gpus_per_worker",
    "--seed": "runtime.seed",
    "--aux-root": "aux.root",
    "--aux-neighbours": "aux.neighbours",
}
PREFIX = "set:"      # argparse dest of a dotted flag
ALIAS = "alias:"     # argparse dest of a short alias


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples keep their line breaks; options wrap as usual."""


class ExactParser(argparse.ArgumentParser):
    """argparse without prefix abbreviations (`--stage1.epoch` is not `--stage1.epochs`),
    whose errors are one line (`PROG: error: ...`) raised as LfmError, so the caller prints
    it and exits 2 like any other input error, without the usage block."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["allow_abbrev"] = False
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        raise LfmError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def new_parser(prog: str | None = None, description: str | None = None,
               **kwargs: Any) -> argparse.ArgumentParser:
    return ExactParser(prog=prog, description=description, **kwargs)


def _help(doc: dict[str, Any]) -> str:
    text = doc["help"] or "see lfm_ray/config.py"
    kind = doc["type"].replace(" | None", " or null")
    default = doc["default"]
    shown = "null" if default is None else default
    unit = f" ({doc['unit']})" if doc.get("unit") else ""
    bounds = f"; {doc['bounds']}" if doc.get("bounds") else ""
    choices = f"; one of {', '.join(doc['choices'])}" if doc["choices"] else ""
    return f"{text} [{kind}{unit}; default {shown}{bounds}{choices}]".replace("%", "%%")


def add_run_flags(parser: argparse.ArgumentParser, *, seed_alias: bool = True) -> None:
    """--config, --preset, a dotted flag for every field, and the short aliases.

    `seed_alias=False` leaves `--seed` to the caller (a study's `--seed` is its one seed)."""
    group = parser.add_argument_group(
        "run configuration", "any field as --section.field VALUE; later layers win: defaults "
        "< --preset < --config < the script's own settings < --smoke < these flags")
    group.add_argument("--config", metavar="FILE",
                       help="JSON or YAML file of config sections (stage1: {lr: 1e-6}) or "
                            "dotted keys; every value it names is used")
    group.add_argument("--preset", choices=[NO_PRESET, *PRESETS], metavar="NAME",
                       help="a data set's hyperparameters: the paper's Table 6 "
                            f"({', '.join(PAPER_PRESETS)}) or the embedded benchmark's recipe "
                            f"({', '.join(EMBEDDED_PRESETS)}); default: the data set's own on "
                            "those data sets, none elsewhere; 'none' turns it off")
    docs = field_docs()
    for flag, dotted in SHORT_NAMES.items():
        if flag == "--seed" and not seed_alias:
            continue
        doc = docs[dotted]
        extra: dict[str, Any] = {}
        if dotted == "data.name":  # a study takes several (they become a swept parameter)
            extra = {"action": "append", "help": "= --data.name (a study takes several)"}
        group.add_argument(flag, dest=ALIAS + dotted, metavar=dotted.split(".")[-1].upper(),
                           choices=doc["choices"], **{"help": f"= --{dotted}", **extra})
    group.add_argument("--template", dest=ALIAS + "model.templates", action="append",
                       metavar="TEXT", help="prompt template with {} (repeat for an ensemble) "
                                            "= --model.templates")
    group.add_argument("--zero-shot", dest=ALIAS + "runtime.zero_shot", action="store_const",
                       const=True, help="evaluate without training = --runtime.zero_shot true")
    for dotted, doc in docs.items():
        kwargs: dict[str, Any] = {"dest": PREFIX + dotted, "help": _help(doc)}
        if doc["choices"]:
            kwargs["choices"] = doc["choices"]
        if doc["type"].startswith("list"):
            kwargs.update(nargs="+", metavar="V")
        else:
            kwargs["metavar"] = doc["type"].split(" ")[0].upper()
        group.add_argument(f"--{dotted}", **kwargs)


def flag_values(args: argparse.Namespace, several_datasets: bool = False) -> dict[str, Any]:
    """The fields set by flags, dotted; an alias and its dotted flag may not disagree.

    `--dataset` may repeat only where `several_datasets` (a study): then data.name is a list."""
    dotted = {k[len(PREFIX):]: v for k, v in vars(args).items()
              if k.startswith(PREFIX) and v is not None}
    for key, value in vars(args).items():
        if not key.startswith(ALIAS) or value is None:
            continue
        name = key[len(ALIAS):]
        if name == "data.name":
            value = list(dict.fromkeys(value))
            if several_datasets and len(value) > 1:
                if "data.name" in dotted:
                    raise LfmError("give the data sets with --dataset only, not also --data.name")
                dotted[name] = value
                continue
            if len(value) > 1:
                raise LfmError(f"--dataset is given {len(value)} times ({', '.join(value)}); "
                               "a run trains on one data set (a study may sweep several)")
            value = value[0]
        if name in dotted and dotted[name] != value:
            alias = next((f for f, d in SHORT_NAMES.items() if d == name), name)
            raise LfmError(f"{alias} {value!r} and --{name} {dotted[name]!r} disagree; give one")
        dotted[name] = value
    return dotted


def config_layers(args: argparse.Namespace, *, fixed: dict[str, Any] | None = None,
                  smoke: bool = False, study: str | None = None,
                  defaults: dict[str, Any] | None = None,
                  flags: dict[str, Any] | None = None) -> ConfigLayers:
    """The layers the parsed flags describe (the config file read and checked here)."""
    file = read_config_file(args.config) if getattr(args, "config", None) else {}
    return ConfigLayers(preset=getattr(args, "preset", None), defaults=dict(defaults or {}),
                        file=file, fixed=dict(fixed or {}), smoke=dict(SMOKE) if smoke else {},
                        flags=flag_values(args) if flags is None else flags, study=study)


def announce_presets(layers: ConfigLayers, datasets: list[str]) -> None:
    """Say on stderr which paper preset each data set's runs take, and how to opt out."""
    from lfm_ray.config import STUDY_PRESETS

    for name in datasets:
        chosen = layers.preset_for(name)
        if not chosen:
            continue
        backbone = STUDY_PRESETS.get(layers.study or "", {}).get(chosen, {}).get("model.name")
        extra = f", the paper's {backbone} backbone for {layers.study}" if backbone else ""
        if chosen in EMBEDDED_PRESETS:
            what = "the embedded benchmark's recipe, results/fashion_recipe.md"
        else:
            what = f"Table 6 hyperparameters{extra}"
        how = "the preset" if chosen in EMBEDDED_PRESETS else "the paper's preset"
        how = how if layers.preset is None else "preset"
        print(f"{name}: {how} {chosen} ({what}); --preset none turns it off",
              file=sys.stderr, flush=True)
