"""Progress of one training, drawn by the driver from the run's own reports.

Ray Train V2 runs report callbacks on its controller, not in the process that called
`fit()`, so the training loop's rank 0 also puts each epoch's metrics into a small Ray queue
that the driver reads on a thread: one bar per stage with epoch, loss, accuracy (percent) and
ETA, drawn here and not inside Ray's workers.
"""

from __future__ import annotations

import math
import sys
import threading
from typing import Any

from lfm_ray.config import RunConfig

DONE = "__done__"


class StageBars:
    """One tqdm bar per stage, advanced by each reported epoch."""

    def __init__(self, cfg: RunConfig, stream=None):
        self.epochs = {1: cfg.stage1.epochs, 2: cfg.stage2.epochs}
        self.stream = stream or sys.stderr
        self.bars: dict[int, Any] = {}

    def _bar(self, stage: int):
        from tqdm import tqdm

        if stage not in self.bars:
            for other in self.bars.values():
                other.close()
            self.bars[stage] = tqdm(total=self.epochs.get(stage, 0), desc=f"stage {stage}",
                                    unit="epoch", file=self.stream, dynamic_ncols=True,
                                    leave=True)
        return self.bars[stage]

    def update(self, metrics: dict[str, Any]) -> None:
        stage = int(metrics.get("stage") or 0)
        if stage not in self.epochs:
            return
        bar = self._bar(stage)
        first = 1 if stage == 1 else self.epochs[1] + 1
        done = int(metrics["epoch"]) - first + 1
        bar.set_postfix_str(describe(metrics), refresh=False)
        if done > bar.n:
            bar.update(done - bar.n)  # a resumed run's first report jumps part-way
        else:
            bar.refresh()

    def start(self) -> None:
        """Stage 1's bar from the start, so its rate and ETA count from the first epoch."""
        if self.epochs[1] > 0:
            self._bar(1)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def describe(metrics: dict[str, Any]) -> str:
    """'loss 1.234, all 56.7 %, few 12.0 %' (accuracies in percent; files keep fractions)."""
    parts = []
    loss = metrics.get("train_loss")
    if isinstance(loss, (int, float)) and math.isfinite(loss):
        parts.append(f"loss {loss:.4f}")
    for key, label in (("val_acc_all", "val all"), ("acc_all", "all"), ("acc_few", "few")):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts.append(f"{label} {100 * value:.1f} %")
    return ", ".join(parts)


class ProgressFeed:
    """The queue the training loop reports into, and the driver thread that draws the bars."""

    def __init__(self, cfg: RunConfig):
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=0)
        self.bars = StageBars(cfg)
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._stop = threading.Event()

    def __enter__(self) -> "ProgressFeed":
        self.bars.start()
        self._thread.start()
        return self

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                item = self.queue.get(block=True, timeout=0.5)
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue actor went away with Ray; stop drawing
                return
            self.bars.update(item)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        try:  # the epochs reported since the last poll
            while not self.queue.empty():
                self.bars.update(self.queue.get_nowait())
        except Exception:  # noqa: BLE001 - best effort at the end
            pass
        self.bars.close()
        try:
            import ray

            ray.kill(self.queue.actor)
        except Exception:  # noqa: BLE001
            pass


def report_progress(queue: Any, metrics: dict[str, Any]) -> None:
    """From the training loop's rank 0: one epoch's metrics to the driver's bars."""
    try:
        queue.put_nowait({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))})
    except Exception:  # noqa: BLE001 - a progress bar must never stop a training
        pass
