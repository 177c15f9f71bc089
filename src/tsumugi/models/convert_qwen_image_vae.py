"""Qwen-Image VAE keys: original Wan-2.1 layout (ComfyUI ``qwen_image_vae.safetensors``) <-> diffusers.

The original model is a flat ``nn.Sequential`` per side; diffusers groups the decoder into up-blocks.

================================  ==============================================
original                          diffusers ``AutoencoderKLQwenImage``
================================  ==============================================
conv1 / conv2                     quant_conv / post_quant_conv
{enc,dec}oder.conv1               {enc,dec}oder.conv_in
{enc,dec}oder.head.0 / head.2     {enc,dec}oder.norm_out / conv_out
{side}.middle.0 / .1 / .2         {side}.mid_block.resnets.0 / attentions.0 / resnets.1
encoder.downsamples.N             encoder.down_blocks.N (same flat numbering)
decoder.upsamples.N               decoder.up_blocks.B.resnets.R or .upsamplers.0
residual.0 / .2 / .3 / .6         norm1 / conv1 / norm2 / conv2
shortcut                          conv_shortcut
================================  ==============================================

The decoder grouping is derived from the keys, not from a fixed block count: walking the flat
``upsamples`` entries in order, residual blocks join the current up-block and a resample entry
(``resample.*``/``time_conv.*``) closes it as its ``upsamplers.0``. This handles any
``num_res_blocks`` (the release has 2, our tiny VAE 1).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
_SIDE = {"conv1": "conv_in", "head.0": "norm_out", "head.2": "conv_out"}
_RESIDUAL = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
             "shortcut": "conv_shortcut"}

_TOP_INV = {v: k for k, v in _TOP.items()}
_SIDE_INV = {v: k for k, v in _SIDE.items()}
_RESIDUAL_INV = {v: k for k, v in _RESIDUAL.items()}

_RESAMPLE_PARTS = ("resample.", "time_conv.")


def looks_like_original(keys: Iterable[str]) -> bool:
    return any(
        k in ("conv1.weight", "encoder.conv1.weight") or k.startswith(("encoder.downsamples.", "decoder.upsamples."))
        for k in keys
    )


def _rename_head(sub: str, table: Mapping[str, str]) -> str:
    """Replace the leading module path of ``sub`` if it is in ``table`` (longest match wins)."""
    for old in sorted(table, key=len, reverse=True):
        if sub.startswith(old + "."):
            return table[old] + sub[len(old):]
    return sub


def _decoder_groups(keys: Iterable[str]) -> dict[int, str]:
    """Flat ``decoder.upsamples`` index -> ``B.resnets.R`` / ``B.upsamplers.0``."""
    entries: dict[int, bool] = {}
    for key in keys:
        m = re.match(r"decoder\.upsamples\.(\d+)\.(.+)$", key)
        if m:
            is_resample = m[2].startswith(_RESAMPLE_PARTS)
            entries[int(m[1])] = entries.get(int(m[1]), False) or is_resample
    groups: dict[int, str] = {}
    block, resnet = 0, 0
    for index in sorted(entries):
        if entries[index]:
            groups[index] = f"{block}.upsamplers.0"
            block, resnet = block + 1, 0
        else:
            groups[index] = f"{block}.resnets.{resnet}"
            resnet += 1
    return groups


def _key_to_diffusers(key: str, groups: Mapping[int, str]) -> str:
    top, _, rest = key.partition(".")
    if top in _TOP and rest in ("weight", "bias"):
        return f"{_TOP[top]}.{rest}"
    if top not in ("encoder", "decoder"):
        return key
    if m := re.match(r"middle\.(\d+)\.(.+)$", rest):
        i = int(m[1])
        if i % 2 == 0:
            return f"{top}.mid_block.resnets.{i // 2}.{_rename_head(m[2], _RESIDUAL)}"
        return f"{top}.mid_block.attentions.{i // 2}.{m[2]}"
    if top == "encoder" and (m := re.match(r"downsamples\.(\d+)\.(.+)$", rest)):
        return f"encoder.down_blocks.{m[1]}.{_rename_head(m[2], _RESIDUAL)}"
    if top == "decoder" and (m := re.match(r"upsamples\.(\d+)\.(.+)$", rest)):
        return f"decoder.up_blocks.{groups[int(m[1])]}.{_rename_head(m[2], _RESIDUAL)}"
    return f"{top}.{_rename_head(rest, _SIDE)}"


def to_diffusers(sd: Mapping[str, torch.Tensor], config: dict | None = None) -> dict[str, torch.Tensor]:
    """Original (ComfyUI/Wan) keys -> diffusers keys. Tensors are passed through unchanged."""
    groups = _decoder_groups(sd)
    return {_key_to_diffusers(k, groups): v for k, v in sd.items()}


def _up_block_offsets(keys: Iterable[str]) -> dict[int, tuple[int, int]]:
    """Diffusers up-block index -> (flat index of its first entry, number of resnets)."""
    resnets: dict[int, int] = {}
    has_upsampler: dict[int, bool] = {}
    for key in keys:
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", key):
            b = int(m[1])
            resnets[b] = max(resnets.get(b, 0), int(m[2]) + 1)
            has_upsampler.setdefault(b, False)
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", key):
            has_upsampler[int(m[1])] = True
            resnets.setdefault(int(m[1]), 0)
    offsets, start = {}, 0
    for b in sorted(resnets):
        offsets[b] = (start, resnets[b])
        start += resnets[b] + int(has_upsampler[b])
    return offsets


def _key_from_diffusers(key: str, offsets: Mapping[int, tuple[int, int]]) -> str:
    top, _, rest = key.partition(".")
    if top in _TOP_INV and rest in ("weight", "bias"):
        return f"{_TOP_INV[top]}.{rest}"
    if top not in ("encoder", "decoder"):
        return key
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", rest):
        i = int(m[2])
        if m[1] == "resnets":
            return f"{top}.middle.{2 * i}.{_rename_head(m[3], _RESIDUAL_INV)}"
        return f"{top}.middle.{2 * i + 1}.{m[3]}"
    if top == "encoder" and (m := re.match(r"down_blocks\.(\d+)\.(.+)$", rest)):
        return f"encoder.downsamples.{m[1]}.{_rename_head(m[2], _RESIDUAL_INV)}"
    if top == "decoder" and (m := re.match(r"up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)$", rest)):
        start, n_resnets = offsets[int(m[1])]
        index = start + (int(m[3]) if m[3] is not None else n_resnets)
        return f"decoder.upsamples.{index}.{_rename_head(m[4], _RESIDUAL_INV)}"
    return f"{top}.{_rename_head(rest, _SIDE_INV)}"


def from_diffusers(sd: Mapping[str, torch.Tensor], config: dict | None = None) -> dict[str, torch.Tensor]:
    """Diffusers keys -> original (ComfyUI/Wan) keys."""
    offsets = _up_block_offsets(sd)
    return {_key_from_diffusers(k, offsets): v for k, v in sd.items()}
