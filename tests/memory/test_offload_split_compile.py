"""Activation offload, split attention and per-block torch.compile on tiny DiTs (CPU).

Each option must leave the model output and the LoRA gradients unchanged: offload exactly, split
attention and compile up to float rounding (1e-5). The compile tests use the ``aot_eager`` backend
(dynamo + AOTAutograd, the real torch.compile path without code generation): inductor works on this
CPU machine but takes ~30 s per tiny model to generate C++ code, too slow for the test budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from dit_cases import forward_backward, lora_dit, make_qwen, make_zimage, run_qwen, run_zimage

from tsumugi.memory.activation_offload import enable_checkpointing_with_cpu_offload
from tsumugi.memory.block_swap import attach_block_swap
from tsumugi.memory.compile_blocks import compile_blocks, compiled_blocks
from tsumugi.memory.split_attention import (
    QwenSplitAttnProcessor,
    ZImageSplitAttnProcessor,
    apply_split_attention,
)

N_BLOCKS = 3


@dataclass
class Arch:
    name: str
    make: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict[str, Any]]
    run: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor]
    network_module: str
    split: type


def _qwen() -> torch.nn.Module:
    return make_qwen(N_BLOCKS)


def _qwen_inputs() -> dict[str, Any]:
    """Two prompts of 7 and 4 tokens: the second one is padded."""
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(2, 16, 64, generator=g),
        "encoder_hidden_states": torch.randn(2, 7, 64, generator=g),
        "encoder_hidden_states_mask": torch.tensor([[True] * 7, [True] * 4 + [False] * 3]),
        "timestep": torch.full((2,), 0.4),
        "img_shapes": [[(1, 4, 4)]] * 2,
    }


def _zimage() -> torch.nn.Module:
    return make_zimage(N_BLOCKS)


def _zimage_inputs() -> dict[str, Any]:
    """Two prompts of 5 and 40 tokens: unified sequences of 64 and 96 tokens, the first one padded."""
    g = torch.Generator().manual_seed(1)
    return {
        "x": [torch.randn(16, 1, 8, 8, generator=g), torch.randn(16, 1, 8, 8, generator=g)],
        "t": torch.full((2,), 0.6),
        "cap_feats": [torch.randn(5, 64, generator=g), torch.randn(40, 64, generator=g)],
    }


QWEN = Arch("qwen_image", _qwen, _qwen_inputs, run_qwen, "tsumugi.networks.lora_qwen_image", QwenSplitAttnProcessor)
ZIMAGE = Arch("zimage", _zimage, _zimage_inputs, run_zimage, "tsumugi.networks.lora_zimage", ZImageSplitAttnProcessor)
ARCHS = [QWEN, ZIMAGE]


def _setup(arch: Arch, prepare: Callable[[torch.nn.Module], Any] | None = None):
    return lora_dit(arch.make, arch.network_module, prepare)


def _step(arch: Arch, dit: torch.nn.Module, network) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return forward_backward(arch.run, arch.inputs(), dit, network)


_REF: dict[tuple[str, bool], tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}


def _reference(arch: Arch, checkpointing: bool):
    key = (arch.name, checkpointing)
    if key not in _REF:
        dit, network, _ = _setup(arch, (lambda d: d.enable_gradient_checkpointing()) if checkpointing else None)
        _REF[key] = _step(arch, dit, network)
    return _REF[key]


def _assert_same(got, ref, exact: bool, atol: float = 1e-5) -> None:
    out, grads = got
    ref_out, ref_grads = ref
    # a compiled block returns zero gradients (not None) for LoRAs on outputs nothing uses
    extra = grads.keys() - ref_grads.keys()
    assert all(not grads.pop(k).any() for k in extra)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    assert sum(bool(g.abs().sum() > 0) for g in ref_grads.values()) > 0.8 * len(ref_grads)
    if exact:
        assert torch.equal(out, ref_out)
        assert all(torch.equal(g, ref_grads[k]) for k, g in grads.items())
    else:
        torch.testing.assert_close(out, ref_out, rtol=0, atol=atol)
        for k, g in grads.items():
            torch.testing.assert_close(g, ref_grads[k], rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_cpu_offload_is_exact_and_active(arch: Arch) -> None:
    # force=True: on the CPU the block inputs are really copied at pack time and restored from the copy
    dit, network, offloader = _setup(arch, lambda d: enable_checkpointing_with_cpu_offload(d, force=True))
    _assert_same(_step(arch, dit, network), _reference(arch, True), exact=True)
    stats = offloader.stats
    # every block's inputs went through the hooks and were restored from the copies in the backward
    # (Z-Image: blocks whose inputs need no gradient, e.g. the caption refiner, are never recomputed)
    assert stats.moved >= N_BLOCKS * 2 and stats.bytes_moved > 0
    assert 0 < stats.unpacked <= stats.moved
    # the hooks are only active around checkpointed blocks: no-grad sampling packs nothing
    before = stats.packed
    with torch.no_grad():
        arch.run(dit, arch.inputs())
    assert stats.packed == before


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_split_attention_matches_masked_attention(arch: Arch) -> None:
    calls: list[int] = []
    dit, network, count = _setup(arch, apply_split_attention)
    wrappers = [m.processor for m in dit.modules() if isinstance(getattr(m, "processor", None), arch.split)]
    assert count == len(wrappers) > 0
    inner = wrappers[-1].processor  # a main block (Z-Image: not a refiner, whose sequences are equal)
    original = type(inner).__call__

    class Counting(type(inner)):
        def __call__(self, attn, hidden_states, *args):
            text = args[0] if args and args[0] is not None else hidden_states[:, :0]
            calls.append(hidden_states.shape[1] + text.shape[1])
            return original(self, attn, hidden_states, *args)

    inner.__class__ = Counting  # this one instance only
    _assert_same(_step(arch, dit, network), _reference(arch, False), exact=False)
    # the wrapped processor ran once per sample, on sequences of different (un-padded) lengths
    assert len(calls) == 2 and calls[0] != calls[1]
    # per instance: another model of the same class is untouched
    other = arch.make()
    assert not any(isinstance(getattr(m, "processor", None), arch.split) for m in other.modules())
    # the attention backend set by --flash_attn/--xformers reaches the wrapped processor
    wrappers[-1]._attention_backend = "flash"
    assert inner._attention_backend == "flash"


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_compiled_blocks_match_eager(arch: Arch) -> None:
    torch._dynamo.reset()
    dit, network, blocks = _setup(arch, lambda d: compile_blocks(d, arch.name, backend="aot_eager",
                                                                cache_size_limit=32))
    assert blocks == compiled_blocks(dit, arch.name) and len(blocks) >= N_BLOCKS
    assert torch._dynamo.config.cache_size_limit == 32
    _assert_same(_step(arch, dit, network), _reference(arch, False), exact=False)
    with torch.no_grad():
        _ = arch.run(dit, arch.inputs())
    # dynamo really compiled the block forwards
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_everything_together_with_block_swap(arch: Arch) -> None:
    """The training order: checkpointing + offload, split attention, compile, then block swap hooks."""
    torch._dynamo.reset()

    def prepare(d):
        offloader = enable_checkpointing_with_cpu_offload(d, force=True)
        apply_split_attention(d)
        compile_blocks(d, arch.name, backend="eager", eager_linears=True)  # dynamo only: keeps the test short
        return offloader

    dit, network, offloader = _setup(arch, prepare)
    # placeholder=True: an offloaded weight raises if computed with, so passing proves residency
    swapper = attach_block_swap(dit, 1, "cpu", arch.name, placeholder=True, trace=True)
    for _ in range(2):  # the second step runs the cached compiled code with other blocks resident
        _assert_same(_step(arch, dit, network), _reference(arch, True), exact=False)
    assert offloader.stats.moved > 0 and swapper.stats["misses"] == 0
