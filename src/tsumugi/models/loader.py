"""Load a DiT, VAE or text encoder from any supported file layout into its diffusers/transformers class.

Steps: :func:`~tsumugi.models.detect.detect` the path (keys only) -> refuse a wrong component or an
fp8_scaled file -> convert the key set on meta tensors to the library layout -> resolve the config
(``config.json`` of folders; otherwise released config + ``tsumugi.config`` metadata + shapes) -> build
the module on the meta device and check keys and shapes -> read tensors one by one (cast to ``dtype``
as read, placed on ``device``), convert, ``load_state_dict(strict=True, assign=True)``.

What the loader learned is attached to the returned module as ``model._tsumugi_info`` (read it with
:func:`load_info`): ``kind``, ``layout``, ``prefix``, ``path``, ``files``, ``edit_2511_marker`` (the
ComfyUI ``__index_timestep_zero__`` key was present and removed; the DiT is then built with
``zero_cond_t=True``), ``fp8_weights`` (float8 tensors were upcast), ``remapped_blocks`` (sparse
block indices of a pruned DiT were renumbered), ``config`` (the constructor config used).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tsumugi.errors import UserError
from tsumugi.models import configs
from tsumugi.models.components import KINDS, init_kwargs, instantiate, kind_for
from tsumugi.models.converters import converter
from tsumugi.models.detect import Detection, detect

logger = logging.getLogger(__name__)

INFO_ATTR = "_tsumugi_info"

# Block lists of DiTs whose indices may be sparse in pruned checkpoints.
_BLOCK_LISTS = {"qwen_image_dit": ("transformer_blocks.",), "zimage_dit": ("layers.",)}


def load_dit(
    path: str | Path,
    arch: str,
    *,
    flag: str = "--dit",
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    config_overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """The DiT of ``arch`` ("qwen_image" | "zimage") from ``path``.

    ``config_overrides`` win over everything else (e.g. ``{"zero_cond_t": True}`` for Edit-2511).
    """
    return load_component(path, kind_for("dit", arch).name, flag=flag, dtype=dtype, device=device,
                          config_overrides=config_overrides)


def load_vae(
    path: str | Path,
    arch: str,
    *,
    flag: str = "--vae",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config_overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """The VAE of ``arch``: AutoencoderKLQwenImage (qwen_image) or the FLUX AutoencoderKL (zimage)."""
    return load_component(path, kind_for("vae", arch).name, flag=flag, dtype=dtype, device=device,
                          config_overrides=config_overrides)


def load_text_encoder(
    path: str | Path,
    arch: str,
    *,
    flag: str = "--text_encoder",
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    config_overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """Qwen2_5_VLForConditionalGeneration (qwen_image) or Qwen3Model (zimage)."""
    return load_component(path, kind_for("text_encoder", arch).name, flag=flag, dtype=dtype, device=device,
                          config_overrides=config_overrides)


def load_info(model: torch.nn.Module) -> dict[str, Any]:
    """What the loader recorded about ``model`` (empty for modules it did not load)."""
    return getattr(model, INFO_ATTR, {})


# ---- the generic path -----------------------------------------------------------------------------
def load_component(
    path: str | Path,
    kind: str,
    *,
    flag: str,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    config_overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    spec = KINDS[kind]
    det = detect(path, kind, flag=flag)
    with det.source:
        if det.kind != kind:
            raise UserError(f"{flag}: {det.path} is {det.describe()}, expected {spec.with_article}")
        if det.fp8_scaled:
            raise UserError(
                f"{flag}: {det.path} is an fp8_scaled checkpoint (pre-quantized weights with scale tensors); "
                "loading those is not supported yet: use the bf16 (or fp16) file"
            )
        return _load(det, kind, flag=flag, dtype=dtype, device=device, config_overrides=config_overrides)


def _load(
    det: Detection,
    kind: str,
    *,
    flag: str,
    dtype: torch.dtype,
    device: torch.device | str,
    config_overrides: Mapping[str, Any] | None,
) -> torch.nn.Module:
    conv = converter(kind)
    needs_conversion = conv.looks_like_original(det.keymap.keys())

    def read_state() -> dict[str, torch.Tensor]:
        state = {k: det.source.get(f, dtype, device) for k, f in det.keymap.items()}
        return conv.to_diffusers(state) if needs_conversion else state

    # Learn the library-layout keys and shapes without reading data (converters are pure key/shape
    # functions, so they run on meta tensors); a converter that needs values gets the real tensors.
    state: dict[str, torch.Tensor] | None = None
    meta = {k: torch.empty(det.source.info(f).shape, device="meta") for k, f in det.keymap.items()}
    try:
        layout_keys = conv.to_diffusers(meta) if needs_conversion else meta
    except Exception:
        logger.debug("converter for %s needs tensor data; converting before the key check", kind)
        layout_keys = state = read_state()
    layout_keys, remapped = _prepare_keys(kind, layout_keys)
    shapes = {k: tuple(v.shape) for k, v in layout_keys.items()}

    config = _config(det, kind, shapes, flag)
    if kind == "qwen_image_dit" and det.edit_2511_marker:
        config["zero_cond_t"] = True
    if config_overrides:
        config.update(config_overrides)

    try:
        model = instantiate(kind, config)
    except Exception as e:
        hint = ""
        has_metadata_config = any(k.startswith(configs.CONFIG_METADATA_KEY) for k in det.source.metadata)
        if det.folder_config is None and not has_metadata_config:
            hint = (" (the file has no config.json or tsumugi.config metadata: the released model's values"
                    " were assumed for what tensor shapes cannot tell)")
        raise UserError(
            f"{flag}: cannot build {KINDS[kind].with_article} from {det.path}: {type(e).__name__}: {e}{hint}"
        ) from e
    expected = model.state_dict()
    tie_lm_head = _tied_lm_head(model, expected, shapes)
    _check_keys(flag, det, kind, expected, shapes, ignore={"lm_head.weight"} if tie_lm_head else set())

    if state is None:
        state = read_state()
    state, _ = _prepare_keys(kind, state)
    if tie_lm_head:
        state["lm_head.weight"] = state[_embed_key(kind)]
    model.load_state_dict(state, strict=True, assign=True)
    del state
    if torch.device(device).type != "cpu":
        model.to(device)  # the real (non-meta) buffers built on CPU, e.g. RoPE tables
    model.eval()
    setattr(model, INFO_ATTR, {
        "kind": kind,
        "layout": det.layout,
        "prefix": det.prefix,
        "path": str(det.path),
        "files": [str(f) for f in det.source.files],
        "edit_2511_marker": det.edit_2511_marker,
        "fp8_weights": det.fp8_weights,
        "remapped_blocks": remapped,
        "config": config,
    })
    if det.edit_2511_marker:
        logger.info("%s: %s carries the Edit-2511 marker %s (removed)", flag, det.path, "__index_timestep_zero__")
    return model


def _prepare_keys(kind: str, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Library-layout fix-ups shared by all sources: drop an unused LM head, renumber sparse blocks."""
    if kind == "qwen3":
        sd.pop("lm_head.weight", None)  # Qwen3ForCausalLM folders; Qwen3Model has no head
    remapped = False
    for prefix in _BLOCK_LISTS.get(kind, ()):
        sd, changed = compact_block_indices(sd, prefix)
        remapped = remapped or changed
    return sd, remapped


