"""Turning dataset images into VAE input tensors, with the resize policy shared by every path."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tsumugi.caching.fingerprint import current_fingerprints
from tsumugi.caching.metadata import recorded_latent_sources
from tsumugi.data.buckets import resize_control, resize_to_bucket
from tsumugi.data.config import DatasetConfig
from tsumugi.data.images import load_image
from tsumugi.data.items import ImageItem


def to_model_pixels(image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


@dataclass
class LoadedItem:
    """Pixels of one item resized for the VAE."""

    target: torch.Tensor
    controls: list[torch.Tensor]


def load_item(item: ImageItem, bucket: tuple[int, int], dataset: DatasetConfig) -> LoadedItem:
    """Decode, resize and crop the target and its controls (runs in worker threads)."""
    target = resize_to_bucket(load_image(item.image_path), bucket)
    controls = [load_control(path, bucket, dataset) for path in item.control_paths]
    return LoadedItem(target=to_model_pixels(target), controls=[to_model_pixels(c) for c in controls])


def load_control(path, bucket: tuple[int, int], dataset: DatasetConfig):
    """One control image at the size the DiT sees it (``docs/design.md``, "Buckets and control images")."""
    return resize_control(load_image(path), bucket, dataset.control_resolution, dataset.no_resize_control)


def item_sources(item: ImageItem, found: dict[str, str] | None) -> tuple[list[str], list[str | None]]:
    """(fingerprints, stat tokens) of the target and each control; ``found``: the existing cache's
    metadata, whose fingerprints are reused for files whose size and mtime did not change."""
    recorded = recorded_latent_sources(found) if found else ([], [])
    return current_fingerprints([item.image_path, *item.control_paths], *recorded)
