"""Checks of the files a command will write, made before it does any work (a report or a
benchmark is not computed only to find that its output path cannot be written)."""

from __future__ import annotations

import os
from pathlib import Path

from lfm_ray.errors import LfmError


def check_output_file(path: str | os.PathLike, flag: str,
                      suffixes: tuple[str, ...] = ()) -> Path:
    """`path` can be written: not a folder, its folder exists and is writable, and it ends
    in one of `suffixes` (where given). Returns it as a Path; one LfmError otherwise."""
    target = Path(path).expanduser()
    if suffixes and target.suffix.lower() not in suffixes:
        raise LfmError(f"{flag} {str(target)!r} must name a {' or '.join(suffixes)} file")
    if target.is_dir():
        raise LfmError(f"{flag} {str(target)!r} is a folder; give a file name in it")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.exists():
        raise LfmError(f"{flag} {str(target)!r}: the folder {str(parent)!r} does not exist; "
                       "create it first")
    if not parent.is_dir():
        raise LfmError(f"{flag} {str(target)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists()
                                                    and not os.access(target, os.W_OK)):
        raise LfmError(f"{flag} {str(target)!r} cannot be written (no permission)")
    return target
