"""Shared plumbing of the prompt encoders: one no-grad encoder call that returns all hidden states."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch


def run_text_encoder(
    text_encoder: torch.nn.Module, inputs: Mapping[str, Any], device: torch.device | str
) -> tuple[torch.Tensor, ...]:
    """Call ``text_encoder(**inputs)`` on ``device`` without gradients; return its ``hidden_states``.

    Works for the bare models (``Qwen3Model``, ``Qwen2_5_VLModel``) and the ones with an LM head (for
    those only the last position's logits are computed, which leaves the hidden states unchanged). The
    KV cache is not built.
    """
    model_inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    with torch.no_grad():
        output = text_encoder(
            **model_inputs, output_hidden_states=True, use_cache=False, **_skip_logits(text_encoder)
        )
    return output.hidden_states


def _skip_logits(text_encoder: torch.nn.Module) -> dict[str, Any]:
    try:
        params = inspect.signature(text_encoder.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}
