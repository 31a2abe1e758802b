"""Images as the model's own preprocessing gives them, up to (not including) ToTensor/Normalize.

open_clip's evaluation transform (`open_clip.image_transform(..., is_train=False)`) brings a
PIL image to the model's input size S in one of three ways, its `resize_mode`, each with the
model's `interpolation` (bicubic or bilinear, Pillow's filters), and then converts it to RGB:

- shortest: the short side to S, the long side to int(S · long / short), then the centre
  S × S crop (CLIP's own preprocessing);
- longest: the long side to S, each side to round(side · S / long), then padded to S × S with
  `fill_color`, the image centred (left and top get the smaller half of an odd margin);
- squash: straight to S × S; the aspect ratio is not kept.

`preprocess_file` makes the same Pillow calls in the same order, so the node cache holds
exactly what open_clip would feed the model. In-memory sets (CIFAR, digits) are square, and
for a square image every mode is the plain resize to S × S: `resize_square` does that resize
in batch, on any device, and gives Pillow's uint8 result exactly. Pillow's bicubic filter is
not PyTorch's (a = -0.5, not -0.75; taps past the border are dropped, not clamped), and
Pillow rounds to uint8 between its horizontal and vertical passes with 22-bit fixed-point
weights; `resize_square` applies those very integer weights in float64, where the sums of
uint8 values times them are exact, so no rounding differs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lfm_ray.errors import LfmError

if TYPE_CHECKING:
    import torch


RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")
# Pillow's fixed point for 8-bit images: a weight of 1 is 2**22, and a sum is rounded to
# uint8 as (sum + 2**21) >> 22, clipped to 0..255.
_FIXED_BITS = 22


def check_preprocessing(size: object, resize_mode: object, interpolation: object,
                        fill_color: object, what: str = "image preprocessing") -> None:
    """LfmError naming `what` and the accepted values unless all four are valid."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise LfmError(f"{what}: size {size!r} is not valid; expected a positive integer")
    if resize_mode not in RESIZE_MODES:
        raise LfmError(f"{what}: resize_mode {resize_mode!r} is not valid; expected one of "
                       f"{', '.join(RESIZE_MODES)}")
    if interpolation not in INTERPOLATIONS:
        raise LfmError(f"{what}: interpolation {interpolation!r} is not valid; expected one of "
                       f"{', '.join(INTERPOLATIONS)}")
    if isinstance(fill_color, bool) or not isinstance(fill_color, int) \
            or not 0 <= fill_color <= 255:
        raise LfmError(f"{what}: fill_color {fill_color!r} is not valid; expected an integer "
                       "0..255")


