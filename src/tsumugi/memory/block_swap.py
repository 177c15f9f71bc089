"""Block swap (``--blocks_to_swap N``): N DiT blocks keep their Linear weights on the CPU and are streamed in.

Layout
------
Of the ``N_b`` blocks of the swappable list (Qwen-Image ``transformer_blocks``, Z-Image ``layers``), N are
*streamed*, spread at even intervals (``_spread``: block ``floor((k + 1) * N_b / N) - 1`` for k < N) so that
the copy of a streamed block overlaps the compute of the resident blocks before it. The other
``N_b - N`` blocks, every bias, norm, buffer and whatever is not a Linear weight stay on ``device``
permanently. Only the tensors named ``weight`` (or ``weight_fp8``) of modules whose class name ends in
``Linear`` move. The LoRA network lives outside the blocks (``networks/lora.py`` only wraps each Linear's
``forward``), so its parameters are never touched.

A streamed tensor keeps its identity (optimizers and LoRA wrappers hold the same object); only its
``.data`` changes: the CPU *master* copy (pinned when asked and CUDA is there) while offloaded, a
device copy while loaded. At most ``slots`` streamed blocks are loaded at any time (default 2: the
one in use and the next one), so at most ``N_b - N + slots`` blocks occupy the device.

Schedule
--------
Block uses follow a fixed cycle: forward-only mode (inference, sampling during training) runs
``0 .. N_b-1`` again and again; training mode runs ``0 .. N_b-1`` forward then ``N_b-1 .. 0`` backward.
At every step of the cycle the wanted set is the *window*: the next ``slots`` distinct streamed blocks
from the current position on (the current block first). Reconciling evicts loaded blocks outside the
window, then starts loading window blocks, nearest first. So the forward prefetches ahead, the last
streamed blocks of a training forward stay loaded for the backward turn, the end of a backward (or of
a forward-only pass) already loads the first streamed blocks of the next pass, and any irregular call
order is still correct: a block that is not loaded when used is loaded on the spot (a *miss*, counted).

Hooks (the diffusers forward code is unchanged):

- forward pre-hook of block i: reconcile at ``(fwd, i)``, then wait for block i;
- forward hook of block i: reconcile at the position after it (``(fwd, i+1)``, or ``(bwd, N_b-1)``
  after the last block in training, or ``(fwd, 0)`` in forward-only mode). In training it also puts two
  gradient hooks on the block's outputs (``register_multi_grad_hook``): ``any`` (the first gradient
  reaching the block: its backward starts) waits for block i; ``all`` (every output gradient is
  complete: block i+1's backward is finished) reconciles at ``(bwd, i)``, which evicts block i+1 and
  prefetches block i-1;
- with gradient checkpointing the recomputation of block i runs its forward pre-hook inside the
  backward: it only waits for block i (already loaded by the ``any`` hook);
- without gradient checkpointing autograd would keep every forward's weight tensors (views of the
  device copies) alive until the backward. Around each training forward of a block (when no other
  saved-tensor hooks are active, e.g. checkpointing or activation offload) a ``saved_tensors_hooks``
  pair replaces saved views of frozen streamed weights by a reference (block, tensor, strides) and
  rebuilds the view from the block's current device copy in the backward (loading it if needed), so
  the copies really are released after use. Trainable weights (full fine-tuning) are saved as usual:
  correct, but their copies stay alive until the backward.

Transfers (CUDA)
----------------
Loads run on a side ``torch.cuda.Stream``: the device copy is allocated on that stream, filled with a
``non_blocking`` copy and followed by an event; the compute stream waits for the event (``wait_event``,
the host does not block) right before the block is used, and ``record_stream`` tells the caching
allocator that the copy is used by the compute stream, so dropping it later is safe while kernels are
still queued. With pageable masters the host blocks while the driver stages the copy (the GPU keeps
running queued kernels); pinned masters (``pinned=True``) make the copy fully asynchronous.
Eviction drops the device copy without any copy back: the CPU master is still valid because the
weights did not change. Only when a streamed tensor was modified in place while loaded (its autograd
version counter moved, e.g. an optimizer step in full fine-tuning) is it written back to the master
(synchronously, on the compute stream). ``h2d_only=True`` forbids that case up front: the swapped
weights must be frozen (LoRA training, generation). Blocks with trainable weights make the compute
stream wait for their load immediately, so an optimizer step never reads a copy in flight.

Host memory
-----------
Each swapped weight has exactly one host copy, its master. A weight already on the CPU (and pinned
when ``pinned=True``) becomes the master as it is; the loader puts them there directly when given
:func:`swap_host_tensors` (``load_dit(host_tensors=..., pin_host=...)``), so loading with block swap
never holds a second host copy nor passes swapped weights through the device.

Not handled here: gradients of trainable swapped weights stay on the device while the weight is
offloaded (``--fused_backward_pass`` or optimizer param patching; ``docs/design.md``, "Memory: block
swap and fp8").

On the CPU
----------
With ``device="cpu"`` the master already sits where the computation runs, so a load uses it as it is
(no copy: the host holds each weight once, as without block swap). ``host_copies=True`` (or the
environment variable ``TSUMUGI_BLOCK_SWAP_CPU_COPIES=1``, which the test suite sets) makes loads real
copies on the CPU too, so the GPU path (copies, write-back of updated copies, released views) runs and
is tested on a machine without one. ``placeholder=True`` replaces an
offloaded tensor inside its module by a placeholder that raises on any computation, so a forward that
uses an offloaded block fails instead of silently reading the master. ``trace=True`` records every
load, eviction, use and miss (``BlockSwapper.trace``) and tracks the live device copies.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from tsumugi.errors import UserError

logger = logging.getLogger(__name__)

Mode = Literal["train", "forward"]

# arch -> (attribute of the swappable block list, blocks that must stay: max N = num_blocks - reserve)
ARCH_BLOCKS: dict[str, tuple[str, int]] = {
    "qwen_image": ("transformer_blocks", 1),
    "zimage": ("layers", 2),
}

_SWAPPED_NAMES = ("weight", "weight_fp8")


class SwapEvent(NamedTuple):
    """One trace entry: ``kind`` (load/evict/use/miss/writeback), the block, the phase that caused it
    (fwd/bwd/recompute/unpack/mode/remove) and the streamed blocks loaded right after it."""

    kind: str
    block: int
    phase: str
    loaded: tuple[int, ...]


class _Placeholder(torch.Tensor):
    """Stands in for an offloaded tensor (``placeholder=True``): metadata reads work, computing raises."""

    _where: str
    _ALLOWED = frozenset(
        {
            "__get__",
            "size",
            "dim",
            "numel",
            "nelement",
            "is_floating_point",
            "element_size",
            "__repr__",
            "__format__",
        }
    )

    @staticmethod
    def __new__(cls, like: torch.Tensor, where: str) -> _Placeholder:
        t = torch.Tensor._make_subclass(cls, torch.empty(like.shape, dtype=like.dtype, device="meta"), False)
        t._where = where
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in cls._ALLOWED:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        where = next(
            (a._where for a in (*args, *kwargs.values()) if isinstance(a, _Placeholder)), "a swapped weight"
        )
        raise RuntimeError(f"block swap: {where} was used while its block is offloaded")


@dataclass
class _Swapped:
    """One streamed tensor: the module's own tensor object, its CPU master and its current device copy."""

    module: nn.Module
    name: str
    is_param: bool
    tensor: torch.Tensor
    master: torch.Tensor
    placeholder: torch.Tensor | None
    copy: torch.Tensor | None = None
    version: int = 0


