"""Qwen2.5-VL keys: release/ComfyUI layout <-> transformers 5 module layout.

The Qwen2.5-VL release, ComfyUI's ``qwen_2.5_vl_7b.safetensors`` and ``save_pretrained`` of
transformers 5 all store ``model.*`` (language model), ``visual.*`` (vision tower) and
``lm_head.weight``. The module tree of ``Qwen2_5_VLForConditionalGeneration`` in transformers 5 is
``model.language_model.*``, ``model.visual.*``, ``lm_head.*`` (some diffusers folders, e.g.
Qwen-Image's ``text_encoder/``, store these names). Both are accepted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

_RUNTIME = ("model.language_model.", "model.visual.")


def looks_like_original(keys: Iterable[str]) -> bool:
    return any(k.startswith("visual.") or (k.startswith("model.") and not k.startswith(_RUNTIME)) for k in keys)


def _to_runtime(key: str) -> str:
    if key.startswith(_RUNTIME):
        return key
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key


def _to_original(key: str) -> str:
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def to_diffusers(sd: Mapping[str, torch.Tensor], config: dict | None = None) -> dict[str, torch.Tensor]:
    """Release/ComfyUI keys (or already-runtime keys) -> transformers module keys."""
    return {_to_runtime(k): v for k, v in sd.items()}


def from_diffusers(sd: Mapping[str, torch.Tensor], config: dict | None = None) -> dict[str, torch.Tensor]:
    """transformers module keys -> release/ComfyUI keys."""
    return {_to_original(k): v for k, v in sd.items()}
