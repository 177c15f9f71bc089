"""``--split_attn``: attention one sample at a time on the un-padded sequence, per model instance.

The diffusers processors of Qwen-Image (``QwenDoubleStreamAttnProcessor2_0``, text padding given by
``encoder_hidden_states_mask``) and Z-Image (``ZSingleStreamAttnProcessor``, padding given by a boolean
``attention_mask``) are wrapped, on the attention modules of one model only, by processors that run the
original processor for each sample of the batch with its padding tokens removed and no mask, then put
the results back at their positions (padding positions get zeros; no valid token ever attends to them,
so the model output and the gradients are unchanged). The wrapped processor keeps its attention
backend, so this composes with ``--flash_attn`` / ``--xformers`` (which ignore masks).
"""

from __future__ import annotations

from typing import Any

import torch


def _select(t: torch.Tensor, sample: int, keep: torch.Tensor | None, batched: bool) -> torch.Tensor:
    """Rows of sample ``sample`` (dim 1 of a batched tensor, dim 0 of a shared one) at positions ``keep``."""
    if batched:
        t = t[sample : sample + 1]
        return t if keep is None else t.index_select(1, keep)
    return t if keep is None else t.index_select(0, keep)


def _scatter(parts: list[torch.Tensor], keeps: list[torch.Tensor | None], length: int) -> torch.Tensor:
    """Stack per-sample ``[1, n_i, ...]`` results into ``[B, length, ...]`` with zeros at dropped positions."""
    rows = []
    for part, keep in zip(parts, keeps, strict=True):
        part = part[0]
        if keep is not None:
            part = part.new_zeros((length, *part.shape[1:])).index_copy(0, keep, part)
        rows.append(part)
    return torch.stack(rows)


def _keep_indices(mask: torch.Tensor | None, batch: int) -> list[torch.Tensor | None]:
    """Per sample, the indices of the valid positions of a ``[B, L]`` mask (None: every position)."""
    if mask is None:
        return [None] * batch
    mask = mask.to(torch.bool)
    if mask.ndim == 4:  # [B, 1, 1, L]
        mask = mask[:, 0, 0, :]
    return [None if bool(m.all()) else m.nonzero().squeeze(1) for m in mask]


class _SplitBase:
    """Forwards the attention backend attribute to the wrapped processor."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    @property
    def _attention_backend(self) -> Any:
        return getattr(self.processor, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.processor._attention_backend = value


class QwenSplitAttnProcessor(_SplitBase):
    """Per-sample wrapper of ``QwenDoubleStreamAttnProcessor2_0`` (joint text+image attention)."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None or attention_mask is not None:
            # let the wrapped processor raise its own error
            return self.processor(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                  attention_mask, image_rotary_emb)
        batch, txt_len = encoder_hidden_states.shape[:2]
        keeps = _keep_indices(encoder_hidden_states_mask, batch)
        imgs, txts = [], []
        for i, keep in enumerate(keeps):
            rotary = image_rotary_emb
            if rotary is not None:
                img_freqs, txt_freqs = rotary
                rotary = (
                    img_freqs[i] if img_freqs.ndim == 3 else img_freqs,
                    _select(txt_freqs, i, keep, batched=False) if txt_freqs.ndim == 2
                    else _select(txt_freqs, i, keep, batched=True)[0],
                )
            img, txt = self.processor(
                attn, hidden_states[i : i + 1], _select(encoder_hidden_states, i, keep, batched=True), None, None, rotary
            )
            imgs.append(img)
            txts.append(txt)
        return torch.cat(imgs), _scatter(txts, keeps, txt_len)


class ZImageSplitAttnProcessor(_SplitBase):
    """Per-sample wrapper of ``ZSingleStreamAttnProcessor`` (one padded unified sequence)."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, length = hidden_states.shape[:2]
        keeps = _keep_indices(attention_mask, batch)
        outs = []
        for i, keep in enumerate(keeps):
            freqs = None if freqs_cis is None else _select(freqs_cis, i, keep, batched=True)
            outs.append(self.processor(attn, _select(hidden_states, i, keep, batched=True), encoder_hidden_states,
                                       None, freqs))
        return _scatter(outs, keeps, length)


_WRAPPERS = {
    "QwenDoubleStreamAttnProcessor2_0": QwenSplitAttnProcessor,
    "ZSingleStreamAttnProcessor": ZImageSplitAttnProcessor,
}


def apply_split_attention(model: torch.nn.Module) -> int:
    """Wrap every Qwen-Image / Z-Image attention processor of ``model``; returns how many were wrapped."""
    count = 0
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is None or isinstance(processor, _SplitBase):
            continue
        wrapper = _WRAPPERS.get(type(processor).__name__)
        if wrapper is not None:
            module.processor = wrapper(processor)
            count += 1
    if count == 0:
        raise ValueError(f"--split_attn: no supported attention processor in {type(model).__name__}")
    return count
