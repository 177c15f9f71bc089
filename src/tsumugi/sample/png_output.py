"""Saving generated images and latents: unique names, atomic writes, settings in the metadata."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

PNG_PARAMETERS_KEY = "tsumugi_parameters"


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) / (4, H, W) in [0, 1] -> 8-bit RGB / RGBA, rounded like diffusers' image processor."""
    array = image.detach().float().cpu().permute(1, 2, 0).numpy()
    return Image.fromarray((array * 255).round().astype(np.uint8))


def _claim_unique(directory: Path, stem: str, suffix: str, tmp: Path) -> Path:
    """Hard-link ``tmp`` to the first free ``stem[_k]suffix`` name: atomic and never overwrites."""
    for k in range(10_000):
        candidate = directory / (f"{stem}{suffix}" if k == 0 else f"{stem}_{k}{suffix}")
        try:
            os.link(tmp, candidate)
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"no free file name for {stem}{suffix} in {directory}")


def output_stem(seed: int, name_suffix: str = "") -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}_{seed}{name_suffix}"


def save_png(image: Image.Image, directory: str | Path, stem: str, parameters: dict[str, Any]) -> Path:
    """Write ``image`` as ``directory/stem.png`` (or ``stem_1.png``...) with the settings as text chunks.

    Each parameter is a text chunk of its own (readable by any PNG viewer) and the whole dict is also
    stored as JSON under ``tsumugi_parameters`` for tools.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key, value in parameters.items():
        info.add_itxt(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    info.add_itxt(PNG_PARAMETERS_KEY, json.dumps(parameters, ensure_ascii=False))
    tmp = directory / f".{stem}.{os.getpid()}.tmp.png"
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        return _claim_unique(directory, stem, ".png", tmp)
    finally:
        tmp.unlink(missing_ok=True)


def save_latent(latent: torch.Tensor, directory: str | Path, stem: str, metadata: dict[str, str] | None) -> Path:
    """Write a latent file Musubi can decode: one tensor named ``latent`` plus string metadata."""
    from safetensors.torch import save_file

    from tsumugi.models.safetensors_write import apply_default_mode

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{stem}.{os.getpid()}.tmp.safetensors"
    try:
        save_file({"latent": latent.detach().cpu().contiguous()}, str(tmp), metadata=metadata)
        apply_default_mode(tmp)
        return _claim_unique(directory, stem + "_latent", ".safetensors", tmp)
    finally:
        tmp.unlink(missing_ok=True)
