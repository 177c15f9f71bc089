"""Attention backend choice, per model instance.

diffusers' ``ModelMixin.set_attention_backend`` also touches process-wide state; here the backend is
written onto each attention processor of the one model, so two models in a process can differ.
"""

from __future__ import annotations

import importlib.util

import torch

from tsumugi.errors import UserError

# --attn_mode value -> (diffusers backend name, python module that must be importable, pip package)
ATTENTION_MODES: dict[str, tuple[str | None, str | None, str | None]] = {
    "torch": (None, None, None),
    "sdpa": (None, None, None),
    "flash": ("flash", "flash_attn", "flash-attn"),
    "xformers": ("xformers", "xformers", "xformers"),
    "sageattn": ("sage", "sageattention", "sageattention"),
}


def apply_attention_mode(model: torch.nn.Module, mode: str, flag: str = "--attn_mode") -> None:
    """Select the attention kernel of ``model``'s attention processors; ``torch``/``sdpa`` is the default."""
    if mode not in ATTENTION_MODES:
        raise UserError(f"{flag}: unknown attention mode {mode!r}; expected one of {', '.join(ATTENTION_MODES)}")
    backend, module_name, package = ATTENTION_MODES[mode]
    if backend is None:
        return
    if importlib.util.find_spec(module_name) is None:
        raise UserError(f"{flag} {mode} needs the Python package '{package}': pip install {package}")
    if not torch.cuda.is_available():
        raise UserError(f"{flag} {mode} runs on CUDA GPUs only; use --attn_mode torch on this machine")
    from diffusers.models.attention_dispatch import AttentionBackendName

    name = AttentionBackendName(backend)
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            processor._attention_backend = name
