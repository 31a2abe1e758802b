"""`lfm-ray train` run again on an output folder: resume, extend, restart, or refuse.

An output folder holds one configuration and one data set. Its config.json records both
(the RunConfig sections, `data_fingerprint`, and any `extensions`), and a rerun is planned
against it before anything is written:

- the same configuration and data: resume from the run's last checkpoint (a finished run
  trains nothing and writes its results again);
- anything else: refused, every difference named as `path: old -> new`, unless
  `extend` (more epochs of the last stage: stage 2's, or stage 1's where there is no
  stage 2; the run continues from its last checkpoint) or `restart` (the folder's run is
  discarded and trained afresh).

Fields that only say where things live or how fast they run (`lfm_ray.stage1.NOT_STAGE1`
lists them and why they leave the result alone) may change on a resume.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lfm_ray.config import RECORD_KEYS, RunConfig, diff, flatten
from lfm_ray.errors import LfmError
from lfm_ray.stage1 import NOT_STAGE1

CONFIG_FILE = "config.json"
# What `lfm-ray train` writes in an output folder (and --restart removes; nothing else). The
# folders' names hold a dot, which no study name may: an output folder that is also a
# studies' results folder (with its `ray/` and `<study>/` folders) loses none of them.
RAY_DIR, CHECKPOINT_DIR = "run.ray", "run.checkpoints"
RUN_FILES = (CONFIG_FILE, "history.csv", "metrics.json", "confusion.npz")
RUN_DIRS = (RAY_DIR, CHECKPOINT_DIR)
# An earlier lfm-ray's names for them, which a study's folders may also have.
LEGACY_DIRS = ("ray", "checkpoints")
# Keys of config.json beside the RunConfig sections (read back as --config, they are skipped).
FINGERPRINT_KEY, EXTENSIONS_KEY = RECORD_KEYS


@dataclass
class TrainRerun:
    """What a run on an output folder does: new | resume | extend | restart."""

    action: str
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)
    extensions: list[dict[str, Any]] = field(default_factory=list)  # to record in config.json


def free_fields() -> set[str]:
    """Fields a resume may change (they do not change the result)."""
    return set(NOT_STAGE1)


def read_record(out: Path) -> dict[str, Any] | None:
    """The output folder's config.json, or None where there is none."""
    path = out / CONFIG_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        RunConfig.from_dict(_sections(record))
    except (OSError, ValueError) as exc:
        raise LfmError(f"{path} cannot be read as a run's configuration ({exc}); add "
                       "--restart to discard that output's run, or give another --output") from None
    return record


def _sections(record: dict[str, Any]) -> dict[str, Any]:
    """The settings of a config.json (its record keys and derived section left out)."""
    from lfm_ray.config import DERIVED_SECTION

    return {k: v for k, v in record.items() if k not in (*RECORD_KEYS, DERIVED_SECTION)}


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(stored: dict[str, Any], cfg: RunConfig,
                fingerprint: str | None) -> list[tuple[str, Any, Any]]:
    """(path, old, new) for every field (and the data fingerprint) that differs, free
    fields left out."""
    old = flatten(RunConfig.from_dict(_sections(stored)).to_dict())
    free = free_fields()
    changes = [c for c in diff(old, flatten(cfg.to_dict())) if c[0] not in free]
    old_fp = stored.get(FINGERPRINT_KEY)
    if old_fp is not None and fingerprint is not None and old_fp != fingerprint:
        changes.append((FINGERPRINT_KEY, old_fp, fingerprint))
    return changes


def last_stage(cfg: RunConfig) -> str:
    """'stage2', or 'stage1' for a run without a stage 2."""
    return "stage2" if cfg.stage2.epochs > 0 else "stage1"


def _extension(stored_cfg: RunConfig, cfg: RunConfig,
               changes: list[tuple[str, Any, Any]]) -> str | None:
    """Why `changes` is not an extension of the stored run, or None when it is one: more
    epochs of its last stage, or a stage 2 added to a run that had none (both continue
    the run from where it stopped)."""
    if stored_cfg.runtime.zero_shot or cfg.runtime.zero_shot:
        return "a zero-shot run trains no epochs to extend"
    paths = [p for p, _, _ in changes]
    allowed = f"{last_stage(stored_cfg)}.epochs"
    if stored_cfg.stage2.epochs == 0:
        # No stage 2 trained yet: more stage-1 epochs, or a stage 2 with its own settings.
        stage2 = [p for p in paths if p.startswith("stage2.")]
        if "stage1.epochs" in paths and stage2:
            return ("--extend adds epochs to one stage: stage 1's, or a stage 2 to a run "
                    "without one, not both")
        other = [p for p in paths if p != "stage1.epochs" and not p.startswith("stage2.")]
        allowed = "stage1.epochs, or a stage 2"
    else:
        other = [p for p in paths if p != allowed]
    if other:
        return (f"--extend only adds epochs to the last stage ({allowed}); "
                f"it cannot change {', '.join(other)}")
    for path, old, new in changes:
        if path.endswith(".epochs") and new < old:
            return f"--extend only adds epochs; {path} goes from {old} to {new}"
    return None


