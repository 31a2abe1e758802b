"""What one Ray Train worker knows about its group, and the helpers that depend on it: the
sum over ranks and generators seeded from (seed, epoch, rank, ...)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from lfm_ray.config import RunConfig


@dataclass
class WorkerInfo:
    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def worker_info(cfg: RunConfig, in_tune_trial: bool = False) -> WorkerInfo:
    """Rank, world size and device of this worker. A loop in a Tune trial's own process
    (local mode) is the only rank; Ray refuses `ray.train` calls inside a Tune trial."""
    import ray.train

    if in_tune_trial:
        device = torch.device("cuda", 0) if cfg.runtime.gpus_per_worker > 0 \
            and torch.cuda.is_available() else torch.device("cpu")
        return WorkerInfo(rank=0, world_size=1, device=device)
    ctx = ray.train.get_context()
    if cfg.runtime.gpus_per_worker > 0 and torch.cuda.is_available():
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    return WorkerInfo(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), device=device)


def all_reduce_sum(t: torch.Tensor, info: WorkerInfo) -> torch.Tensor:
    if info.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from integers (seed, epoch, rank, ...), stable across runs."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p) + 1) % (2**61 - 1)
    return torch.Generator().manual_seed(seed)
