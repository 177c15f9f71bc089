"""Aspect-ratio buckets, bucket assignment and resize-to-bucket.

See ``docs/design.md``, "Buckets and control images".

Sizes are (width, height) everywhere in this module.

Resampling: Lanczos (PIL) when enlarging, as Musubi does. When shrinking Musubi uses OpenCV's
``INTER_AREA``; tsumugi does not depend on OpenCV and implements the same area averaging in numpy
(:func:`area_resize`): each output pixel is the mean of the input it covers, partially covered input
pixels weighted by the covered fraction. PIL's ``BOX`` filter is not used because it weights whole
pixels by whether their *centre* falls in the footprint, which differs from area averaging for
non-integer factors. The result differs from OpenCV only by float rounding (at most 1 level). As with
OpenCV, channels (alpha included) are averaged independently; the Lanczos path goes through Pillow,
which premultiplies alpha.

:func:`resize_control` is the single implementation of the control-image size policy; caching,
training samples and generation all call it so they cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

STEP = 16
"""Bucket granularity in pixels for every Qwen-Image variant and Z-Image."""

Size = tuple[int, int]


def floor16(value: int) -> int:
    return value - value % STEP


def make_buckets(resolution: Size) -> list[Size]:
    """All buckets for ``resolution`` = (W, H) with bucketing enabled, sorted."""
    area = resolution[0] * resolution[1]
    side = math.isqrt(area)
    buckets: set[Size] = set()
    width = max(floor16(side // 2), STEP)
    while width < side + STEP:
        height = floor16(area // width)
        if height >= STEP:
            buckets.add((width, height))
            buckets.add((height, width))
        width += STEP
    return sorted(buckets)


class BucketSelector:
    """Assigns image sizes to buckets for one dataset's resolution and bucket settings."""

    def __init__(self, resolution: Size, enable_bucket: bool = False, bucket_no_upscale: bool = False):
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.area = self.resolution[0] * self.resolution[1]
        self.enable_bucket = enable_bucket
        self.bucket_no_upscale = bucket_no_upscale and enable_bucket  # ignored without bucketing
        self.buckets: list[Size] = make_buckets(self.resolution) if enable_bucket else [self.resolution]
        self._ratios = [w / h for w, h in self.buckets]

    def assign(self, size: Size) -> Size:
        """Bucket (W, H) for an image of original size (W, H)."""
        width, height = size
        if not self.enable_bucket:
            return self.resolution
        if self.bucket_no_upscale and width * height <= self.area:
            return (floor16(width), floor16(height))
        ratio = width / height
        errors = [abs(r - ratio) for r in self._ratios]
        return self.buckets[errors.index(min(errors))]  # first on ties


def bucket_for_area(size: Size, resolution: Size, step: int = STEP) -> Size:
    """Size with about the area of ``resolution`` and the aspect ratio of ``size``."""
    area = resolution[0] * resolution[1]
    ratio = size[0] / size[1]
    base_w = int(math.sqrt(area * ratio))
    base_w -= base_w % step
    best: Size | None = None
    best_err = math.inf
    for k in (-2, -1, 0, 1, 2):
        w = base_w + k * step
        if w <= 0:
            continue
        h = area // w
        h -= h % step
        if h <= 0:
            continue
        err = abs(w / h - ratio)
        if err < best_err:
            best, best_err = (w, h), err
    if best is None:  # only for areas below one step squared
        return (step, step)
    return best


VL_CONTROL_RESOLUTION: Size = (384, 384)
"""Area of control images given to the Qwen2.5-VL text encoder."""


def vl_input_size(control_size: Size) -> Size:
    """Size of an (already resized) control image for the VL text encoder: ~384x384 area, step 16."""
    return bucket_for_area(control_size, VL_CONTROL_RESOLUTION)


def resize_to_bucket(image: Image.Image, bucket: Size) -> Image.Image:
    """Scale so the bucket is covered, then center-crop to exactly ``bucket`` (W, H)."""
    width, height = image.size
    bucket_w, bucket_h = bucket
    if (width, height) == (bucket_w, bucket_h):
        return image
    scale = max(bucket_w / width, bucket_h / height)
    new_w, new_h = int(width * scale + 0.5), int(height * scale + 0.5)
    if (new_w, new_h) != (width, height):
        if scale > 1:
            image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
        else:
            image = area_resize(image, (new_w, new_h))
    return center_crop(image, bucket)


