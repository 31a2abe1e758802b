"""BatchBuilder against a direct per-image computation: flip, bicubic resize, clamp, normalise."""

import numpy as np
import torch
import torch.nn.functional as F

from lfm_ray.augment import BatchBuilder, DeviceImages
from lfm_ray.model import ImageSpec

SPEC = ImageSpec(48, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))


def direct(images: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    out = []
    for img, flip in zip(images, flips):
        x = img.permute(2, 0, 1).double() / 255.0          # (3, H, W)
        if flip:
            x = x.flip(-1)                                  # left-right
        x = F.interpolate(x[None], size=(SPEC.size, SPEC.size), mode="bicubic",
                          align_corners=False)[0].clamp(0, 1)
        mean = torch.tensor(SPEC.mean, dtype=torch.float64).view(3, 1, 1)
        std = torch.tensor(SPEC.std, dtype=torch.float64).view(3, 1, 1)
        out.append((x - mean) / std)
    return torch.stack(out)


def test_batches_match_the_direct_computation_and_leave_the_input_alone():
    images = torch.randint(0, 256, (9, 20, 20, 3), dtype=torch.uint8)
    before = images.clone()
    flips = torch.rand(9, generator=torch.Generator().manual_seed(5)) < 0.5
    assert 0 < int(flips.sum()) < 9  # both cases occur
    got = BatchBuilder(SPEC, torch.device("cpu"))(images, flip=True,
                                                  generator=torch.Generator().manual_seed(5))
    assert got.shape == (9, 3, SPEC.size, SPEC.size) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), direct(images, flips), atol=1e-5, rtol=0)
    assert torch.equal(images, before)
    plain = BatchBuilder(SPEC, torch.device("cpu"))(images)
    torch.testing.assert_close(plain.double(), direct(images, torch.zeros(9, dtype=torch.bool)),
                               atol=1e-5, rtol=0)


def test_device_images_gather_by_position():
    arr = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    images = DeviceImages(arr, torch.device("cpu"))
    assert len(images) == 5
    got = images.gather(torch.tensor([4, 0, 4]))
    assert torch.equal(got, torch.from_numpy(arr[[4, 0, 4]]))


def test_one_build_of_images_and_partners_equals_two_builds():
    """The trainer's single build of [images; partners] with flips drawn as two builds draw
    them gives exactly the two builds' batches."""
    images = torch.randint(0, 256, (6, 20, 20, 3), dtype=torch.uint8)
    partners = torch.randint(0, 256, (6, 20, 20, 3), dtype=torch.uint8)
    build = BatchBuilder(SPEC, torch.device("cpu"))
    g = torch.Generator().manual_seed(11)
    want_i, want_j = build(images, flip=True, generator=g), build(partners, flip=True, generator=g)
    g = torch.Generator().manual_seed(11)
    flips = torch.cat([build.draw_flips(6, g), build.draw_flips(6, g)])
    both = build(torch.cat([images, partners]), flips=flips)
    assert torch.equal(both[:6], want_i) and torch.equal(both[6:], want_j)
