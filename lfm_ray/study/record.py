"""study.json: what a study is (so a rerun can be held to it), what ran it, and on what.

A rerun under the same name compares its request with the stored one (`plan_rerun`):
identical resumes; a change that only adds trials (new seeds or grid values) may `--extend`;
any other change to what decides results is refused, listing each difference, unless the
study is run afresh with `--restart`. Changes that do not touch results (address,
concurrency, trackers) are free.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lfm_ray.config import ConfigLayers, RunConfig, diff, flatten, same_value
from lfm_ray.errors import LfmError
from lfm_ray.stage1 import comparable as comparable_fields
from lfm_ray.study.optuna_storage import storage_kind, storage_record
from lfm_ray.study.spec import Dim, Study, selection_note
from lfm_ray.study.storage import LAYOUT, experiment_name, new_study_id, restart_removes

STUDY_FILE = "study.json"
# What decides a study's results; a rerun must match these (or only add trials).
RESULT_KEYS = ("search", "grid", "space", "seeds", "num_samples", "metric", "mode",
               "objectives", "scheduler", "sampler", "variants", "share_stage1",
               "base_configs", "optuna_storage_kind", "warm_start")
EXTENDABLE = ("grid", "seeds")


def request(study: Study) -> dict[str, Any]:
    """The parts of a study that decide its results, as JSON values."""
    raw = {
        "search": study.search, "grid": study.grid if study.search == "grid" else {},
        "space": {k: v.to_dict() for k, v in study.space.items()} if study.search != "grid"
        else {},
        "seeds": list(study.seeds),
        "num_samples": study.num_samples if study.search != "grid" else None,
        "metric": study.metric, "mode": study.mode, "objectives": list(study.objectives),
        "scheduler": study.scheduler, "sampler": study.sampler if study.search == "optuna"
        else None,
        "variants": study.variants, "share_stage1": study.share_stage1,
        "base_configs": {d: c.to_dict() for d, c in study.base_configs().items()},
        # where the sampler's history lives (lfm_ray.study.optuna_storage says why it counts)
        "optuna_storage_kind": storage_kind(study),
        # an Optuna search's first points (lfm_ray.study.warm): the earlier study as asked for
        "warm_start": study.warm_start,
    }
    return json.loads(json.dumps(raw, default=str))


def comparable(configs: Any) -> Any:
    """Base configurations as a rerun compares them (lfm_ray.stage1.comparable): without the
    fields that change where things live or how fast, not what is learned, with the world
    size for the worker count (0, Ray Train's local mode, trains as one rank: the study's
    default on a laptop, 1 with --address or a GPU) and the device kind for the GPU share."""
    if not isinstance(configs, dict):
        return configs
    return {dataset: comparable_fields(flatten(cfg)) if isinstance(cfg, dict) else cfg
            for dataset, cfg in configs.items()}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted path, old, new) for each result-deciding value that differs."""
    out = []
    for key in RESULT_KEYS:
        a, b = old.get(key), new.get(key)
        if key == "base_configs":
            a, b = comparable(a), comparable(b)
        out += diff(flatten(a, key), flatten(b, key), absent="(absent)")
    return out


@dataclass
class Rerun:
    """What running a study now means: new, resume, extend (with the points it adds) or
    restart, and the Tune experiments it has (the last one is the one to run)."""

    kind: str                                   # new | resume | extend | restart
    experiments: list[str]
    new_points: list[dict[str, Any]] = field(default_factory=list)
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # data_record: fingerprints per data set

    @property
    def experiment(self) -> str:
        return self.experiments[-1]


def read_stored(study: Study) -> dict[str, Any] | None:
    path = study.result_dir / STUDY_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LfmError(f"{path} cannot be read ({exc}); move it away or run with --restart") from None