@dataclass
class _Block:
    index: int
    tensors: list[_Swapped]
    trainable: bool
    loaded: bool = False
    event: Any = None  # torch.cuda.Event of the pending/finished load
    waited: set[int] = field(default_factory=set)  # compute streams already ordered after the load


class _SavedWeight(NamedTuple):
    """What the pack hook saves instead of a view of a streamed weight's device copy."""

    block: int
    tensor: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def _check_num_swap(num_swap: object, num_blocks: int, max_swap: int | None, flag: str) -> None:
    max_swap = num_blocks - 1 if max_swap is None else min(max_swap, num_blocks - 1)
    if (
        isinstance(num_swap, bool)
        or not isinstance(num_swap, int)
        or not 0 <= num_swap <= max(max_swap, 0)
    ):
        raise UserError(
            f"{flag}: {num_swap} is out of range for a model with {num_blocks} blocks; "
            f"expected 0..{max(max_swap, 0)}"
        )


def _spread(num_blocks: int, num_swap: int) -> list[int]:
    """Indices of the streamed blocks, evenly spread and ending with the last block."""
    if num_swap == 0:
        return []
    return [(k + 1) * num_blocks // num_swap - 1 for k in range(num_swap)]


def _iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _iter_tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _iter_tensors(o)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _linear_tensors(block: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """``(path, module, name, tensor)`` of the swapped tensors of ``block``: Linear weights (incl. fp8)."""
    for path, module in block.named_modules():
        if not type(module).__name__.endswith("Linear"):
            continue
        for name in _SWAPPED_NAMES:
            t = module._parameters.get(name, module._buffers.get(name))
            if t is not None:
                yield path, module, name, t


def _move_tensors(root: nn.Module, device: torch.device, skip: set[int]) -> None:
    """Move every parameter and buffer of ``root`` to ``device`` in place, except the objects in ``skip``."""
    for module in root.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in skip and p.device != device:
                p.data = p.data.to(device)
        for name, b in module._buffers.items():
            if b is not None and id(b) not in skip and b.device != device:
                module._buffers[name] = b.to(device)


class BlockSwapper:
    """Streams the Linear weights of ``num_swap`` of ``blocks`` from the CPU to ``device`` (module docstring).

    ``max_swap`` (default ``len(blocks) - 1``) bounds ``num_swap``; a value outside ``0..max_swap`` is a
    :class:`UserError` naming ``flag``. ``slots`` (>= 2) streamed blocks may be loaded at once.
    Construction moves the blocks into place: resident blocks and everything but the streamed tensors to
    ``device``, streamed tensors to their CPU masters. Start in ``mode`` ("train": forward + backward,
    "forward": forward only); switch with :meth:`set_mode`; undo everything with :meth:`remove`.
    """

    def __init__(
        self,
        blocks: nn.ModuleList,
        num_swap: int,
        device: torch.device | str,
        *,
        pinned: bool = False,
        h2d_only: bool = False,
        flag: str = "--blocks_to_swap",
        max_swap: int | None = None,
        slots: int = 2,
        mode: Mode = "train",
        placeholder: bool = False,
        trace: bool = False,
        host_copies: bool | None = None,
    ) -> None:
        num_blocks = len(blocks)
        _check_num_swap(num_swap, num_blocks, max_swap, flag)
        if slots < 2:
            raise ValueError(f"block swap needs at least 2 device slots for streamed blocks, got {slots}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.blocks = blocks
        self.num_blocks = num_blocks
        self.num_swap = num_swap
        self.device = device
        self.slots = slots
        self.h2d_only = h2d_only
        self.placeholder = placeholder
        self._cuda = device.type == "cuda"
        if host_copies is None:
            host_copies = os.environ.get("TSUMUGI_BLOCK_SWAP_CPU_COPIES") == "1"
        self._alias = device.type == "cpu" and not host_copies  # loads use the master itself (module docstring)
        self.pinned = bool(pinned and self._cuda and torch.cuda.is_available())
        self._stream = torch.cuda.Stream(device=device) if self._cuda else None
        self.streamed = _spread(num_blocks, num_swap)
        self.stats = {"loads": 0, "evictions": 0, "misses": 0, "writebacks": 0}
        self.trace: list[SwapEvent] | None = [] if trace else None
        self._live: list[weakref.ref[torch.UntypedStorage]] | None = [] if trace else None
        self._blocks: dict[int, _Block] = {}
        self._by_storage: dict[int, tuple[int, int]] = {}
        self._owned: set[int] = set()
        self._handles: list[Any] = []
        self._saved_hooks: list[tuple[int, Any]] = []
        self._mode: Mode = "train"
        self._build_cycles()

        if h2d_only:
            for i in self.streamed:
                for path, _, name, t in _linear_tensors(blocks[i]):
                    if t.requires_grad:
                        raise UserError(
                            f"--block_swap_h2d_only: {path}.{name} of swapped block {i} is trainable; "
                            "host-to-device-only swapping is for frozen base weights (LoRA training, generation)"
                        )
        for i in self.streamed:
            self._blocks[i] = self._make_block(i, flag)
        for block in blocks:
            _move_tensors(block, device, self._owned)
        if self._blocks:
            for i, block in enumerate(blocks):
                self._handles.append(block.register_forward_pre_hook(self._make_pre_hook(i)))
                self._handles.append(block.register_forward_hook(self._make_post_hook(i), always_call=True))
        logger.info(
            "block swap: %d of %d blocks streamed to %s (%s), %d device slots%s%s",
            num_swap,
            num_blocks,
            device,
            ", ".join(map(str, self.streamed)) or "none",
            slots,
            ", pinned masters" if self.pinned else "",
            ", host-to-device only" if h2d_only else "",
        )
        self.set_mode(mode)

    # -- setup ---------------------------------------------------------------------------------------

    def _make_block(self, index: int, flag: str) -> _Block:
        tensors: list[_Swapped] = []
        for path, module, name, t in _linear_tensors(self.blocks[index]):
            is_param = name in module._parameters
            if t.device.type == "cpu" and (t.is_pinned() or not self.pinned):
                master = t.detach()  # already in its host home (streamed there by the loader): no copy
            elif self.pinned:
                master = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                master.copy_(t.detach())
            else:
                master = t.detach().to("cpu")
            where = f"block {index} {path}.{name}"
            ph = _Placeholder(t, where) if self.placeholder else None
            s = _Swapped(module, name, is_param, t, master, ph)
            self._owned.add(id(t))
            if ph is not None:
                self._owned.add(id(ph))
            self._point(s, master)
            tensors.append(s)
        if not tensors:
            raise ValueError(f"{flag}: block {index} has no Linear weights to swap")
        return _Block(index, tensors, trainable=any(s.tensor.requires_grad for s in tensors))

    def _build_cycles(self) -> None:
        nb = self.num_blocks
        streamed = set(self.streamed)
        self._cycles: dict[str, list[int]] = {
            "forward": list(range(nb)),
            "train": list(range(nb)) + list(reversed(range(nb))),
        }
        self._windows: dict[str, list[tuple[int, ...]]] = {}
        for name, seq in self._cycles.items():
            wins = []
            for p in range(len(seq)):
                w: list[int] = []
                for q in range(len(seq)):
                    b = seq[(p + q) % len(seq)]
                    if b in streamed and b not in w:
                        w.append(b)
                        if len(w) == self.slots:
                            break
                wins.append(tuple(w))
            self._windows[name] = wins

    # -- public --------------------------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def max_resident(self) -> int:
        """Upper bound of blocks whose Linear weights are on the device: ``N_b - N + slots``."""
        return self.num_blocks - self.num_swap + min(self.slots, self.num_swap)

    def loaded(self) -> tuple[int, ...]:
        """Streamed blocks whose weights are on the device now."""
        return tuple(i for i in self.streamed if self._blocks[i].loaded)

    def live_copies(self) -> int:
        """Device copies whose storage is still alive, held by us or by anyone else (``trace=True`` only)."""
        if self._live is None:
            raise RuntimeError("live_copies() needs BlockSwapper(trace=True)")
        self._live = [r for r in self._live if r() is not None]
        return len(self._live)

    def set_mode(self, mode: Mode) -> None:
        """``"train"`` (forward + backward, e.g. LoRA training) or ``"forward"`` (inference, sampling)."""
        if mode not in ("train", "forward"):
            raise ValueError(f"block swap mode must be 'train' or 'forward', got {mode!r}")
        self._mode = mode
        if self._blocks:
            self._reconcile(mode, 0, "mode")

    def remove(self) -> None:
        """Remove the hooks and load every streamed block for good (the model is then fully on ``device``)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for i in self.streamed:
            self._ensure(i, "remove", count_miss=False)
            for s in self._blocks[i].tensors:
                s.copy = None
        self._blocks.clear()
        self._by_storage.clear()
        self.streamed = []

    # -- residency -----------------------------------------------------------------------------------

    def _record(self, kind: str, block: int, phase: str) -> None:
        if self.trace is not None:
            self.trace.append(SwapEvent(kind, block, phase, self.loaded()))

    def _point(self, s: _Swapped, data: torch.Tensor) -> None:
        s.tensor.data = data
        if s.placeholder is not None:
            table = s.module._parameters if s.is_param else s.module._buffers
            table[s.name] = s.tensor if data is s.copy else s.placeholder

    def _load(self, i: int, phase: str) -> None:
        b = self._blocks[i]
        if b.loaded:
            return
        if self._cuda:
            with torch.cuda.stream(self._stream):
                for s in b.tensors:
                    s.copy = torch.empty(s.master.shape, dtype=s.master.dtype, device=self.device)
                    s.copy.copy_(s.master, non_blocking=True)
                b.event = torch.cuda.Event()
                b.event.record(self._stream)
        elif self._alias:
            for s in b.tensors:
                s.copy = s.master
        else:
            for s in b.tensors:
                s.copy = torch.empty(s.master.shape, dtype=s.master.dtype, device=self.device)
                s.copy.copy_(s.master)
        for k, s in enumerate(b.tensors):
            self._point(s, s.copy)
            s.version = s.tensor._version
            if not s.tensor.requires_grad:
                self._by_storage[s.copy.untyped_storage().data_ptr()] = (i, k)
            if self._live is not None:
                self._live.append(weakref.ref(s.copy.untyped_storage()))
        b.loaded = True
        self.stats["loads"] += 1
        self._record("load", i, phase)
        if self._cuda and b.trainable:
            self._wait(b)

    def _evict(self, i: int, phase: str) -> None:
        b = self._blocks[i]
        if not b.loaded:
            return
        for s in b.tensors:
            assert s.copy is not None
            self._by_storage.pop(s.copy.untyped_storage().data_ptr(), None)
            if not self.h2d_only and s.tensor._version != s.version and s.copy is not s.master:
                s.master.copy_(s.copy)
                self.stats["writebacks"] += 1
                self._record("writeback", i, phase)
            self._point(s, s.master)
            s.copy = None
        b.loaded = False
        b.event = None
        b.waited.clear()
        self.stats["evictions"] += 1
        self._record("evict", i, phase)

    def _wait(self, b: _Block) -> None:
        """Order the current (compute) stream after block ``b``'s load and mark the copies as used by it."""
        if not self._cuda or b.event is None:
            return
        cur = torch.cuda.current_stream(self.device)
        if cur.cuda_stream in b.waited:
            return
        cur.wait_event(b.event)
        for s in b.tensors:
            assert s.copy is not None
            s.copy.record_stream(cur)
        b.waited.add(cur.cuda_stream)

    def _ensure(self, i: int, phase: str, count_miss: bool = True) -> None:
        b = self._blocks.get(i)
        if b is None:
            return
        if not b.loaded:
            if count_miss:
                self.stats["misses"] += 1
                self._record("miss", i, phase)
            self._load(i, phase)
        self._wait(b)
        self._record("use", i, phase)

    def _reconcile(self, cycle: str, pos: int, phase: str) -> None:
        window = self._windows[cycle][pos % len(self._windows[cycle])]
        for i in self.streamed:
            if self._blocks[i].loaded and i not in window:
                self._evict(i, phase)
        for i in window:
            self._load(i, phase)

    # -- hooks ---------------------------------------------------------------------------------------

    def _cycle(self) -> str:
        return "train" if self._mode == "train" and torch.is_grad_enabled() else "forward"

    def _make_pre_hook(self, i: int):
        def pre_hook(module: nn.Module, args: Any) -> None:
            if _in_backward():  # recomputation under gradient checkpointing
                self._ensure(i, "recompute")
                return
            cycle = self._cycle()
            self._reconcile(cycle, i, "fwd")
            self._ensure(i, "fwd")
            if (
                cycle == "train"
                and self._by_storage
                and torch._C._autograd._saved_tensors_hooks_is_enabled()
                and torch._C._autograd._top_saved_tensors_default_hooks(False) is None
            ):
                ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
                ctx.__enter__()
                self._saved_hooks.append((i, ctx))

        return pre_hook

    def _make_post_hook(self, i: int):
        def post_hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._saved_hooks and self._saved_hooks[-1][0] == i:
                self._saved_hooks.pop()[1].__exit__(None, None, None)
            if _in_backward():
                return
            cycle = self._cycle()
            if cycle == "train" and output is not None:
                outs = [t for t in _iter_tensors(output) if t.requires_grad]
                if outs:
                    torch.autograd.graph.register_multi_grad_hook(
                        outs, lambda grad: self._ensure(i, "bwd"), mode="any"
                    )
                    pos = 2 * self.num_blocks - 1 - i
                    torch.autograd.graph.register_multi_grad_hook(
                        outs, lambda grads: self._reconcile("train", pos, "bwd"), mode="all"
                    )
            self._reconcile(cycle, i + 1, "fwd")

        return post_hook

    def _pack(self, t: torch.Tensor) -> Any:
        if t.device != self.device:
            return t
        try:
            hit = self._by_storage.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError, TypeError):
            return t
        if hit is None:
            return t
        copy = self._blocks[hit[0]].tensors[hit[1]].copy
        if copy is None or t.dtype != copy.dtype:
            return t
        return _SavedWeight(
            hit[0], hit[1], tuple(t.shape), tuple(t.stride()), t.storage_offset() - copy.storage_offset()
        )

    def _unpack(self, obj: Any) -> Any:
        if not isinstance(obj, _SavedWeight):
            return obj
        self._ensure(obj.block, "unpack")
        copy = self._blocks[obj.block].tensors[obj.tensor].copy
        assert copy is not None
        return copy.as_strided(obj.size, obj.stride, copy.storage_offset() + obj.offset)


def attach_block_swap(
    dit: nn.Module,
    num_swap: int,
    device: torch.device | str,
    arch: Literal["qwen_image", "zimage"],
    **kwargs: Any,
) -> BlockSwapper:
    """Block swap for a diffusers Qwen-Image or Z-Image DiT; everything else of ``dit`` goes to ``device``.

    Picks the block list (``transformer_blocks`` / ``layers``) and the largest N (``num_blocks - 1`` /
    ``num_blocks - 2``); ``kwargs`` go to :class:`BlockSwapper`. Z-Image's refiners, embedders and heads
    always stay on the device.
    """
    if arch not in ARCH_BLOCKS:
        raise ValueError(f"block swap: unknown architecture {arch!r}; expected one of {sorted(ARCH_BLOCKS)}")
    attr, reserve = ARCH_BLOCKS[arch]
    blocks = getattr(dit, attr)
    swapper = BlockSwapper(blocks, num_swap, device, max_swap=len(blocks) - reserve, **kwargs)
    _move_tensors(dit, swapper.device, swapper._owned)
    return swapper


def swap_host_tensors(
    num_swap: int, arch: Literal["qwen_image", "zimage"], *, flag: str = "--blocks_to_swap"
) -> Callable[[nn.Module], list[str]]:
    """For ``load_dit(host_tensors=...)``: the keys of the weights :func:`attach_block_swap` will stream.

    Loading them straight into host memory (pinned with ``load_dit(pin_host=True)``) makes them the
    swapper's masters as they are: each swapped weight has exactly one host copy and never passes
    through the device. The block count is checked against the model as :class:`BlockSwapper` does.
    """
    if arch not in ARCH_BLOCKS:
        raise ValueError(f"block swap: unknown architecture {arch!r}; expected one of {sorted(ARCH_BLOCKS)}")
    attr, reserve = ARCH_BLOCKS[arch]

    def keys(dit: nn.Module) -> list[str]:
        blocks = getattr(dit, attr)
        _check_num_swap(num_swap, len(blocks), len(blocks) - reserve, flag)
        out = []
        for i in _spread(len(blocks), num_swap):
            for path, _, name, _ in _linear_tensors(blocks[i]):
                out.append(f"{attr}.{i}.{path}.{name}" if path else f"{attr}.{i}.{name}")
        return out

    return keys
