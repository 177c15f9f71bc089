"""Tiny DiTs carrying a LoRA network, shared by the memory tests: builders, runners, forward + backward."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from tsumugi.testing.tiny_configs import tiny_qwen_image_dit_config, tiny_zimage_dit_config

NETWORK_MODULES = {"qwen_image": "tsumugi.networks.lora_qwen_image", "zimage": "tsumugi.networks.lora_zimage"}


def make_qwen(num_blocks: int) -> torch.nn.Module:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**tiny_qwen_image_dit_config(num_layers=num_blocks))


def make_zimage(num_blocks: int) -> torch.nn.Module:
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    return ZImageTransformer2DModel(**tiny_zimage_dit_config(n_layers=num_blocks))


def run_qwen(dit: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return dit(**inputs, return_dict=False)[0]


def run_zimage(dit: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return torch.stack(list(dit(inputs["x"], inputs["t"], inputs["cap_feats"], return_dict=False)[0]))


def lora_dit(
    make: Callable[[], torch.nn.Module], network_module: str, prepare: Callable[[torch.nn.Module], Any] | None = None
) -> tuple[torch.nn.Module, Any, Any]:
    """A frozen DiT (``prepare`` applied before the LoRA, as in training) with an applied LoRA whose up weights
    are non-zero; returns (dit, network, what ``prepare`` returned)."""
    dit = make()
    dit.requires_grad_(False)
    extra = prepare(dit) if prepare is not None else None
    network = importlib.import_module(network_module).create_network(dit, 4, 2.0, None, None)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in network.modules_list():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.05)
    network.apply_to()
    return dit, network, extra


def forward_backward(
    run: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor], inputs: dict[str, Any], dit, network
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + backward of a fixed weighted sum; returns the output and the LoRA gradients."""
    network.zero_grad(set_to_none=True)
    out = run(dit, inputs)
    weight = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}
