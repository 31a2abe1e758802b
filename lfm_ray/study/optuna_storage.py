"""Where an Optuna search keeps its Optuna study, so that several drivers can write at once.

Ray Tune's OptunaSearch keeps an Optuna study in the storage it is given; every trial the
searcher asks for and every result it is told is written there, and a resumed search reads
its history back from it. lfm-ray gives it:

- `journal` (the default for a local storage path): Optuna's JournalStorage on a file,
  `<storage>/<name>/optuna.journal`, locked with Optuna's `JournalFileOpenLock` (an
  exclusive open of `<file>.lock`, which also works on NFS). Appends from several processes
  (two drivers of one study, or two studies sharing a file) are serialised by the lock, so
  none fails with SQLite's "database is locked". optuna-dashboard opens the file directly
  (`optuna-dashboard <storage>/<name>/optuna.journal`).
- `rdb`: a database URL the user gives (`--optuna-storage postgresql://...`, or
  `sqlite:///...` for one writer), checked before anything runs.
- `memory`: a cloud storage path (s3://, gs://) with no URL given: there is no file to lock,
  so the searcher keeps its study in memory and Tune's experiment checkpoint holds it.

The kind is recorded in study.json (`optuna_storage_kind`, and `optuna_journal`, the file
relative to the storage path) and decides results: a resumed search's sampler proposes from
the history in its storage, so resuming into another kind would start the sampler from an
empty (or someone else's) history while the study's finished trials lie elsewhere. A change
of kind is refused like any other result-deciding change; a change of URL within `rdb` is
not (the same database may be reached by another address from another machine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lfm_ray.errors import LfmError
from lfm_ray.study.spec import Study, join_path

JOURNAL_FILE = "optuna.journal"
LOCK_SUFFIX = ".lock"  # JournalFileOpenLock's lock file: <journal>.lock
KINDS = ("journal", "rdb", "memory")


def storage_kind(study: Study) -> str | None:
    """journal, rdb or memory for an Optuna search; None for other searches."""
    if study.search != "optuna":
        return None
    if study.optuna_storage:
        return "rdb"
    return "memory" if "://" in str(study.storage_path) else "journal"


def journal_path(study: Study) -> Path:
    """The study's journal file: <storage>/<name>/optuna.journal (a local storage path)."""
    return Path(join_path(study.storage_path, study.name)).expanduser() / JOURNAL_FILE


def journal_relative(study: Study) -> str:
    """The journal file relative to the storage path, as study.json records it."""
    return f"{study.name}/{JOURNAL_FILE}"


def open_journal(path: str | Path):
    """Optuna's JournalStorage on `path` with Optuna's open-file lock (creates the folder)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path),
                                             lock_obj=JournalFileOpenLock(str(path))))


def open_storage(study: Study):
    """The Optuna storage the study's searcher writes to (None: in memory)."""
    kind = storage_kind(study)
    if kind == "journal":
        return open_journal(journal_path(study))
    if kind == "rdb":
        import optuna

        url = str(study.optuna_storage)
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url)
    return None


def check_optuna_storage(url: str | None) -> None:
    """A storage URL SQLAlchemy can parse, of a dialect it has; checked before anything is
    written (a bad URL would otherwise fail inside Tune after the study started)."""
    if url is None:
        return
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        parsed.get_dialect()  # an unknown scheme fails here ("bogus://x")
    except Exception as exc:  # noqa: BLE001 - ArgumentError, NoSuchModuleError, ...
        raise LfmError(f"--optuna-storage {url!r} is not a database URL Optuna can use "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                       "expected e.g. sqlite:///path/optuna.db or "
                       "postgresql://user@host/db") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).expanduser().absolute().parent
        from lfm_ray.study.spec import check_storage

        check_storage(str(folder), "--optuna-storage folder")


def check_storage_choice(study: Study) -> None:
    """Before anything runs: a URL only for Optuna searches, and one Optuna can use (parsed,
    its dialect installed, and a database server answering); one LfmError otherwise."""
    url = study.optuna_storage
    if url is None:
        return
    if study.search != "optuna":
        raise LfmError(f"--optuna-storage is for --search optuna; this study is a "
                       f"{study.search} search")
    check_optuna_storage(url)  # parses, has a dialect, an SQLite folder that can be written
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    if make_url(url).get_backend_name() == "sqlite":
        return  # a file: connecting would create it, and nothing may be written yet
    try:
        engine = create_engine(url, connect_args={"connect_timeout": 10}
                               if make_url(url).get_backend_name() in ("postgresql", "mysql")
                               else {})
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - OperationalError, ImportError of a driver, ...
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LfmError(f"--optuna-storage {url!r}: the database cannot be opened ({first}); "
                       "start it, fix the URL, or leave the flag out for the study's "
                       "journal file") from None


def storage_record(study: Study) -> dict[str, Any]:
    """study.json's fields: the kind and, for a journal, its file relative to the storage path."""
    kind = storage_kind(study)
    return {"optuna_storage_kind": kind,
            "optuna_journal": journal_relative(study) if kind == "journal" else None}


def recorded_journal(meta: dict[str, Any], roots: list[Path]) -> Path | None:
    """The journal file a study.json names, under the first of `roots` (where its storage
    path may be on this machine) that has it; None when there is none."""
    rel = meta.get("optuna_journal")
    if not rel:
        return None
    for root in roots:
        if (root / rel).is_file():
            return root / rel
    return None
