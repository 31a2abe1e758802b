"""Where a study keeps its files, whose a folder is, and what a restart may remove.

A study named N writes two folders:

- its results, `<results_dir>/N/`: study.json, trials.csv, best.json, report.html with its
  PNGs, and trials/<trial id>/ (small and portable; what results/ commits);
- its Ray state, `<storage_path>/N/`, a folder of its own (a local path, NFS or a URI):
  `lfm_ray_study.json` (whose folder it is), `tune` (the Tune experiment of the first run),
  `tune-ext1`, `tune-ext2`, ... (one per --extend that added trials), `stage1`,
  `stage1-ext1`, ... (shared stage-1 runs), `train` (Ray Train runs of worker-group
  trials), and `optuna.journal` (Optuna's journal file) / `mlflow.db` where those are used.

Every folder lfm-ray makes for a study lies inside that study's own folders, so no study
name can produce another study's folder. Study names are letters, digits, - and _; `ray`
is reserved (the default storage folder inside a results folder). A restart removes only
what it can prove is the study's: the files named above in the results folder, and in the
storage folder the entries named above, only when `lfm_ray_study.json` carries the
study_id that the study's study.json records. Anything else stays, and is named.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from lfm_ray.errors import LfmError
from lfm_ray.study.spec import Study, join_path

LAYOUT = 2                     # study.json's storage_layout: one storage folder per study
MARKER = "lfm_ray_study.json"  # in <storage>/<name>/: the study it belongs to
TUNE, STAGE1, TRAIN = "tune", "stage1", "train"
DATABASES = ("optuna.db", "optuna.journal", "optuna.journal.lock", "mlflow.db")
RESERVED_NAMES = ("ray",)
# What a study writes in its results folder (and what a restart removes there).
RESULT_FILES = ("study.json", "trials.csv", "best.json", "report.html")
RESULT_DIRS = ("trials",)
RESULT_SUFFIXES = (".png", ".tmp")  # the report's figures; files being written


def check_name(name: str) -> None:
    """Letters, digits, - and _ (so no other folder lfm-ray makes can be a study's), not
    starting with - and not a reserved name."""
    ok = bool(name) and all(c.isalnum() or c in "-_" for c in name) and name[0] != "-"
    if not ok:
        raise LfmError(f"study name {name!r} is not valid; use letters, digits, - and _ "
                       "(not starting with -)")
    if name in RESERVED_NAMES:
        raise LfmError(f"study name {name!r} is reserved (the default storage folder "
                       f"inside a results folder is named {name!r}); choose another --name")


def _local(path: str) -> Path | None:
    return None if "://" in path else Path(path).expanduser().resolve()


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_folders(study: Study) -> None:
    """The study's results folder and its storage folder are apart: neither inside the
    other, and the results folder not inside the storage path (where other studies'
    folders live)."""
    results, storage = _local(str(study.result_dir)), _local(study.storage_path)
    if results is None or storage is None:
        return
    folder = _local(study_folder(study))
    if _overlap(results, folder) or storage == results or storage in results.parents:
        raise LfmError(f"study {study.name!r}: its results folder {study.result_dir} and its "
                       f"storage folder {study_folder(study)} would overlap; give a --storage-path "
                       "outside the results folder (the default is <results-dir>/ray)")


# ---- names -----------------------------------------------------------------------------------
def study_folder(study: Study) -> str:
    return join_path(study.storage_path, study.name)


def experiment_name(study: Study, index: int = 0) -> str:
    """The index-th Tune experiment of a study, relative to the storage path."""
    return f"{study.name}/{TUNE}" + (f"-ext{index}" if index else "")


def stage1_experiment(experiment: str) -> str:
    """The shared stage-1 experiment beside a Tune experiment (`N/tune-ext1` -> `N/stage1-ext1`)."""
    parent, _, leaf = experiment.rpartition("/")
    return f"{parent}/{STAGE1}{leaf[len(TUNE):]}"


def split_experiment(storage_path: str, experiment: str) -> tuple[str, str]:
    """(Tune's storage_path, Tune's experiment name) of an experiment under the storage path."""
    parent, _, leaf = experiment.rpartition("/")
    return join_path(storage_path, parent) if parent else storage_path, leaf


def train_storage(study: Study) -> str:
    """Where worker-group trials keep their Ray Train runs."""
    return join_path(study_folder(study), TRAIN)


# ---- a local path or a URI, read and written alike --------------------------------------------
def _fs(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path)


def exists(path: str) -> bool:
    if "://" not in path:
        return os.path.lexists(path)
    import pyarrow.fs

    fs, inner = _fs(path)
    return fs.get_file_info(inner).type != pyarrow.fs.FileType.NotFound


def read_text(path: str) -> str | None:
    try:
        if "://" not in path:
            return Path(path).read_text()
        fs, inner = _fs(path)
        with fs.open_input_stream(inner) as fh:
            return fh.read().decode()
    except (OSError, FileNotFoundError):
        return None


def write_text(path: str, text: str) -> None:
    if "://" not in path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        return
    fs, inner = _fs(path)
    fs.create_dir(inner.rpartition("/")[0], recursive=True)
    with fs.open_output_stream(inner) as fh:
        fh.write(text.encode())


def remove(path: str) -> None:
    """Remove a file or a folder (with what is in it); nothing where there is none."""
    if "://" in path:
        import pyarrow.fs

        fs, inner = _fs(path)
        kind = fs.get_file_info(inner).type
        if kind == pyarrow.fs.FileType.Directory:
            fs.delete_dir(inner)
        elif kind == pyarrow.fs.FileType.File:
            fs.delete_file(inner)
        return
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def listing(path: str) -> list[str]:
    """The names in a folder (empty where there is none)."""
    if "://" not in path:
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    import pyarrow.fs

    fs, inner = _fs(path)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.Directory:
        return []
    infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=False))
    return sorted(i.base_name for i in infos)


# ---- whose a storage folder is ------------------------------------------------------------------
def new_study_id() -> str:
    return uuid.uuid4().hex[:12]


def owner(study: Study) -> dict[str, Any] | None:
    """The marker of the study's storage folder, or None where there is none (or it is not
    one of lfm-ray's)."""
    text = read_text(join_path(study_folder(study), MARKER))
    try:
        marker = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return marker if isinstance(marker, dict) else None


def claim(study: Study, study_id: str) -> None:
    """Mark the study's storage folder as this study's (before anything is put in it)."""
    write_text(join_path(study_folder(study), MARKER), json.dumps(
        {"study": study.name, "study_id": study_id, "results": str(study.result_dir)},
        indent=2))


def check_owner(study: Study, stored: dict[str, Any] | None, restart: bool) -> None:
    """Refuse to run where the study's storage folder (or its record) belongs to something
    else: a folder lfm-ray did not make for this study, or a record of an earlier layout."""
    folder = study_folder(study)
    here = exists(folder) and bool(listing(folder) or "://" in folder)
    marker = owner(study) if here else None
    if stored is not None and stored.get("storage_layout") != LAYOUT:
        if not restart:
            raise LfmError(f"{study.result_dir / 'study.json'} was written by an earlier lfm-ray "
                           "that kept a study's Tune experiments beside other studies' in the "
                           "storage path; it cannot be resumed or extended. Run with --restart "
                           "(its results files are replaced) or give a new --name")
        if here:
            raise LfmError(f"{folder} exists and is not marked as study {study.name!r}'s (an "
                           "earlier lfm-ray's experiment of that name, or another's); lfm-ray "
                           "deletes only what it can tell is the study's: remove it by hand, "
                           "or give another --storage-path or --name")
        return
    if not here:
        return
    if stored is None:
        whose = (f"it holds study {marker.get('study')!r} (study_id {marker.get('study_id')}, "
                 f"results {marker.get('results')})" if marker else
                 "it was not made by lfm-ray for this study")
        raise LfmError(f"study {study.name!r} has no record ({study.result_dir / 'study.json'}), "
                       f"but its storage folder {folder} exists: {whose}. Give another --name "
                       "or --storage-path (or remove that folder by hand if it is no longer "
                       "needed)")
    if marker is None or marker.get("study_id") != stored.get("study_id"):
        whose = f"study_id {marker.get('study_id')}" if marker else "no lfm-ray marker"
        raise LfmError(f"the storage folder {folder} is not study {study.name!r}'s as recorded "
                       f"in {study.result_dir / 'study.json'} (study_id {stored.get('study_id')}; "
                       f"the folder has {whose}). Give another --name or --storage-path")


# ---- what a restart removes ---------------------------------------------------------------------
def owned_results(study: Study) -> list[Path]:
    """The files and folders of the study's results folder that the study wrote."""
    d = study.result_dir
    if not d.is_dir():
        return []
    return [d / n for n in sorted(os.listdir(d))
            if n in RESULT_FILES or (n in RESULT_DIRS and (d / n).is_dir())
            or Path(n).suffix in RESULT_SUFFIXES and (d / n).is_file()]


def owned_storage(study: Study, stored: dict[str, Any] | None) -> list[str]:
    """The entries of the study's storage folder that are provably its own (the marker
    carries the study_id of its record)."""
    if stored is None or stored.get("storage_layout") != LAYOUT:
        return []
    marker = owner(study)
    if marker is None or marker.get("study_id") != stored.get("study_id"):
        return []
    folder = study_folder(study)
    names = {MARKER, TRAIN, *DATABASES}
    for exp in stored.get("experiments") or []:
        names.update({exp.rpartition("/")[2], stage1_experiment(exp).rpartition("/")[2]})
    return [join_path(folder, n) for n in listing(folder) if n in names]


def restart_removes(study: Study, stored: dict[str, Any] | None) -> str:
    """What --restart would remove, for a message."""
    paths = [str(p) for p in owned_results(study)] + owned_storage(study, stored)
    return ", ".join(paths) if paths else "nothing"


def discard(study: Study, stored: dict[str, Any] | None) -> list[str]:
    """--restart: remove what the study wrote (see the module docstring); returns what
    stays in its folders (not the study's)."""
    for path in owned_storage(study, stored):
        remove(path)
    for path in owned_results(study):
        remove(str(path))
    kept = []
    if stored is not None and stored.get("storage_layout") != LAYOUT:
        # An earlier lfm-ray's experiments sat beside other studies' under names another
        # study could have: they cannot be told apart, so they stay.
        for exp in stored.get("experiments") or []:
            for name in (exp, f"{exp}_stage1", f"{exp}_train"):
                if exists(join_path(study.storage_path, name)):
                    kept.append(join_path(study.storage_path, name))
    for folder in (str(study.result_dir), study_folder(study)):
        left = listing(folder)
        if left:
            kept += [join_path(folder, n) for n in left]
        elif "://" not in folder and os.path.isdir(folder):
            os.rmdir(folder)
    return kept
