"""Z-Image side checkpoint conversions: DiT, FLUX VAE and Qwen3 text encoder (ComfyUI <-> diffusers)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, ZImageTransformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    convert_z_image_transformer_checkpoint_to_diffusers,
)
from transformers import Qwen3Config, Qwen3Model

from tsumugi.models import convert_flux_vae, convert_qwen3, convert_zimage_dit
from tsumugi.testing.tiny_configs import tiny_flux_vae_config, tiny_qwen3_config, tiny_zimage_dit_config


def _random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Distinct random values for every tensor (parameters made with torch.empty may hold NaN)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), (sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# ----------------------------------------------------------------------------------------- Z-Image DiT


def _tiny_dit(n_layers: int = 2) -> tuple[ZImageTransformer2DModel, dict[str, torch.Tensor]]:
    model = ZImageTransformer2DModel(**tiny_zimage_dit_config(n_layers))
    return model, _random_state_dict(model)


def test_zimage_dit_round_trip_is_exact_and_renames_without_copy():
    _, sd = _tiny_dit()
    original = convert_zimage_dit.from_diffusers(sd)
    back = convert_zimage_dit.to_diffusers(original)
    _assert_same(back, sd)
    assert len(original) == len(sd) - 2 * (2 + 1 + 1)  # 4 attention blocks: q, k, v -> qkv
    # Renamed tensors are the very same objects; split q/k/v are copies: views of the fused weight would share
    # one autograd version counter, and full fine-tuning updates each of them in place in the backward.
    assert original["x_embedder.weight"] is sd["all_x_embedder.2-1.weight"]
    assert original["layers.1.attention.out.weight"] is sd["layers.1.attention.to_out.0.weight"]
    assert back["all_final_layer.2-1.linear.weight"] is sd["all_final_layer.2-1.linear.weight"]
    qkv = original["layers.0.attention.qkv.weight"]
    assert not _shares_storage(back["layers.0.attention.to_k.weight"], qkv)
    assert not _shares_storage(back["layers.0.attention.to_k.weight"], back["layers.0.attention.to_q.weight"])
    # Inputs are left alone.
    assert "layers.0.attention.to_q.weight" in sd and "layers.0.attention.qkv.weight" in original


def test_zimage_dit_to_diffusers_matches_diffusers_converter():
    _, sd = _tiny_dit()
    original = convert_zimage_dit.from_diffusers(sd)
    original["norm_final.weight"] = torch.ones(64)  # Lumina-2 leftover both converters drop
    reference = convert_z_image_transformer_checkpoint_to_diffusers(dict(original))
    ours = convert_zimage_dit.to_diffusers(original)
    _assert_same(ours, reference)


def test_zimage_dit_converted_state_dict_loads_strict():
    model, sd = _tiny_dit()
    model.load_state_dict(convert_zimage_dit.to_diffusers(convert_zimage_dit.from_diffusers(sd)), strict=True)
    assert torch.equal(model.layers[1].attention.to_v.weight, sd["layers.1.attention.to_v.weight"])


def _release_block(prefix: str, modulation: bool) -> set[str]:
    # comfy/ldm/lumina/model.py JointTransformerBlock with z_image_modulation=True.
    names = {
        "attention.qkv.weight",
        "attention.out.weight",
        "attention.q_norm.weight",
        "attention.k_norm.weight",
        "feed_forward.w1.weight",
        "feed_forward.w2.weight",
        "feed_forward.w3.weight",
        "attention_norm1.weight",
        "ffn_norm1.weight",
        "attention_norm2.weight",
        "ffn_norm2.weight",
    }
    if modulation:
        names |= {"adaLN_modulation.0.weight", "adaLN_modulation.0.bias"}
    return {f"{prefix}.{name}" for name in names}


def test_zimage_dit_release_layout_key_names():
    """Real-size (meta) model with one main layer: names and shapes of z_image_turbo_bf16.safetensors."""
    with torch.device("meta"):
        model = ZImageTransformer2DModel(n_layers=1)  # release defaults: dim 3840, 30 heads, 2 refiners
    original = convert_zimage_dit.from_diffusers(model.state_dict())
    expected = {
        "x_embedder.weight",
        "x_embedder.bias",
        "final_layer.linear.weight",
        "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.bias",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias",
        "cap_embedder.0.weight",
        "cap_embedder.1.weight",
        "cap_embedder.1.bias",
        "x_pad_token",
        "cap_pad_token",
    }
    expected |= _release_block("layers.0", modulation=True)
    for i in range(2):
        expected |= _release_block(f"noise_refiner.{i}", modulation=True)
        expected |= _release_block(f"context_refiner.{i}", modulation=False)
    assert set(original) == expected
    shapes = {
        "x_embedder.weight": (3840, 64),
        "layers.0.attention.qkv.weight": (3 * 3840, 3840),
        "layers.0.attention.q_norm.weight": (128,),
        "layers.0.feed_forward.w1.weight": (10240, 3840),
        "layers.0.adaLN_modulation.0.weight": (4 * 3840, 256),
        "final_layer.adaLN_modulation.1.weight": (3840, 256),
        "final_layer.linear.weight": (64, 3840),
        "t_embedder.mlp.0.weight": (1024, 256),
        "t_embedder.mlp.2.weight": (256, 1024),
        "cap_embedder.0.weight": (2560,),
        "cap_embedder.1.weight": (3840, 2560),
        "x_pad_token": (1, 3840),
    }
    for key, shape in shapes.items():
        assert tuple(original[key].shape) == shape, key
    assert convert_zimage_dit.looks_like_original(original)
    assert not convert_zimage_dit.looks_like_original(model.state_dict())


def test_zimage_dit_splits_grouped_query_qkv_by_the_output_projection():
    dim, kv_rows = 64, 32
    original = {
        "layers.0.attention.qkv.weight": torch.randn(dim + 2 * kv_rows, dim),
        "layers.0.attention.out.weight": torch.randn(dim, dim),
    }
    converted = convert_zimage_dit.to_diffusers(original)
    assert converted["layers.0.attention.to_q.weight"].shape == (dim, dim)
    assert converted["layers.0.attention.to_k.weight"].shape == (kv_rows, dim)
    assert converted["layers.0.attention.to_v.weight"].shape == (kv_rows, dim)
    _assert_same(convert_zimage_dit.from_diffusers(converted), original)


# -------------------------------------------------------------------------------------------- FLUX VAE


def _tiny_vae() -> tuple[AutoencoderKL, dict[str, torch.Tensor]]:
    model = AutoencoderKL(**tiny_flux_vae_config())
    return model, _random_state_dict(model, seed=1)


def test_flux_vae_round_trip_is_exact_and_renames_without_copy():
    _, sd = _tiny_vae()
    original = convert_flux_vae.from_diffusers(sd)
    back = convert_flux_vae.to_diffusers(original)
    _assert_same(back, sd)
    assert len(original) == len(sd)
    # Decoder levels run in opposite orders; the attention projections are 1x1 convolutions.
    assert original["decoder.up.0.block.0.conv1.weight"] is sd["decoder.up_blocks.3.resnets.0.conv1.weight"]
    assert original["decoder.up.3.upsample.conv.weight"] is sd["decoder.up_blocks.0.upsamplers.0.conv.weight"]
    assert (
        original["encoder.down.2.block.0.nin_shortcut.weight"]
        is sd["encoder.down_blocks.2.resnets.0.conv_shortcut.weight"]
    )
    assert original["encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert _shares_storage(
        original["decoder.mid.attn_1.proj_out.weight"], sd["decoder.mid_block.attentions.0.to_out.0.weight"]
    )
    assert not any(key.startswith(("quant_conv", "post_quant_conv")) for key in original)


def test_flux_vae_to_diffusers_matches_diffusers_converter():
    _, sd = _tiny_vae()
    original = convert_flux_vae.from_diffusers(sd)
    config = tiny_flux_vae_config()
    reference = convert_ldm_vae_checkpoint(dict(original), config)
    _assert_same(convert_flux_vae.to_diffusers(original, config), reference)
    _assert_same(convert_flux_vae.to_diffusers(original), reference)  # level count from the keys


def test_flux_vae_converted_state_dict_loads_strict():
    model, sd = _tiny_vae()
    model.load_state_dict(convert_flux_vae.to_diffusers(convert_flux_vae.from_diffusers(sd)), strict=True)
    assert torch.equal(
        model.decoder.up_blocks[0].resnets[1].conv2.weight, sd["decoder.up_blocks.0.resnets.1.conv2.weight"]
    )


def test_flux_vae_release_layout_key_names():
    """Real-size (meta) FLUX VAE: two residual blocks per level, 128/256/512/512 channels."""
    config = {**tiny_flux_vae_config(), "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2}
    config["norm_num_groups"] = 32
    with torch.device("meta"):
        model = AutoencoderKL(**config)
    original = convert_flux_vae.from_diffusers(model.state_dict())
    resnet = ("norm1", "conv1", "norm2", "conv2")
    attn = ("norm", "q", "k", "v", "proj_out")
    expected: set[str] = set()
    for side in ("encoder", "decoder"):
        for layer in ("conv_in", "conv_out", "norm_out"):
            expected |= {f"{side}.{layer}.weight", f"{side}.{layer}.bias"}
        for block in ("block_1", "block_2"):
            expected |= {f"{side}.mid.{block}.{p}.{e}" for p in resnet for e in ("weight", "bias")}
        expected |= {f"{side}.mid.attn_1.{p}.{e}" for p in attn for e in ("weight", "bias")}
    for i in range(4):
        down = [f"encoder.down.{i}.block.{j}" for j in range(2)]
        up = [f"decoder.up.{i}.block.{j}" for j in range(3)]
        expected |= {f"{b}.{p}.{e}" for b in down + up for p in resnet for e in ("weight", "bias")}
    expected |= {f"encoder.down.{i}.downsample.conv.{e}" for i in range(3) for e in ("weight", "bias")}
    expected |= {f"decoder.up.{i}.upsample.conv.{e}" for i in (1, 2, 3) for e in ("weight", "bias")}
    for block in (
        "encoder.down.1.block.0",
        "encoder.down.2.block.0",
        "decoder.up.0.block.0",
        "decoder.up.1.block.0",
    ):
        expected |= {f"{block}.nin_shortcut.weight", f"{block}.nin_shortcut.bias"}
    assert set(original) == expected
    assert len(original) == 244
    assert tuple(original["decoder.up.0.block.0.nin_shortcut.weight"].shape) == (128, 256, 1, 1)
    assert tuple(original["encoder.conv_out.weight"].shape) == (32, 512, 3, 3)
    assert tuple(original["decoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)
    assert convert_flux_vae.looks_like_original(original)
    assert not convert_flux_vae.looks_like_original(model.state_dict())


# ---------------------------------------------------------------------------------------------- Qwen3


def _tiny_qwen3() -> tuple[Qwen3Model, dict[str, torch.Tensor]]:
    model = Qwen3Model(Qwen3Config(**tiny_qwen3_config()))
    return model, _random_state_dict(model, seed=2)


def test_qwen3_round_trip_is_exact_and_renames_without_copy():
    _, sd = _tiny_qwen3()
    original = convert_qwen3.from_diffusers(sd)
    _assert_same(convert_qwen3.to_diffusers(original), sd)
    assert original["model.embed_tokens.weight"] is sd["embed_tokens.weight"]
    # Keys ComfyUI's text-encoder detection reads (comfy/sd.py detect_te_model).
    assert {
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.self_attn.q_norm.weight",
    } <= set(original)
    assert {"model.norm.weight", "model.layers.2.mlp.down_proj.weight"} <= set(original)
    assert "lm_head.weight" not in original
    assert convert_qwen3.looks_like_original(original)
    assert not convert_qwen3.looks_like_original(sd)


def test_qwen3_drops_tied_lm_head_and_loads_strict():
    model, sd = _tiny_qwen3()
    original = convert_qwen3.from_diffusers(sd)
    original["lm_head.weight"] = original["model.embed_tokens.weight"]
    converted = convert_qwen3.to_diffusers(original)
    assert "lm_head.weight" not in converted
    model.load_state_dict(converted, strict=True)
    assert torch.equal(model.norm.weight, sd["norm.weight"])
