"""FLUX VAE state dicts: original BFL/LDM ``ae.safetensors`` layout <-> diffusers ``AutoencoderKL``.

Z-Image uses the 16-channel FLUX autoencoder (no ``quant_conv`` / ``post_quant_conv``). Name mapping:

=================================================  ================================================
original (BFL / LDM / ComfyUI)                     diffusers ``AutoencoderKL``
=================================================  ================================================
``encoder.down.I.block.J.{norm1,conv1,...}``       ``encoder.down_blocks.I.resnets.J.{norm1,conv1,...}``
``....block.J.nin_shortcut``                       ``....resnets.J.conv_shortcut``
``encoder.down.I.downsample.conv``                 ``encoder.down_blocks.I.downsamplers.0.conv``
``decoder.up.I.block.J``                           ``decoder.up_blocks.(N-1-I).resnets.J``
``decoder.up.I.upsample.conv``                     ``decoder.up_blocks.(N-1-I).upsamplers.0.conv``
``{en,de}coder.mid.block_1`` / ``block_2``         ``{en,de}coder.mid_block.resnets.0`` / ``.1``
``{en,de}coder.mid.attn_1.norm``                   ``{en,de}coder.mid_block.attentions.0.group_norm``
``....attn_1.{q,k,v}`` (1x1 conv, ``(C, C, 1, 1)``)  ``....attentions.0.to_{q,k,v}`` (Linear, ``(C, C)``)
``....attn_1.proj_out`` (1x1 conv)                 ``....attentions.0.to_out.0`` (Linear)
``{en,de}coder.norm_out``                          ``{en,de}coder.conv_norm_out``
``{en,de}coder.conv_in`` / ``conv_out``,           unchanged
``quant_conv``, ``post_quant_conv``
=================================================  ================================================

The decoder's up levels run in opposite orders: the original ``decoder.up.0`` is the full-resolution level,
diffusers' ``up_blocks.0`` the lowest-resolution one. The number of levels ``N`` comes from ``config``
(``up_block_types`` or ``block_out_channels`` of the diffusers kwargs) or else from the keys, so any depth
and any ``layers_per_block`` convert (the tiny test VAE has one residual block per level, the release two).

Keys must come without a container prefix (``first_stage_model.``, ``vae.``): the caller strips it. Unknown
keys pass through unchanged. Renamed tensors are the input tensor objects; the attention weights are
reshaped as views (``w[:, :, 0, 0]`` / ``w[:, :, None, None]``), so no tensor data is copied.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

__all__ = ["from_diffusers", "looks_like_original", "to_diffusers"]

_RESNET_LAYERS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"}
_RESNET_TO_DIFF = {**_RESNET_LAYERS, "nin_shortcut": "conv_shortcut"}
_RESNET_FROM_DIFF = {**_RESNET_LAYERS, "conv_shortcut": "nin_shortcut"}
_ATTN_TO_DIFF = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_FROM_DIFF = {new: old for old, new in _ATTN_TO_DIFF.items()}

_ORIGINAL_MARK = re.compile(
    r"(?:^|\.)(?:encoder\.down\.\d+\.|decoder\.up\.\d+\.|(?:en|de)coder\.mid\.(?:block_\d|attn_\d)\."
    r"|(?:en|de)coder\.norm_out\.)"
)
_ORIG_UP = re.compile(r"^decoder\.up\.(\d+)\.")
_DIFF_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.")

_Rule = tuple[re.Pattern[str], Callable[[re.Match[str], int], str]]


def looks_like_original(keys: Iterable[str]) -> bool:
    """True if the keys are in the original BFL/LDM layout (``encoder.down.0.block.0...``)."""
    return any(_ORIGINAL_MARK.search(key) for key in keys)


def _num_up(keys: Iterable[str], pattern: re.Pattern[str], config: Mapping[str, Any] | None) -> int:
    found = {int(m.group(1)) for key in keys if (m := pattern.match(key))}
    from_keys = max(found) + 1 if found else 0
    if config and ("up_block_types" in config or "block_out_channels" in config):
        n = len(config.get("up_block_types") or config["block_out_channels"])
        if from_keys > n:
            raise ValueError(f"the keys have {from_keys} decoder up levels, the config {n}")
        return n
    return from_keys


def _resnet(table: Mapping[str, str], layer: str, key: str) -> str:
    try:
        return table[layer]
    except KeyError:
        raise ValueError(f"unknown residual-block layer {layer!r} in {key!r}") from None


_TO_DIFF_RULES: tuple[_Rule, ...] = (
    (
        re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)$"),
        lambda m, n: (
            f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_resnet(_RESNET_TO_DIFF, m[3], m[0])}.{m[4]}"
        ),
    ),
    (
        re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv\.(\w+)$"),
        lambda m, n: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}",
    ),
    (
        re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)$"),
        lambda m, n: (
            f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}.{_resnet(_RESNET_TO_DIFF, m[3], m[0])}.{m[4]}"
        ),
    ),
    (
        re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv\.(\w+)$"),
        lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}",
    ),
    (
        re.compile(r"^(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(\w+)$"),
        lambda m, n: (
            f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_resnet(_RESNET_TO_DIFF, m[3], m[0])}.{m[4]}"
        ),
    ),
    (
        re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(\w+)$"),
        lambda m, n: f"{m[1]}.mid_block.attentions.0.{_ATTN_TO_DIFF[m[2]]}.{m[3]}",
    ),
    (re.compile(r"^(encoder|decoder)\.norm_out\.(\w+)$"), lambda m, n: f"{m[1]}.conv_norm_out.{m[2]}"),
)

_FROM_DIFF_RULES: tuple[_Rule, ...] = (
    (
        re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)$"),
        lambda m, n: f"encoder.down.{m[1]}.block.{m[2]}.{_resnet(_RESNET_FROM_DIFF, m[3], m[0])}.{m[4]}",
    ),
    (
        re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)$"),
        lambda m, n: f"encoder.down.{m[1]}.downsample.conv.{m[2]}",
    ),
    (
        re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)$"),
        lambda m, n: (
            f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{_resnet(_RESNET_FROM_DIFF, m[3], m[0])}.{m[4]}"
        ),
    ),
    (
        re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)$"),
        lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}",
    ),
    (
        re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(\w+)$"),
        lambda m, n: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet(_RESNET_FROM_DIFF, m[3], m[0])}.{m[4]}",
    ),
    (
        re.compile(
            r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)$"
        ),
        lambda m, n: f"{m[1]}.mid.attn_1.{_ATTN_FROM_DIFF[m[2]]}.{m[3]}",
    ),
    (re.compile(r"^(encoder|decoder)\.conv_norm_out\.(\w+)$"), lambda m, n: f"{m[1]}.norm_out.{m[2]}"),
)

_ORIG_ATTN_WEIGHT = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
_DIFF_ATTN_WEIGHT = re.compile(r"\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _rename(key: str, rules: tuple[_Rule, ...], n_up: int) -> str:
    for pattern, build in rules:
        match = pattern.match(key)
        if match:
            return build(match, n_up)
    return key


def to_diffusers(sd: Mapping[str, torch.Tensor], config: dict | None = None) -> dict[str, torch.Tensor]:
    """Original BFL/LDM VAE state dict -> ``AutoencoderKL.load_state_dict`` layout.

    ``config`` (the ``AutoencoderKL`` kwargs) is optional: it fixes the number of decoder levels, which the
    keys give otherwise.
    """
    n_up = _num_up(sd.keys(), _ORIG_UP, config)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if _ORIG_ATTN_WEIGHT.search(key) and value.ndim > 2:
            value = value[:, :, 0] if value.ndim == 3 else value[:, :, 0, 0]  # 1x1 conv -> Linear, a view
        out[_rename(key, _TO_DIFF_RULES, n_up)] = value
    return out


def from_diffusers(sd: Mapping[str, torch.Tensor], config: dict | None = None) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` state dict -> original BFL/LDM layout (inverse of ``to_diffusers``).

    The mid-block attention projections are written as 1x1 convolutions ``(C, C, 1, 1)`` like ``ae.safetensors``.
    """
    n_up = _num_up(sd.keys(), _DIFF_UP, config)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if _DIFF_ATTN_WEIGHT.search(key) and value.ndim == 2:
            value = value[:, :, None, None]  # Linear -> 1x1 conv, a view
        out[_rename(key, _FROM_DIFF_RULES, n_up)] = value
    return out
