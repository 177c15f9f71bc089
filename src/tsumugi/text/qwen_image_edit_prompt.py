"""Qwen-Image-Edit prompt encoding: caption plus control images through Qwen2.5-VL.

Facts: ``docs/design.md``, "Prompt encoding".

* ``edit``: the edit template, whose user turn starts with one ``<|vision_start|><|image_pad|><|vision_end|>``;
  only the first control image is used (a warning names prompts with more).
* ``edit-2509`` / ``edit-2511``: the edit system prompt; the user turn is
  ``"Picture 1: <|vision_start|><|image_pad|><|vision_end|>"`` ... for every image, then the caption.

Each ``<|image_pad|>`` of the template becomes as many pad tokens as the image gives language-model tokens
(``t * h * w / merge_size**2`` of its ``image_grid_thw`` row); the images are preprocessed by
:mod:`tsumugi.text.qwen_vl_images` exactly like transformers' Qwen2-VL processor. The encoder runs on
``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw`` and ``mm_token_type_ids`` (1 on image
tokens); the last hidden state of the masked tokens without the first 64 is returned per prompt.

``mm_token_type_ids`` matters: transformers 5 builds the 3-D (t, h, w) multimodal RoPE positions of the
image tokens from it and silently falls back to plain 1-D positions without it (the behaviour of diffusers'
edit pipelines up to at least 0.42.1, which do not forward it: diffusers issue #14194). Transformers 4.x
(Musubi pins 4.57) derived the same 3-D positions from ``input_ids``; we reproduce those.

Images are used as given: the caller resizes them (training / caching / ``--resize_control_to_official_size``:
:func:`tsumugi.text.qwen_vl_images.vl_input_size`); the processing only snaps them to multiples of 28.

A prompt without images is encoded with the text-only template (:func:`encode_qwen_image_prompts`, drop 34,
at most 1024 tokens), so a batch may mix prompts with and without images: the result is the same as encoding
every prompt on its own (up to float rounding).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from tsumugi.text.qwen_image_prompt import (
    QwenPromptTemplate,
    encode_qwen_image_prompts,
    encode_tokenized_prompts,
)
from tsumugi.text.qwen_vl_images import (
    MERGE_SIZE,
    PATCH_SIZE,
    TEMPORAL_PATCH_SIZE,
    preprocess_qwen_vl_images,
)

logger = logging.getLogger(__name__)

EDIT_VERSIONS = ("edit", "edit-2509", "edit-2511")

IMAGE_PAD = "<|image_pad|>"
VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"

_EDIT_SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)

EDIT_TEMPLATE = QwenPromptTemplate(
    template=_EDIT_SYSTEM + VISION_BLOCK + "{}<|im_end|>\n<|im_start|>assistant\n",
    drop_idx=64,
    max_length=None,
)
"""Template of Qwen-Image-Edit (one image block before the caption)."""

EDIT_PLUS_TEMPLATE = QwenPromptTemplate(
    template=_EDIT_SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n",
    drop_idx=64,
    max_length=None,
)
"""Template of Qwen-Image-Edit-2509 / 2511 (picture labels and caption go into ``{}``)."""

PICTURE_LABEL = "Picture {}: " + VISION_BLOCK
"""Per-image label of 2509/2511 (1-based index), repeated without separator before the caption."""

ImageLike = Image.Image | np.ndarray


def edit_prompt_text(prompt: str, num_images: int, version: str) -> str:
    """The chat text of one prompt with ``num_images`` (>= 1) images, one ``<|image_pad|>`` per image.

    This is the text diffusers hands to the Qwen2-VL processor (before pad expansion). For ``edit`` the
    template holds exactly one image block whatever ``num_images`` is.
    """
    _check_version(version)
    if num_images < 1:
        raise ValueError(
            "edit_prompt_text needs at least one image; prompts without images use the text template"
        )
    if version == "edit":
        return EDIT_TEMPLATE.template.format(prompt)
    labels = "".join(PICTURE_LABEL.format(k) for k in range(1, num_images + 1))
    return EDIT_PLUS_TEMPLATE.template.format(labels + prompt)


def encode_qwen_image_edit_prompts(
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    images: Sequence[Sequence[ImageLike] | None],
    version: str,
    device: torch.device | str,
    dtype: torch.dtype | None,
) -> list[torch.Tensor]:
    """Encode edit prompts with their control images; one ``(L_i, hidden)`` tensor per prompt, in ``dtype``.

    ``images[i]`` are the (already resized) control images of ``prompts[i]`` in order; an empty list (or
    ``None``) encodes that prompt text-only. ``version``: ``"edit"``, ``"edit-2509"`` or ``"edit-2511"``.
    ``text_encoder``: ``Qwen2_5_VLForConditionalGeneration`` or its ``Qwen2_5_VLModel``, placed on ``device``;
    ``tokenizer``: the Qwen2.5 tokenizer (:func:`tsumugi.text.tokenizers.load_tokenizer`). ``dtype=None``
    keeps the encoder's dtype. Batched and one-by-one encoding give the same tensors up to float rounding.
    """
    _check_version(version)
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a string")
    if len(images) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} image lists")
    per_prompt: list[list[ImageLike]] = []
    for i, imgs in enumerate(images):
        if imgs is None:
            imgs = []
        if isinstance(imgs, (Image.Image, np.ndarray)):
            raise TypeError(f"images[{i}] must be a list of images, not a single image")
        imgs = list(imgs)
        if version == "edit" and len(imgs) > 1:
            logger.warning(
                "prompt %d has %d control images; Qwen-Image-Edit (version 'edit') gives only the first one to "
                "the text encoder",
                i,
                len(imgs),
            )
            imgs = imgs[:1]
        per_prompt.append(imgs)

    result: list[torch.Tensor | None] = [None] * len(prompts)
    text_only = [i for i, imgs in enumerate(per_prompt) if not imgs]
    with_images = [i for i, imgs in enumerate(per_prompt) if imgs]
    if text_only:
        encoded = encode_qwen_image_prompts(
            text_encoder, tokenizer, [prompts[i] for i in text_only], device, dtype
        )
        for i, e in zip(text_only, encoded):
            result[i] = e
    if with_images:
        encoded = _encode_with_images(
            text_encoder,
            tokenizer,
            [prompts[i] for i in with_images],
            [per_prompt[i] for i in with_images],
            version,
            device,
            dtype,
        )
        for i, e in zip(with_images, encoded):
            result[i] = e
    return result  # type: ignore[return-value]


def _encode_with_images(
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    images: list[list[ImageLike]],
    version: str,
    device: torch.device | str,
    dtype: torch.dtype | None,
) -> list[torch.Tensor]:
    patch_size, merge_size, temporal_patch_size = _vision_geometry(text_encoder)
    vision = preprocess_qwen_vl_images(
        [img for imgs in images for img in imgs],
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
    )
    tokens_per_image = iter(vision.num_image_tokens)
    texts, expected = [], []
    for prompt, imgs in zip(prompts, images):
        counts = [next(tokens_per_image) for _ in imgs]
        texts.append(_expanded_text(prompt, counts, version))
        expected.append(sum(counts))

    inputs = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    is_image = (inputs["input_ids"] == image_token_id) & inputs["attention_mask"].bool()
    for i, n in enumerate(is_image.sum(dim=1).tolist()):
        if n != expected[i]:
            raise ValueError(
                f"prompt {i} contains the token {IMAGE_PAD} itself ({n - expected[i]} extra); it is reserved for "
                f"image placeholders: {prompts[i]!r}"
            )
    inputs["pixel_values"] = vision.pixel_values
    inputs["image_grid_thw"] = vision.image_grid_thw
    inputs["mm_token_type_ids"] = is_image.long()
    drop_idx = EDIT_TEMPLATE.drop_idx if version == "edit" else EDIT_PLUS_TEMPLATE.drop_idx
    return encode_tokenized_prompts(text_encoder, inputs, drop_idx, device, dtype)


def _expanded_text(prompt: str, tokens_per_image: list[int], version: str) -> str:
    """Chat text with each template/label ``<|image_pad|>`` repeated for its image; the caption is untouched."""
    if version == "edit":
        head, tail = EDIT_TEMPLATE.template.split("{}")
        return head.replace(IMAGE_PAD, IMAGE_PAD * tokens_per_image[0]) + prompt + tail
    labels = "".join(
        PICTURE_LABEL.format(k).replace(IMAGE_PAD, IMAGE_PAD * n)
        for k, n in enumerate(tokens_per_image, start=1)
    )
    return EDIT_PLUS_TEMPLATE.template.format(labels + prompt)


def _vision_geometry(text_encoder: torch.nn.Module) -> tuple[int, int, int]:
    """(patch, spatial merge, temporal patch) sizes of the encoder's vision tower (Qwen2.5-VL: 14, 2, 2)."""
    vision_config = getattr(getattr(text_encoder, "config", None), "vision_config", None)
    if vision_config is None:
        return PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE
    return (
        int(getattr(vision_config, "patch_size", PATCH_SIZE)),
        int(getattr(vision_config, "spatial_merge_size", MERGE_SIZE)),
        int(getattr(vision_config, "temporal_patch_size", TEMPORAL_PATCH_SIZE)),
    )


def _check_version(version: str) -> None:
    if version not in EDIT_VERSIONS:
        raise ValueError(f"unknown edit model version {version!r}; expected one of {list(EDIT_VERSIONS)}")
