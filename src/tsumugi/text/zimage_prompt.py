"""Z-Image prompt encoding with the Qwen3 text encoder (``docs/design.md``, "Prompt encoding").

Each prompt is rendered with the Qwen3 chat template (one user turn, generation prompt, ``enable_thinking=True``
so no empty ``<think>`` block), giving ``"<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n"``.
The batch is padded to 512 tokens (truncation on; the limit includes the template tokens), and the
second-to-last hidden state of the attention-masked tokens is kept. No template tokens are dropped. Same
result as diffusers' ``ZImagePipeline.encode_prompt``.
"""

from __future__ import annotations

from typing import Any

import torch

from tsumugi.text._encoder import run_text_encoder

ZIMAGE_MAX_LENGTH = 512
"""Token limit of a Z-Image prompt, template tokens included."""

ZIMAGE_HIDDEN_LAYER = -2
"""Index into the encoder's ``hidden_states``: the second-to-last layer."""


def render_zimage_prompt(tokenizer: Any, prompt: str) -> str:
    """The chat text of one prompt (Qwen3 template, generation prompt, thinking enabled)."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
    )


def encode_zimage_prompts(
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    device: torch.device | str,
    dtype: torch.dtype | None,
) -> list[torch.Tensor]:
    """Encode ``prompts`` as one batch; returns one ``(L_i, hidden)`` tensor per prompt (``L_i <= 512``).

    ``text_encoder`` is the Qwen3 model (``Qwen3Model`` or ``Qwen3ForCausalLM``) placed for running on
    ``device``; ``tokenizer`` the Qwen3 tokenizer (:func:`load_tokenizer`). ``dtype=None`` keeps the encoder's.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a string")
    if not prompts:
        return []
    texts = [render_zimage_prompt(tokenizer, p) for p in prompts]
    inputs = tokenizer(
        texts, padding="max_length", max_length=ZIMAGE_MAX_LENGTH, truncation=True, return_tensors="pt"
    )
    valid = inputs["attention_mask"].bool()
    hidden = run_text_encoder(
        text_encoder, {"input_ids": inputs["input_ids"], "attention_mask": valid}, device
    )[ZIMAGE_HIDDEN_LAYER]
    valid = valid.to(hidden.device)
    result = []
    for i in range(hidden.shape[0]):
        tokens = hidden[i][valid[i]]
        result.append(tokens.to(dtype=tokens.dtype if dtype is None else dtype, copy=True))
    return result
