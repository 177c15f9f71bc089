"""Sizes estimated before a run: one saved file, and the memory one image needs.

Save sizes come from the DiT header (shapes only). A LoRA of rank ``r`` stores ``r * (in + out)`` values
for each adapted Linear; every 2-D weight inside a transformer block is counted (an upper bound: the
family's default excludes are ignored). A full checkpoint is the DiT in the save dtype. A PNG is at
most its raw RGB bytes plus its text chunks.

Image memory: decoding is the largest single step at large sizes. The VAE decoder's last stage keeps
feature maps of ``C`` channels at the full output resolution in float32 (C = 96 for the Qwen-Image VAE,
128 for the FLUX VAE of Z-Image); a convolution holds its input and output, so two such maps are a
lower bound of the peak. The DiT's activations per block (about eight ``tokens x hidden`` tensors in
bfloat16, with ``tokens = pixels / 256``) are smaller at every size, and are reported as well.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tsumugi.errors import UserError
from tsumugi.models.safetensors_io import TensorInfo
from tsumugi.preflight.paths import format_size

logger = logging.getLogger(__name__)

MEMORY_LIMIT_ENV = "TSUMUGI_MAX_MEMORY_GIB"
"""Environment variable: the memory (GiB) image sizes are checked against, instead of the device's."""

_BLOCK_KEY = re.compile(r"(^|\.)(transformer_blocks|layers)\.\d+\.")
_DECODER_CHANNELS = {"qwen_image": 96, "zimage": 128}
_HIDDEN = {"qwen_image": 3072, "zimage": 3840}
PNG_OVERHEAD = 64 * 1024


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def lora_save_bytes(dit: Mapping[str, TensorInfo], rank: int, dtype: torch.dtype) -> int:
    """Upper estimate of a LoRA file of ``rank`` for the DiT whose header infos are ``dit``."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for key, info in dit.items():
        if key.endswith(".weight") and len(info.shape) == 2 and _BLOCK_KEY.search(key):
            out_features, in_features = info.shape
            total += rank * (in_features + out_features) * size + 4 + 3 * 160  # factors, alpha, header entries
    return total


def dit_save_bytes(dit: Mapping[str, TensorInfo], dtype: torch.dtype | None) -> int:
    """A DiT checkpoint: floating tensors in ``dtype`` (None: as stored), others as stored."""
    total = 0
    for info in dit.values():
        stored = info.dtype or torch.uint8
        target = dtype if dtype is not None and stored.is_floating_point else stored
        total += _numel(info.shape) * torch.empty((), dtype=target).element_size() + 160
    return total


def png_bytes(width: int, height: int) -> int:
    """Upper estimate of one PNG: raw RGB plus text chunks."""
    return width * height * 3 + PNG_OVERHEAD


@dataclass(frozen=True)
class ImageMemory:
    vae_bytes: int
    dit_bytes: int

    @property
    def peak(self) -> int:
        return max(self.vae_bytes, self.dit_bytes)


def image_memory(arch: str, width: int, height: int) -> ImageMemory:
    """Lower estimate of the memory making one ``width x height`` image needs (see the module docstring)."""
    pixels = width * height
    return ImageMemory(vae_bytes=2 * pixels * _DECODER_CHANNELS[arch] * 4,
                       dit_bytes=8 * (pixels // 256) * _HIDDEN[arch] * 2)


def device_memory(device: torch.device | str) -> tuple[int, str]:
    """(bytes, description) of the memory images are made in: the GPU's total, or the machine's RAM."""
    override = os.environ.get(MEMORY_LIMIT_ENV)
    if override:
        try:
            gib = float(override)
        except ValueError:
            raise UserError(f"{MEMORY_LIMIT_ENV}={override!r}: expected a number of GiB") from None
        if not math.isfinite(gib) or gib <= 0:
            raise UserError(f"{MEMORY_LIMIT_ENV}={override!r}: expected a positive number of GiB")
        return int(gib * (1 << 30)), f"{MEMORY_LIMIT_ENV}={override}"
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"the memory of {props.name}"
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62, "unknown RAM"
    return ram, "this machine's RAM"


def check_image_memory(arch: str, width: int, height: int, device: torch.device | str, where: str) -> None:
    """Refuse an image size whose estimated memory exceeds the device's (UserError naming ``where``)."""
    need = image_memory(arch, width, height)
    limit, what = device_memory(device)
    if need.peak > limit:
        raise UserError(
            f"{where}: a {width}x{height} image needs at least {format_size(need.peak)} "
            f"(VAE decode {format_size(need.vae_bytes)}, DiT activations {format_size(need.dit_bytes)}), more "
            f"than the {format_size(limit)} of {what}; use a smaller size (to check against another limit, "
            f"set {MEMORY_LIMIT_ENV} to the memory in GiB)"
        )
