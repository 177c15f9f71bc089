"""Qwen-Image prompt encoding against diffusers' QwenImagePipeline.encode_prompt on a tiny Qwen2.5-VL."""

from __future__ import annotations

import pytest
import torch

from tsumugi.text.qwen_image_prompt import (
    TEXT_TO_IMAGE_TEMPLATE,
    encode_qwen_image_prompts,
    pad_prompt_embeds,
)

PROMPTS = [
    "A red fox jumping over a lazy dog, 35mm photo.",
    "一只橘猫坐在窗台上，窗外下着小雨，水彩画风格。",
    " ",
    'emoji 🐱🎉 and a sign that reads "OPEN" <|vision_start|>',
]


@pytest.fixture(scope="module")
def pipeline(tiny_qwen2_5_vl, qwen_image_tokenizer):
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    from tsumugi.testing.tiny_configs import tiny_qwen_image_dit_config, tiny_qwen_image_vae_config

    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=AutoencoderKLQwenImage(**tiny_qwen_image_vae_config()),
        text_encoder=tiny_qwen2_5_vl,
        tokenizer=qwen_image_tokenizer,
        transformer=QwenImageTransformer2DModel(**tiny_qwen_image_dit_config()),
    )


def _diffusers(pipeline, prompts):
    with torch.no_grad():
        return pipeline.encode_prompt(list(prompts), device=torch.device("cpu"))


def test_template_prefix_is_drop_idx_tokens(qwen_image_tokenizer):
    prefix, suffix = TEXT_TO_IMAGE_TEMPLATE.template.split("{}")
    assert len(qwen_image_tokenizer(prefix).input_ids) == TEXT_TO_IMAGE_TEMPLATE.drop_idx == 34
    full = qwen_image_tokenizer(TEXT_TO_IMAGE_TEMPLATE.template.format("a cat")).input_ids
    assert full[:34] == qwen_image_tokenizer(prefix).input_ids
    assert full[34:] == qwen_image_tokenizer("a cat" + suffix).input_ids


def test_matches_diffusers(pipeline, tiny_qwen2_5_vl, qwen_image_tokenizer):
    ours = encode_qwen_image_prompts(tiny_qwen2_5_vl, qwen_image_tokenizer, PROMPTS, "cpu", torch.float32)
    expected_embeds, expected_mask = _diffusers(pipeline, PROMPTS)
    assert expected_mask is not None  # the prompts have different lengths
    embeds, mask = pad_prompt_embeds(ours)
    assert mask.dtype == torch.long
    assert torch.equal(embeds, expected_embeds)
    assert torch.equal(mask, expected_mask)
    suffix_len = len(qwen_image_tokenizer(TEXT_TO_IMAGE_TEMPLATE.template.split("{}")[1]).input_ids)
    for prompt, e in zip(PROMPTS, ours):
        assert e.shape == (len(qwen_image_tokenizer(prompt).input_ids) + suffix_len, 64)
        assert e.dtype == torch.float32


def test_single_prompt_matches_diffusers(pipeline, tiny_qwen2_5_vl, qwen_image_tokenizer):
    (ours,) = encode_qwen_image_prompts(
        tiny_qwen2_5_vl, qwen_image_tokenizer, [PROMPTS[1]], "cpu", torch.float32
    )
    expected_embeds, expected_mask = _diffusers(pipeline, [PROMPTS[1]])
    assert expected_mask is None  # diffusers drops an all-ones mask
    assert torch.equal(ours, expected_embeds[0])


def test_truncation_matches_diffusers(pipeline, tiny_qwen2_5_vl, qwen_image_tokenizer):
    prompts = ["word " * 1100, "short"]
    ours = encode_qwen_image_prompts(tiny_qwen2_5_vl, qwen_image_tokenizer, prompts, "cpu", torch.float32)
    assert ours[0].shape[0] == 1024
    expected_embeds, expected_mask = _diffusers(pipeline, prompts)
    embeds, mask = pad_prompt_embeds(ours)
    assert torch.equal(embeds, expected_embeds) and torch.equal(mask, expected_mask)


def test_batched_equals_one_by_one(tiny_qwen2_5_vl, qwen_image_tokenizer):
    batched = encode_qwen_image_prompts(tiny_qwen2_5_vl, qwen_image_tokenizer, PROMPTS, "cpu", torch.float32)
    for prompt, e in zip(PROMPTS, batched):
        (single,) = encode_qwen_image_prompts(
            tiny_qwen2_5_vl, qwen_image_tokenizer, [prompt], "cpu", torch.float32
        )
        assert single.shape == e.shape
        torch.testing.assert_close(e, single, atol=1e-5, rtol=1e-5)


def test_outputs_own_their_storage_and_dtype(tiny_qwen2_5_vl, qwen_image_tokenizer):
    out = encode_qwen_image_prompts(tiny_qwen2_5_vl, qwen_image_tokenizer, PROMPTS[:2], "cpu", torch.bfloat16)
    for e in out:
        assert e.dtype == torch.bfloat16 and e.is_contiguous()
        assert e.untyped_storage().nbytes() == e.numel() * e.element_size()
    assert encode_qwen_image_prompts(tiny_qwen2_5_vl, qwen_image_tokenizer, [], "cpu", torch.float32) == []
    with pytest.raises(TypeError):
        encode_qwen_image_prompts(tiny_qwen2_5_vl, qwen_image_tokenizer, "a cat", "cpu", torch.float32)


def test_pad_prompt_embeds():
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    embeds, mask = pad_prompt_embeds([a, b])
    assert embeds.shape == (2, 5, 4) and mask.shape == (2, 5) and mask.dtype == torch.long
    assert torch.equal(embeds[0, :3], a) and torch.equal(embeds[0, 3:], torch.zeros(2, 4))
    assert torch.equal(embeds[1], b)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    with pytest.raises(ValueError):
        pad_prompt_embeds([])
    with pytest.raises(ValueError):
        pad_prompt_embeds([a, torch.randn(2, 3)])


def test_bare_vl_model_gives_the_same_embeddings(tiny_qwen2_5_vl, qwen_image_tokenizer):
    full = encode_qwen_image_prompts(tiny_qwen2_5_vl, qwen_image_tokenizer, PROMPTS[:2], "cpu", torch.float32)
    bare = encode_qwen_image_prompts(
        tiny_qwen2_5_vl.model, qwen_image_tokenizer, PROMPTS[:2], "cpu", torch.float32
    )
    for a, b in zip(full, bare):
        assert torch.equal(a, b)
