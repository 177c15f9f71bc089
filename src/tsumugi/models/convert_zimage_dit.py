"""Z-Image DiT state dicts: ComfyUI single-file layout <-> diffusers ``ZImageTransformer2DModel``.

The ComfyUI release (``z_image_turbo_bf16.safetensors``) uses the Lumina-2 ``NextDiT`` names of ComfyUI's
``comfy/ldm/lumina/model.py``; diffusers splits the attention projection and keys the patch embedder and
the final layer by patch size:

=====================================================  ===================================================
ComfyUI / original                                     diffusers
=====================================================  ===================================================
``x_embedder.{weight,bias}``                           ``all_x_embedder.2-1.{weight,bias}``
``final_layer.linear.*``                               ``all_final_layer.2-1.linear.*``
``final_layer.adaLN_modulation.1.*``                   ``all_final_layer.2-1.adaLN_modulation.1.*``
``<block>.attention.qkv.weight`` (q;k;v on dim 0)      ``<block>.attention.to_q/to_k/to_v.weight``
``<block>.attention.out.weight``                       ``<block>.attention.to_out.0.weight``
``<block>.attention.q_norm.weight`` / ``k_norm``       ``<block>.attention.norm_q.weight`` / ``norm_k``
``norm_final.weight`` (Lumina-2 leftover, unused)      dropped
everything else (``layers.N``, ``noise_refiner.N``,    unchanged
``context_refiner.N`` norms, feed-forward and
``adaLN_modulation.0``, ``t_embedder.mlp.{0,2}``,
``cap_embedder.{0,1}``, ``x_pad_token``,
``cap_pad_token``)
=====================================================  ===================================================

``<block>`` is any of ``layers.N``, ``noise_refiner.N``, ``context_refiner.N`` (and ``siglip_refiner.N`` of
Omni checkpoints). ``2-1`` is ``f"{patch_size}-{f_patch_size}"``; the single-file layout holds only one.

Keys must come without a container prefix: the caller strips ``model.diffusion_model.`` (ComfyUI full
checkpoints) before calling these functions and adds it back afterwards if wanted. Keys these functions do
not know pass through unchanged, so ``load_state_dict(strict=True)`` reports them. Renamed tensors are the
input tensor objects (no copy); only the q/k/v split (views of the fused weight) and the fusion
(``torch.cat``) touch the data. The input dicts are never modified.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["from_diffusers", "looks_like_original", "to_diffusers"]

# Suffix renames inside an attention block, original -> diffusers.
_ATTN_RENAMES: tuple[tuple[str, str], ...] = (
    (".attention.out.weight", ".attention.to_out.0.weight"),
    (".attention.out.bias", ".attention.to_out.0.bias"),
    (".attention.q_norm.weight", ".attention.norm_q.weight"),
    (".attention.k_norm.weight", ".attention.norm_k.weight"),
)
_QKV = ".attention.qkv."
_SPLIT = (".attention.to_q.", ".attention.to_k.", ".attention.to_v.")
_ORIG_X_EMBEDDER = "x_embedder."
_ORIG_FINAL_LAYER = "final_layer."
_DIFF_X_EMBEDDER = "all_x_embedder."
_DIFF_FINAL_LAYER = "all_final_layer."
_DROPPED = frozenset({"norm_final.weight"})


def looks_like_original(keys: Iterable[str]) -> bool:
    """True if the keys are in the ComfyUI/original layout (fused ``attention.qkv``, ``x_embedder.``...)."""
    for key in keys:
        if _QKV in key or ".attention.q_norm." in key or ".attention.out." in key:
            return True
        if key.startswith((_ORIG_X_EMBEDDER, _ORIG_FINAL_LAYER)):
            return True
    return False


def _patch_tag(config: Mapping[str, Any] | None) -> str:
    if not config:
        return "2-1"
    patch = tuple(config.get("all_patch_size", (2,)))
    f_patch = tuple(config.get("all_f_patch_size", (1,)))
    if len(patch) != 1 or len(f_patch) != 1:
        raise ValueError(
            f"the single-file Z-Image layout holds one patch size, the config has {patch} / {f_patch}"
        )
    return f"{patch[0]}-{f_patch[0]}"


def _qkv_sizes(
    sd: Mapping[str, torch.Tensor], block: str, total: int, config: Mapping[str, Any] | None
) -> tuple[int, int, int]:
    """Rows of q, k and v in the fused projection of ``block`` (GQA-aware)."""
    out = sd.get(block + ".attention.out.weight")
    if out is not None and out.ndim == 2:
        q = int(out.shape[1])  # out: (dim, n_heads * head_dim)
    elif config and {"dim", "n_heads"} <= config.keys():
        q = int(config["dim"]) // int(config["n_heads"]) * int(config["n_heads"])
    else:
        q = total // 3
    kv, rest = divmod(total - q, 2)
    if rest or kv <= 0:
        raise ValueError(f"{block}: cannot split a fused qkv of {total} rows with {q} query rows")
    return q, kv, kv


def to_diffusers(sd: Mapping[str, torch.Tensor], config: dict | None = None) -> dict[str, torch.Tensor]:
    """ComfyUI/original Z-Image DiT state dict -> ``ZImageTransformer2DModel.load_state_dict`` layout.

    ``config`` (the diffusers model kwargs) is optional; it gives the patch-size tag (default ``2-1``) and,
    when a block lacks ``attention.out.weight``, the q/k/v split.
    """
    tag = _patch_tag(config)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in _DROPPED:
            continue
        if _QKV in key:
            block, _, end = key.partition(_QKV)
            sizes = _qkv_sizes(sd, block, int(value.shape[0]), config)
            # clones, not views: views of one qkv tensor share its autograd version counter, so an in-place
            # update of to_q (the fused backward pass steps each weight as soon as its gradient is ready)
            # would invalidate to_k/to_v tensors saved for the backward
            for part, tensor in zip(_SPLIT, torch.split(value, list(sizes), dim=0)):
                out[block + part + end] = tensor.clone()
            continue
        new = key
        if key.startswith(_ORIG_X_EMBEDDER):
            new = f"{_DIFF_X_EMBEDDER}{tag}.{key[len(_ORIG_X_EMBEDDER) :]}"
        elif key.startswith(_ORIG_FINAL_LAYER):
            new = f"{_DIFF_FINAL_LAYER}{tag}.{key[len(_ORIG_FINAL_LAYER) :]}"
        else:
            for old_suffix, new_suffix in _ATTN_RENAMES:
                if key.endswith(old_suffix):
                    new = key[: -len(old_suffix)] + new_suffix
                    break
        out[new] = value
    return out


def _diffusers_tag(keys: Iterable[str]) -> str | None:
    tags = {
        key.split(".", 2)[1]
        for key in keys
        if key.startswith((_DIFF_X_EMBEDDER, _DIFF_FINAL_LAYER)) and key.count(".") >= 2
    }
    if len(tags) > 1:
        raise ValueError(f"the single-file Z-Image layout holds one patch size, found {sorted(tags)}")
    return next(iter(tags), None)


def from_diffusers(sd: Mapping[str, torch.Tensor], config: dict | None = None) -> dict[str, torch.Tensor]:
    """diffusers ``ZImageTransformer2DModel`` state dict -> ComfyUI/original layout (inverse of ``to_diffusers``).

    ``config`` is accepted for symmetry and unused: the layout follows from the keys.
    """
    del config
    tag = _diffusers_tag(sd.keys())
    x_prefix = f"{_DIFF_X_EMBEDDER}{tag}."
    final_prefix = f"{_DIFF_FINAL_LAYER}{tag}."
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        split_part = next((part for part in _SPLIT if part in key), None)
        if split_part is not None:
            block, _, end = key.partition(split_part)
            names = [block + part + end for part in _SPLIT]
            if split_part != _SPLIT[0] and names[0] in sd:
                continue  # fused together with to_q
            missing = [name for name in names if name not in sd]
            if missing:
                raise KeyError(f"cannot fuse {block}{_QKV}{end}: missing {missing}")
            out[block + _QKV + end] = torch.cat([sd[name] for name in names], dim=0)
            continue
        new = key
        if tag is not None and key.startswith(x_prefix):
            new = _ORIG_X_EMBEDDER + key[len(x_prefix) :]
        elif tag is not None and key.startswith(final_prefix):
            new = _ORIG_FINAL_LAYER + key[len(final_prefix) :]
        else:
            for old_suffix, new_suffix in _ATTN_RENAMES:
                if key.endswith(new_suffix):
                    new = key[: -len(new_suffix)] + old_suffix
                    break
        out[new] = value
    return out
