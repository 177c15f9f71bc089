"""Image input of the Qwen2.5-VL text encoder (the vision tower), without torchvision.

Our own implementation of what transformers' ``Qwen2VLImageProcessor`` does for still images (see
``docs/design.md``, "Prompt encoding"), with the settings of the Qwen2.5-VL / Qwen-Image-Edit processor
config:

1. convert to RGB (transparent pixels are composited onto white, as transformers does);
2. "smart resize" (PIL bicubic) to the nearest size whose sides are multiples of ``patch_size * merge_size``
   (= 28) with the pixel count kept within ``[min_pixels, max_pixels]`` (3136 .. 12845056);
3. rescale by 1/255 (computed in float64, stored as float32) and normalise with the CLIP mean/std;
4. repeat the frame ``temporal_patch_size`` (= 2) times and cut it into 14x14 patches. The rows of
   ``pixel_values`` are ordered merge-group by merge-group: for each 2x2 group of patches (groups in row-major
   order), its four patches in row-major order; each row is ``(channel, time, y, x)`` flattened, i.e.
   ``3 * 2 * 14 * 14 = 1176`` values -- the layout the Conv3d patch embedding of the tower reads.

Every image gives one ``image_grid_thw`` row ``(1, H / 14, W / 14)`` and ``H * W / (14 * 14 * 4)`` tokens in the
language model (one per merged 2x2 group).

:func:`vl_input_size` is the size a control image is resized to *before* this processing in the training
pipeline (Musubi: ``bucket_for_area(size, 384x384)`` with step 16; ``docs/design.md``, "Buckets and
control images"); callers resize, this module only snaps to the 28-grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from tsumugi.data.buckets import vl_input_size as _vl_input_size

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = 56 * 56  # 3136
MAX_PIXELS = 28 * 28 * 16384  # 12845056, the value in the Qwen2.5-VL / Qwen-Image-Edit processor config
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255
MAX_ASPECT_RATIO = 200



@dataclass(frozen=True)
class QwenVLImageInputs:
    """Vision-tower input of a list of images, in the layout of transformers' processor output."""

    pixel_values: torch.Tensor
    """``(sum of patches, 3 * temporal_patch_size * patch_size**2)`` float32, the images' patches in order."""
    image_grid_thw: torch.Tensor
    """``(num_images, 3)`` int64: ``(1, H / patch_size, W / patch_size)`` per image."""
    merge_size: int = MERGE_SIZE

    @property
    def num_image_tokens(self) -> list[int]:
        """Language-model tokens per image (one ``<|image_pad|>`` each)."""
        return [int(n) for n in self.image_grid_thw.prod(dim=-1) // (self.merge_size**2)]


def smart_resize(
    height: int,
    width: int,
    factor: int = PATCH_SIZE * MERGE_SIZE,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """Return ``(height, width)``: both multiples of ``factor``, area within the bounds, aspect ratio kept.

    Each side is first rounded to the nearest multiple (Python's ``round``, ties to even); if the area then
    exceeds ``max_pixels`` both sides are scaled down by ``sqrt(area / max_pixels)`` and floored to the grid
    (at least one ``factor``); if it is below ``min_pixels`` they are scaled up and ceiled.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio of a {width}x{height} image exceeds {MAX_ASPECT_RATIO}, which the Qwen2-VL processor rejects"
        )
    new_h = round(height / factor) * factor
    new_w = round(width / factor) * factor
    if new_h * new_w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / scale / factor) * factor)
        new_w = max(factor, math.floor(width / scale / factor) * factor)
    elif new_h * new_w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * scale / factor) * factor
        new_w = math.ceil(width * scale / factor) * factor
    return new_h, new_w


def vl_input_size(width: int, height: int) -> tuple[int, int]:
    """``(width, height)`` a control image of this size is resized to for the VL encoder (about 384x384
    area, step 16; :func:`tsumugi.data.buckets.vl_input_size`). The processor then snaps to multiples of 28."""
    return _vl_input_size((width, height))


def preprocess_qwen_vl_images(
    images: Sequence[Image.Image | np.ndarray],
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    patch_size: int = PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
) -> QwenVLImageInputs:
    """Turn images into ``pixel_values`` / ``image_grid_thw`` for the Qwen2.5-VL vision tower.

    ``images``: PIL images (any mode; alpha is composited onto white) or ``(H, W, 3)`` uint8 RGB arrays.
    Gives the same tensors as transformers' ``Qwen2VLImageProcessor`` (PIL backend) with
    ``min_pixels=3136, max_pixels=12845056``.
    """
    if isinstance(images, (Image.Image, np.ndarray)):
        raise TypeError("images must be a sequence of images, not a single image")
    if not images:
        raise ValueError("preprocess_qwen_vl_images needs at least one image")
    factor = patch_size * merge_size
    mean = np.asarray(IMAGE_MEAN, dtype=np.float32)
    std = np.asarray(IMAGE_STD, dtype=np.float32)
    patches, grids = [], []
    for image in images:
        rgb = _to_rgb(image)
        height, width = smart_resize(rgb.height, rgb.width, factor, min_pixels, max_pixels)
        resized = np.asarray(rgb.resize((width, height), resample=Image.Resampling.BICUBIC))
        pixels = (resized.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
        pixels = (pixels - mean) / std  # (H, W, 3), float32 like the processor
        patches.append(
            _patchify(
                torch.from_numpy(np.ascontiguousarray(pixels)), patch_size, merge_size, temporal_patch_size
            )
        )
        grids.append((1, height // patch_size, width // patch_size))
    return QwenVLImageInputs(
        pixel_values=torch.cat(patches, dim=0),
        image_grid_thw=torch.tensor(grids, dtype=torch.long),
        merge_size=merge_size,
    )


def _patchify(
    pixels: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int
) -> torch.Tensor:
    """``(H, W, C)`` -> ``(H * W / patch_size**2, C * temporal_patch_size * patch_size**2)``."""
    height, width, channels = pixels.shape
    groups_h, groups_w = height // (patch_size * merge_size), width // (patch_size * merge_size)
    # y = ((group_row * merge + row_in_group) * patch + py), likewise for x
    grid = pixels.reshape(groups_h, merge_size, patch_size, groups_w, merge_size, patch_size, channels)
    # -> (group_row, group_col, row_in_group, col_in_group, channel, py, px)
    grid = grid.permute(0, 3, 1, 4, 6, 2, 5)
    # the still frame is repeated along a time axis placed between channel and py
    grid = grid.unsqueeze(5).expand(*grid.shape[:5], temporal_patch_size, patch_size, patch_size)
    num_patches = groups_h * groups_w * merge_size * merge_size
    return grid.reshape(num_patches, channels * temporal_patch_size * patch_size * patch_size).contiguous()


def _to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"array images must be (H, W, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}"
            )
        return Image.fromarray(image, mode="RGB")
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
