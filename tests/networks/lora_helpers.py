"""Tiny Qwen-Image / Z-Image DiTs, their inputs and helpers for the LoRA network tests."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tsumugi.testing.tiny_configs import tiny_qwen_image_dit_config, tiny_zimage_dit_config


@dataclass
class ArchCase:
    """One architecture: a fresh seeded DiT each call, its inputs, and how to run it."""

    name: str
    make_dit: Callable[[], torch.nn.Module]
    inputs: Callable[[int], dict[str, Any]]
    run: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor]
    network_module: str
    per_block: int
    n_blocks: int


def _qwen_dit() -> torch.nn.Module:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**tiny_qwen_image_dit_config()).eval()


def _qwen_inputs(batch: int = 1) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(batch, 16, 64, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 64, generator=g),
        "timestep": torch.full((batch,), 0.4),
        "img_shapes": [[(1, 4, 4)]] * batch,
    }


def _qwen_run(dit: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return dit(**inputs, return_dict=False)[0]


def _zimage_dit() -> torch.nn.Module:
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    return ZImageTransformer2DModel(**tiny_zimage_dit_config()).eval()


def _zimage_inputs(batch: int = 1) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 8, 8, generator=g)
    cap = torch.randn(5, 64, generator=g)
    return {"x": [x] * batch, "t": torch.full((batch,), 0.6), "cap_feats": [cap] * batch}


def _zimage_run(dit: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    out = dit(inputs["x"], inputs["t"], inputs["cap_feats"], return_dict=False)[0]
    return torch.stack(list(out))


QWEN = ArchCase("qwen_image", _qwen_dit, _qwen_inputs, _qwen_run, "tsumugi.networks.lora_qwen_image", 14, 2)
ZIMAGE = ArchCase("z_image", _zimage_dit, _zimage_inputs, _zimage_run, "tsumugi.networks.lora_zimage", 7, 2)


def randomize_up(network, std: float = 0.05, seed: int = 3) -> None:
    """Give every ``lora_up`` a non-zero value so the update is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.modules_list():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * std)


def merged_copy(dit: torch.nn.Module, network) -> torch.nn.Module:
    """A plain copy of ``dit`` (no wrappers) with every module's delta added to its weight."""
    was_applied = network.applied
    network.remove()
    ref = copy.deepcopy(dit)
    if was_applied:
        network.apply_to()
    with torch.no_grad():
        for m in network.modules_list():
            ref.get_submodule(m.path).weight += m.delta_weight()
    return ref
