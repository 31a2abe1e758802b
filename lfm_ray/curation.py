"""Curating auxiliary classes offline (`lfm-ray aux`): the steps of the paper's pipeline that
need no LLM and no web.

"Learning from Neighbors" asks an LLM for fine-grained classes close to each target class,
crawls their images, and cleans them. Offline, the user brings the candidates; this module:

1. proposes neighbours by text similarity: for target class t, the k_t candidate names
   whose class features (the run's text encoder, `model.text`: CLIP's tower with the run's
   prompt templates, or word vectors) are nearest to t's, with more for tail
   classes in proportion to the head-to-tail ratio, k_t = min(max_k, ⌈k · n_max / n_t⌉)
   (`neighbour_counts`); a candidate may neighbour several targets;
2. cleans candidate images: within each auxiliary class, an image is kept when the cosine of
   its image feature to the class prototype (the normalised mean feature of the class's
   images) lies in [min_cos, max_cos] (the paper: 0.7 and 0.98): below, a stray; above, a
   near-copy of the typical image;
3. writes the auxiliary folder (OUT/<class>/ with the kept files) and the neighbour map
   (OUT/neighbours.json) that `--aux-root OUT --aux-neighbours OUT/neighbours.json` train on.
   Proposed classes without a candidate folder, or with no image kept, leave the map.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lfm_ray.config import AUX_CURATION
from lfm_ray.data.auxiliary import NEIGHBOURS_FILE, name_key
from lfm_ray.data.folder import IMAGE_SUFFIXES
from lfm_ray.errors import LfmError

MIN_COS, MAX_COS = AUX_CURATION["min_cos"], AUX_CURATION["max_cos"]  # the paper's thresholds


# ---- the formulas ------------------------------------------------------------------------------
def neighbour_counts(class_counts: Sequence[int], k: int, max_k: int) -> list[int]:
    """k_t = min(max_k, ⌈k · n_max / n_t⌉) neighbours per target class: k for the largest
    class, more in proportion to how far below it a class is."""
    if k < 1 or max_k < k:
        raise LfmError(f"k={k}, max_k={max_k} are not valid; expected 1 <= k <= max_k")
    counts = np.asarray(class_counts, dtype=np.float64)
    if len(counts) == 0 or (counts < 1).any():
        raise LfmError("every target class needs at least one training image")
    ratio = counts.max() / counts
    # The ratio in float can exceed an exact integer by rounding (3 · 2.0000000000000004).
    return [int(min(max_k, math.ceil(k * r - 1e-9))) for r in ratio]


def propose_neighbours(target_features: torch.Tensor, candidate_features: torch.Tensor,
                       counts: Sequence[int]) -> list[list[int]]:
    """Per target t, the indices of its counts[t] most similar candidates (cosine of the unit
    text features), most similar first; ties go to the earlier candidate."""
    t = F.normalize(target_features.double(), dim=-1)
    c = F.normalize(candidate_features.double(), dim=-1)
    sim = t @ c.t()
    out = []
    for row, n in zip(sim, counts):
        # A stable sort of −similarity keeps the file's order among equal similarities.
        order = torch.sort(-row, stable=True).indices
        out.append([int(i) for i in order[:min(int(n), len(order))]])
    return out


def prototype_cosines(features: torch.Tensor) -> torch.Tensor:
    """Each feature's cosine to the prototype of the set: its normalised mean unit feature."""
    unit = F.normalize(features.double(), dim=-1)
    prototype = F.normalize(unit.mean(dim=0), dim=0)
    return (unit @ prototype).clamp(-1.0, 1.0)  # rounding may step past ±1


def keep_by_prototype(features: torch.Tensor, min_cos: float = MIN_COS,
                      max_cos: float = MAX_COS) -> torch.Tensor:
    """(N,) bool: the images whose cosine to their class prototype is in [min_cos, max_cos]."""
    if not -1 <= min_cos <= max_cos <= 1:
        raise LfmError(f"min_cos={min_cos}, max_cos={max_cos} are not valid; expected "
                       "-1 <= min_cos <= max_cos <= 1")
    cos = prototype_cosines(features)
    return (cos >= min_cos) & (cos <= max_cos)


# ---- inputs --------------------------------------------------------------------------------------
def read_candidates(path: str | Path, target_names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(candidate names, those dropped for being target classes) from a text file, one name a
    line; blank lines and lines starting with # are skipped, repeats kept once."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise LfmError(f"--candidates {str(path)!r} is not a file; expected a text file with one "
                       "candidate class name a line")
    targets = {name_key(n) for n in target_names}
    names, dropped, seen = [], [], set()
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if "/" in name or "\\" in name or name.startswith("."):
            raise LfmError(f"--candidates {str(path)!r} line {number}: {name!r} cannot be a "
                           "class folder name (no / or \\, no leading .)")
        key = name_key(name)
        if key in seen:
            continue
        seen.add(key)
        (dropped if key in targets else names).append(name)
    if not names:
        raise LfmError(f"--candidates {str(path)!r} names no class that is not a target class")
    return names, dropped


def candidate_folders(images_root: str | Path) -> dict[str, Path]:
    """name_key -> folder of `images_root/<candidate>/*`."""
    root = Path(images_root).expanduser()
    if not root.is_dir():
        raise LfmError(f"--images {str(images_root)!r} is not a folder; expected "
                       "images/<candidate class>/* image folders")
    return {name_key(d.name): d for d in sorted(root.iterdir())
            if d.is_dir() and not d.name.startswith(".")}


def image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


