"""Block swap on CPU: exact outputs and LoRA gradients, the residency schedule, and the user errors.

The swapper runs with ``device="cpu"`` and ``placeholder=True``: an offloaded Linear weight is replaced
inside its module by a tensor that raises when computed with, so every forward/backward that passes
proves that each block was loaded when it ran, and ``torch.equal`` against the unswapped model proves
that the streamed copies and the rebuilt saved tensors carry the right values.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from dit_cases import forward_backward, lora_dit, make_qwen, make_zimage, run_qwen, run_zimage

from tsumugi.errors import UserError
from tsumugi.memory.block_swap import BlockSwapper, SwapEvent, attach_block_swap

N_BLOCKS = 6


@dataclass
class Arch:
    name: str
    make: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict[str, Any]]
    run: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor]
    network_module: str
    attr: str
    max_swap: int


def _qwen() -> torch.nn.Module:
    return make_qwen(N_BLOCKS)


def _qwen_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 16, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, 64, generator=g),
        "timestep": torch.full((1,), 0.4),
        "img_shapes": [[(1, 4, 4)]],
    }


def _zimage() -> torch.nn.Module:
    return make_zimage(N_BLOCKS)


def _zimage_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {
        "x": [torch.randn(16, 1, 8, 8, generator=g)],
        "t": torch.full((1,), 0.6),
        "cap_feats": [torch.randn(5, 64, generator=g)],
    }


QWEN = Arch(
    "qwen_image",
    _qwen,
    _qwen_inputs,
    run_qwen,
    "tsumugi.networks.lora_qwen_image",
    "transformer_blocks",
    N_BLOCKS - 1,
)
ZIMAGE = Arch(
    "zimage", _zimage, _zimage_inputs, run_zimage, "tsumugi.networks.lora_zimage", "layers", N_BLOCKS - 2
)
ARCHS = [QWEN, ZIMAGE]


def _setup(arch: Arch, gc_on: bool):
    dit, network, _ = lora_dit(arch.make, arch.network_module,
                               (lambda d: d.enable_gradient_checkpointing()) if gc_on else None)
    return dit, network


def _step(arch: Arch, dit: torch.nn.Module, network) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return forward_backward(arch.run, arch.inputs(), dit, network)


_REFERENCE: dict[tuple[str, bool], tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]] = {}


def _reference(arch: Arch, gc_on: bool):
    """Output and gradients of the model without block swap, and its no-grad output."""
    key = (arch.name, gc_on)
    if key not in _REFERENCE:
        dit, network = _setup(arch, gc_on)
        out, grads = _step(arch, dit, network)
        with torch.no_grad():
            fwd = arch.run(dit, arch.inputs())
        _REFERENCE[key] = (out, grads, fwd)
    return _REFERENCE[key]


def _check_trace(swapper: BlockSwapper, allow_miss: bool = False) -> None:
    """Replay the trace: each use finds its block loaded, and at most ``slots`` streamed blocks are loaded."""
    assert swapper.trace is not None
    loaded: set[int] = set()
    for ev in swapper.trace:
        if ev.kind == "load":
            assert ev.block not in loaded
            loaded.add(ev.block)
        elif ev.kind == "evict":
            assert ev.block in loaded
            loaded.discard(ev.block)
        elif ev.kind == "use":
            assert ev.block in loaded, ev
        elif ev.kind == "miss":
            assert allow_miss, ev
        assert set(ev.loaded) == loaded
        assert len(loaded) <= swapper.slots, ev


def _uses(trace: list[SwapEvent], phase: str) -> list[int]:
    return [ev.block for ev in trace if ev.kind == "use" and ev.phase == phase]


@pytest.mark.parametrize("gc_on", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_swap_is_exact(arch: Arch, gc_on: bool) -> None:
    ref_out, ref_grads, ref_fwd = _reference(arch, gc_on)
    # (the last Qwen block's text-stream output is unused, so its text LoRA grads are zero)
    assert sum(bool(g.abs().sum() > 0) for g in ref_grads.values()) > 0.8 * len(ref_grads)
    for n in sorted({1, N_BLOCKS // 2, arch.max_swap}):
        dit, network = _setup(arch, gc_on)
        # frozen base weights: host-to-device-only at max N; pinning is ignored without CUDA
        swapper = attach_block_swap(
            dit, n, "cpu", arch.name, placeholder=True, trace=True, h2d_only=n == arch.max_swap, pinned=n == 1
        )
        assert len(swapper.streamed) == n and swapper.h2d_only == (n == arch.max_swap)
        out, grads = _step(arch, dit, network)
        assert torch.equal(out, ref_out), n
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            assert torch.equal(g, ref_grads[name]), (n, name)
        # sampling during training: forward-only mode, then a training step from the state it left
        swapper.set_mode("forward")
        with torch.no_grad():
            assert torch.equal(arch.run(dit, arch.inputs()), ref_fwd), n
        swapper.set_mode("train")
        out, grads = _step(arch, dit, network)
        assert torch.equal(out, ref_out) and all(torch.equal(g, ref_grads[k]) for k, g in grads.items()), n

        _check_trace(swapper)
        assert swapper.stats["misses"] == 0 and swapper.stats["writebacks"] == 0
        fwd = _uses(swapper.trace, "fwd")
        # streamed blocks are used in order in every forward (2 training passes, 1 sampling pass)
        assert fwd == swapper.streamed * 3
        if gc_on:
            assert sorted(_uses(swapper.trace, "recompute")) == sorted(swapper.streamed * 2)
        else:
            assert set(_uses(swapper.trace, "unpack")) == set(swapper.streamed)
        bwd = _uses(swapper.trace, "bwd")
        assert bwd == list(reversed(swapper.streamed)) * 2
        # after a training step only the first streamed blocks of the next step are loaded
        assert swapper.loaded() == tuple(swapper.streamed[: swapper.slots])
        assert swapper.max_resident == N_BLOCKS - n + min(2, n)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_offloaded_weights_are_gone(arch: Arch) -> None:
    """An offloaded block cannot compute, and without checkpointing the saved tensors do not pin copies."""
    dit, network = _setup(arch, gc_on=False)
    n = arch.max_swap
    swapper = attach_block_swap(dit, n, "cpu", arch.name, placeholder=True, trace=True)
    blocks = getattr(dit, arch.attr)
    off = next(i for i in swapper.streamed if i not in swapper.loaded())
    linear = next(m for m in blocks[off].modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(RuntimeError, match="offloaded"):
        linear(torch.zeros(1, linear.in_features))
    # the DiT's other parameters went to the device; the master copies stay on the CPU
    assert all(b.tensors[0].master.device.type == "cpu" for b in swapper._blocks.values())

    per_block = len(swapper._blocks[swapper.streamed[0]].tensors)
    out = arch.run(dit, arch.inputs())
    gc.collect()
    # forward done, backward pending: only the window's copies are alive, not one per streamed block
    assert swapper.live_copies() <= swapper.slots * per_block < n * per_block
    out.sum().backward()
    _check_trace(swapper)
    assert swapper.stats["misses"] == 0


def test_remove_restores_the_model() -> None:
    arch = QWEN
    _, _, ref_fwd = _reference(arch, False)
    dit, network = _setup(arch, gc_on=False)
    swapper = attach_block_swap(dit, 3, "cpu", arch.name, placeholder=True, mode="forward")
    swapper.remove()
    blocks = getattr(dit, arch.attr)
    assert all(type(p) is torch.nn.Parameter for p in blocks.parameters())
    assert not any(blk._forward_pre_hooks or blk._forward_hooks for blk in blocks)
    with torch.no_grad():
        assert torch.equal(arch.run(dit, arch.inputs()), ref_fwd)


def test_writeback_of_modified_weights() -> None:
    """A weight changed in place while loaded (an optimizer step) is copied back before its copy is dropped."""
    arch = ZIMAGE
    dit = arch.make()
    dit.requires_grad_(False)
    swapper = attach_block_swap(dit, 4, "cpu", arch.name, placeholder=True, trace=True, mode="forward")
    first = swapper.streamed[0]
    assert first in swapper.loaded()
    s = swapper._blocks[first].tensors[0]
    with torch.no_grad():
        s.tensor.add_(1.0)
    expected = s.copy.clone()
    with torch.no_grad():
        arch.run(dit, arch.inputs())  # passes block `first`, which is evicted afterwards
        swapper.set_mode("forward")
    assert swapper.stats["writebacks"] == 1
    assert torch.equal(s.master, expected)

    # h2d_only: the master is never written, so trainable swapped weights are refused
    dit = arch.make()
    with pytest.raises(UserError, match="--block_swap_h2d_only"):
        attach_block_swap(dit, 2, "cpu", arch.name, h2d_only=True)


def test_spread_layout_and_windows() -> None:
    blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(2, 2)) for _ in range(10))
    swapper = BlockSwapper(blocks, 4, "cpu", mode="forward")
    assert swapper.streamed == [1, 4, 6, 9]
    assert swapper.loaded() == (1, 4)
    x = torch.zeros(1, 2)
    with torch.no_grad():
        for blk in blocks:
            x = blk(x)
    # the end of a forward-only pass already loads the next pass's first streamed blocks
    assert swapper.loaded() == (1, 4)
    assert BlockSwapper(torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4)), 3, "cpu").streamed == [
        0,
        1,
        3,
    ]


@pytest.mark.parametrize(
    ("arch", "n", "expected"),
    [(QWEN, N_BLOCKS, "0..5"), (QWEN, -1, "0..5"), (ZIMAGE, N_BLOCKS - 1, "0..4"), (ZIMAGE, 2.5, "0..4")],
    ids=["qwen-too-many", "qwen-negative", "zimage-too-many", "zimage-not-int"],
)
def test_invalid_num_swap(arch: Arch, n: Any, expected: str) -> None:
    dit = arch.make()
    with pytest.raises(UserError) as info:
        attach_block_swap(dit, n, "cpu", arch.name)
    msg = str(info.value)
    assert "--blocks_to_swap" in msg and str(n) in msg and expected in msg
    with pytest.raises(UserError, match="--my_flag"):
        BlockSwapper(getattr(dit, arch.attr), n, "cpu", flag="--my_flag", max_swap=arch.max_swap)


def test_bad_mode_and_arch() -> None:
    blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))
    swapper = BlockSwapper(blocks, 1, "cpu")
    with pytest.raises(ValueError, match="mode"):
        swapper.set_mode("eval")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="architecture"):
        attach_block_swap(torch.nn.Module(), 1, "cpu", "flux")  # type: ignore[arg-type]


def test_fp8_linear_buffers_are_swapped() -> None:
    """fp8 Linears (class name ending in ``Linear``) stream their ``weight_fp8`` buffer; the scale stays."""
    from tsumugi.memory.fp8_linear import Fp8Linear

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(
        torch.nn.Sequential(Fp8Linear(torch.nn.Linear(8, 8)), torch.nn.GELU()) for _ in range(4)
    )
    x = torch.randn(2, 8)
    with torch.no_grad():
        ref = x
        for blk in blocks:
            ref = blk(ref)
        swapper = BlockSwapper(blocks, 3, "cpu", placeholder=True, trace=True, mode="forward")
        assert [s.name for s in swapper._blocks[swapper.streamed[0]].tensors] == ["weight_fp8"]
        for _ in range(2):
            y = x
            for blk in blocks:
                y = blk(y)
            assert torch.equal(y, ref)
    _check_trace(swapper)


@pytest.mark.parametrize("arch", [QWEN, ZIMAGE], ids=lambda a: a.name)
def test_on_the_cpu_loads_use_the_master_without_a_copy(arch: Arch, monkeypatch) -> None:
    """Without TSUMUGI_BLOCK_SWAP_CPU_COPIES (which this suite sets to test the GPU path on the CPU) a CPU
    run keeps one host copy of every weight: a load points the module at its master. Training and
    inference give what the model without block swap gives."""
    monkeypatch.delenv("TSUMUGI_BLOCK_SWAP_CPU_COPIES", raising=False)
    ref_out, ref_grads, ref_fwd = _reference(arch, False)
    dit, network = _setup(arch, gc_on=False)
    swapper = attach_block_swap(dit, 3, "cpu", arch.name, trace=True)
    for i in swapper.streamed:
        swapper._ensure(i, "test", count_miss=False)
        assert all(s.tensor.data_ptr() == s.master.data_ptr() for s in swapper._blocks[i].tensors)
    out, grads = _step(arch, dit, network)
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[k], ref_grads[k]) for k in grads)
    swapper.set_mode("forward")
    with torch.no_grad():
        assert torch.equal(arch.run(dit, arch.inputs()), ref_fwd)
    assert swapper.stats["writebacks"] == 0
