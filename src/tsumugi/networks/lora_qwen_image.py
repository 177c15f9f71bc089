"""LoRA targets for Qwen-Image (``--network_module networks.lora_qwen_image``).

Targets: every ``nn.Linear`` inside each ``QwenImageTransformerBlock`` (``transformer_blocks.N``),
14 per block: ``img_mod.1``, ``attn.to_q/to_k/to_v``, ``attn.add_q_proj/add_k_proj/add_v_proj``,
``attn.to_out.0``, ``attn.to_add_out``, ``img_mlp.net.0.proj``, ``img_mlp.net.2``, ``txt_mod.1``,
``txt_mlp.net.0.proj``, ``txt_mlp.net.2`` (60 x 14 = 840 for the released model). Nothing outside
the blocks is adapted.

Modulation linears are included on purpose, to produce the same key set as Musubi: Musubi appends the
default exclude ``.*(_mod_).*``, but patterns are full-matched against *dotted* paths
(``transformer_blocks.3.img_mod.1``), where ``_mod_`` never occurs, so ``img_mod.1``/``txt_mod.1`` are
trained there too (about 28 % of the LoRA parameters at a given rank). We keep that pattern verbatim
so behaviour and files match; to leave modulation out use
``--network_args "exclude_patterns=[r'.*_mod\\.1']"``.

Files are written in the Musubi layout by default (``lora_unet_<path>.lora_down/.lora_up/.alpha``),
which Musubi, ComfyUI (generic ``lora_unet_`` map of the native Qwen keys) and diffusers
(``QwenImageLoraLoaderMixin`` converts kohya keys, folding alpha) all read as saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from tsumugi.networks.lora import LoRANetwork, TargetSpec, create_network_for_spec

QWEN_IMAGE_TARGET = TargetSpec(
    name="qwen_image",
    container_classes=("QwenImageTransformerBlock",),
    default_exclude=(r".*(_mod_).*",),
    default_layout="musubi",
)

DEFAULT_SAVE_LAYOUT = QWEN_IMAGE_TARGET.default_layout


def create_network(
    dit: nn.Module,
    network_dim: int | None,
    network_alpha: float | None,
    network_dropout: float | None,
    network_args: Sequence[str] | None,
    *,
    multiplier: float = 1.0,
    dim_from_weights: str | Path | None = None,
    device: torch.device | str | None = None,
) -> LoRANetwork:
    """Qwen-Image LoRA network from Musubi's flags (see :func:`tsumugi.networks.lora.create_network_for_spec`)."""
    return create_network_for_spec(
        QWEN_IMAGE_TARGET,
        dit,
        network_dim,
        network_alpha,
        network_dropout,
        network_args,
        multiplier=multiplier,
        dim_from_weights=dim_from_weights,
        device=device,
    )