def _area_axis(arr: np.ndarray, out_n: int, axis: int) -> np.ndarray:
    """Area-average ``arr`` along ``axis`` down to ``out_n`` samples (float32 result).

    Output ``o`` covers ``[o*s, (o+1)*s)`` of the input, ``s = n / out_n``; input pixel ``i`` gets the
    weight ``overlap([i, i+1), footprint) / s``. Computed as ``ceil(s) + 1`` weighted gathers.
    """
    n = arr.shape[axis]
    scale = n / out_n
    edges = np.arange(out_n + 1, dtype=np.float64) * scale
    edges[-1] = n
    low, high = edges[:-1], edges[1:]
    first = np.floor(low).astype(np.int64)
    weight_shape = [1] * arr.ndim
    weight_shape[axis] = out_n
    out_shape = list(arr.shape)
    out_shape[axis] = out_n
    out = np.zeros(out_shape, np.float32)
    term = np.empty(out_shape, np.float32)
    for tap in range(math.ceil(scale) + 1):
        index = first + tap
        weight = np.clip(np.minimum(high, index + 1) - np.maximum(low, index), 0.0, None) / scale
        if not weight.any():
            continue
        gathered = np.take(arr, np.minimum(index, n - 1), axis=axis)
        np.multiply(gathered, weight.astype(np.float32).reshape(weight_shape), out=term)
        out += term
    return out


def area_resize(image: Image.Image, size: Size) -> Image.Image:
    """Shrink with area averaging (OpenCV ``INTER_AREA`` semantics); 8-bit L/LA/RGB/RGBA images."""
    if image.mode not in ("L", "LA", "RGB", "RGBA"):
        raise ValueError(f"area_resize needs an 8-bit L/LA/RGB/RGBA image, got mode {image.mode}")
    width, height = size
    if width > image.width or height > image.height:
        raise ValueError(f"area_resize only shrinks: {image.size} -> {size}")
    if (width, height) == image.size:
        return image.copy()
    factor = image.width // width
    if image.width == width * factor and image.height == height * factor:
        return image.reduce(factor)  # whole blocks: a plain mean, done in C
    arr = np.asarray(image)
    if height != image.height:
        arr = _area_axis(arr, height, axis=0)  # rows first: contiguous gathers
    if width != image.width:
        arr = _area_axis(arr, width, axis=1)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode=image.mode)


def center_crop(image: Image.Image, size: Size) -> Image.Image:
    width, height = image.size
    left, top = (width - size[0]) // 2, (height - size[1]) // 2
    if (left, top) == (0, 0) and image.size == tuple(size):
        return image
    return image.crop((left, top, left + size[0], top + size[1]))


def _control_plan(
    control_size: Size, target_bucket: Size, control_resolution: Sequence[int] | None, no_resize_control: bool
) -> tuple[Size, bool]:
    """(size, crop_only) for one control image; crop_only means no resampling at all."""
    res = None if control_resolution is None else (int(control_resolution[0]), int(control_resolution[1]))
    if not no_resize_control:
        if res is None:
            return (int(target_bucket[0]), int(target_bucket[1])), False
        return bucket_for_area(control_size, res), False
    width, height = control_size
    if res is not None and width * height > res[0] * res[1]:
        return bucket_for_area(control_size, res), False
    return (floor16(width), floor16(height)), True


def control_target_size(
    control_size: Size, target_bucket: Size, control_resolution: Sequence[int] | None, no_resize_control: bool
) -> Size:
    """Size (W, H) a control image of ``control_size`` gets under the control resize policy."""
    return _control_plan(control_size, target_bucket, control_resolution, no_resize_control)[0]


def resize_control(
    image: Image.Image,
    target_bucket: Size,
    control_resolution: Sequence[int] | None,
    no_resize_control: bool,
) -> Image.Image:
    """Resize/crop one control image for the VAE/DiT.

    * ``no_resize_control`` false, ``control_resolution`` unset: the target's bucket (default);
    * false, set: ``bucket_for_area(control size, control_resolution)``, own aspect ratio;
    * true, unset: native size, center-cropped so each side is a multiple of 16;
    * true, set: as the previous case unless the control's area exceeds ``control_resolution``'s,
      then ``bucket_for_area`` (``control_resolution`` acts as a maximum).
    """
    size, crop_only = _control_plan(image.size, target_bucket, control_resolution, no_resize_control)
    return center_crop(image, size) if crop_only else resize_to_bucket(image, size)
