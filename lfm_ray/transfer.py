"""Host-to-GPU copies that do not stall the host.

A plain `tensor.to("cuda")` from ordinary host memory waits until the GPU has finished all the
work queued before it, so the host stops queueing kernels and the GPU then idles while it
catches up. The training step moves a few small tensors per batch (positions, flips, labels,
mixing weights); copied from pinned memory without blocking they keep the queue full. The
values are the same either way.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device`; a CPU tensor bound for a GPU goes through pinned memory, non-blocking
    (PyTorch's pinned-memory cache keeps the staging buffer until the copy has run)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
