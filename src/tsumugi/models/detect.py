"""What is this path? Component kind, key layout and flags, from keys only (no tensor data read).

Accepted paths:

* a ``.safetensors`` file; a shard of a ``name-0000N-of-0000M.safetensors`` set (all shards are used);
  a ``*.safetensors.index.json``;
* a component folder (``config.json`` + weights, single or sharded), as diffusers/transformers save them;
* a diffusers model root (``model_index.json`` + ``transformer/``, ``vae/``, ``text_encoder/``): the
  subfolder of the requested role is used.

Layouts: ``comfy`` (ComfyUI / original release key names), ``comfy_prefixed`` (the same inside an
all-in-one checkpoint, e.g. ``model.diffusion_model.``; the prefix of the requested component is
selected and stripped), ``diffusers`` (a library folder with ``config.json``, or a file with
diffusers/transformers module names).

Flags: ``fp8_scaled`` (ComfyUI pre-quantized weights with scale tensors: not loadable yet),
``fp8_weights`` (plain float8 tensors: loadable, upcast on load), ``edit_2511_marker`` (the
``__index_timestep_zero__`` key ComfyUI uses to mark Qwen-Image-Edit-2511 checkpoints).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tsumugi.errors import UserError
from tsumugi.models.components import ALL_PREFIXES, KINDS, ROLES
from tsumugi.models.safetensors_io import FLOAT8_DTYPES, SafetensorsSource, is_shard_name, open_safetensors

EDIT_2511_MARKER = "__index_timestep_zero__"
_SCALE_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale", ".comfy_quant")
_SCALE_KEYS = frozenset({"scaled_fp8"})
_CANONICAL_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_LIBRARY_STEMS = ("diffusion_pytorch_model.", "diffusion_pytorch_model-", "model.", "model-")

_LAYOUT_TEXT = {"comfy": "ComfyUI layout", "comfy_prefixed": "ComfyUI layout", "diffusers": "diffusers layout"}


@dataclass
class Detection:
    """What :func:`detect` found. ``source`` is open (headers only); close it when done."""

    path: Path
    """The path as the user gave it, or the component subfolder of a model root."""
    source: SafetensorsSource
    kind: str | None
    """A key of :data:`~tsumugi.models.components.KINDS`, or None when unrecognised."""
    layout: str
    prefix: str = ""
    keymap: dict[str, str] = field(default_factory=dict)
    """Component key (prefix stripped, marker and scale keys removed) -> key in the file."""
    fp8_scaled: bool = False
    fp8_weights: bool = False
    edit_2511_marker: bool = False
    folder_config: dict[str, Any] | None = None
    """``config.json`` of a component folder."""

    def describe(self) -> str:
        """E.g. ``a Qwen-Image VAE (ComfyUI layout)``."""
        if self.kind is None:
            sample = ", ".join(repr(k) for k in sorted(self.keymap)[:3])
            return f"not a model file we recognise (keys such as {sample})"
        spec = KINDS[self.kind]
        layout = _LAYOUT_TEXT[self.layout]
        if self.layout == "diffusers" and spec.library == "transformers":
            layout = "transformers layout"
        if self.prefix:
            layout += f", prefix {self.prefix}"
        return f"{spec.with_article} ({layout})"


def classify(keys: Collection[str]) -> tuple[str | None, bool]:
    """(component kind or None, whether the keys use the library's module names)."""

    def starts(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if starts("transformer_blocks.") and any(".img_mod." in k for k in keys):
        return "qwen_image_dit", True  # ComfyUI uses the diffusers names for this model
    if starts("noise_refiner.", "context_refiner."):
        return "zimage_dit", starts("all_x_embedder.") or any(".attention.to_q." in k for k in keys)
    if starts("encoder.downsamples.", "decoder.upsamples.") or ("conv1.weight" in keys and starts("encoder.")):
        return "qwen_image_vae", False
    if starts("encoder.down_blocks.", "decoder.up_blocks."):
        if any(k.endswith(".gamma") for k in keys):
            return "qwen_image_vae", True
        return "flux_vae", True
    if starts("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid."):
        return "flux_vae", False
    if starts("visual.", "model.visual."):
        return "qwen2_5_vl", starts("model.language_model.", "model.visual.")
    if any(re.match(r"(model\.)?layers\.\d+\.self_attn\.q_norm\.weight$", k) for k in keys):
        return "qwen3", not starts("model.")
    if any(re.match(r"model\.(language_model\.)?layers\.\d+\.self_attn\.q_proj\.bias$", k) for k in keys):
        # A Qwen2.5 language model without its vision tower: reported as the VL encoder so the
        # loader's message lists the missing vision keys.
        return "qwen2_5_vl", starts("model.language_model.")
    return None, False


def _wanted_prefixes(expected: str | None) -> tuple[str, ...]:
    if expected in KINDS:
        return KINDS[expected].prefixes
    if expected in ROLES:
        found = {p for k in KINDS.values() if k.role == expected for p in k.prefixes}
        return tuple(sorted(found, key=len, reverse=True))
    return ALL_PREFIXES


def _select_prefix(keys: Collection[str], expected: str | None) -> str:
    """The component prefix to strip: the requested component's if present (all-in-one files), else a
    prefix shared by every key (a prefixed file of some other component)."""
    for prefix in _wanted_prefixes(expected):
        if any(k.startswith(prefix) for k in keys):
            return prefix
    for prefix in ALL_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def _weights_in_folder(folder: Path, flag: str) -> Path:
    """The weights file (or index / first shard) of a component folder."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    for name in _CANONICAL_WEIGHTS:
        if (folder / (name + ".index.json")) in indexes:
            return folder / (name + ".index.json")
    singles = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    for name in _CANONICAL_WEIGHTS:
        if folder / name in singles:
            return folder / name
    if len(indexes) == 1:
        return indexes[0]
    candidates = [p for p in singles if not is_shard_name(p.name)]
    candidates += [p for p in singles if is_shard_name(p.name) and re.search(r"-0*1-of-\d+\.safetensors$", p.name)]
    if not candidates and not indexes:
        raise UserError(f"{flag}: {folder} is a folder without .safetensors files")
    if len(candidates) != 1:
        names = ", ".join(p.name for p in (indexes or candidates)[:4])
        raise UserError(f"{flag}: {folder} holds several weight files ({names}); pass the file itself")
    return candidates[0]


def _read_json(path: Path, flag: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError) as e:
        raise UserError(f"{flag}: {path} is not a valid JSON file ({e})") from e


def _component_folder(path: Path, expected: str | None, flag: str) -> Path:
    """``path`` itself, or the subfolder of a diffusers model root that holds the expected role."""
    if not (path / "model_index.json").is_file():
        return path
    role = KINDS[expected].role if expected in KINDS else expected
    if role not in ROLES:
        raise UserError(f"{flag}: {path} is a diffusers model root; pass one of its component folders")
    sub = {"dit": "transformer", "vae": "vae", "text_encoder": "text_encoder"}[role]
    if not (path / sub).is_dir():
        raise UserError(f"{flag}: {path} is a diffusers model root without a {sub}/ folder")
    return path / sub


def _locate_weights(path: Path, expected: str | None, flag: str) -> tuple[Path, Path, dict[str, Any] | None]:
    """(path to show in messages, weights file/index/first shard to open, config.json of a library folder)."""
    if not path.exists():
        raise UserError(f"{flag}: {path} does not exist")
    if path.is_dir():
        folder = _component_folder(path, expected, flag)
        config = _read_json(folder / "config.json", flag) if (folder / "config.json").is_file() else None
        return folder, _weights_in_folder(folder, flag), config
    if not path.name.endswith((".safetensors", ".safetensors.index.json")):
        raise UserError(f"{flag}: {path} is not a .safetensors file (only safetensors weights are supported)")
    config = None
    # A weights file of a library folder (also its shard or index) comes with the folder's config.
    if path.name.startswith(_LIBRARY_STEMS) and (path.parent / "config.json").is_file():
        config = _read_json(path.parent / "config.json", flag)
    return path, path, config


def detect(path: str | Path, expected: str | None = None, *, flag: str = "--model") -> Detection:
    """Identify the model at ``path``.

    ``expected`` (a component kind such as ``qwen_image_dit`` or a role ``dit``/``vae``/``text_encoder``)
    only steers which part of a multi-component input is looked at (model root subfolder, all-in-one
    prefix); the result reports what is there, matching or not. Raises UserError for paths that are
    missing, unreadable or hold no safetensors weights.
    """
    path = Path(path).expanduser()
    shown, weights, folder_config = _locate_weights(path, expected, flag)
    try:
        source = open_safetensors(weights)
    except UserError as e:
        raise UserError(f"{flag}: {e}") from e

    all_keys = source.keys()
    fp8_scaled = any(k.endswith(_SCALE_SUFFIXES) or k.rpartition(".")[2] in _SCALE_KEYS for k in all_keys)
    fp8_weights = any(info.dtype in FLOAT8_DTYPES for info in source.infos().values())
    prefix = _select_prefix([k for k in all_keys if not k.endswith(EDIT_2511_MARKER)], expected)
    keymap = {k[len(prefix):]: k for k in all_keys if k.startswith(prefix)}
    marker = keymap.pop(EDIT_2511_MARKER, None) is not None or EDIT_2511_MARKER in source
    keymap = {k: v for k, v in keymap.items() if not (k.endswith(_SCALE_SUFFIXES) or k in _SCALE_KEYS)}
    kind, library_names = classify(keymap.keys())
    if prefix:
        layout = "comfy_prefixed"
    elif folder_config is not None or (library_names and kind != "qwen_image_dit"):
        layout = "diffusers"  # (ComfyUI's Qwen-Image DiT names are diffusers' own: called comfy)
    else:
        layout = "comfy"
    return Detection(
        path=shown,
        source=source,
        kind=kind,
        layout=layout,
        prefix=prefix,
        keymap=keymap,
        fp8_scaled=fp8_scaled,
        fp8_weights=fp8_weights,
        edit_2511_marker=marker,
        folder_config=folder_config,
    )
