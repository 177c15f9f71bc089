"""Training batches read from the caches: bucketed, shuffled per epoch, resumable at any position."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tsumugi.caching.cache_files import read_cache_file
from tsumugi.caching.validate import CachedItem
from tsumugi.data.batching import epoch_batches
from tsumugi.data.config import DatasetConfig


@dataclass
class TrainBatch:
    """Stacked cached latents of one bucket, per-item text embeddings, and control latents."""

    latents: torch.Tensor
    text: list[torch.Tensor]
    controls: list[torch.Tensor]
    bucket: tuple[int, int]
    paths: list[Path]


class CachedTrainingData:
    """The epoch plan is a pure function of (seed, epoch): a resumed run rebuilds it and skips ahead."""

    def __init__(self, datasets: list[DatasetConfig], cached: list[list[CachedItem]], text_key: str) -> None:
        self.datasets = datasets
        self.text_key = text_key
        self.by_image = {
            (dataset.index, item.image_path): cache
            for dataset, caches in zip(datasets, cached)
            for item, cache in zip(dataset.items or (), caches)
        }

    def epoch(self, seed: int, epoch: int) -> list[list[CachedItem]]:
        """Batches of one epoch (``num_repeats`` applied, shuffled with ``seed + epoch``)."""
        return [
            [self.by_image[(batch.key.dataset_index, item.image_path)] for item in batch.items]
            for batch in epoch_batches(self.datasets, seed, epoch)
        ]

    def batches_per_epoch(self) -> int:
        return len(self.epoch(0, 0))

    def num_items(self) -> int:
        return sum(len(d.items or ()) * d.num_repeats for d in self.datasets)

    def items_without_controls(self) -> tuple[int, int]:
        """(items without control images, all items), each dataset entry counted once (no repeats)."""
        items = [item for dataset in self.datasets for item in dataset.items or ()]
        return sum(not item.control_paths for item in items), len(items)

    def load(self, items: list[CachedItem]) -> TrainBatch:
        latents, text, controls = [], [], []
        for item in items:
            tensors, _ = read_cache_file(item.latent_path)
            latents.append(tensors["latents"])
            controls.append([tensors[k] for k in sorted(k for k in tensors if k.startswith("latents_control_"))])
            text.append(read_cache_file(item.text_path)[0][self.text_key])
        if len({len(c) for c in controls}) > 1:  # batching keys on control sizes: cannot happen
            raise ValueError(f"a batch mixes items with different control counts: {[i.latent_path for i in items]}")
        stacked_controls = [torch.stack([c[j] for c in controls]) for j in range(len(controls[0]))]
        return TrainBatch(torch.stack(latents), text, stacked_controls, items[0].bucket,
                          [i.latent_path for i in items])
