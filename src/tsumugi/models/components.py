"""The six model components we load, and what we know about each.

A *component kind* names one weight set and the library class that runs it:

==================  ====================================  =============  ==========
kind                class                                 role           arch
==================  ====================================  =============  ==========
qwen_image_dit      diffusers QwenImageTransformer2DModel dit            qwen_image
qwen_image_vae      diffusers AutoencoderKLQwenImage      vae            qwen_image
qwen2_5_vl          transformers Qwen2_5_VLForCond.Gen.   text_encoder   qwen_image
zimage_dit          diffusers ZImageTransformer2DModel    dit            zimage
flux_vae            diffusers AutoencoderKL               vae            zimage
qwen3               transformers Qwen3Model               text_encoder   zimage
==================  ====================================  =============  ==========

``prefixes`` are the key prefixes ComfyUI puts in front of the component inside all-in-one
checkpoints (``model.diffusion_model.`` for the DiT, ``vae.`` for the VAE,
``text_encoders.<name>.transformer.`` for the text encoder).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

ROLES = ("dit", "vae", "text_encoder")
ARCHS = ("qwen_image", "zimage")


@dataclass(frozen=True)
class ComponentKind:
    name: str
    display: str
    role: str
    arch: str
    library: str  # "diffusers" | "transformers"
    class_name: str
    prefixes: tuple[str, ...]
    weights_name: str  # file name inside a diffusers/transformers component folder
    subfolder: str  # folder name inside a diffusers model root

    @property
    def with_article(self) -> str:
        return f"a {self.display}"


_DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_VAE_PREFIXES = ("vae.", "first_stage_model.")

KINDS: dict[str, ComponentKind] = {
    k.name: k
    for k in (
        ComponentKind(
            "qwen_image_dit", "Qwen-Image DiT", "dit", "qwen_image", "diffusers",
            "QwenImageTransformer2DModel", _DIT_PREFIXES, "diffusion_pytorch_model.safetensors", "transformer",
        ),
        ComponentKind(
            "qwen_image_vae", "Qwen-Image VAE", "vae", "qwen_image", "diffusers",
            "AutoencoderKLQwenImage", _VAE_PREFIXES, "diffusion_pytorch_model.safetensors", "vae",
        ),
        ComponentKind(
            "qwen2_5_vl", "Qwen2.5-VL text encoder", "text_encoder", "qwen_image", "transformers",
            "Qwen2_5_VLForConditionalGeneration", ("text_encoders.qwen25_7b.transformer.",),
            "model.safetensors", "text_encoder",
        ),
        ComponentKind(
            "zimage_dit", "Z-Image DiT", "dit", "zimage", "diffusers",
            "ZImageTransformer2DModel", _DIT_PREFIXES, "diffusion_pytorch_model.safetensors", "transformer",
        ),
        ComponentKind(
            "flux_vae", "FLUX VAE (Z-Image)", "vae", "zimage", "diffusers",
            "AutoencoderKL", _VAE_PREFIXES, "diffusion_pytorch_model.safetensors", "vae",
        ),
        ComponentKind(
            "qwen3", "Qwen3 text encoder", "text_encoder", "zimage", "transformers",
            "Qwen3Model", ("text_encoders.qwen3_4b.transformer.",), "model.safetensors", "text_encoder",
        ),
    )
}

ALL_PREFIXES: tuple[str, ...] = tuple(
    sorted({p for k in KINDS.values() for p in k.prefixes}, key=len, reverse=True)
)


def kind_for(role: str, arch: str) -> ComponentKind:
    """The component kind of ``role`` ("dit", "vae", "text_encoder") in architecture ``arch``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    for kind in KINDS.values():
        if kind.role == role and kind.arch == arch:
            return kind
    raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")


def model_class(kind: str) -> type[torch.nn.Module]:
    spec = KINDS[kind]
    if spec.library == "diffusers":
        import diffusers

        return getattr(diffusers, spec.class_name)
    import transformers

    return getattr(transformers, spec.class_name)


def config_class(kind: str) -> Any:
    """The transformers config class of a transformers component (None for diffusers ones)."""
    spec = KINDS[kind]
    if spec.library != "transformers":
        return None
    import transformers

    return {"qwen2_5_vl": transformers.Qwen2_5_VLConfig, "qwen3": transformers.Qwen3Config}[kind]


def init_kwargs(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` restricted to what the diffusers class's ``__init__`` accepts (drops ``_class_name`` etc.)."""
    params = inspect.signature(model_class(kind).__init__).parameters
    return {k: v for k, v in config.items() if k in params and k != "self"}


def instantiate(kind: str, config: dict[str, Any], *, empty: bool = True) -> torch.nn.Module:
    """Build the library module of ``kind`` from a config dict.

    ``empty=True`` puts the parameters on the meta device (no memory, no init cost) for a following
    ``load_state_dict(assign=True)``; buffers stay real so non-persistent ones (RoPE tables) are valid.
    """
    from contextlib import nullcontext

    from accelerate import init_empty_weights

    cls = model_class(kind)
    with init_empty_weights(include_buffers=False) if empty else nullcontext():
        if KINDS[kind].library == "diffusers":
            return cls(**init_kwargs(kind, config))
        return cls(config_class(kind)(**config))
