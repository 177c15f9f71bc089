"""Writing a trained :class:`~tsumugi.networks.lora.LoRANetwork` to a safetensors file.

Layouts (``r`` = rank, ``<path>`` = dotted DiT module path such as ``layers.0.attention.to_q``):

``musubi``
    ``lora_unet_<path with _>.lora_down.weight`` ``(r, in)``, ``.lora_up.weight`` ``(out, r)``,
    ``.alpha`` (scalar). Musubi/kohya's own format. Default for Qwen-Image.
``diffusion_model``
    ``diffusion_model.<path>.lora_A.weight`` ``(r, in)``, ``.lora_B.weight`` ``(out, r)``,
    ``.alpha`` (scalar, kept). Default for Z-Image.
``diffusers``
    ``transformer.<path>.lora_A.weight`` / ``.lora_B.weight`` with alpha folded into the factors
    (both multiplied by ``sqrt(alpha / r)``, no alpha key): the plain PEFT form, loadable even by
    ``transformer.load_lora_adapter`` without any conversion. Resuming from it resets alpha to r.

Every tensor is written in ``dtype`` (``--save_precision``, default fp32), alpha included.

Why Z-Image defaults to ``diffusion_model`` (ComfyUI and diffusers both take it fully, as saved):

- ComfyUI ``comfy/lora.py`` ``model_lora_keys_unet``: for ``Lumina2`` models (Z-Image is
  ``ZImage(Lumina2)``) it maps every diffusers module path from ``comfy.utils.z_image_to_diffusers``
  (``layers.N.attention.to_q/to_k/to_v`` onto row slices of the fused ``attention.qkv``,
  ``attention.to_out.0`` onto ``attention.out``, ``feed_forward.w1/w2/w3``) under the names
  ``diffusion_model.<path>``, ``transformer.<path>``, ``lycoris_<path with _>`` and ``<path>``. Its
  generic ``lora_unet_`` names are built from ComfyUI's *native* keys (``attention_qkv``,
  ``attention_out``), so a Musubi-layout Z-Image file (``lora_unet_layers_0_attention_to_q``) loads
  only its feed-forward modules there and every attention module is dropped with "lora key not
  loaded" (which is why Musubi tells users to run ``convert_lora --target other``).
  ``comfy/weight_adapter/lora.py`` reads ``<x>.lora_B.weight``/``<x>.lora_A.weight`` (as well as
  ``lora_up``/``lora_down``) and ``load_lora`` reads ``<x>.alpha``, so alpha is honoured.
- diffusers 0.42.1 ``ZImageLoraLoaderMixin.lora_state_dict`` routes any state dict with a
  ``diffusion_model.`` prefix or ``.alpha`` keys through ``_convert_non_diffusers_z_image_lora_to_diffusers``:
  prefix stripped, each ``.alpha`` popped and ``alpha / r`` folded into lora_A/lora_B (exact product),
  keys re-prefixed ``transformer.``; ``load_lora_weights`` then injects PEFT layers with no missing or
  unexpected keys and the same output as our merge (``tests/networks``). The Musubi layout also loads
  in diffusers, so the choice is driven by ComfyUI.
- Musubi ``convert_lora --target default`` turns it back into ``lora_unet_`` keys keeping alpha
  (``..._alpha`` -> ``.alpha``); ``tsumugi.networks.lora_files`` reads it as saved. Keeping alpha (rather
  than folding it as Musubi's ``--target other`` does) keeps ``--network_weights`` resumes exact.

Qwen-Image keeps the ``musubi`` layout: ComfyUI's Qwen model uses the diffusers module names, so the
generic ``lora_unet_`` map covers every module, and diffusers' ``_convert_non_diffusers_qwen_lora_to_diffusers``
restores the dotted names (``img_mod``/``txt_mod`` included) and folds alpha.

Musubi Tuner itself reads only the ``musubi`` layout: it skips every key of the other two with a
warning and trains or generates without the LoRA. Saving in another layout therefore logs that once
per network (per training run), and files saved with metadata record their layout under
``tsumugi.lora_layout`` (:data:`LAYOUT_METADATA_KEY`).

Files are written atomically: temporary name in the same directory, fsync, ``os.replace``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import weakref
from pathlib import Path

import torch
from safetensors.torch import save

from tsumugi.models.safetensors_write import save_file_atomic
from tsumugi.networks.lora import LoRANetwork

LAYOUTS = ("musubi", "diffusion_model", "diffusers")
LAYOUT_METADATA_KEY = "tsumugi.lora_layout"

logger = logging.getLogger(__name__)
_told_not_for_musubi: weakref.WeakSet[LoRANetwork] = weakref.WeakSet()


def _note_layout(network: LoRANetwork, layout: str) -> None:
    """Say once per network that Musubi Tuner does not load a non-``musubi`` layout."""
    if layout == "musubi" or network in _told_not_for_musubi:
        return
    _told_not_for_musubi.add(network)
    logger.warning(
        "LoRA files are saved in the %r layout: ComfyUI and diffusers load it, Musubi Tuner does not (it skips "
        "every key with only a warning); for Musubi save with --lora_format musubi or convert the file with "
        "convert_lora --target default", layout,
    )


def _resolve_layout(network: LoRANetwork, layout: str | None) -> str:
    layout = layout or network.target_spec.default_layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r} (known: {', '.join(LAYOUTS)})")
    return layout


def lora_state_dict(
    network: LoRANetwork, layout: str | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The network's tensors under the key names of ``layout`` (default: the architecture's), on CPU."""
    layout = _resolve_layout(network, layout)
    dtype = dtype or torch.float32
    out: dict[str, torch.Tensor] = {}

    def put(key: str, t: torch.Tensor) -> None:
        out[key] = t.detach().to(device="cpu", dtype=dtype).contiguous()

    for m in network.modules_list():
        down = m.lora_down.weight.detach().float()
        up = m.lora_up.weight.detach().float()
        alpha = m.alpha.detach().float().cpu()
        if layout == "musubi":
            put(f"{m.lora_name}.lora_down.weight", down)
            put(f"{m.lora_name}.lora_up.weight", up)
            put(f"{m.lora_name}.alpha", alpha)
        elif layout == "diffusion_model":
            put(f"diffusion_model.{m.path}.lora_A.weight", down)
            put(f"diffusion_model.{m.path}.lora_B.weight", up)
            put(f"diffusion_model.{m.path}.alpha", alpha)
        else:  # diffusers: fold alpha / r into both factors
            scale = float(alpha) / m.rank
            root = math.sqrt(abs(scale))
            put(f"transformer.{m.path}.lora_A.weight", down * root)
            put(f"transformer.{m.path}.lora_B.weight", up * (root if scale >= 0 else -root))
    return out


def model_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """sd-webui additional-networks hashes (``sshs_model_hash``, ``sshs_legacy_hash``).

    Both are taken over the serialization of ``tensors`` with only the ``ss_*`` metadata: SHA-256 of
    the bytes after the header, and the first 8 hex digits of SHA-256 of 64 KiB at offset 1 MiB.
    """
    blob = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def save_lora(
    network: LoRANetwork,
    path: str | Path,
    layout: str | None = None,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the network to ``path`` atomically; returns the path.

    ``metadata`` values must be strings. When metadata is given, ``tsumugi.lora_layout``,
    ``sshs_model_hash`` and ``sshs_legacy_hash`` are added (hashes computed over the tensors as written).
    """
    path = Path(path)
    layout = _resolve_layout(network, layout)
    _note_layout(network, layout)
    tensors = lora_state_dict(network, layout, dtype)
    meta = None
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata values must be strings: {', '.join(map(str, bad))}")
        meta = {**metadata, LAYOUT_METADATA_KEY: layout}
        if meta:
            meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hashes(tensors, meta)
    return save_file_atomic(tensors, path, meta)
