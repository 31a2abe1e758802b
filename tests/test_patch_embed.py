"""PatchConv2d against the convolution it replaces: outputs and gradients, float64."""

import pytest
import torch
import torch.nn as nn

from lfm_ray.model import build_clip
from lfm_ray.patch_embed import PatchConv2d, is_patch_conv, patch_convs_as_matmul


@pytest.mark.parametrize("size,bias", [(32, False), (35, True)])  # 35: a remainder is dropped
def test_patch_conv_equals_the_convolution(size, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, kernel_size=8, stride=8, bias=bias).double()
    fast = PatchConv2d.from_conv(conv)
    assert fast.weight is conv.weight
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    want, got = conv(x), fast(x)
    assert got.shape == want.shape == (4, 16, size // 8, size // 8)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    (gw_want,) = torch.autograd.grad(want, conv.weight, g)
    (gw_got,) = torch.autograd.grad(got, fast.weight, g)
    torch.testing.assert_close(gw_got, gw_want, rtol=1e-12, atol=1e-12)
    # channels-last input, as the batch builder makes on a GPU
    xc = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(xc), want, rtol=1e-12, atol=1e-12)


def test_only_patch_convolutions_are_swapped():
    assert not is_patch_conv(nn.Conv2d(3, 8, kernel_size=3, stride=1, padding=1))
    assert not is_patch_conv(nn.Conv2d(3, 8, kernel_size=4, stride=2))
    model = build_clip("tiny")[0].visual
    before = model.state_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.eval()(x)
    assert patch_convs_as_matmul(model) == 1
    assert isinstance(model.conv1, PatchConv2d)
    assert list(model.state_dict()) == list(before)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
