"""What a study costs: an estimate before it runs (`--dry-run`), the measured cost after, and
a budget that stops launching trials (`--budget-hours`).

The measured cost of a trial is its wall time (Tune's time_total_s, trials.csv's
wall_time_s) times the GPUs it holds (num_workers x gpus_per_worker, at least one worker), in
GPU-hours; a trial that holds no GPU counts its wall time in trial-hours instead. A study's
cost is the sum over its ended trials (finished or failed).

The estimate takes the earlier trials in the results folder on the same data set and model
(every <results-dir>/*/trials.csv; the data set and model from each row, else from that
study's study.json), their wall time per epoch, and scales it by each new trial's epochs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lfm_ray.config import RunConfig
from lfm_ray.errors import LfmError
from lfm_ray.study.spec import Study

FINAL = ("TERMINATED", "ERROR")


def gpus_per_trial(cfg: RunConfig) -> float:
    rt = cfg.runtime
    return max(1, rt.num_workers) * rt.gpus_per_worker


def cost_unit(cfg: RunConfig) -> str:
    return "GPU-hours" if gpus_per_trial(cfg) > 0 else "trial-hours"


def trial_cost_hours(wall_s: float, gpus: float) -> float:
    """A trial's measured cost: GPU-hours, or trial-hours when it holds no GPU."""
    return wall_s / 3600 * (gpus if gpus > 0 else 1.0)


# ---- before: the estimate ----------------------------------------------------------------------
def epochs_of(cfg: RunConfig) -> int:
    """Epochs a trial trains; a zero-shot trial (none) counts as one."""
    return max(1, 0 if cfg.runtime.zero_shot else cfg.stage1.epochs + cfg.stage2.epochs)


def earlier_timings(results_dir: str) -> list[dict[str, Any]]:
    """Every finished trial under the results folder with a wall time: its study, data set,
    model, wall seconds and epochs trained (its last epoch; else its study's base epochs)."""
    out = []
    root = Path(results_dir)
    if "://" in results_dir or not root.is_dir():
        return out
    import pandas as pd

    for csv in sorted(root.glob("*/trials.csv")):
        meta_path = csv.parent / "study.json"
        try:
            table = pd.read_csv(csv)
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        except (OSError, ValueError):
            continue
        if "wall_time_s" not in table or "status" not in table:
            continue
        base = meta.get("base_config") or {}
        base_epochs = sum(int((base.get(s) or {}).get("epochs") or 0) for s in ("stage1", "stage2"))
        for row in table[table["status"] == "TERMINATED"].to_dict("records"):
            wall = pd.to_numeric(row.get("wall_time_s"), errors="coerce")
            epochs = pd.to_numeric(row.get("epoch"), errors="coerce")
            if pd.isna(epochs) or epochs < 1:
                epochs = base_epochs
            data = row.get("data.name") if isinstance(row.get("data.name"), str) else \
                (base.get("data") or {}).get("name")
            model = row.get("model.name") if isinstance(row.get("model.name"), str) else \
                (base.get("model") or {}).get("name")
            if pd.isna(wall) or wall <= 0 or not epochs or not data or not model:
                continue
            out.append({"study": csv.parent.name, "data": data, "model": model,
                        "wall_s": float(wall), "epochs": int(epochs)})
    return out


def planned_configs(study: Study, points: list[dict[str, Any]] | None, trials: int
                    ) -> list[RunConfig]:
    """The configuration of each trial the run adds: a grid's points, else the base of
    each data set in turn (a search's own values do not change data set and model)."""
    if study.search == "grid":
        return [study.config_for(p) for p in (points if points is not None
                                              else study.grid_points())]
    bases = list(study.base_configs().values())
    return [bases[i % len(bases)] for i in range(trials)]


def estimate(study: Study, configs: list[RunConfig]) -> dict[str, Any]:
    """The estimated cost of `configs` from earlier timings: per trial the mean over earlier
    trials on its data set and model of (wall seconds / epochs), times its epochs."""
    timings = earlier_timings(study.results_dir)
    per_epoch: dict[tuple[str, str], list[float]] = {}
    studies: dict[tuple[str, str], set[str]] = {}
    for t in timings:
        per_epoch.setdefault((t["data"], t["model"]), []).append(t["wall_s"] / t["epochs"])
        studies.setdefault((t["data"], t["model"]), set()).add(t["study"])
    out: dict[str, Any] = {"trials": len(configs)}
    lacking = sorted({(c.data.name, c.model.name) for c in configs} - set(per_epoch))
    if lacking:
        pairs = ", ".join(f"{d} with model {m}" for d, m in lacking)
        out["note"] = (f"no estimate: no earlier timings of {pairs} in {study.results_dir} "
                       "(finished trials in a trials.csv there); a --smoke study first gives "
                       "some")
        return out
    minutes = gpu_hours = 0.0
    for cfg in configs:
        times = per_epoch[(cfg.data.name, cfg.model.name)]
        seconds = sum(times) / len(times) * epochs_of(cfg)
        minutes += seconds / 60
        gpu_hours += seconds / 3600 * gpus_per_trial(cfg)
    out.update({
        "trial_minutes": round(minutes, 3), "gpu_hours": round(gpu_hours, 4),
        "gpus_per_trial": sorted({gpus_per_trial(c) for c in configs}),
        "from": {f"{d} / {m}": {"trials": len(v), "studies": sorted(studies[(d, m)]),
                                "seconds_per_epoch": round(sum(v) / len(v), 3)}
                 for (d, m), v in per_epoch.items()
                 if any((c.data.name, c.model.name) == (d, m) for c in configs)},
        "note": "wall seconds per epoch of earlier trials on the same data set and model, "
                "times each trial's epochs"})
    return out


def estimate_line(cost: dict[str, Any]) -> str:
    if "trial_minutes" not in cost:
        return f"cost estimate of {cost['trials']} trials: {cost['note']}"
    used = sum(v["trials"] for v in cost["from"].values())
    return (f"cost estimate: {cost['trials']} trials, about {cost['trial_minutes']:.1f} "
            f"trial-minutes and {cost['gpu_hours']:.3f} GPU-hours (from {used} earlier "
            "trials on the same data set and model)")


# ---- after: the measured cost --------------------------------------------------------------------
def measured_cost(study: Study, table: Any) -> tuple[float, list[float]]:
    """(the cost of a trials table's ended trials, each one's cost) in the study's unit."""
    import pandas as pd

    if table is None or not len(table) or "wall_time_s" not in table:
        return 0.0, []
    ended = table[table["status"].isin(FINAL)]
    walls = pd.to_numeric(ended["wall_time_s"], errors="coerce").fillna(0.0)
    gpus = gpus_per_trial(study.base)
    costs = [trial_cost_hours(float(w), gpus) for w in walls]
    return sum(costs), costs
