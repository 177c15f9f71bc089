"""Qwen-Image-Edit prompt encoding and our Qwen2-VL image preprocessing, on a tiny Qwen2.5-VL.

Golden references:

* pixels: transformers' ``Qwen2VLImageProcessor`` (the PIL backend ``Qwen2VLImageProcessorPil``, which needs no
  torchvision) with the Qwen2.5-VL config values ``min_pixels=3136, max_pixels=12845056``;
* embeddings: diffusers' ``QwenImageEditPipeline`` / ``QwenImageEditPlusPipeline.encode_prompt`` with a
  ``Qwen2VLProcessor`` built from that image processor and our tokenizer. diffusers 0.42.1 does not forward the
  processor's ``mm_token_type_ids`` to the encoder (diffusers issue #14194), so with transformers 5 the image
  tokens silently get 1-D positions; the reference pipelines get an encoder shim that supplies it (what the
  fix does), and a separate test checks the 3-D positions against an independent construction.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from tsumugi.text.qwen_image_edit_prompt import (
    EDIT_PLUS_TEMPLATE,
    EDIT_TEMPLATE,
    IMAGE_PAD,
    VISION_BLOCK,
    edit_prompt_text,
    encode_qwen_image_edit_prompts,
)
from tsumugi.text.qwen_image_prompt import encode_qwen_image_prompts, pad_prompt_embeds
from tsumugi.text.qwen_vl_images import (
    MAX_PIXELS,
    MIN_PIXELS,
    preprocess_qwen_vl_images,
    smart_resize,
    vl_input_size,
)

IMAGE_TOKEN_ID = 151655


def _random_image(seed: int, width: int, height: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = 4 if mode in ("RGBA", "LA", "P") else 3
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(array, "RGBA" if channels == 4 else "RGB")
    return image if mode in ("RGB", "RGBA") else image.convert(mode)


# ---- image preprocessing ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


ODD_SIZES = [(131, 97), (500, 33), (17, 1000), (30, 20), (57, 29), (384, 384), (803, 601)]


@pytest.mark.parametrize("size", ODD_SIZES)
def test_pixels_match_transformers_processor(reference_image_processor, size):
    image = _random_image(sum(size), *size)
    expected = reference_image_processor(images=[image], return_tensors="pt")
    ours = preprocess_qwen_vl_images([image])
    assert ours.pixel_values.dtype == torch.float32 and ours.image_grid_thw.dtype == torch.long
    assert torch.equal(ours.image_grid_thw, expected["image_grid_thw"])
    assert ours.pixel_values.shape == expected["pixel_values"].shape
    torch.testing.assert_close(ours.pixel_values, expected["pixel_values"], atol=1e-6, rtol=0)
    t, h, w = ours.image_grid_thw[0].tolist()
    assert t == 1 and ours.pixel_values.shape == (h * w, 3 * 2 * 14 * 14)
    assert ours.num_image_tokens == [h * w // 4]


def test_batch_modes_and_bounds_match_transformers_processor(reference_image_processor):
    images = [
        _random_image(i, w, h, mode)
        for i, ((w, h), mode) in enumerate(zip(ODD_SIZES, ["RGB", "RGBA", "L", "LA", "P", "RGB", "RGB"]))
    ]
    images[4].info["transparency"] = 7  # palette image with a transparent colour
    expected = reference_image_processor(images=images, return_tensors="pt")
    ours = preprocess_qwen_vl_images(images)
    assert torch.equal(ours.image_grid_thw, expected["image_grid_thw"])
    torch.testing.assert_close(ours.pixel_values, expected["pixel_values"], atol=1e-6, rtol=0)
    # a tighter pixel budget exercises the max_pixels branch
    small = 28 * 28 * 12
    expected = reference_image_processor(
        images=images, return_tensors="pt", size={"shortest_edge": MIN_PIXELS, "longest_edge": small}
    )
    ours = preprocess_qwen_vl_images(images, max_pixels=small)
    assert torch.equal(ours.image_grid_thw, expected["image_grid_thw"])
    torch.testing.assert_close(ours.pixel_values, expected["pixel_values"], atol=1e-6, rtol=0)
    # numpy RGB arrays are accepted too
    array = np.asarray(images[0])
    assert torch.equal(
        preprocess_qwen_vl_images([array]).pixel_values, preprocess_qwen_vl_images(images[:1]).pixel_values
    )


def test_patch_layout_is_documented_one():
    """Independent of transformers: row r = merge group r // 4 (row-major), patch r % 4 in it; (c, t, y, x)."""
    image = _random_image(5, 85, 71)
    ours = preprocess_qwen_vl_images([image])
    _, grid_h, grid_w = ours.image_grid_thw[0].tolist()
    height, width = grid_h * 14, grid_w * 14
    assert (height, width) == smart_resize(71, 85)
    resized = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC)).astype(np.float64) / 255
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    normalised = torch.from_numpy((resized - mean) / std)
    patches = ours.pixel_values.double().view(-1, 3, 2, 14, 14)
    groups_w = grid_w // 2
    for row in range(patches.shape[0]):
        group, within = divmod(row, 4)
        y = (group // groups_w * 2 + within // 2) * 14
        x = (group % groups_w * 2 + within % 2) * 14
        block = normalised[y : y + 14, x : x + 14].permute(2, 0, 1)
        for t in range(2):
            torch.testing.assert_close(patches[row, :, t], block, atol=1e-5, rtol=0)


def test_smart_resize_rules():
    for height, width in [(1, 1), (97, 131), (4000, 3000), (28, 5000), (10000, 9000)]:
        h, w = smart_resize(height, width)
        assert h % 28 == 0 and w % 28 == 0 and MIN_PIXELS <= h * w <= MAX_PIXELS
    assert smart_resize(384, 384) == (392, 392)  # 384 / 28 = 13.7 -> 14
    assert smart_resize(42, 70) == (56, 56)  # 1.5 and 2.5 round to even (2, 2)
    with pytest.raises(ValueError):
        smart_resize(10, 2010)
    with pytest.raises(TypeError):
        preprocess_qwen_vl_images(_random_image(0, 30, 30))


def test_vl_input_size():
    """bucket_for_area(size, 384x384), step 16 (docs/design.md, "Buckets and control images").

    Values worked out by hand."""
    assert vl_input_size(1024, 1024) == (384, 384)
    assert vl_input_size(1920, 1080) == (512, 288)
    assert vl_input_size(1024, 768) == (432, 336)  # diffusers' calculate_dimensions gives 448x320
    assert vl_input_size(768, 1024) == (336, 432)
    assert vl_input_size(1000, 17) == (2912, 48)
    for width, height in [(1, 1), (333, 777), (5000, 100), (100, 5000)]:
        w, h = vl_input_size(width, height)
        assert w % 16 == 0 and h % 16 == 0 and 0 < w * h <= 384 * 384


# ---- prompt encoding -------------------------------------------------------------------------------


def _image_only_processor(image_processor, tokenizer):
    """A ``Qwen2VLProcessor`` without its video processor: that one needs torchvision, and transformers 5.23
    rejects even ``video_processor=None`` when torchvision is missing, so the subclass drops the argument."""
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


class _ForwardTokenTypes(torch.nn.Module):
    """Encoder shim adding the ``mm_token_type_ids`` diffusers 0.42.1 fails to forward (issue #14194)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def forward(self, input_ids=None, **kwargs):
        kwargs.setdefault("mm_token_type_ids", (input_ids == IMAGE_TOKEN_ID).long())
        return self.model(input_ids=input_ids, **kwargs)


@pytest.fixture(scope="module")
def pipelines(tiny_qwen2_5_vl, qwen_image_tokenizer, reference_image_processor):
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )

    from tsumugi.testing.tiny_configs import tiny_qwen_image_dit_config, tiny_qwen_image_vae_config

    processor = _image_only_processor(reference_image_processor, qwen_image_tokenizer)
    vae = AutoencoderKLQwenImage(**tiny_qwen_image_vae_config())
    transformer = QwenImageTransformer2DModel(**tiny_qwen_image_dit_config())
    kwargs = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_ForwardTokenTypes(tiny_qwen2_5_vl),
        tokenizer=qwen_image_tokenizer,
        processor=processor,
        transformer=transformer,
    )
    return {"edit": QwenImageEditPipeline(**kwargs), "plus": QwenImageEditPlusPipeline(**kwargs)}


IMAGES = [_random_image(10, 140, 100), _random_image(11, 60, 90), _random_image(12, 75, 75)]
PROMPTS = [
    "Make the cat wear a red hat.",
    "把背景换成夜晚的城市，保留人物。",
    'Put picture 2\'s dog into picture 1, sign "OPEN" {}',
]


def _diffusers(pipeline, prompts, image):
    with torch.no_grad():
        return pipeline.encode_prompt(list(prompts), image=image, device=torch.device("cpu"))


def test_templates_match_diffusers_and_drop_64_tokens(pipelines, qwen_image_tokenizer):
    assert EDIT_TEMPLATE.template == pipelines["edit"].prompt_template_encode
    assert EDIT_PLUS_TEMPLATE.template == pipelines["plus"].prompt_template_encode
    assert (
        pipelines["edit"].prompt_template_encode_start_idx
        == pipelines["plus"].prompt_template_encode_start_idx
    )
    assert EDIT_TEMPLATE.drop_idx == EDIT_PLUS_TEMPLATE.drop_idx == 64
    edit_prefix = EDIT_TEMPLATE.template.split(VISION_BLOCK)[0]
    plus_prefix = EDIT_PLUS_TEMPLATE.template.split("{}")[0]
    assert edit_prefix == plus_prefix
    assert len(qwen_image_tokenizer(plus_prefix).input_ids) == 64
    assert edit_prompt_text("cap", 2, "edit-2511") == EDIT_PLUS_TEMPLATE.template.format(
        "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: <|vision_start|><|image_pad|><|vision_end|>cap"
    )
    assert edit_prompt_text("cap", 3, "edit") == EDIT_TEMPLATE.template.format("cap")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_edit_single_image_matches_diffusers(pipelines, tiny_qwen2_5_vl, qwen_image_tokenizer, prompt):
    (ours,) = encode_qwen_image_edit_prompts(
        tiny_qwen2_5_vl, qwen_image_tokenizer, [prompt], [[IMAGES[0]]], "edit", "cpu", torch.float32
    )
    expected, mask = _diffusers(pipelines["edit"], [prompt], IMAGES[0])
    assert mask is None
    assert ours.shape == expected[0].shape
    assert torch.equal(ours, expected[0])


def test_edit_batch_matches_diffusers(pipelines, tiny_qwen2_5_vl, qwen_image_tokenizer):
    ours = encode_qwen_image_edit_prompts(
        tiny_qwen2_5_vl,
        qwen_image_tokenizer,
        PROMPTS,
        [[img] for img in IMAGES],
        "edit",
        "cpu",
        torch.float32,
    )
    expected, expected_mask = _diffusers(pipelines["edit"], PROMPTS, IMAGES)
    embeds, mask = pad_prompt_embeds(ours)
    assert torch.equal(mask, expected_mask)
    assert torch.equal(embeds, expected)


@pytest.mark.parametrize("version", ["edit-2509", "edit-2511"])
@pytest.mark.parametrize("num_images", [1, 2, 3])
def test_plus_matches_diffusers(pipelines, tiny_qwen2_5_vl, qwen_image_tokenizer, version, num_images):
    images = IMAGES[:num_images]
    prompt = PROMPTS[2]
    (ours,) = encode_qwen_image_edit_prompts(
        tiny_qwen2_5_vl, qwen_image_tokenizer, [prompt], [images], version, "cpu", torch.float32
    )
    expected, _ = _diffusers(pipelines["plus"], [prompt], images if num_images > 1 else images[0])
    assert torch.equal(ours, expected[0])
    grids = preprocess_qwen_vl_images(images).num_image_tokens
    suffix = len(qwen_image_tokenizer(prompt + "<|im_end|>\n<|im_start|>assistant\n").input_ids)
    label = len(qwen_image_tokenizer("Picture 1: <|vision_start|><|vision_end|>").input_ids)
    assert ours.shape == (num_images * label + sum(grids) + suffix, 64)


def _reference_position_ids(input_ids: list[int], grids: list[list[int]]) -> torch.Tensor:
    """3-D RoPE positions as transformers 4.x derived them from input_ids (Musubi pins 4.57.6)."""
    positions, current, index, image = [], 0, 0, 0
    while index < len(input_ids):
        if input_ids[index] != IMAGE_TOKEN_ID:
            positions.append((current, current, current))
            current += 1
            index += 1
            continue
        t, h, w = grids[image]
        image += 1
        h, w = h // 2, w // 2
        positions += [
            (current, current + y, current + x) for _ in range(t) for y in range(h) for x in range(w)
        ]
        index += t * h * w
        current += max(h, w)
    return torch.tensor(positions).T.reshape(3, 1, -1)


@pytest.mark.parametrize("version", ["edit", "edit-2509"])
def test_image_tokens_get_3d_positions(tiny_qwen2_5_vl, qwen_image_tokenizer, version):
    images = IMAGES[:2]
    (ours,) = encode_qwen_image_edit_prompts(
        tiny_qwen2_5_vl, qwen_image_tokenizer, [PROMPTS[0]], [images], version, "cpu", torch.float32
    )
    used = images[:1] if version == "edit" else images
    vision = preprocess_qwen_vl_images(used)
    pads = iter(vision.num_image_tokens)
    text = edit_prompt_text(PROMPTS[0], len(used), version)
    head, *rest = text.split(IMAGE_PAD)
    text = head + "".join(IMAGE_PAD * next(pads) + part for part in rest)
    input_ids = qwen_image_tokenizer(text, return_tensors="pt").input_ids
    kwargs = dict(input_ids=input_ids, pixel_values=vision.pixel_values, image_grid_thw=vision.image_grid_thw)
    with torch.no_grad():
        positions = _reference_position_ids(input_ids[0].tolist(), vision.image_grid_thw.tolist())
        reference = tiny_qwen2_5_vl(**kwargs, position_ids=positions, output_hidden_states=True)
        one_d = tiny_qwen2_5_vl(**kwargs, output_hidden_states=True)  # what diffusers 0.42.1 computes
    torch.testing.assert_close(ours, reference.hidden_states[-1][0, 64:], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ours, one_d.hidden_states[-1][0, 64:], atol=1e-3)


def test_batch_equals_one_by_one_with_mixed_image_counts(tiny_qwen2_5_vl, qwen_image_tokenizer):
    prompts = PROMPTS + ["no control image here", ""]
    images = [[IMAGES[0], IMAGES[1]], [], [IMAGES[2]], None, [IMAGES[1], IMAGES[2], IMAGES[0]]]
    for version in ("edit-2509", "edit"):
        batched = encode_qwen_image_edit_prompts(
            tiny_qwen2_5_vl, qwen_image_tokenizer, prompts, images, version, "cpu", torch.float32
        )
        for prompt, imgs, e in zip(prompts, images, batched):
            (single,) = encode_qwen_image_edit_prompts(
                tiny_qwen2_5_vl, qwen_image_tokenizer, [prompt], [imgs], version, "cpu", torch.float32
            )
            assert single.shape == e.shape
            torch.testing.assert_close(e, single, atol=1e-5, rtol=1e-5)
        # prompts without images use the text-only encoder
        text_only = encode_qwen_image_prompts(
            tiny_qwen2_5_vl, qwen_image_tokenizer, [prompts[1], prompts[3]], "cpu", torch.float32
        )
        torch.testing.assert_close(batched[1], text_only[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched[3], text_only[1], atol=1e-5, rtol=1e-5)


def test_edit_uses_only_the_first_image(tiny_qwen2_5_vl, qwen_image_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="tsumugi.text.qwen_image_edit_prompt"):
        (two,) = encode_qwen_image_edit_prompts(
            tiny_qwen2_5_vl, qwen_image_tokenizer, [PROMPTS[0]], [IMAGES[:2]], "edit", "cpu", torch.float32
        )
    assert "only the first" in caplog.text
    (one,) = encode_qwen_image_edit_prompts(
        tiny_qwen2_5_vl, qwen_image_tokenizer, [PROMPTS[0]], [IMAGES[:1]], "edit", "cpu", torch.float32
    )
    assert torch.equal(one, two)


def test_vl_sized_control_and_output_dtype(tiny_qwen2_5_vl, qwen_image_tokenizer):
    control = _random_image(20, 1024, 768)
    resized = control.resize(vl_input_size(*control.size), Image.Resampling.LANCZOS)
    assert preprocess_qwen_vl_images([resized]).image_grid_thw.tolist() == [
        [1, 24, 30]
    ]  # 336x420 -> 180 tokens
    out = encode_qwen_image_edit_prompts(
        tiny_qwen2_5_vl,
        qwen_image_tokenizer,
        [PROMPTS[0], "x"],
        [[resized], []],
        "edit-2511",
        "cpu",
        torch.bfloat16,
    )
    for e in out:
        assert e.dtype == torch.bfloat16 and e.is_contiguous()
        assert e.untyped_storage().nbytes() == e.numel() * e.element_size()
    bare = encode_qwen_image_edit_prompts(
        tiny_qwen2_5_vl.model,
        qwen_image_tokenizer,
        [PROMPTS[0]],
        [[resized]],
        "edit-2511",
        "cpu",
        torch.bfloat16,
    )
    assert torch.equal(out[0], bare[0])


def test_invalid_inputs(tiny_qwen2_5_vl, qwen_image_tokenizer):
    def encode(prompts, images, version="edit-2509"):
        return encode_qwen_image_edit_prompts(
            tiny_qwen2_5_vl, qwen_image_tokenizer, prompts, images, version, "cpu", torch.float32
        )

    assert encode([], []) == []
    with pytest.raises(ValueError, match="version"):
        encode(["a"], [[IMAGES[0]]], version="edit-2512")
    with pytest.raises(ValueError, match="image lists"):
        encode(["a", "b"], [[IMAGES[0]]])
    with pytest.raises(TypeError):
        encode("a", [[IMAGES[0]]])
    with pytest.raises(TypeError):
        encode(["a"], [IMAGES[0]])
    with pytest.raises(ValueError, match="image_pad"):
        encode([f"a {IMAGE_PAD} b"], [[IMAGES[0]]])
