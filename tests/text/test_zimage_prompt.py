"""Z-Image prompt encoding against diffusers' ZImagePipeline.encode_prompt on a tiny Qwen3."""

from __future__ import annotations

import pytest
import torch

from tsumugi.text.zimage_prompt import ZIMAGE_MAX_LENGTH, encode_zimage_prompts, render_zimage_prompt

PROMPTS = [
    "A red fox jumping over a lazy dog, 35mm photo.",
    "一只橘猫坐在窗台上，窗外下着小雨，水彩画风格。",
    "",
    "emoji 🐱🎉 <think>not a thought</think> <|vision_start|>",
]


@pytest.fixture(scope="module")
def pipeline(tiny_qwen3, zimage_tokenizer):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )

    from tsumugi.testing.tiny_configs import tiny_flux_vae_config, tiny_zimage_dit_config

    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=AutoencoderKL(**tiny_flux_vae_config()),
        text_encoder=tiny_qwen3,
        tokenizer=zimage_tokenizer,
        transformer=ZImageTransformer2DModel(**tiny_zimage_dit_config()),
    )


def _diffusers(pipeline, prompts):
    with torch.no_grad():
        embeds, negative = pipeline.encode_prompt(
            list(prompts), device=torch.device("cpu"), do_classifier_free_guidance=False
        )
    assert negative == []
    return embeds


def test_rendered_prompt(zimage_tokenizer):
    assert (
        render_zimage_prompt(zimage_tokenizer, "a cat")
        == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    )


def test_matches_diffusers(pipeline, tiny_qwen3, zimage_tokenizer):
    ours = encode_zimage_prompts(tiny_qwen3, zimage_tokenizer, PROMPTS, "cpu", torch.float32)
    expected = _diffusers(pipeline, PROMPTS)
    assert len(ours) == len(expected) == len(PROMPTS)
    for prompt, e, x in zip(PROMPTS, ours, expected):
        assert torch.equal(e, x)
        assert e.shape == (
            len(zimage_tokenizer(render_zimage_prompt(zimage_tokenizer, prompt)).input_ids),
            64,
        )


def test_truncation_matches_diffusers(pipeline, tiny_qwen3, zimage_tokenizer):
    prompts = ["word " * 600, "short"]
    ours = encode_zimage_prompts(tiny_qwen3, zimage_tokenizer, prompts, "cpu", torch.float32)
    assert ours[0].shape[0] == ZIMAGE_MAX_LENGTH == 512
    for e, x in zip(ours, _diffusers(pipeline, prompts)):
        assert torch.equal(e, x)


def test_batched_equals_one_by_one(tiny_qwen3, zimage_tokenizer):
    batched = encode_zimage_prompts(tiny_qwen3, zimage_tokenizer, PROMPTS, "cpu", torch.float32)
    for prompt, e in zip(PROMPTS, batched):
        (single,) = encode_zimage_prompts(tiny_qwen3, zimage_tokenizer, [prompt], "cpu", torch.float32)
        assert single.shape == e.shape
        torch.testing.assert_close(e, single, atol=1e-5, rtol=1e-5)


def test_causal_lm_wrapper_gives_the_same_embeddings(tiny_qwen3, zimage_tokenizer):
    from transformers import Qwen3ForCausalLM

    lm = Qwen3ForCausalLM(tiny_qwen3.config).eval()
    lm.model.load_state_dict(tiny_qwen3.state_dict())
    ours = encode_zimage_prompts(lm, zimage_tokenizer, PROMPTS[:2], "cpu", torch.float32)
    for e, x in zip(
        ours, encode_zimage_prompts(tiny_qwen3, zimage_tokenizer, PROMPTS[:2], "cpu", torch.float32)
    ):
        assert torch.equal(e, x)


def test_dtype_and_storage(tiny_qwen3, zimage_tokenizer):
    out = encode_zimage_prompts(tiny_qwen3, zimage_tokenizer, PROMPTS[:2], "cpu", torch.bfloat16)
    for e in out:
        assert e.dtype == torch.bfloat16
        assert e.untyped_storage().nbytes() == e.numel() * e.element_size()
    assert encode_zimage_prompts(tiny_qwen3, zimage_tokenizer, [], "cpu", None) == []
