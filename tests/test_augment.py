"""BatchBuilder against the authors' pipeline computed image by image (flip the PIL image, then
open_clip's evaluation transform); the batch resize against torchvision's resize of PIL images."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from lfm_ray.augment import BatchBuilder, DeviceImages
from lfm_ray.data.preprocess import resize_square
from lfm_ray.model import ImageSpec

SPEC = ImageSpec(48, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))


def direct(images: torch.Tensor, flips: torch.Tensor, spec: ImageSpec = SPEC) -> torch.Tensor:
    """Per image, as the authors' training transform: RandomHorizontalFlip on the PIL image,
    then the model's preprocessing (open_clip's evaluation transform)."""
    import open_clip

    transform = open_clip.image_transform(spec.size, is_train=False, mean=spec.mean,
                                          std=spec.std, resize_mode=spec.resize_mode,
                                          interpolation=spec.interpolation)
    out = []
    for img, flip in zip(images.numpy(), flips):
        pil = Image.fromarray(img)
        out.append(transform(ImageOps.mirror(pil) if flip else pil))
    return torch.stack(out).double()


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_batches_match_the_authors_pipeline_and_leave_the_input_alone(interpolation):
    spec = ImageSpec(48, SPEC.mean, SPEC.std, interpolation=interpolation)
    images = torch.randint(0, 256, (9, 20, 20, 3), dtype=torch.uint8)
    before = images.clone()
    flips = torch.rand(9, generator=torch.Generator().manual_seed(5)) < 0.5
    assert 0 < int(flips.sum()) < 9  # both cases occur
    got = BatchBuilder(spec, torch.device("cpu"))(images, flip=True,
                                                  generator=torch.Generator().manual_seed(5))
    assert got.shape == (9, 3, spec.size, spec.size) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), direct(images, flips, spec), atol=1e-5, rtol=0)
    assert torch.equal(images, before)
    plain = BatchBuilder(spec, torch.device("cpu"))(images)
    torch.testing.assert_close(plain.double(), direct(images, torch.zeros(9, dtype=torch.bool), spec),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_cifar_batch_resize_equals_torchvision(interpolation):
    """32 px → 224 px in batch: torchvision's Resize of each image as a PIL image (what CLIP's
    preprocessing does to a CIFAR image), to the uint8 (tolerance 0)."""
    from torchvision.transforms import InterpolationMode, Resize

    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    got = resize_square(images.permute(0, 3, 1, 2).float(), 224, interpolation)
    resize = Resize(224, interpolation=InterpolationMode(interpolation))
    want = np.stack([np.asarray(resize(Image.fromarray(im))) for im in images.numpy()])
    assert torch.equal(got, got.round())  # whole uint8 values
    assert np.array_equal(got.permute(0, 2, 3, 1).to(torch.uint8).numpy(), want)


@pytest.mark.parametrize("n,size", [(8, 32), (20, 48), (40, 24), (33, 7)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_batch_resize_equals_pillow_at_any_scale(n, size, interpolation):
    """Up, down, and by non-integer factors, where Pillow's rounding between passes and its
    fixed-point weights decide ties: still Pillow's uint8 exactly."""
    filters = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
    images = torch.randint(0, 256, (6, n, n, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(n))
    got = resize_square(images.permute(0, 3, 1, 2).double(), size, interpolation)
    want = np.stack([np.asarray(Image.fromarray(im).resize((size, size), filters[interpolation]))
                     for im in images.numpy()])
    assert np.array_equal(got.permute(0, 2, 3, 1).to(torch.uint8).numpy(), want)
    assert got.dtype == torch.float64


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
