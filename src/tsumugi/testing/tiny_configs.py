"""Configurations of tiny random models with the real architectures.

Tests, the demo and CPU benchmarks build models from these. Each tiny model keeps every structural
feature of the released one (block types, RoPE axes, modulation, VAE down-sampling factor, text-encoder
vocabulary) and only shrinks widths and depths, so the real loading and sampling code runs unchanged.
"""

from __future__ import annotations

from typing import Any

# Size of the Qwen2/Qwen3 vocabulary: the real tokenizer's ids must all be embeddable.
QWEN_VOCAB_SIZE = 151936

TINY_TEXT_HIDDEN = 64


def tiny_qwen_image_dit_config(num_layers: int = 2, zero_cond_t: bool = False,
                               layered: bool = False) -> dict[str, Any]:
    """QwenImageTransformer2DModel kwargs: 2 heads of 32 (RoPE axes 8+12+12), text width 64.

    ``layered``: Qwen-Image-Layered's extra time embedding (``use_additional_t_cond``) and layer-3D RoPE.
    """
    return {
        "patch_size": 2,
        "in_channels": 64,
        "out_channels": 16,
        "num_layers": num_layers,
        "attention_head_dim": 32,
        "num_attention_heads": 2,
        "joint_attention_dim": TINY_TEXT_HIDDEN,
        "guidance_embeds": False,
        "axes_dims_rope": (8, 12, 12),
        "zero_cond_t": zero_cond_t,
        "use_additional_t_cond": layered,
        "use_layer3d_rope": layered,
    }


def tiny_qwen_image_vae_config(layered: bool = False) -> dict[str, Any]:
    """AutoencoderKLQwenImage kwargs: 8x down-sampling like the real VAE, one residual block per level.

    One residual block (the release has two) keeps the conversion code honest about block counts.
    The latent mean/std are the released, non-trivial values. ``layered``: the RGBA VAE of
    Qwen-Image-Layered (4 input and output channels).
    """
    return {
        "base_dim": 16,
        "z_dim": 16,
        "dim_mult": [1, 2, 2, 2],
        "num_res_blocks": 1,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
        "dropout": 0.0,
        "input_channels": 4 if layered else 3,
    }


def tiny_qwen2_5_vl_config() -> dict[str, Any]:
    """Qwen2_5_VLConfig kwargs: 2 text layers of width 64, a 2-block vision tower."""
    return {
        "text_config": {
            "vocab_size": QWEN_VOCAB_SIZE,
            "hidden_size": TINY_TEXT_HIDDEN,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": TINY_TEXT_HIDDEN,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "in_channels": 3,
        },
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
    }


def tiny_zimage_dit_config(n_layers: int = 2) -> dict[str, Any]:
    """ZImageTransformer2DModel kwargs: width 64, 2 heads of 32 (RoPE axes 8+12+12), caption width 64."""
    return {
        "all_patch_size": (2,),
        "all_f_patch_size": (1,),
        "in_channels": 16,
        "dim": 64,
        "n_layers": n_layers,
        "n_refiner_layers": 1,
        "n_heads": 2,
        "n_kv_heads": 2,
        "norm_eps": 1e-5,
        "qk_norm": True,
        "cap_feat_dim": TINY_TEXT_HIDDEN,
        "rope_theta": 256.0,
        "t_scale": 1000.0,
        "axes_dims": [8, 12, 12],
        "axes_lens": [1024, 512, 512],
    }


def tiny_flux_vae_config() -> dict[str, Any]:
    """AutoencoderKL kwargs of a FLUX-style 16-channel VAE (used by Z-Image), 8x down-sampling."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [16, 16, 32, 32],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 16,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }


def tiny_qwen3_config() -> dict[str, Any]:
    """Qwen3Config kwargs: 3 layers of width 64 (Z-Image reads the second-to-last hidden state)."""
    return {
        "vocab_size": QWEN_VOCAB_SIZE,
        "hidden_size": TINY_TEXT_HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    }
