"""Pieces of the streaming loader: per-tensor load steps, placement, assignment into a meta-built module.

The loader (:mod:`tsumugi.models.loader`) builds the module on the meta device, then for each tensor of
the file: reads it (into memory it owns), converts its key (and, for Z-Image's fused qkv, its data),
casts it, runs the :class:`LoadStep` s (LoRA merge, fp8 quantization), places the results on their final
device (the compute device; the host, pinned when asked, for the weights block swap streams) and
assigns them into the module, before the next tensor is read. No full-size intermediate model exists.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

import torch
from torch import nn


class LoadStep:
    """A transformation applied to each tensor as it streams in (subclass and override).

    ``prepare`` runs once on the meta-device module before any data is read (floating parameters
    already have the dtype they will be loaded in): check inputs, restructure modules (e.g. swap in fp8
    Linear classes). ``apply`` gets each tensor under its library key, cast and on its work device, and
    returns what to assign (the same key, or several keys, e.g. an fp8 weight and its scale).
    ``finish`` runs after the last tensor.
    """

    def prepare(self, model: nn.Module) -> None:
        return None

    def apply(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: tensor}

    def finish(self, model: nn.Module) -> None:
        return None


HostTensors = Callable[[nn.Module], Collection[str]]
"""Given the prepared meta module, the keys whose final home is host memory (block swap's masters)."""


@dataclass(frozen=True)
class Placement:
    device: torch.device
    pinned: bool = False


def block_group(key: str) -> str:
    """The block a key belongs to: up to its first numeric part (``layers.3``), else its first part."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def owns_storage(tensor: torch.Tensor) -> bool:
    """True if ``tensor`` is contiguous and covers its whole storage (it keeps nothing larger alive)."""
    if tensor.device.type == "meta":
        return False
    nbytes = tensor.numel() * tensor.element_size()
    return (
        tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == nbytes
    )


def place(tensor: torch.Tensor, placement: Placement) -> torch.Tensor:
    """``tensor`` in its own storage on ``placement`` (no copy when it already is)."""
    tensor = tensor.detach()
    if (
        tensor.device == placement.device
        and owns_storage(tensor)
        and (not placement.pinned or tensor.is_pinned())
    ):
        return tensor
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device=placement.device, pin_memory=placement.pinned)
    out.copy_(tensor)
    return out


def assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the parameter or buffer ``key`` (as ``load_state_dict(assign=True)``)."""
    path, _, name = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(tensor, requires_grad=old is not None and old.requires_grad)
    elif name in module._buffers:
        module._buffers[name] = tensor
    else:
        raise KeyError(f"{key}: no such parameter or buffer")


def retype_meta(model: nn.Module, keys: Collection[str], dtype: torch.dtype) -> None:
    """Give the floating meta parameters/buffers ``keys`` of ``model`` the dtype they will be loaded in."""
    for key in keys:
        path, _, name = key.rpartition(".")
        module = model.get_submodule(path) if path else model
        for table in (module._parameters, module._buffers):
            t = table.get(name)
            if t is None or t.device.type != "meta" or not t.is_floating_point() or t.dtype == dtype:
                continue
            new = torch.empty(t.shape, dtype=dtype, device="meta")
            table[name] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_LOAD_MMAP_THRESHOLD = 1 << 20
_AFTER_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def host_allocations_returned() -> Iterator[None]:
    """While loading, host buffers of 1 MiB and more are separate mappings that go back to the system
    when freed (glibc), and free heap memory is handed back at the end.

    Without this, glibc's adaptive threshold serves the per-tensor temporaries (read buffers, fp32
    quantization scratch) from its heap after the first large free; the heap then fragments between
    the long-lived loaded tensors and the process keeps up to a whole model's worth of freed memory.
    Afterwards the threshold is set to glibc's usual ceiling, so later allocations behave as they
    would after any large free.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP_THRESHOLD)
            libc.malloc_trim(0)


__all__ = ["host_allocations_returned", "LoadStep", "HostTensors", "Placement", "block_group", "owns_storage", "place", "assign",
           "retype_meta"]