def compact_block_indices(sd: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], bool]:
    """Renumber ``{prefix}N.`` keys to 0..n-1 keeping their order (pruned checkpoints skip blocks)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = sorted({int(m[1]) for k in sd if (m := pattern.match(k))})
    if indices == list(range(len(indices))):
        return sd, False
    new_index = {old: new for new, old in enumerate(indices)}
    out = {}
    for key, value in sd.items():
        m = pattern.match(key)
        out[f"{prefix}{new_index[int(m[1])]}.{key[m.end():]}" if m else key] = value
    return out, True


def _config(det: Detection, kind: str, shapes: Mapping[str, tuple[int, ...]], flag: str) -> dict[str, Any]:
    if det.folder_config is not None:
        config = configs.clean_config(det.folder_config)
        if KINDS[kind].library == "diffusers":
            config = init_kwargs(kind, config)
        return config
    explicit = configs.config_from_metadata(det.source.metadata, kind, f"{flag}: {det.source.label}")
    return configs.resolve_config(kind, shapes, explicit)


def _embed_key(kind: str) -> str:
    return "model.language_model.embed_tokens.weight" if kind == "qwen2_5_vl" else "embed_tokens.weight"


def _tied_lm_head(model: torch.nn.Module, expected: Mapping[str, Any], shapes: Mapping[str, Any]) -> bool:
    """Whether the file omits an LM head that the config ties to the embeddings."""
    if "lm_head.weight" not in expected or "lm_head.weight" in shapes:
        return False
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    return bool(getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))


def _check_keys(
    flag: str,
    det: Detection,
    kind: str,
    expected: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    ignore: set[str],
) -> None:
    """Missing/unexpected keys and shape mismatches, before any tensor is read."""
    missing = sorted(set(expected) - set(shapes) - ignore)
    unexpected = sorted(set(shapes) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:4])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:4])})")
    if not problems:
        wrong = [
            f"{k} {tuple(shapes[k])} vs {tuple(t.shape)}"
            for k, t in expected.items()
            if k in shapes and tuple(shapes[k]) != tuple(t.shape)
        ]
        if wrong:
            problems.append(f"{len(wrong)} tensors with unexpected shapes (e.g. {'; '.join(wrong[:3])})")
    if problems:
        spec = KINDS[kind]
        raise UserError(
            f"{flag}: {det.path} does not match the {spec.display} model built from its config: "
            + "; ".join(problems)
        )


__all__ = ["load_dit", "load_vae", "load_text_encoder", "load_component", "load_info", "compact_block_indices"]
