"""A ViT's patch embedding as one matrix product.

The patch embedding is a convolution whose kernel equals its stride: each output is the dot
product of one non-overlapping patch with a filter. Written as patches @ filters it is the
same sum; on GPUs cuDNN runs this shape slowly (ViT-B/32 at batch 256 on an H100: 1.8 ms
forward and 2.8 ms for the weight gradient per step, about 15 % of a stage-1 step), while
the product takes a few tenths of a millisecond.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchConv2d(nn.Conv2d):
    """nn.Conv2d with kernel == stride, no padding, no dilation, one group, computed as a
    matrix product over the patches. Same parameters and state dict keys as the conv."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "PatchConv2d":
        out = cls.__new__(cls)
        out.__dict__.update(conv.__dict__)  # the same Parameter objects, hooks and settings
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p, q = self.kernel_size
        h, w = H // p, W // q
        # Trailing rows and columns that fill no patch are dropped, as the convolution does.
        x = x[:, :, :h * p, :w * q]
        patches = x.reshape(B, C, h, p, w, q).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * q)
        out = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
        return out.transpose(1, 2).reshape(B, self.out_channels, h, w)


def is_patch_conv(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and tuple(m.kernel_size) == tuple(m.stride)
            and tuple(m.padding) == (0, 0) and tuple(m.dilation) == (1, 1) and m.groups == 1
            and m.padding_mode == "zeros")


def patch_convs_as_matmul(model: nn.Module) -> int:
    """Swap every patch-embedding convolution in `model` for a PatchConv2d, in place;
    returns how many were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_patch_conv(child):
                setattr(parent, name, PatchConv2d.from_conv(child))
                swapped += 1
    return swapped
