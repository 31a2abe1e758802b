"""A run's confusion matrix on the reported (test) split, saved beside the sampling matrix P.

`confusion.npz` holds what the paper's Fig. 7 sets side by side: the C×C counts of test
images (row: true class, column: predicted class) and LFM's sampling matrix P at the run's
stage-1 τ. The trainer writes it into every checkpoint from the first test evaluation on
(counts of `epoch`, the epoch the acc_* figures come from) and `lfm-ray train` copies the
final one beside metrics.json. Counts are integers, so the file stays small; above
MAX_CLASSES classes (iNaturalist's 8,142 would be 66 million cells) it is only written when
`runtime.save_confusion` asks for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lfm_ray.contract import CONFUSION_FILE
from lfm_ray.errors import LfmError

MAX_CLASSES = 1000  # `runtime.save_confusion = None` saves up to this many classes


def wanted(save_confusion: bool | None, num_classes: int) -> bool:
    """Whether a run of `num_classes` classes keeps its confusion matrix."""
    if save_confusion is not None:
        return bool(save_confusion)
    return num_classes <= MAX_CLASSES


def add_counts(counts: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor) -> None:
    """counts[y, ŷ] += 1 for every (label, prediction) pair, in place (no C² temporary)."""
    ones = torch.ones(len(labels), dtype=counts.dtype)
    counts.index_put_((labels.long(), predicted.long()), ones, accumulate=True)


def write(path: Path, counts: Any, sampling_matrix: Any, *, class_names: Sequence[str],
          split: str, epoch: int, tau: float, source: str | None = None) -> None:
    """One confusion.npz: counts (int64, C×C), P (float32, C×C), and what they are of
    (`source`: the similarity P was computed from, as mix.similarity names it)."""
    counts = np.asarray(counts)
    C = counts.shape[0]
    if counts.shape != (C, C) or np.asarray(sampling_matrix).shape != (C, C):
        raise ValueError(f"confusion counts {counts.shape} and P "
                         f"{np.asarray(sampling_matrix).shape} must both be C×C")
    np.savez_compressed(
        path, counts=counts.astype(np.int64),
        sampling_matrix=np.asarray(sampling_matrix, dtype=np.float32),
        class_names=np.asarray(list(class_names), dtype=str),
        split=np.asarray(split), epoch=np.asarray(int(epoch)), tau=np.asarray(float(tau)),
        **({"source": np.asarray(str(source))} if source else {}))


def read(path: str | Path) -> dict[str, Any]:
    """The contents of a confusion.npz (or of the one in a folder: a run or a checkpoint)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFUSION_FILE
    if not path.is_file():
        raise LfmError(f"{path} does not exist; a run saves it for data sets of at most "
                       f"{MAX_CLASSES} classes, or with runtime.save_confusion true")
    with np.load(path, allow_pickle=False) as z:
        return {"counts": z["counts"], "sampling_matrix": z["sampling_matrix"],
                "class_names": [str(n) for n in z["class_names"]], "split": str(z["split"]),
                "epoch": int(z["epoch"]), "tau": float(z["tau"]),
                "source": str(z["source"]) if "source" in z.files else None}
