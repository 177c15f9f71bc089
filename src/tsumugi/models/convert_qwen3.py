"""Qwen3 text-encoder state dicts: ComfyUI ``qwen_3_4b.safetensors`` layout <-> transformers ``Qwen3Model``.

The ComfyUI file keeps the Hugging Face ``Qwen3ForCausalLM`` names: ``model.embed_tokens.weight``,
``model.layers.N.{self_attn.{q,k,v,o}_proj,self_attn.{q,k}_norm,mlp.{gate,up,down}_proj,input_layernorm,
post_attention_layernorm}.weight`` and ``model.norm.weight``, without ``lm_head.weight`` (Qwen3-4B ties it to
the embedding). ``Qwen3Model`` holds the same tensors without the ``model.`` prefix.

``to_diffusers`` strips ``model.`` and drops ``lm_head.weight`` if present (``Qwen3Model`` has no head;
Z-Image reads hidden states only). Keys without the prefix pass through unchanged, so a state dict that is
already in the transformers layout converts to itself. Tensors are never copied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

__all__ = ["from_diffusers", "looks_like_original", "to_diffusers"]

_PREFIX = "model."
_DROPPED = frozenset({"lm_head.weight", "lm_head.bias"})


def looks_like_original(keys: Iterable[str]) -> bool:
    """True if the keys carry the ``model.`` prefix of the ComfyUI / ``Qwen3ForCausalLM`` layout."""
    return any(
        key.startswith((_PREFIX + "layers.", _PREFIX + "embed_tokens.", _PREFIX + "norm.")) for key in keys
    )


def to_diffusers(sd: Mapping[str, torch.Tensor], config: dict | None = None) -> dict[str, torch.Tensor]:
    """ComfyUI Qwen3 state dict -> ``Qwen3Model.load_state_dict`` layout. ``config`` is unused."""
    del config
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in _DROPPED:
            continue
        out[key[len(_PREFIX) :] if key.startswith(_PREFIX) else key] = value
    return out


def from_diffusers(sd: Mapping[str, torch.Tensor], config: dict | None = None) -> dict[str, torch.Tensor]:
    """``Qwen3Model`` state dict -> ComfyUI layout (``model.`` prefix, no ``lm_head``). ``config`` is unused."""
    del config
    return {_PREFIX + key: value for key, value in sd.items()}
