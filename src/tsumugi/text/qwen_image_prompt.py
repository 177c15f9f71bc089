"""Qwen-Image prompt encoding with the Qwen2.5-VL text encoder (``docs/design.md``, "Prompt encoding").

A prompt is wrapped in the text-only chat template, tokenized (at most ``1024 + drop_idx`` tokens, truncated),
run through the encoder, and the last hidden state of the attention-masked tokens is kept without the first
``drop_idx = 34`` tokens (the system prompt and user header). The result per prompt is an ``(L_i, hidden)``
tensor without padding: what the text-encoder cache stores. :func:`pad_prompt_embeds` re-pads a batch with
zeros and builds the mask the DiT expects, exactly like diffusers' ``QwenImagePipeline.encode_prompt``.

Extension point for the edit models (not implemented yet): an edit prompt differs only in its
:class:`QwenPromptTemplate` (system prompt, ``drop_idx = 64``, no length limit) and in the encoder inputs,
which come from the Qwen2-VL processor (text + images) instead of the tokenizer and carry ``pixel_values`` /
``image_grid_thw`` besides ``input_ids`` / ``attention_mask``. :func:`encode_tokenized_prompts` takes such a
ready-made input dict and does the encoder call and post-processing for both cases, so the edit encoder only
has to build the template text and call the processor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tsumugi.text._encoder import run_text_encoder


@dataclass(frozen=True)
class QwenPromptTemplate:
    """A Qwen-Image prompt template: the text, how many leading tokens to drop, and the token limit."""

    template: str
    """Chat text with one ``{}`` where the prompt goes."""
    drop_idx: int
    """Leading tokens removed from the encoder output (the template prefix)."""
    max_length: int | None
    """Limit on the tokens kept after ``drop_idx`` (the tokenizer truncates at ``max_length + drop_idx``);
    ``None``: no truncation."""


TEXT_TO_IMAGE_TEMPLATE = QwenPromptTemplate(
    template=(
        "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
        "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    drop_idx=34,
    max_length=1024,
)
"""Text-only template of Qwen-Image (also used by the layered model and by edit models without a control)."""


def encode_qwen_image_prompts(
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    device: torch.device | str,
    dtype: torch.dtype | None,
) -> list[torch.Tensor]:
    """Encode ``prompts`` as one batch; returns one ``(L_i, hidden)`` tensor per prompt, in ``dtype``.

    ``text_encoder`` is the Qwen2.5-VL model (``Qwen2_5_VLForConditionalGeneration`` or its ``Qwen2_5_VLModel``)
    already placed for running on ``device``; ``tokenizer`` the Qwen2.5 tokenizer (:func:`load_tokenizer`).
    Batched and one-by-one encoding give the same tensors up to float rounding.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a string")
    if not prompts:
        return []
    template = TEXT_TO_IMAGE_TEMPLATE
    texts = [template.template.format(p) for p in prompts]
    tokenizer_kwargs: dict[str, Any] = {"padding": True, "return_tensors": "pt"}
    if template.max_length is not None:
        tokenizer_kwargs.update(max_length=template.max_length + template.drop_idx, truncation=True)
    inputs = tokenizer(texts, **tokenizer_kwargs)
    return encode_tokenized_prompts(text_encoder, inputs, template.drop_idx, device, dtype)


def encode_tokenized_prompts(
    text_encoder: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    drop_idx: int,
    device: torch.device | str,
    dtype: torch.dtype | None,
) -> list[torch.Tensor]:
    """Run the encoder on tokenizer/processor output and return the per-prompt hidden states.

    ``inputs`` must hold ``input_ids`` and ``attention_mask`` (B, L); any further entries (for the edit
    models: ``pixel_values``, ``image_grid_thw``) are passed to the encoder unchanged. Keeps the masked
    tokens of the last hidden state, drops the first ``drop_idx`` of them, casts to ``dtype`` (``None``:
    keep the encoder's dtype). Every returned tensor owns its storage.
    """
    hidden = run_text_encoder(text_encoder, inputs, device)[-1]
    valid = inputs["attention_mask"].to(hidden.device).bool()
    result = []
    for i in range(hidden.shape[0]):
        tokens = hidden[i][valid[i]][drop_idx:]
        result.append(tokens.to(dtype=tokens.dtype if dtype is None else dtype, copy=True))
    return result


def pad_prompt_embeds(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``(L_i, D)`` tensors to ``(B, Lmax, D)``; the mask ``(B, Lmax)`` (long) is 1 on real tokens.

    Same layout as diffusers' ``QwenImagePipeline`` (which drops the mask when it is all ones).
    """
    if not embeds:
        raise ValueError("pad_prompt_embeds needs at least one tensor")
    dims = {e.shape[-1] for e in embeds}
    if any(e.dim() != 2 for e in embeds) or len(dims) != 1:
        raise ValueError(f"expected (L, D) tensors with one D, got shapes {[tuple(e.shape) for e in embeds]}")
    first = embeds[0]
    max_len = max(e.shape[0] for e in embeds)
    padded = first.new_zeros(len(embeds), max_len, first.shape[1])
    mask = torch.zeros(len(embeds), max_len, dtype=torch.long, device=first.device)
    for i, e in enumerate(embeds):
        padded[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = 1
    return padded, mask