@dataclass(frozen=True)
class ImageSpec:
    """What the model expects, from its open_clip preprocessing config: the square input size,
    per-channel mean and std (in [0, 1] units), and how an image is brought to that size:
    resize_mode (shortest, longest or squash, as open_clip defines them; see
    lfm_ray/data/preprocess.py), interpolation (bicubic or bilinear) and fill_color (the
    padding of 'longest'). Those three default to open_clip's own defaults (its PreprocessCfg),
    which is what a model without them in its config gets from open_clip too."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    fill_color: int = 0

    def __post_init__(self) -> None:
        check_preprocessing(self.size, self.resize_mode, self.interpolation, self.fill_color,
                            "ImageSpec")



# ---- image files: Pillow, as open_clip calls it ---------------------------------------------
def resized_size(width: int, height: int, size: int, resize_mode: str) -> tuple[int, int]:
    """(width, height) an image of width × height is resized to before the crop or pad."""
    if resize_mode == "squash":
        return size, size
    if resize_mode == "shortest":  # torchvision's Resize(size): the long side truncated
        short, long = min(width, height), max(width, height)
        new_long = int(size * long / short)
        return (size, new_long) if width <= height else (new_long, size)
    # longest (open_clip's ResizeKeepRatio with longest=1): both sides rounded (half to even)
    ratio = max(height / size, width / size)
    return round(width / ratio), round(height / ratio)


def _crop_or_pad(im, size: int, fill_color: int):
    """The centre size × size of a Pillow image, padded with fill_color where it is smaller."""
    from PIL import ImageOps

    width, height = im.size
    if width < size or height < size:
        border = ((size - width) // 2 if width < size else 0,
                  (size - height) // 2 if height < size else 0,
                  (size - width + 1) // 2 if width < size else 0,
                  (size - height + 1) // 2 if height < size else 0)
        bands = len(im.getbands())  # one fill value per band, as torchvision passes it
        fill = fill_color if bands == 1 else (fill_color,) * bands
        im = ImageOps.expand(im, border=border, fill=fill)
        width, height = im.size
        if (width, height) == (size, size):
            return im
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


# JPEG draft decoding (libjpeg's DCT-domain scaling by 1/2, 1/4 or 1/8) is allowed down to
# this many times the size the image is then resized to, never below: the resize that follows
# still averages at least two decoded pixels per output pixel, and the pixels differ from a
# full decode only by rounding (tested: mean absolute difference under 2 levels of 255 on
# natural-like and pure-noise images; README lists it).
DRAFT_MARGIN = 2


def _torch_downscale(pixels: "torch.Tensor", new: tuple[int, int], interpolation: str
                     ) -> np.ndarray:
    """uint8 (C, H, W) pixels resized down to `new` (width, height) by PyTorch's uint8
    antialiased resize, returned as (h, w, C): Pillow's filter (a = -0.5 for bicubic, the
    support widened by the scale) in separable fixed-point passes, vectorised; about 3 times
    Pillow's own resize on one core. Its rounding differs from Pillow's on a few pixels by
    one level (tested: at most 1, on under 2 % of the pixels)."""
    import torch.nn.functional as F

    out = F.interpolate(pixels.unsqueeze(0), size=(new[1], new[0]), mode=interpolation,
                        antialias=True)[0].numpy()
    # The kernel returns (C, h, w) planes. One strided copy per plane into (h, w, C) is about
    # five times numpy's or PyTorch's copy of the whole transposed view, which walks the
    # planes innermost.
    hwc = np.empty((out.shape[1], out.shape[2], out.shape[0]), dtype=np.uint8)
    for band in range(out.shape[0]):
        hwc[..., band] = out[band]
    return hwc


def decode_jpeg(path: str, mode: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB or (H, W, 1) greyscale pixels of a JPEG whose Pillow mode is
    `mode`, decoded in full by simplejpeg: the same libjpeg-turbo calls Pillow makes (its
    accurate integer IDCT, fancy chroma upsampling), so the same pixels (tested equal to
    Pillow's decode), written straight into one numpy array where Pillow decodes into its own
    4-byte pixels and copies them out twice; about 1.7 times Pillow's decode on one core.
    Corrupt or truncated data raises ValueError (strict), as Pillow raises OSError."""
    import simplejpeg

    with open(path, "rb") as f:
        data = f.read()
    return simplejpeg.decode_jpeg(data, colorspace="RGB" if mode == "RGB" else "GRAY",
                                  strict=True)


def _fast_jpeg(path: str, mode: str, spec: "ImageSpec", new: tuple[int, int]) -> np.ndarray:
    """An RGB or greyscale JPEG decoded in full by decode_jpeg, resized down by
    _torch_downscale, cropped or padded as an array, as RGB."""
    import torch

    pixels = decode_jpeg(path, mode)  # writable, so torch.from_numpy may share it
    pixels = pixels if pixels.ndim == 3 else pixels[..., None]
    out = _torch_downscale(torch.from_numpy(pixels).permute(2, 0, 1), new, spec.interpolation)
    if spec.resize_mode != "squash":
        out = _crop_or_pad_array(out, spec.size, spec.fill_color)
    # Greyscale to RGB repeats the one band, as Pillow's convert does.
    return np.ascontiguousarray(np.broadcast_to(out, (*out.shape[:2], 3)))


def _crop_or_pad_array(pixels: np.ndarray, size: int, fill_color: int) -> np.ndarray:
    """_crop_or_pad on (H, W, C) uint8 pixels: the same centre crop and the same padding."""
    height, width = pixels.shape[:2]
    if width < size or height < size:
        left, top = max(size - width, 0) // 2, max(size - height, 0) // 2
        padded = np.full((max(height, size), max(width, size), pixels.shape[2]), fill_color,
                         dtype=np.uint8)
        padded[top:top + height, left:left + width] = pixels
        pixels, (height, width) = padded, padded.shape[:2]
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return pixels[top:top + size, left:left + size]