def plan_rerun(study: Study, stored: dict[str, Any] | None, *, extend: bool = False,
               restart: bool = False) -> Rerun:
    """Decide new / resume / extend / restart, or refuse with every difference named."""
    first = [experiment_name(study)]
    if restart or stored is None:
        return Rerun("restart" if stored is not None else "new", first)
    experiments = list(stored.get("experiments") or first)
    old = stored.get("request") or {}
    new = request(study)
    changes = differences(old, new)
    if not changes:
        if extend:
            raise LfmError(f"study {study.name!r}: --extend adds no trials (the request is the "
                           f"one stored in {study.result_dir / STUDY_FILE}); nothing written. "
                           "Run without --extend to resume it")
        return Rerun("resume", experiments)
    listed = "; ".join(f"{path}: {_show(a)} -> {_show(b)}" for path, a, b in changes)
    where = study.result_dir / STUDY_FILE
    extendable = all(path.split(".")[0] in EXTENDABLE for path, _, _ in changes)
    if extend:
        if study.search != "grid" or not extendable:
            raise LfmError(
                f"study {study.name!r} cannot be extended: --extend only adds trials to a grid "
                f"study (new seeds or grid values), but these differ from {where}: {listed}. "
                "Use a new --name, or --restart to discard the stored trials and run afresh")
        points = _added_points(study, old)
        if not points:
            raise LfmError(f"study {study.name!r}: --extend adds no trials ({listed}: every "
                           "grid point and seed is already in the study); nothing written")
        return Rerun("extend", [*experiments, experiment_name(study, len(experiments))],
                     points, changes)
    hint = ("add --extend to run only the new trials (the finished ones are kept), "
            if extendable and study.search == "grid" else "")
    raise LfmError(
        f"study {study.name!r} already exists ({where}) with another configuration: {listed}. "
        f"To proceed, {hint}give a new --name, or add --restart to discard its stored trials "
        f"and results ({restart_removes(study, stored)}) and run it afresh")


# ---- the data a study trained on ----------------------------------------------------------------
def data_sources(study: Study) -> dict[str, tuple[str, str | None]]:
    """Every data set (name, root) the study's trials read, by the key study.json gives it:
    the data set's name, numbered where a grid sweeps its root."""
    configs = list(study.base_configs().values())
    if study.search == "grid" and "data.root" in study.grid:
        configs += [study.config_for(p) for p in study.grid_points()]
    found = list(dict.fromkeys((c.data.name, c.data.root) for c in configs))
    out = {}
    for name, root in found:
        same = [r for n, r in found if n == name]
        out[name if len(same) == 1 else f"{name}#{same.index(root) + 1}"] = (name, root)
    return out


def data_record(study: Study) -> dict[str, Any]:
    """study.json's `data`: per data set its fingerprint (lfm_ray.data.fingerprint: split
    and annotation files hashed, images by size and modification time), with a file count
    and hash per part of it, so a change can be named. No path is kept."""
    from lfm_ray.data.fingerprint import fingerprint_summary

    return {key: {"name": name, **fingerprint_summary(name, root)}
            for key, (name, root) in data_sources(study).items()}