def plan_train_rerun(out: Path, cfg: RunConfig, fingerprint: str | None, *,
                     extend: bool = False, restart: bool = False) -> TrainRerun:
    """Decide what a run of `cfg` on output folder `out` does; refuse (LfmError) a changed
    configuration or data set without extend or restart. Writes nothing."""
    if extend and restart:
        raise LfmError("give --extend or --restart, not both")
    if out.exists() and not out.is_dir():
        raise LfmError(f"--output {str(out)!r} is a file, not a folder")
    stored = read_record(out) if out.is_dir() else None
    if stored is None:
        leftovers = [n for n in (*RUN_FILES, *RUN_DIRS) if (out / n).exists()]
        if leftovers:
            raise LfmError(f"--output {str(out)!r} holds {', '.join(leftovers)} but no "
                           f"{CONFIG_FILE}, so nothing tells which run they belong to and "
                           "lfm-ray will not delete them (not with --restart either): move "
                           "them away, or give another --output")
        return TrainRerun("new")
    legacy = [n for n in LEGACY_DIRS if (out / n).is_dir()]
    if legacy and not any((out / n).is_dir() for n in RUN_DIRS) and not restart:
        raise LfmError(f"--output {str(out)!r} holds a run of an earlier lfm-ray, whose "
                       f"checkpoints are in {', '.join(legacy)}/ (names a study's folders may "
                       "have too), so it cannot be resumed or extended. Give another --output, "
                       f"or add --restart to train afresh ({removes(out)} go; "
                       f"{', '.join(legacy)}/ stay: remove them by hand if they are this run's)")
    if restart:
        return TrainRerun("restart")
    changes = differences(stored, cfg, fingerprint)
    extensions = list(stored.get(EXTENSIONS_KEY) or [])
    if not changes:
        return TrainRerun("resume", [], extensions)
    listed = "; ".join(f"{path}: {_show(a)} -> {_show(b)}" for path, a, b in changes)
    where = out / CONFIG_FILE
    data_changed = any(path == FINGERPRINT_KEY for path, _, _ in changes)
    why_not = ("the data set's files changed since it trained" if data_changed
               else _extension(RunConfig.from_dict(_sections(stored)), cfg, changes))
    if extend and why_not is None:
        record = {"changed": {path: [old, new] for path, old, new in changes}}
        segment = added_segment(cfg, changes)
        if segment:
            record["schedule"] = segment
        return TrainRerun("extend", changes, [*extensions, record])
    if extend:
        raise LfmError(f"{str(out)!r} cannot be extended: {why_not} ({where}: {listed}). "
                       "Give another --output, or add --restart to discard that output's run "
                       f"({removes(out)}) and train afresh")
    hint = "add --extend to train the added epochs from its last checkpoint, " \
        if why_not is None else ""
    raise LfmError(f"--output {str(out)!r} holds a run of another configuration ({where}): "
                   f"{listed}. To proceed, {hint}give another --output, or add --restart to "
                   f"discard that output's run ({removes(out)}) and train afresh")


SEGMENT_RULE = "a new cosine segment from {stage}.lr to {stage}.min_lr over the added epochs"


def added_segment(cfg: RunConfig, changes: list[tuple[str, Any, Any]]) -> dict[str, Any] | None:
    """How an extension trains its added epochs (recorded in config.json): a stage whose
    trained epochs ended its cosine at min_lr goes on with a cosine segment of its own over
    the added epochs, from the stage's lr down to its min_lr again. None where the change
    adds a stage 2 to a run without one (that stage's own schedule, as always)."""
    for path, old, new in changes:
        if path.endswith(".epochs") and old and new > old:
            stage = path.split(".")[0]
            first = int(old) + 1 + (cfg.stage1.epochs if stage == "stage2" else 0)
            scfg = getattr(cfg, stage)
            return {"stage": stage, "epochs": [first, first + int(new - old) - 1],
                    "lr": scfg.lr, "min_lr": scfg.min_lr,
                    "rule": SEGMENT_RULE.format(stage=stage)}
    return None


def schedule_segments(cfg: RunConfig, extensions: list[dict[str, Any]]) -> dict[int, list[int]]:
    """Per stage that was extended, the epochs of each of its cosine segments, in order
    (the stage's epochs before its first extension, then each extension's added ones); a
    stage never extended has one segment over all its epochs and is left out."""
    out: dict[int, list[int]] = {}
    for record in extensions:
        for path, (old, new) in (record.get("changed") or {}).items():
            stage, _, field_name = path.partition(".")
            if field_name != "epochs" or stage not in ("stage1", "stage2") or not old:
                continue
            number = 1 if stage == "stage1" else 2
            segments = out.setdefault(number, [int(old)])
            segments.append(int(new) - int(old))
    for number, segments in out.items():
        total = getattr(cfg, f"stage{number}").epochs
        if sum(segments) != total:
            raise LfmError(f"config.json's extensions give stage {number} {sum(segments)} "
                           f"epochs in all, but stage{number}.epochs is {total}")
    return out


def owned(out: Path) -> list[str]:
    """The names in `out` that `lfm-ray train` wrote there (what --restart removes)."""
    return [n for n in RUN_FILES if (out / n).is_file()] + \
        [n + "/" for n in RUN_DIRS if (out / n).is_dir()]


def removes(out: Path) -> str:
    names = owned(out)
    return f"{', '.join(names)} in {out}" if names else "nothing"


def discard(out: Path) -> None:
    """--restart: remove what `lfm-ray train` wrote in `out` (nothing else in it)."""
    for name in RUN_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in RUN_FILES:
        if (out / name).is_file():
            (out / name).unlink()


def record(cfg: RunConfig, fingerprint: str | None,
           extensions: list[dict[str, Any]]) -> dict[str, Any]:
    """config.json: the RunConfig sections, the data fingerprint, the extensions."""
    out: dict[str, Any] = with_resolved(cfg.to_dict(), cfg)
    out[FINGERPRINT_KEY] = fingerprint
    if extensions:
        out[EXTENSIONS_KEY] = extensions
    return out


def with_resolved(settings: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    """`settings` with the resolved section (model family, LFM's similarity source) added."""
    from lfm_ray.config import DERIVED_SECTION
    from lfm_ray.resolved import resolved_choices  # torch: only when a record is written

    return {**settings, DERIVED_SECTION: resolved_choices(cfg)}
