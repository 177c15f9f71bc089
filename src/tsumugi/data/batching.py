"""Group items into batches: one dataset, one bucket, same control sizes and layer count.

See ``docs/design.md``, "Dataset items and batches".

Batch key = (dataset index, target bucket (W, H), every control's resized size (W, H) in order, number
of targets). Musubi keys on bucket and control sizes only; tsumugi adds the number of targets so that
Qwen-Image-Layered JSONL items with different layer counts never meet in a batch (Musubi fails when
stacking them). Control sizes come from :func:`tsumugi.data.buckets.control_target_size`, the same
policy :func:`~tsumugi.data.buckets.resize_control` applies to pixels.

Epochs: ``num_repeats`` copies of each item inside its bucket; then per dataset the generator is seeded
with ``seed + epoch``, the items of every bucket are shuffled (buckets in sorted key order) and the
batch order is shuffled; the datasets' batches are concatenated. A private ``random.Random(seed +
epoch)`` is used: the same sequence as ``random.seed(seed + epoch)`` + ``random.shuffle`` without
touching the global generator. (A DataLoader may shuffle batch indices again; that is the trainer's.)
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from tsumugi.data.buckets import BucketSelector, control_target_size
from tsumugi.data.config import DatasetConfig
from tsumugi.data.items import ImageItem, list_items

Size = tuple[int, int]


@dataclass(frozen=True, order=True)
class BatchKey:
    dataset_index: int
    bucket: Size
    """target bucket (W, H)"""
    control_sizes: tuple[Size, ...] = ()
    """resized size (W, H) of each control image, in control order"""
    num_targets: int = 1


@dataclass(frozen=True)
class Batch:
    key: BatchKey
    items: tuple[ImageItem, ...]

    @property
    def bucket(self) -> Size:
        return self.key.bucket


def selector_for(dataset: DatasetConfig) -> BucketSelector:
    return BucketSelector(dataset.resolution, dataset.enable_bucket, dataset.bucket_no_upscale)


def batch_key(dataset: DatasetConfig, item: ImageItem, selector: BucketSelector | None = None) -> BatchKey:
    bucket = (selector or selector_for(dataset)).assign(item.original_size)
    controls = tuple(
        control_target_size(size, bucket, dataset.control_resolution, dataset.no_resize_control)
        for size in item.control_sizes
    )
    return BatchKey(dataset.index, bucket, controls, item.num_targets)


def bucket_items(dataset: DatasetConfig, *, repeats: bool = False) -> dict[BatchKey, list[ImageItem]]:
    """Items by batch key (keys sorted; items in path order, each ``num_repeats`` times if ``repeats``)."""
    selector = selector_for(dataset)
    groups: dict[BatchKey, list[ImageItem]] = {}
    copies = dataset.num_repeats if repeats else 1
    for item in list_items(dataset):
        groups.setdefault(batch_key(dataset, item, selector), []).extend([item] * copies)
    return dict(sorted(groups.items()))


def _batches(groups: dict[BatchKey, list[ImageItem]], batch_size: int) -> list[Batch]:
    return [
        Batch(key, tuple(items[i : i + batch_size]))
        for key, items in groups.items()
        for i in range(0, len(items), batch_size)
    ]


def caching_batches(datasets: Iterable[DatasetConfig]) -> list[Batch]:
    """Every item once, in bucket order (no repeats, no shuffle): what the caching scripts iterate."""
    return [b for ds in datasets for b in _batches(bucket_items(ds), ds.batch_size)]


def epoch_batches(
    datasets: Iterable[DatasetConfig], seed: int, epoch: int, *, shuffle: bool = True
) -> list[Batch]:
    """All batches of one training epoch, with repeats and (by default) the seeded shuffle."""
    batches: list[Batch] = []
    for dataset in datasets:
        groups = bucket_items(dataset, repeats=True)
        if shuffle:
            rng = random.Random(seed + epoch)
            for items in groups.values():
                rng.shuffle(items)
            dataset_batches = _batches(groups, dataset.batch_size)
            rng.shuffle(dataset_batches)
        else:
            dataset_batches = _batches(groups, dataset.batch_size)
        batches.extend(dataset_batches)
    return batches