def preprocess_file(path: str, spec: "ImageSpec", exact: bool = False) -> np.ndarray:
    """uint8 (S, S, 3) RGB of one image file, as the model's preprocessing gives it.

    As open_clip: resize in the file's own colour mode, crop or pad, then convert to RGB.
    `exact=True` makes open_clip's very Pillow calls. By default two speed-ups apply to JPEGs,
    each pinned to the exact path by a test and listed in README: a JPEG at least
    2 × DRAFT_MARGIN times the size it is resized to is decoded at a reduced scale by libjpeg
    (pixels within rounding of the full decode: see DRAFT_MARGIN) and resized by Pillow; any
    other RGB or greyscale JPEG resized down is decoded by decode_jpeg (Pillow's pixels) and
    resized by PyTorch's uint8 kernel (within one level: _torch_downscale)."""
    from PIL import Image

    filters = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
    try:
        with Image.open(path) as im:
            new = resized_size(im.width, im.height, spec.size, spec.resize_mode)
            fast = not exact and im.format == "JPEG" and new != im.size
            drafted = fast and im.width // 2 >= DRAFT_MARGIN * new[0] \
                and im.height // 2 >= DRAFT_MARGIN * new[1]
            if fast and not drafted and im.mode in ("RGB", "L") and new[0] <= im.width \
                    and new[1] <= im.height:
                return _fast_jpeg(path, im.mode, spec, new)
            if drafted:
                im.draft(im.mode, (DRAFT_MARGIN * new[0], DRAFT_MARGIN * new[1]))
                new = resized_size(im.width, im.height, spec.size, spec.resize_mode)
            out = im.resize(new, filters[spec.interpolation]) if new != im.size else im
            if spec.resize_mode != "squash":
                out = _crop_or_pad(out, spec.size, spec.fill_color)
            return np.asarray(out.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # missing, bad, too big
        raise LfmError(f"cannot read image {path}: {exc}") from None


# ---- in-memory square images: Pillow's resize in batch ---------------------------------------
def _bicubic(x: float) -> float:
    a = -0.5  # Pillow's (and CLIP's preprocessing's) bicubic; PyTorch's uses -0.75
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}  # filter, its support


@functools.lru_cache(maxsize=64)
def pillow_weights(in_size: int, out_size: int, interpolation: str) -> np.ndarray:
    """(out_size, in_size) float64 matrix of Pillow's resampling weights for one axis, in its
    fixed point (integers; 2**22 stands for 1), computed in Pillow's order of operations."""
    filt, support = _FILTERS[interpolation]
    scale = in_size / out_size
    stretch = max(scale, 1.0)      # a downscale widens the filter: antialiasing
    reach = support * stretch
    inverse = 1.0 / stretch
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        centre = (i + 0.5) * scale
        lo = max(int(centre - reach + 0.5), 0)  # int() truncates toward zero, as C's cast
        hi = min(int(centre + reach + 0.5), in_size)
        w = np.array([filt((j - centre + 0.5) * inverse) for j in range(lo, hi)])
        total = w.sum()
        if total != 0.0:
            w = w / total
        w = w * (1 << _FIXED_BITS)
        weights[i, lo:hi] = np.where(w < 0, np.trunc(w - 0.5), np.trunc(w + 0.5))
    return weights


@functools.lru_cache(maxsize=64)
def _weights_on(in_size: int, out_size: int, interpolation: str, device: str) -> "torch.Tensor":
    import torch

    return torch.from_numpy(pillow_weights(in_size, out_size, interpolation)).to(device)


def _to_uint8_values(fixed: "torch.Tensor") -> "torch.Tensor":
    """Pillow's rounding of a fixed-point sum to uint8, in place: (sum + 2**21) >> 22, clipped."""
    return fixed.add_(1 << (_FIXED_BITS - 1)).div_(1 << _FIXED_BITS).floor_().clamp_(0, 255)


def resize_square(x: "torch.Tensor", size: int, interpolation: str) -> "torch.Tensor":
    """(B, C, n, n) float holding uint8 values → (B, C, size, size) of the same dtype and
    device, equal to Pillow's resize of each uint8 image (horizontal pass first, as Pillow)."""
    import torch

    n = x.shape[-1]
    if x.shape[-2] != n:
        raise ValueError(f"resize_square takes square images, got {tuple(x.shape[-2:])}")
    if n == size:
        return x
    w = _weights_on(n, size, interpolation, str(x.device))
    # float64 holds every sum exactly (|sum| <= 255 · Σ|weight| < 2**31 << 2**53), in any
    # order of summation; autocast must not lower it.
    with torch.autocast(device_type=x.device.type, enabled=False):
        rows = _to_uint8_values(torch.matmul(x.double(), w.t()))   # (B, C, n, size)
        out = _to_uint8_values(torch.matmul(w, rows))             # (B, C, size, size)
    return out.to(x.dtype)


def resize_uint8(images: np.ndarray, size: int, interpolation: str,
                 chunk: int = 1024) -> np.ndarray:
    """uint8 (N, n, n, 3) → uint8 (N, size, size, 3), exactly as the batch builder resizes."""
    import torch

    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + chunk]))
        x = resize_square(x.permute(0, 3, 1, 2).float(), size, interpolation)
        out[start:start + chunk] = x.byte().permute(0, 2, 3, 1).numpy()
    return out
