"""Qwen-Image DiT keys: ComfyUI's Qwen-Image model uses the diffusers module names, so the conversion is
the identity (prefixes such as ``model.diffusion_model.`` and the ``__index_timestep_zero__`` marker of
Edit-2511 files are handled by the loader for every component)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def looks_like_original(keys: Iterable[str]) -> bool:
    return False


def to_diffusers(sd: Mapping[str, torch.Tensor], config: dict | None = None) -> dict[str, torch.Tensor]:
    return dict(sd)


def from_diffusers(sd: Mapping[str, torch.Tensor], config: dict | None = None) -> dict[str, torch.Tensor]:
    return dict(sd)
