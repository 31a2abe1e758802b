"""Batches built on the device from uint8 images: gather, flip, resize, normalise.

Images stay uint8 (N, H, W, 3) for their whole life; a batch becomes float only here, in one
batched call, so no per-image Python work sits in the training step. Resizing uses bicubic
interpolation like CLIP's own preprocessing.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from lfm_ray.transfer import to_device

# Below this size a whole split is copied to the GPU once; above it, batches are gathered on
# the host and copied per step (ImageNet-LT at 224 px is about 17 GB).
GPU_RESIDENT_BYTES = 4 * 2**30


class DeviceImages:
    """One split's uint8 images, indexable by a LongTensor of positions, on `device` if small.

    On the CPU the array is used in place (a memory map of the node cache stays shared by
    every trial on the node); on a GPU a small split is copied there once.
    """

    def __init__(self, images: np.ndarray, device: torch.device):
        self.device = torch.device(device)
        self.count = len(images)
        on_gpu = self.device.type == "cuda" and images.nbytes <= GPU_RESIDENT_BYTES
        if on_gpu:
            with warnings.catch_warnings():  # a read-only memory map, only read for the copy
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                host = torch.from_numpy(np.ascontiguousarray(images))
            self._tensor = host.to(self.device)
            self._array = None
        else:
            self._tensor = None
            self._array = images

    def __len__(self) -> int:
        return self.count

    def gather(self, positions: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) on the device."""
        if self._tensor is not None:
            return self._tensor.index_select(0, to_device(positions, self.device))
        picked = self._array[positions.cpu().numpy()]
        out = torch.from_numpy(np.ascontiguousarray(picked))
        if self.device.type == "cuda":
            return out.pin_memory().to(self.device, non_blocking=True)
        return out


class BatchBuilder:
    """uint8 (B, H, W, 3) → normalised float (B, 3, S, S), with an optional random h-flip."""

    def __init__(self, spec, device: torch.device):
        # spec: lfm_ray.model.ImageSpec (size, mean, std) so preprocessing follows the model.
        self.spec = spec
        self.device = torch.device(device)
        self.mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1)

    @staticmethod
    def draw_flips(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Which of n images to flip, drawn on the CPU generator so that a seed gives the same
        flips on any device."""
        return torch.rand(n, generator=generator) < 0.5

    def __call__(self, images: torch.Tensor, flip: bool = False,
                 generator: torch.Generator | None = None,
                 flips: torch.Tensor | None = None) -> torch.Tensor:
        """flip=True draws the flips from `generator`; or pass them as a (B,) bool `flips`
        (the trainer builds an image batch and its partners in one call that way)."""
        x = to_device(images, self.device).permute(0, 3, 1, 2)  # a channels-last view
        if self.device.type == "cpu":
            # On the CPU, flips and normalisation over that view ran 5-9x slower than over
            # NCHW-contiguous data; a GPU is fastest left channels-last (same values either way).
            x = x.contiguous()
        x = x.float().div_(255.0)
        if flip and flips is None:
            flips = self.draw_flips(x.shape[0], generator)
        if flips is not None:
            # Only the drawn images are flipped (in place: x is this call's own tensor).
            picked = to_device(flips.nonzero().squeeze(1), self.device)
            x.index_copy_(0, picked, x.index_select(0, picked).flip(-1))
        size = self.spec.size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
            x = x.clamp_(0.0, 1.0)
        x = x.sub_(self.mean).div_(self.std)  # x is this call's own tensor: in place
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x
