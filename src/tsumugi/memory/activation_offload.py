"""``--gradient_checkpointing_cpu_offload``: the inputs of each checkpointed block wait in CPU memory.

With non-reentrant checkpointing the only tensors a transformer block keeps between its forward and its
backward are its inputs (the inter-block activations); everything inside is recomputed. The function
built here is handed to diffusers' ``enable_gradient_checkpointing(gradient_checkpointing_func=...)``: it
runs ``torch.utils.checkpoint`` inside a ``saved_tensors_hooks`` pair whose pack copies each saved
non-CPU tensor to host memory (pinned on CUDA, copied asynchronously) and whose unpack moves it back to
its device when the backward recomputes the block. The checkpoint's own hooks (innermost) take every
tensor saved inside the block, so the offload hooks see exactly the block inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


@dataclass
class OffloadStats:
    """Counters of the offload hooks (tests use them to prove the hooks ran)."""

    packed: int = 0
    """tensors handed to the pack hook"""
    moved: int = 0
    """of those, tensors copied to CPU memory (the rest already were there)"""
    bytes_moved: int = 0
    unpacked: int = 0
    devices: set[str] = field(default_factory=set)


class _Offloaded:
    __slots__ = ("cpu", "device")

    def __init__(self, cpu: torch.Tensor, device: torch.device) -> None:
        self.cpu = cpu
        self.device = device


class ActivationOffloader:
    """Saved-tensor hooks that park tensors in CPU memory; ``force`` also counts CPU tensors as moved (tests)."""

    def __init__(self, pin_memory: bool | None = None, force: bool = False) -> None:
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.force = force
        self.stats = OffloadStats()

    def pack(self, t: torch.Tensor) -> Any:
        self.stats.packed += 1
        if t.device.type == "cpu" and not self.force:
            return t
        self.stats.devices.add(str(t.device))
        if t.device.type == "cpu":
            cpu = t.detach().clone()  # test mode: a real copy, so unpack must restore it
        else:
            pin = self.pin_memory and t.device.type == "cuda" and t.layout == torch.strided
            cpu = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin)
            cpu.copy_(t, non_blocking=pin)
        self.stats.moved += 1
        self.stats.bytes_moved += t.numel() * t.element_size()
        return _Offloaded(cpu, t.device)

    def unpack(self, obj: Any) -> torch.Tensor:
        if not isinstance(obj, _Offloaded):
            return obj
        self.stats.unpacked += 1
        if obj.device.type == "cpu":
            return obj.cpu
        return obj.cpu.to(obj.device, non_blocking=obj.cpu.is_pinned())

    def checkpoint_func(self) -> Callable[..., Any]:
        """A ``gradient_checkpointing_func`` for diffusers models: checkpoint with offloaded inputs."""

        def offloading_checkpoint(module: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                return checkpoint(module.__call__, *args, use_reentrant=False, **kwargs)

        return offloading_checkpoint


def enable_checkpointing_with_cpu_offload(
    dit: torch.nn.Module, pin_memory: bool | None = None, force: bool = False
) -> ActivationOffloader:
    """Turn on gradient checkpointing of ``dit`` (a diffusers ModelMixin) with block inputs kept on the CPU."""
    offloader = ActivationOffloader(pin_memory=pin_memory, force=force)
    dit.enable_gradient_checkpointing(gradient_checkpointing_func=offloader.checkpoint_func())
    return offloader
