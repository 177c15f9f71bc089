"""Reference images from diffusers' own pipelines, for parity tests.

The reference side loads the diffusers-format copy of tiny weights with diffusers/transformers'
``from_pretrained`` (not tsumugi's loader) and runs diffusers' pipeline, scheduler and LoRA loader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def reference_pipeline(arch: str, folders: dict[str, Path]):
    from diffusers import (
        AutoencoderKL,
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3Model

    from tsumugi.text.tokenizers import load_tokenizer

    if arch == "qwen_image":
        from tsumugi.arch.qwen_image import QWEN_IMAGE_SCHEDULER_CONFIG

        return QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG),
            vae=AutoencoderKLQwenImage.from_pretrained(folders["vae"]),
            text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(folders["text_encoder"]),
            tokenizer=load_tokenizer("qwen_image"),
            transformer=QwenImageTransformer2DModel.from_pretrained(folders["dit"]),
        )
    from tsumugi.arch.zimage import ZIMAGE_SCHEDULER_CONFIG

    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(ZIMAGE_SCHEDULER_CONFIG),
        vae=AutoencoderKL.from_pretrained(folders["vae"]),
        text_encoder=Qwen3Model.from_pretrained(folders["text_encoder"]),
        tokenizer=load_tokenizer("zimage"),
        transformer=ZImageTransformer2DModel.from_pretrained(folders["dit"]),
    )


def reference_image(
    arch: str,
    folders: dict[str, Path],
    *,
    prompt: str,
    negative_prompt: str,
    height: int,
    width: int,
    steps: int,
    seed: int,
    guidance: float,
    lora: Path | None = None,
) -> np.ndarray:
    """8-bit RGB image of the diffusers pipeline; with ``lora``, loaded by ``load_lora_weights``."""
    pipe = reference_pipeline(arch, folders)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    common = dict(
        prompt=prompt,
        negative_prompt=negative_prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    )
    out = pipe(true_cfg_scale=guidance, **common) if arch == "qwen_image" else pipe(guidance_scale=guidance, **common)
    return (out.images[0] * 255).round().astype(np.uint8)
