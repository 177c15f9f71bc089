"""Model configs: the released models' configs, built in code, completed from tensor shapes.

Single-file checkpoints (ComfyUI layout) carry no config. We build one in three layers, later layers
winning:

1. the released model's config (:data:`RELEASED`: Qwen-Image DiT, Qwen-Image VAE, Qwen2.5-VL-7B,
   Z-Image DiT, FLUX VAE of Z-Image, Qwen3-4B), no download involved;
2. a JSON object stored in the safetensors metadata under the key ``tsumugi.config``
   (:data:`CONFIG_METADATA_KEY`), if the file has one. It holds the class's constructor kwargs (for
   transformers models: the config's kwargs, nested ``text_config``/``vision_config`` included). The
   tiny models of :mod:`tsumugi.testing.tiny_models` always write it; any file may. ``tsumugi.component``
   names the component it describes (optional); an all-in-one file stores one config per component
   under ``tsumugi.config.<kind>`` (e.g. ``tsumugi.config.qwen_image_vae``);
3. what the tensor shapes prove: layer counts, widths, vocabulary size, head size (from the q/k norm
   weights), VAE level widths and block counts, optional modules. So pruned or narrowed checkpoints
   load without a config.

Values the shapes cannot tell (RoPE axes, eps, rope theta, latent mean/std, the attention head count
of models without a q/k norm...) come from layers 1-2; for head counts we keep the layer-1/2 head size
when only the width changed.

Diffusers/transformers folders have a ``config.json``; it is used as is (no shape derivation).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from tsumugi.errors import UserError

CONFIG_METADATA_KEY = "tsumugi.config"
COMPONENT_METADATA_KEY = "tsumugi.component"

Shapes = Mapping[str, tuple[int, ...]]

QWEN_IMAGE_DIT: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
    "zero_cond_t": False,
    "use_additional_t_cond": False,
    "use_layer3d_rope": False,
}

QWEN_IMAGE_VAE: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "input_channels": 3,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
}

QWEN2_5_VL_7B: dict[str, Any] = {
    "text_config": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "in_channels": 3,
    },
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
}

ZIMAGE_DIT: dict[str, Any] = {
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "siglip_feat_dim": None,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
}

FLUX_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
    "force_upcast": True,
    "latents_mean": None,
    "latents_std": None,
}

QWEN3_4B: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "attention_bias": False,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

RELEASED: dict[str, dict[str, Any]] = {
    "qwen_image_dit": QWEN_IMAGE_DIT,
    "qwen_image_vae": QWEN_IMAGE_VAE,
    "qwen2_5_vl": QWEN2_5_VL_7B,
    "zimage_dit": ZIMAGE_DIT,
    "flux_vae": FLUX_VAE,
    "qwen3": QWEN3_4B,
}

# Config keys that only describe a saved object (or are recomputed from others); dropped when a
# config is stored or merged so a derived layer count cannot clash with a stale ``layer_types``.
_VOLATILE = frozenset({
    "transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path", "id2label", "label2id",
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "problem_type", "layer_types", "_attn_implementation_autoset", "_class_name", "_diffusers_version",
    "_use_default_values", "model_type", "_commit_hash",
})


def released_config(kind: str) -> dict[str, Any]:
    """A fresh copy of the released model's config of ``kind``."""
    return copy.deepcopy(RELEASED[kind])


def clean_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without bookkeeping keys (recursively into nested sub-configs)."""
    out = {}
    for key, value in config.items():
        if key in _VOLATILE:
            continue
        out[key] = clean_config(value) if isinstance(value, Mapping) and key.endswith("_config") else value
    return out


def _deep_update(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict) and key.endswith("_config"):
            _deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def config_from_metadata(
    metadata: Mapping[str, str], kind: str, file_label: str = "file"
) -> dict[str, Any] | None:
    """The config a file's metadata stores for ``kind``, or None.

    ``tsumugi.config.<kind>`` is used if present (all-in-one files hold several components); else
    ``tsumugi.config``, unless ``tsumugi.component`` says it belongs to another component.
    """
    raw = metadata.get(f"{CONFIG_METADATA_KEY}.{kind}")
    if raw is None and metadata.get(COMPONENT_METADATA_KEY, kind) == kind:
        raw = metadata.get(CONFIG_METADATA_KEY)
    if raw is None:
        return None
    try:
        config = json.loads(raw)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise UserError(f"{file_label}: metadata {CONFIG_METADATA_KEY!r} is not a valid JSON config ({e})") from e
    return clean_config(config)


def config_to_metadata(config: Mapping[str, Any], kind: str | None = None) -> dict[str, str]:
    """Metadata entries storing ``config`` (see :func:`config_from_metadata`)."""
    out = {CONFIG_METADATA_KEY: json.dumps(clean_config(config), sort_keys=True)}
    if kind is not None:
        out[COMPONENT_METADATA_KEY] = kind
    return out


# ---- shape helpers ------------------------------------------------------------------------------
def block_indices(shapes: Shapes, prefix: str) -> list[int]:
    """Sorted distinct ``N`` of keys ``{prefix}N.*``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m[1]) for k in shapes if (m := pattern.match(k))})


