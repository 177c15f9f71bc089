"""Reference images from diffusers' own pipelines, for parity tests.

The reference side loads the diffusers-format copy of tiny weights with diffusers/transformers'
``from_pretrained`` (not tsumugi's loader) and runs diffusers' pipeline, scheduler and LoRA loader.
"""

from __future__ import annotations

import contextlib
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


IMAGE_TOKEN_ID = 151655


class ForwardTokenTypes(torch.nn.Module):
    """Text-encoder wrapper adding the ``mm_token_type_ids`` that diffusers 0.42.1's edit pipelines do not
    pass to Qwen2.5-VL (diffusers issue #14194); without them the image tokens get 1-D positions."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, input_ids=None, **kwargs):
        kwargs.setdefault("mm_token_type_ids", (input_ids == IMAGE_TOKEN_ID).long())
        return self.model(input_ids=input_ids, **kwargs)


@contextlib.contextmanager
def controls_at_own_size(images: list):
    """diffusers' edit pipelines resize every control by their own rule (1024x1024 / 384x384 areas, step 32,
    Lanczos, no crop); ours differs (step 16, area average, crop). For a comparison on controls neither
    side resamples, their size computation returns each control's own size while this is active."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

    own = {round(im.width / im.height, 6): im.size for im in images}
    saved = pipeline_qwenimage_edit.calculate_dimensions, pipeline_qwenimage_edit_plus.calculate_dimensions
    pipeline_qwenimage_edit.calculate_dimensions = lambda area, ratio: (*own[round(ratio, 6)], None)
    pipeline_qwenimage_edit_plus.calculate_dimensions = lambda area, ratio: own[round(ratio, 6)]
    try:
        yield
    finally:
        pipeline_qwenimage_edit.calculate_dimensions, pipeline_qwenimage_edit_plus.calculate_dimensions = saved


def _image_only_processor(tokenizer):
    """A Qwen2-VL processor without the video processor (that one needs torchvision)."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tsumugi.text.qwen_vl_images import MAX_PIXELS, MIN_PIXELS

    class ImageOnlyProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    return ImageOnlyProcessor(Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS), tokenizer)


def reference_edit_image(
    folders: dict[str, Path],
    version: str,
    images: list,
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    seed: int,
    guidance: float = 4.0,
    lora: Path | None = None,
) -> np.ndarray:
    """8-bit RGB output of diffusers' QwenImageEditPipeline (``edit``) or QwenImageEditPlusPipeline
    (``edit-2509``/``edit-2511``, the latter with ``zero_cond_t``) at the first control's size."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration

    from tsumugi.arch.qwen_image import QWEN_IMAGE_SCHEDULER_CONFIG
    from tsumugi.text.tokenizers import load_tokenizer

    tokenizer = load_tokenizer("qwen_image")
    extra = {"zero_cond_t": True} if version == "edit-2511" else {}
    pipeline_class = QwenImageEditPipeline if version == "edit" else QwenImageEditPlusPipeline
    pipe = pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG),
        vae=AutoencoderKLQwenImage.from_pretrained(folders["vae"]),
        text_encoder=ForwardTokenTypes(Qwen2_5_VLForConditionalGeneration.from_pretrained(folders["text_encoder"])),
        tokenizer=tokenizer,
        processor=_image_only_processor(tokenizer),
        transformer=QwenImageTransformer2DModel.from_pretrained(folders["dit"], **extra),
    )
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    width, height = images[0].size
    with controls_at_own_size(images):
        out = pipe(
            image=images if version != "edit" else images[0], prompt=prompt, negative_prompt=negative_prompt,
            true_cfg_scale=guidance, height=height, width=width, num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
        )
    return (out.images[0] * 255).round().astype(np.uint8)


def reference_layered_images(
    folders: dict[str, Path],
    image,
    *,
    prompt: str,
    negative_prompt: str,
    layers: int,
    steps: int,
    seed: int,
    guidance: float = 4.0,
    lora: Path | None = None,
) -> list[np.ndarray]:
    """8-bit RGBA layers of diffusers' QwenImageLayeredPipeline (the composite is not decoded there), with the
    release's scheduler config and CFG normalisation on (tsumugi, like Musubi, always normalises).

    The pipeline sizes its input to a 640x640 or 1024x1024 area (step 32); here its size rule returns the
    RGBA ``image``'s own size, so neither side resamples it.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageLayeredPipeline,
        QwenImageTransformer2DModel,
    )
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_layered
    from transformers import Qwen2_5_VLForConditionalGeneration

    from tsumugi.arch.qwen_image_layered import QWEN_IMAGE_LAYERED_SCHEDULER_CONFIG
    from tsumugi.text.tokenizers import load_tokenizer

    tokenizer = load_tokenizer("qwen_image")
    pipe = QwenImageLayeredPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_LAYERED_SCHEDULER_CONFIG),
        vae=AutoencoderKLQwenImage.from_pretrained(folders["vae"]),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(folders["text_encoder"]),
        tokenizer=tokenizer,
        processor=_image_only_processor(tokenizer),
        transformer=QwenImageTransformer2DModel.from_pretrained(folders["dit"]),
    )
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    saved = pipeline_qwenimage_layered.calculate_dimensions
    pipeline_qwenimage_layered.calculate_dimensions = lambda area, ratio: image.size
    try:
        out = pipe(
            image=image, prompt=prompt, negative_prompt=negative_prompt, true_cfg_scale=guidance, layers=layers,
            num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
            cfg_normalize=True,
        )
    finally:
        pipeline_qwenimage_layered.calculate_dimensions = saved
    return [(frame * 255).round().astype(np.uint8) for frame in out.images[0]]
