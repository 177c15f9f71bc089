"""Host memory before loading: the default CPU compute dtype and a fit check with an estimate.

On the CPU a model runs in the dtype its weights are stored in when that is bfloat16 (casting a 12 GB
bf16 DiT to float32 would need 24 GB), float32 otherwise; the dtype flags still select float32. A model
that would not fit the memory the system reports as available is refused before any data is read.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tsumugi.errors import UserError
from tsumugi.models.components import kind_for
from tsumugi.models.detect import detect
from tsumugi.models.safetensors_io import TensorInfo

_BLOCK_WEIGHT = re.compile(r"(^|\.)\d+\..*\.weight$")


def _infos(path: str | Path, role: str, arch: str, flag: str) -> list[tuple[str, TensorInfo]]:
    det = detect(path, kind_for(role, arch).name, flag=flag)
    with det.source:
        return [(k, det.source.info(f)) for k, f in det.keymap.items()]


def stored_float_dtype(path: str | Path, role: str, arch: str, *, flag: str) -> torch.dtype | None:
    """The floating dtype holding most of the bytes of the ``role`` weights in ``path`` (headers only)."""
    sizes: dict[torch.dtype, int] = {}
    for _, info in _infos(path, role, arch, flag):
        if info.dtype is not None and info.dtype.is_floating_point:
            sizes[info.dtype] = sizes.get(info.dtype, 0) + max(info.stop - info.start, 0)
    return max(sizes, key=sizes.__getitem__) if sizes else None


def default_dtype(path: str | Path | None, role: str, arch: str, device: torch.device, *, flag: str) -> torch.dtype:
    """bfloat16 on CUDA; on other devices bfloat16 when the weights are stored in it, else float32."""
    if device.type == "cuda":
        return torch.bfloat16
    if path is None:
        return torch.float32
    return torch.bfloat16 if stored_float_dtype(path, role, arch, flag=flag) == torch.bfloat16 else torch.float32


def estimate_bytes(path: str | Path, role: str, arch: str, dtype: torch.dtype, *, flag: str,
                   fp8_blocks: bool = False) -> int:
    """Bytes the ``role`` weights of ``path`` take once loaded in ``dtype`` (floating tensors).

    ``fp8_blocks``: 2-D weights inside numbered blocks count one byte per element (fp8 quantization;
    the per-block scales are left out of this estimate).
    """
    total = 0
    size = torch.empty((), dtype=dtype).element_size()
    for key, info in _infos(path, role, arch, flag):
        numel = 1
        for s in info.shape:
            numel *= s
        if info.dtype is None or not info.dtype.is_floating_point:
            total += max(info.stop - info.start, 0)
        elif fp8_blocks and len(info.shape) == 2 and _BLOCK_WEIGHT.search(key):
            total += numel
        else:
            total += numel * size
    return total


def mem_available() -> int | None:
    """Bytes of memory available to a new process (``MemAvailable``; psutil where installed)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits(needed: int, *, what: str, hint: str) -> None:
    """UserError before loading when ``needed`` bytes exceed the available host memory."""
    available = mem_available()
    if available is not None and needed > available:
        raise UserError(
            f"{what} needs about {needed / 2**30:.1f} GiB of host memory, only {available / 2**30:.1f} GiB "
            f"is available; {hint}"
        )
