"""Which key converter serves which component kind.

Every converter module exposes ``to_diffusers(sd, config=None)``, ``from_diffusers(sd, config=None)``
(library layout <-> ComfyUI/original layout) and ``looks_like_original(keys)``. Converters are pure
functions of keys and tensors; the loader also runs them on meta tensors to learn the converted key
set and shapes before reading any data.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from tsumugi.models.components import KINDS

_MODULES = {
    "qwen_image_dit": "tsumugi.models.convert_qwen_image_dit",
    "qwen_image_vae": "tsumugi.models.convert_qwen_image_vae",
    "qwen2_5_vl": "tsumugi.models.convert_qwen2_5_vl",
    "zimage_dit": "tsumugi.models.convert_zimage_dit",
    "flux_vae": "tsumugi.models.convert_flux_vae",
    "qwen3": "tsumugi.models.convert_qwen3",
}


def converter(kind: str) -> ModuleType:
    """The converter module of ``kind`` (imported on first use)."""
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}")
    return importlib.import_module(_MODULES[kind])
