"""Reading checkpoint files without running code from them.

A pickle names the functions that rebuild its objects, and loading it calls them, so a
crafted state.pt in a shared storage path could run any code on every node that reads it.
Every checkpoint lfm-ray reads (resume, stage-1 branches, the analysis, t-SNE) therefore
goes through `load_state_file`, which uses torch's weights-only unpickler: it admits
tensors, numbers, strings, None and plain containers (dict, list, tuple, OrderedDict),
which is all the trainer writes (lfm_ray.worker.loop.save_state), and refuses any other name
before anything is called.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

from lfm_ray.errors import LfmError


def refused_name(message: str) -> str | None:
    """What the weights-only unpickler refused ('posix.system'), from its message."""
    m = re.search(r"unsupported GLOBAL (\S+)", message, re.IGNORECASE) \
        or re.search(r"Unsupported global: GLOBAL (\S+)", message)
    return m.group(1).rstrip(".,") if m else None


def load_state_file(path: str | os.PathLike, map_location: Any = "cpu",
                    mmap: bool = False, what: str = "checkpoint") -> dict[str, Any]:
    """The dict a trainer checkpoint file (state.pt) holds, read weights-only; one LfmError
    for a missing path, a directory, a file that is not a checkpoint, or one that holds
    anything but tensors and plain data (whose loading could run code)."""
    import torch

    file = Path(path)
    if file.is_dir():
        raise LfmError(f"{what} file {str(file)!r} is a directory; give the state.pt file")
    if not file.is_file():
        raise LfmError(f"{what} file {str(file)!r} does not exist")
    try:
        state = torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        name = refused_name(str(exc))
        if name is None:  # a damaged or foreign file, not a refused object
            raise LfmError(f"{what} file {str(file)!r} is not a PyTorch checkpoint "
                           f"({_first_line(exc)})") from None
        raise LfmError(
            f"{what} file {str(file)!r} is refused: it names {name}, and a checkpoint of the "
            "lfm-ray trainer holds only tensors, numbers, strings and plain containers; "
            "loading it could run code. Use checkpoints you wrote yourself, from storage "
            "only trusted people can write") from None
    except Exception as exc:  # noqa: BLE001 - torch raises assorted types for a bad file
        raise LfmError(f"{what} file {str(file)!r} is not a PyTorch checkpoint "
                       f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(state, dict):
        raise LfmError(f"{what} file {str(file)!r} holds a {type(state).__name__}, not the "
                       "dict of an lfm-ray trainer checkpoint")
    return state


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__