def check_data(study: Study, stored: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse to resume or extend a study whose data changed since it ran: trials on two
    versions of a data set would be averaged as one."""
    from lfm_ray.data.fingerprint import describe_change

    if not stored or not isinstance(stored.get("data"), dict):
        return
    changed = [f"{key}: {describe_change(old, current[key])}"
               for key, old in stored["data"].items()
               if key in current and old.get("fingerprint") != current[key]["fingerprint"]]
    if changed:
        raise LfmError(
            f"study {study.name!r}: the data changed since it ran ({'; '.join(changed)}; "
            f"fingerprints in {study.result_dir / STUDY_FILE}), so its finished trials and new "
            "ones would be on different data. Restore the data, give a new --name, or add "
            "--restart to run it afresh on the data as it is now")


# ---- each run of the study -----------------------------------------------------------------------
def invocation(study: Study, rerun: Rerun, trials: int) -> dict[str, Any]:
    """One entry of study.json's `invocations`: what ran the study this time, and where."""
    out = {"action": rerun.kind, "command": study.command, "called_by": study.called_by,
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions(),
           "machine": machine(), "trials_added": trials}
    if rerun.kind in ("new", "restart", "extend"):
        out["experiment"] = rerun.experiment
    if rerun.kind == "extend":
        out["added"] = rerun.new_points
    return out


def record_run(study: Study, rerun: Rerun, stored: dict[str, Any] | None, study_id: str,
               data: dict[str, Any], trials: int) -> dict[str, Any]:
    """study.json for this run of the study. A new or restarted study's record describes
    this run; a resume appends this run to `invocations`; an extension records the
    extended request and keeps what the first run recorded (its command, start, versions and
    machine at the top), with this run appended to `invocations`."""
    this = invocation(study, rerun, trials)
    if rerun.kind == "resume" and stored is not None:
        meta = dict(stored)
    else:
        meta = study_meta(study, rerun.experiments, study_id)
        meta["data"] = data
        if rerun.kind == "extend" and stored is not None:
            for key in ("command", "called_by", "started", "versions", "machine"):
                if key in stored:
                    meta[key] = stored[key]
            meta["invocations"] = list(stored.get("invocations") or [])
    meta["invocations"] = [*(meta.get("invocations") or []), this]
    return meta


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _added_points(study: Study, old: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid points (with seeds) of the new request that the stored one lacks; refuses a
    request that drops values (extending only adds)."""
    old_grid, old_seeds = old.get("grid") or {}, old.get("seeds") or []
    if set(old_grid) != set(study.grid):
        raise LfmError(f"--extend keeps the grid's parameters ({', '.join(old_grid)}); "
                       f"got {', '.join(study.grid)}. Use a new --name or --restart")
    for name, values in old_grid.items():
        missing = [v for v in values if not any(same_value(v, w) for w in study.grid[name])]
        if missing:
            raise LfmError(f"--extend only adds values; {name} drops {missing}. "
                           "Use a new --name or --restart")
    if any(s not in study.seeds for s in old_seeds):
        raise LfmError(f"--extend only adds seeds; the stored seeds are {old_seeds}")
    old_study = Study(name=study.name, grid=old_grid, seeds=list(old_seeds))
    before = {json.dumps(p, sort_keys=True) for p in _normal(old_study.grid_points())}
    return [p for p, key in zip(study.grid_points(), _normal(study.grid_points()))
            if json.dumps(key, sort_keys=True) not in before]


def _normal(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
             for k, v in p.items()} for p in points]


# ---- the record ------------------------------------------------------------------------------
def study_meta(study: Study, experiments: list[str],
               study_id: str | None = None) -> dict[str, Any]:
    """Everything study.json holds: the request, how it was made, what ran it and where.
    `experiments` are relative to the storage path; `study_id` is also in the marker of the
    study's storage folder (lfm_ray.study.storage), which is how a restart tells it is the
    study's own."""
    return {
        "name": study.name, "study_id": study_id or new_study_id(), "storage_layout": LAYOUT,
        "request": request(study), "experiments": experiments,
        "command": study.command, "called_by": study.called_by,
        "search": study.search, "swept": study.swept, "grid": study.grid,
        "space": {k: v.to_dict() for k, v in study.space.items()},
        "variants": study.variants, "seeds": study.seeds, "num_samples": study.num_samples,
        "metric": study.metric, "mode": study.mode, "objectives": study.objectives,
        "selection_split": study.selection_split, "selection": selection_note(study),
        "scheduler": study.scheduler, "sampler": study.sampler,
        "optuna_storage": study.optuna_storage, **storage_record(study),
        "storage_path": study.storage_path,
        "base_config": study.base.to_dict(),
        "layers": study.layers.to_dict() if study.layers is not None else None,
        "max_concurrent": study.max_concurrent, "max_failures": study.max_failures,
        "selection_holdouts": selection_holdouts(study),
        "trackers": study.trackers, "share_stage1": study.share_stage1,
        "protocol": study.protocol, "resolved": _resolved(study),
        "warm_start": study.warm_record, "budget_hours": study.budget_hours,
        "machine": machine(), "versions": versions(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _resolved(study: Study) -> dict[str, Any]:
    """What the settings resolve to (model family, LFM's similarity source): per data set's
    base configuration, and for each grid point that resolves otherwise than its base."""
    from lfm_ray.resolved import resolved_choices

    bases = {d: resolved_choices(c) for d, c in study.base_configs().items()}
    points: list[dict[str, Any]] = []
    if study.search == "grid":
        for params in study.grid_points():
            params = {k: v for k, v in params.items() if k != "runtime.seed"}
            choices = resolved_choices(study.config_for(params))
            entry = {"params": params, **choices}
            base = bases.get(str(params.get("data.name", study.base.data.name)))
            if choices != base and entry not in points:
                points.append(entry)
    return {"base": bases, "points": points}


def selection_holdouts(study: Study) -> dict[str, Any]:
    """Per data set whose selection split is carved from its training images (iNaturalist
    2018: no labelled test split, so val2018 is reported and a train2018 hold-out selects):
    the rule and the images held out, so selection provably never saw the reported split."""
    out: dict[str, Any] = {}
    for name, cfg in study.base_configs().items():
        if cfg.data.name != "inat2018":
            continue
        from lfm_ray.data.inat import HOLDOUT_MIN_COUNT, holdout_images

        out[name] = {"rule": f"one train2018 image of each class with at least "
                             f"{HOLDOUT_MIN_COUNT}, drawn with data.seed",
                     "seed": cfg.data.seed,
                     "image_ids": [int(i) for i in holdout_images(cfg.data.root, cfg.data.seed)]}
    return out


def machine() -> dict[str, Any]:
    """CPU model and cores, memory, and the GPUs with their CUDA version where there are any."""
    out: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "cpu_model": _proc_field("/proc/cpuinfo", "model name") or
                           platform.processor(), "python": platform.python_version()}
    mem = _proc_field("/proc/meminfo", "MemTotal")
    if mem and mem.split()[0].isdigit():
        out["memory_gib"] = round(int(mem.split()[0]) / 2**20, 1)
    try:
        import torch

        if torch.cuda.is_available():
            out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            out["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001 - a broken driver must not stop the study's record
        pass
    return out


def _proc_field(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from lfm_ray import __version__

    out = {"lfm-ray": __version__}
    commit = git_commit()
    if commit:
        out["git_commit"] = commit
    for n in ("ray", "torch", "open_clip_torch", "optuna", "pandas", "plotly"):
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "absent"
    return out


def git_commit(checkout: Path | None = None) -> str | None:
    """The commit of the lfm-ray checkout in use ("+dirty" with uncommitted changes to its
    tracked files outside results/), or None outside a git checkout (an installed wheel).
    results/ holds the demo studies' outputs, which `studies/run_all.py` rewrites while it
    runs: changes there say nothing about the code that ran."""
    here = checkout or Path(__file__).resolve().parents[2]
    if not (here / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain",
                                "--untracked-files=no", "--", ".", ":(exclude)results"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def load_study_spec(results_dir: str, name: str) -> Study:
    """The Study stored in results/<name>/study.json, for `lfm-ray study --resume NAME`."""
    path = Path(results_dir) / name / STUDY_FILE
    if not path.is_file():
        raise LfmError(f"no study {name!r} to resume: {path} does not exist")
    meta = json.loads(path.read_text())
    layers = ConfigLayers.from_dict(meta["layers"]) if meta.get("layers") else None
    return Study(
        name=meta["name"], base=RunConfig.from_dict(meta["base_config"]), search=meta["search"],
        grid=meta.get("grid") or {},
        space={k: Dim.from_dict(v) for k, v in (meta.get("space") or {}).items()},
        variants=meta.get("variants") or {}, seeds=meta["seeds"],
        num_samples=meta["num_samples"], metric=meta["metric"], mode=meta["mode"],
        objectives=meta.get("objectives") or [], scheduler=meta["scheduler"],
        sampler=meta.get("sampler", "tpe"), optuna_storage=meta.get("optuna_storage"),
        storage_path=meta["storage_path"], results_dir=results_dir,
        max_concurrent=meta.get("max_concurrent"), max_failures=meta.get("max_failures", 1),
        trackers=meta.get("trackers") or [], layers=layers, command=meta.get("command", []),
        share_stage1=bool(meta.get("share_stage1")), protocol=meta.get("protocol"),
        called_by=meta.get("called_by"),
        warm_start=(meta.get("request") or {}).get("warm_start"),
    )