def _first(shapes: Shapes, prefix: str, suffix: str) -> tuple[int, ...] | None:
    """Shape of ``{prefix}N{suffix}`` for the smallest block index N present."""
    for i in block_indices(shapes, prefix):
        shape = shapes.get(f"{prefix}{i}{suffix}")
        if shape is not None:
            return shape
    return None


def _heads(width: int, base_width: int, base_heads: int) -> int:
    """Head count for ``width`` keeping the base config's head size."""
    if width == base_width or base_heads <= 0:
        return base_heads
    head_dim = max(base_width // base_heads, 1)
    return max(width // head_dim, 1)


# ---- per-kind derivation ------------------------------------------------------------------------
def _derive_qwen_image_dit(s: Shapes, cfg: dict[str, Any], explicit: Mapping[str, Any]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if (img_in := s.get("img_in.weight")) is not None:
        inner, d["in_channels"] = img_in
    else:
        inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if (txt_in := s.get("txt_in.weight")) is not None:
        d["joint_attention_dim"] = txt_in[1]
    d["num_layers"] = len(block_indices(s, "transformer_blocks."))
    if (norm_q := _first(s, "transformer_blocks.", ".attn.norm_q.weight")) is not None:
        d["attention_head_dim"] = norm_q[0]
        d["num_attention_heads"] = inner // norm_q[0]
    if (proj_out := s.get("proj_out.weight")) is not None:
        d["out_channels"] = proj_out[0] // (cfg["patch_size"] ** 2)
    d["guidance_embeds"] = any(k.startswith("time_text_embed.guidance_embedder.") for k in s)
    d["use_additional_t_cond"] = "time_text_embed.addition_t_embedding.weight" in s
    if "use_layer3d_rope" not in explicit:
        # Layered is the only release with the extra t embedding, and it uses the layer-3D RoPE.
        d["use_layer3d_rope"] = d["use_additional_t_cond"]
    return d


def _derive_qwen_image_vae(s: Shapes, cfg: dict[str, Any], explicit: Mapping[str, Any]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if (conv_in := s.get("encoder.conv_in.weight")) is not None:
        d["base_dim"], d["input_channels"] = conv_in[0], conv_in[1]
    if (pqc := s.get("post_quant_conv.weight")) is not None:
        d["z_dim"] = pqc[0]
    base = d.get("base_dim", cfg["base_dim"])
    # Walk the flat encoder list: residual blocks (with conv1), attention blocks, resamples.
    levels: list[dict[str, Any]] = [{"res": [], "attn": False}]
    temporal: list[bool] = []
    for i in block_indices(s, "encoder.down_blocks."):
        p = f"encoder.down_blocks.{i}."
        if (conv1 := s.get(p + "conv1.weight")) is not None:
            levels[-1]["res"].append(conv1[0])
        elif p + "to_qkv.weight" in s:
            levels[-1]["attn"] = True
        elif p + "resample.1.weight" in s:
            temporal.append(p + "time_conv.weight" in s)
            levels.append({"res": [], "attn": False})
    if levels[0]["res"] and all(level["res"] for level in levels):
        d["num_res_blocks"] = len(levels[0]["res"])
        d["dim_mult"] = [level["res"][-1] // base for level in levels]
        d["temperal_downsample"] = temporal
        d["attn_scales"] = [1.0 / 2**i for i, level in enumerate(levels) if level["attn"]]
    return d


def _derive_qwen2_5_vl(s: Shapes, cfg: dict[str, Any], explicit: Mapping[str, Any]) -> dict[str, Any]:
    text, vision = cfg["text_config"], cfg["vision_config"]
    t: dict[str, Any] = {}
    v: dict[str, Any] = {}
    lm = "model.language_model."
    if (embed := s.get(lm + "embed_tokens.weight")) is not None:
        t["vocab_size"], t["hidden_size"] = embed
    hidden = t.get("hidden_size", text["hidden_size"])
    t["num_hidden_layers"] = len(block_indices(s, lm + "layers."))
    if (gate := _first(s, lm + "layers.", ".mlp.gate_proj.weight")) is not None:
        t["intermediate_size"] = gate[0]
    heads = _heads(hidden, text["hidden_size"], text["num_attention_heads"])
    t["num_attention_heads"] = heads
    if (k_proj := _first(s, lm + "layers.", ".self_attn.k_proj.weight")) is not None:
        t["num_key_value_heads"] = max(k_proj[0] // max(hidden // heads, 1), 1)
    t["tie_word_embeddings"] = "lm_head.weight" not in s

    vis = "model.visual."
    if (patch := s.get(vis + "patch_embed.proj.weight")) is not None:
        v["hidden_size"], v["in_channels"], v["temporal_patch_size"], v["patch_size"] = patch[:4]
    v_hidden = v.get("hidden_size", vision["hidden_size"])
    v["depth"] = len(block_indices(s, vis + "blocks."))
    v["num_heads"] = _heads(v_hidden, vision["hidden_size"], vision["num_heads"])
    if (gate := _first(s, vis + "blocks.", ".mlp.gate_proj.weight")) is not None:
        v["intermediate_size"] = gate[0]
    if (out := s.get(vis + "merger.mlp.2.weight")) is not None:
        v["out_hidden_size"] = out[0]
    if (merge_in := s.get(vis + "merger.mlp.0.weight")) is not None:
        v["spatial_merge_size"] = math.isqrt(merge_in[1] // v_hidden)
    return {"text_config": t, "vision_config": v, "tie_word_embeddings": t["tie_word_embeddings"]}


def _derive_zimage_dit(s: Shapes, cfg: dict[str, Any], explicit: Mapping[str, Any]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if (cap := s.get("cap_embedder.1.weight")) is not None:
        d["dim"], d["cap_feat_dim"] = cap
    dim = d.get("dim", cfg["dim"])
    d["n_layers"] = len(block_indices(s, "layers."))
    d["n_refiner_layers"] = len(block_indices(s, "noise_refiner."))
    norm_q = _first(s, "layers.", ".attention.norm_q.weight")
    d["qk_norm"] = norm_q is not None
    head_dim = norm_q[0] if norm_q is not None else dim // _heads(dim, cfg["dim"], cfg["n_heads"])
    d["n_heads"] = dim // head_dim
    if (to_k := _first(s, "layers.", ".attention.to_k.weight")) is not None:
        d["n_kv_heads"] = to_k[0] // head_dim
    embedders = sorted(
        (int(m[1]), int(m[2]), shape)
        for k, shape in s.items()
        if (m := re.match(r"all_x_embedder\.(\d+)-(\d+)\.weight$", k))
    )
    if embedders:
        d["all_patch_size"] = [p for p, _, _ in embedders]
        d["all_f_patch_size"] = [f for _, f, _ in embedders]
        p, f, shape = embedders[0]
        d["in_channels"] = shape[1] // (p * p * f)
    if (siglip := s.get("siglip_embedder.0.weight")) is not None:
        d["siglip_feat_dim"] = siglip[0]
    elif "siglip_feat_dim" not in explicit:
        d["siglip_feat_dim"] = None
    return d


def _derive_flux_vae(s: Shapes, cfg: dict[str, Any], explicit: Mapping[str, Any]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    widths = []
    for i in block_indices(s, "encoder.down_blocks."):
        if (conv1 := s.get(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")) is not None:
            widths.append(conv1[0])
    if widths:
        d["block_out_channels"] = widths
        d["down_block_types"] = ["DownEncoderBlock2D"] * len(widths)
        d["up_block_types"] = ["UpDecoderBlock2D"] * len(widths)
        d["layers_per_block"] = len(block_indices(s, "encoder.down_blocks.0.resnets."))
    if (conv_in := s.get("encoder.conv_in.weight")) is not None:
        d["in_channels"] = conv_in[1]
    if (conv_out := s.get("decoder.conv_out.weight")) is not None:
        d["out_channels"] = conv_out[0]
    if (dec_in := s.get("decoder.conv_in.weight")) is not None:
        d["latent_channels"] = dec_in[1]
    d["use_quant_conv"] = "quant_conv.weight" in s
    d["use_post_quant_conv"] = "post_quant_conv.weight" in s
    d["mid_block_add_attention"] = any(k.startswith("encoder.mid_block.attentions.") for k in s)
    return d


def _derive_qwen3(s: Shapes, cfg: dict[str, Any], explicit: Mapping[str, Any]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if (embed := s.get("embed_tokens.weight")) is not None:
        d["vocab_size"], d["hidden_size"] = embed
    d["num_hidden_layers"] = len(block_indices(s, "layers."))
    if (gate := _first(s, "layers.", ".mlp.gate_proj.weight")) is not None:
        d["intermediate_size"] = gate[0]
    if (q_norm := _first(s, "layers.", ".self_attn.q_norm.weight")) is not None:
        head_dim = d["head_dim"] = q_norm[0]
        if (q_proj := _first(s, "layers.", ".self_attn.q_proj.weight")) is not None:
            d["num_attention_heads"] = q_proj[0] // head_dim
        if (k_proj := _first(s, "layers.", ".self_attn.k_proj.weight")) is not None:
            d["num_key_value_heads"] = k_proj[0] // head_dim
    d["attention_bias"] = _first(s, "layers.", ".self_attn.q_proj.bias") is not None
    return d


_DERIVE: dict[str, Callable[[Shapes, dict[str, Any], Mapping[str, Any]], dict[str, Any]]] = {
    "qwen_image_dit": _derive_qwen_image_dit,
    "qwen_image_vae": _derive_qwen_image_vae,
    "qwen2_5_vl": _derive_qwen2_5_vl,
    "zimage_dit": _derive_zimage_dit,
    "flux_vae": _derive_flux_vae,
    "qwen3": _derive_qwen3,
}


def derive_from_shapes(kind: str, shapes: Shapes, base: Mapping[str, Any] | None = None,
                       explicit: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Config values proven by the (library-layout) tensor shapes of a ``kind`` checkpoint."""
    cfg = copy.deepcopy(dict(base)) if base is not None else released_config(kind)
    return _DERIVE[kind](shapes, cfg, explicit or {})


def resolve_config(kind: str, shapes: Shapes, explicit: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Released config < ``explicit`` (the file's ``tsumugi.config``) < what ``shapes`` prove."""
    cfg = released_config(kind)
    if explicit:
        _deep_update(cfg, clean_config(explicit))
        _prefer_rope_parameters(cfg)
    _deep_update(cfg, derive_from_shapes(kind, shapes, cfg, explicit or {}))
    return cfg


def _attention_gaps(heads: int, head_dim: int, width: int, rope: list[int], heads_proven: bool,
                    names: tuple[str, str]) -> list[str]:
    """What a DiT config leaves unproven: ``names`` = (head-count key, RoPE-split key)."""
    if not heads_proven:
        return [f"the attention head count {names[0]} (no q/k norm weights give the head size, and the width "
                f"{width} is not the released model's)"]
    if sum(rope) != head_dim:
        return [f"the RoPE split {names[1]} (the built-in {rope} sums to {sum(rope)}, the head size is {head_dim})"]
    return []


def unproven_dit_values(kind: str, cfg: Mapping[str, Any], shapes: Shapes,
                        explicit: Mapping[str, Any] | None = None) -> list[str]:
    """DiT config values that neither the tensor shapes nor the stored config (``explicit``) determine,
    and that the released values do not fit (a model with another head count or RoPE split): building
    it would fail at the first forward. Empty for the released models and for any file whose stored
    config says it all."""
    explicit = explicit or {}
    if kind == "zimage_dit":
        heads_proven = (_first(shapes, "layers.", ".attention.norm_q.weight") is not None or "n_heads" in explicit
                        or cfg["dim"] == RELEASED[kind]["dim"])
        return _attention_gaps(cfg["n_heads"], cfg["dim"] // max(cfg["n_heads"], 1), cfg["dim"],
                               list(cfg["axes_dims"]), heads_proven, ("n_heads", "axes_dims"))
    if kind == "qwen_image_dit":
        width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        if (img_in := shapes.get("img_in.weight")) is not None:
            width = img_in[0]
        heads_proven = (_first(shapes, "transformer_blocks.", ".attn.norm_q.weight") is not None
                        or "num_attention_heads" in explicit
                        or width == cfg["num_attention_heads"] * cfg["attention_head_dim"])
        return _attention_gaps(cfg["num_attention_heads"], cfg["attention_head_dim"], width,
                               list(cfg["axes_dims_rope"]), heads_proven, ("num_attention_heads", "axes_dims_rope"))
    return []


def _prefer_rope_parameters(cfg: dict[str, Any]) -> None:
    """transformers 5 writes ``rope_parameters``; drop our older-style RoPE keys when both are present."""
    for sub in [cfg, *(v for k, v in cfg.items() if k.endswith("_config") and isinstance(v, dict))]:
        if "rope_parameters" in sub:
            sub.pop("rope_scaling", None)
            sub.pop("rope_theta", None)