# ---- the command's work --------------------------------------------------------------------------
@dataclass
class Curation:
    """What `curate` decided, for the command's summary and for tests."""

    neighbours: dict[str, list[str]]                       # the map written
    proposed: dict[str, list[str]]                         # before images were looked at
    counts: dict[str, int]                                 # k_t per target class
    dropped_targets: list[str] = field(default_factory=list)   # candidates that are targets
    no_folder: list[str] = field(default_factory=list)     # proposed, no candidate folder
    kept: dict[str, tuple[int, int]] = field(default_factory=dict)  # class -> (kept, of)
    map_file: Path | None = None
    folder: Path | None = None


def _check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LfmError(f"--output {str(out)!r} exists and is not an empty folder; give a new "
                       "folder (nothing in it is overwritten)")


@torch.no_grad()
def image_features(tower, spec, files: Sequence[Path], device: torch.device,
                   batch: int = 64) -> torch.Tensor:
    """Unit image features (N, d) of image files under an image tower (a CLIP model's
    visual tower or a timm model), preprocessed as the model's own preprocessing gives them
    (what the node cache would hold)."""
    from lfm_ray.augment import BatchBuilder
    from lfm_ray.data.preprocess import preprocess_file

    build = BatchBuilder(spec, device)
    tower.eval()
    parts = []
    for start in range(0, len(files), batch):
        images = np.stack([preprocess_file(str(f), spec) for f in files[start:start + batch]])
        x = build(torch.from_numpy(images))
        with torch.no_grad():
            parts.append(F.normalize(tower(x).float(), dim=-1).cpu())
    return torch.cat(parts)


def curate(cfg, candidates_file: str | Path, output: str | Path,
           images_root: str | Path | None = None, k: int = AUX_CURATION["k"],
           max_k: int = AUX_CURATION["max_k"],
           min_cos: float = MIN_COS, max_cos: float = MAX_COS,
           device: str | torch.device = "cpu") -> Curation:
    """Propose neighbours for the target classes of `cfg.data` from the candidate names, and
    with `images_root` keep the candidates' clean images; write the folder and the map."""
    from lfm_ray.backbones import build_backbone
    from lfm_ray.families import model_family
    from lfm_ray.data import build_dataset, run_options
    from lfm_ray.text import check_text, class_features

    out = Path(output).expanduser()
    _check_output(out)
    keep_by_prototype(torch.zeros(1, 2), min_cos, max_cos)  # the thresholds, checked first
    neighbour_counts([1], k, max_k)
    folders = candidate_folders(images_root) if images_root is not None else None
    options = run_options(cfg.data)
    dataset = build_dataset(cfg.data.name, cfg.data.root, **options)
    targets = list(dataset.class_names)
    names, dropped = read_candidates(candidates_file, targets)
    device = torch.device(device)
    check_text(cfg)
    torch.manual_seed(cfg.runtime.seed)  # a randomly initialised model (tiny) as a run has it
    backbone, spec = build_backbone(cfg.model, device)
    tower = backbone.visual if model_family(cfg.model.name) == "clip" else backbone
    per_target = neighbour_counts(dataset.class_counts, k, max_k)
    target_feats = class_features(cfg.model, targets, device, clip_model=backbone)
    if target_feats is None:
        raise LfmError(f"lfm-ray aux proposes neighbours by text similarity; the model "
                       f"{cfg.model.name} has no text encoder (model.text none): give it one "
                       "(--model.text glove)")
    picks = propose_neighbours(target_feats,
                               class_features(cfg.model, names, device, clip_model=backbone),
                               per_target)
    proposed = {t: [names[i] for i in p] for t, p in zip(targets, picks)}
    result = Curation(neighbours={}, proposed=proposed,
                      counts=dict(zip(targets, per_target)), dropped_targets=dropped)
    usable = set(name for p in proposed.values() for name in p)
    if folders is not None:
        usable = set()
        for name in dict.fromkeys(n for p in proposed.values() for n in p):
            folder = folders.get(name_key(name))
            files = image_files(folder) if folder is not None else []
            if not files:
                result.no_folder.append(name)
                continue
            keep = keep_by_prototype(image_features(tower, spec, files, device), min_cos, max_cos)
            kept = [f for f, ok in zip(files, keep.tolist()) if ok]
            result.kept[name] = (len(kept), len(files))
            if not kept:
                continue
            usable.add(name)
            target_dir = out / name
            target_dir.mkdir(parents=True, exist_ok=True)
            for f in kept:
                shutil.copy2(f, target_dir / f.name)
        result.folder = out
    result.neighbours = {t: [n for n in p if n in usable] for t, p in proposed.items()}
    result.neighbours = {t: p for t, p in result.neighbours.items() if p}
    out.mkdir(parents=True, exist_ok=True)
    result.map_file = out / NEIGHBOURS_FILE
    result.map_file.write_text(json.dumps(result.neighbours, indent=2, ensure_ascii=False) + "\n")
    return result


def summary(result: Curation) -> str:
    """The lines `lfm-ray aux` prints: per target class k_t and the neighbours kept."""
    lines = []
    for target, names in result.proposed.items():
        kept = result.neighbours.get(target, [])
        lines.append(f"{target} (k={result.counts[target]}): "
                     + (", ".join(kept) if kept else "no neighbour kept"))
    if result.dropped_targets:
        lines.append(f"candidates skipped as target classes: {', '.join(result.dropped_targets)}")
    if result.no_folder:
        lines.append(f"proposed, no images under --images: {', '.join(result.no_folder)}")
    for name, (kept, total) in result.kept.items():
        lines.append(f"  {name}: kept {kept} of {total} images")
    where: list[Any] = [result.map_file]
    if result.folder is not None:
        where.insert(0, f"{result.folder}/<class>/")
    lines.append("wrote " + ", ".join(str(w) for w in where))
    return "\n".join(lines)
