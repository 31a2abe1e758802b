"""Batches built on the device from uint8 images: gather, flip, resize, normalise.

Images stay uint8 (N, H, W, 3) for their whole life; a batch becomes float only here, in one
batched call, so no per-image Python work sits in the training step. Images not yet at the
model's size (square in-memory sets too big to store resized) are resized here with the
model's interpolation, giving exactly the uint8 image the model's own (Pillow) preprocessing
would (lfm_ray/data/preprocess.py).

Training augmentation is a random horizontal flip (probability 0.5) of the stored image,
which for lazily decoded sets is already the model's centre crop.

Test-time augmentation (`eval.tta`; `BatchBuilder.views`) gives each evaluation image
several views whose logits the trainer averages: flip, the model's input and its mirror;
fivecrop, the four corner crops and the centre crop at the model's input size S of the image
resized to a larger side R (the node cache keeps the evaluation splits at R for it).
"""

from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np
import torch

from lfm_ray.data.preprocess import resize_square
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
        # spec: lfm_ray.data.preprocess.ImageSpec (size, interpolation, mean, std), so preprocessing
        # follows the model.
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
        x = self._pixels(images)
        if flip and flips is None:
            flips = self.draw_flips(x.shape[0], generator)
        if flips is not None:
            # Only the drawn images are flipped (in place: x is this call's own tensor).
            picked = to_device(flips.nonzero().squeeze(1), self.device)
            x.index_copy_(0, picked, x.index_select(0, picked).flip(-1))
        # The flip comes first, as in the authors' pipeline (flip the image, then CLIP's resize).
        x = resize_square(x, self.spec.size, self.spec.interpolation)
        return self._normalised(x)

    def views(self, images: torch.Tensor, tta: str = "none",
              resize: int | None = None) -> Iterator[torch.Tensor]:
        """The test-time views of a uint8 (B, H, W, 3) evaluation batch, one normalised
        (B, 3, S, S) batch at a time: none, the model's input; flip, it and its mirror;
        fivecrop, the images resized to `resize` (unless stored at it) cut into their
        top-left, top-right, bottom-left, bottom-right and centre S × S crops."""
        x = self._pixels(images)
        if tta == "fivecrop":
            if resize is None or resize <= self.spec.size:
                raise ValueError(f"five crops of {self.spec.size} px need resize > "
                                 f"{self.spec.size}, got {resize}")
            x = resize_square(x, resize, self.spec.interpolation)
            for crop in five_crops(x, self.spec.size):
                yield self._normalised(crop.clone())  # crops are views of x: their own copy
            return
        if tta not in ("none", "flip"):
            raise ValueError(f"unknown test-time augmentation {tta!r}")
        x = resize_square(x, self.spec.size, self.spec.interpolation)
        mirrored = x.flip(-1) if tta == "flip" else None  # a copy, taken before x is normalised
        yield self._normalised(x)
        if mirrored is not None:
            yield self._normalised(mirrored)

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) → this call's own float (B, 3, H, W) of values 0..255."""
        x = to_device(images, self.device).permute(0, 3, 1, 2)  # a channels-last view
        if self.device.type == "cpu":
            # On the CPU, flips and normalisation over that view ran 5-9x slower than over
            # NCHW-contiguous data; a GPU is fastest left channels-last (same values either way).
            x = x.contiguous()
        # 0..255 until the resize is done: it rounds as Pillow does, in uint8 steps.
        return x.float()

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        """0..255 float → the model's normalisation, in place (x is the caller's own)."""
        x = x.div_(255.0).sub_(self.mean).div_(self.std)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def five_crops(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """The top-left, top-right, bottom-left, bottom-right and centre size × size crops of
    (B, C, H, W) images, as torchvision's five_crop takes them (views of x)."""
    height, width = x.shape[-2:]
    if size > min(height, width):
        raise ValueError(f"crops of {size} px from images of {height} × {width}")
    bottom, right = height - size, width - size
    top, left = int(round(bottom / 2.0)), int(round(right / 2.0))  # torchvision's centre
    return [x[..., :size, :size], x[..., :size, right:], x[..., bottom:, :size],
            x[..., bottom:, right:], x[..., top:top + size, left:left + size]]
