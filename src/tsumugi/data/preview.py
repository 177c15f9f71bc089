"""Dry-run preview of datasets (``--debug_mode`` of the caching scripts): text summary and contact sheet.

The contact sheet shows, per dataset and batch key, up to ``max_per_bucket`` items exactly as they will
be cached: the target cropped to its bucket, then its layers and controls after the control policy.
Transparent layers are drawn over a checkerboard.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from tsumugi.data.batching import BatchKey, bucket_items
from tsumugi.data.buckets import resize_control, resize_to_bucket
from tsumugi.data.config import DatasetConfig
from tsumugi.data.images import load_image
from tsumugi.data.items import ImageItem

_BACKGROUND = (32, 32, 32)
_TEXT = (235, 235, 235)
_PAD = 8
_LABEL_H = 18


def _fmt(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _describe(dataset: DatasetConfig) -> str:
    source = (
        f"jsonl {dataset.image_jsonl_file}" if dataset.is_jsonl else f"directory {dataset.image_directory}"
    )
    if dataset.enable_bucket:
        bucketing = "buckets, no upscale" if dataset.bucket_no_upscale else "buckets"
    else:
        bucketing = "fixed size"
    lines = [
        f"{dataset.name}: {source}",
        f"  cache {dataset.cache_directory}",
        f"  resolution {_fmt(dataset.resolution)} ({bucketing}), batch size {dataset.batch_size}, "
        f"repeats {dataset.num_repeats}",
    ]
    if dataset.control_directory is not None:
        lines.append(f"  controls {dataset.control_directory}")
    if dataset.has_control:
        res = _fmt(dataset.control_resolution) if dataset.control_resolution else "target bucket"
        lines.append(f"  control size: {res}, no_resize_control={str(dataset.no_resize_control).lower()}")
    return "\n".join(lines)


def _key_label(key: BatchKey) -> str:
    label = _fmt(key.bucket)
    if key.num_targets > 1:
        label += f" +{key.num_targets - 1} layers"
    if key.control_sizes:
        label += " | controls " + ", ".join(_fmt(s) for s in key.control_sizes)
    return label


def summarize(datasets: Sequence[DatasetConfig]) -> str:
    """Per dataset: settings, items per batch key, and batches per epoch."""
    out = []
    total_batches = 0
    for dataset in datasets:
        groups = bucket_items(dataset)
        items = sum(len(v) for v in groups.values())
        out.append(_describe(dataset))
        out.append(f"  {items} item(s) in {len(groups)} bucket(s)")
        for key, members in groups.items():
            repeated = len(members) * dataset.num_repeats
            batches = -(-repeated // dataset.batch_size)
            total_batches += batches
            out.append(
                f"    {_key_label(key)}: {len(members)} item(s), {repeated} with repeats, {batches} batch(es)"
            )
    out.append(f"total: {total_batches} batch(es) per epoch")
    return "\n".join(out)


def _checkerboard(size: tuple[int, int], cell: int = 8) -> Image.Image:
    board = Image.new("RGB", size, (200, 200, 200))
    draw = ImageDraw.Draw(board)
    for y in range(0, size[1], cell):
        for x in range((y // cell) % 2 * cell, size[0], 2 * cell):
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(150, 150, 150))
    return board


def _thumb(image: Image.Image, box: int) -> Image.Image:
    image = image.copy()
    image.thumbnail((box, box), Image.Resampling.BOX)
    if image.mode == "RGBA":
        base = _checkerboard(image.size)
        base.paste(image, mask=image.getchannel("A"))
        return base
    return image.convert("RGB")


def _item_cell(dataset: DatasetConfig, key: BatchKey, item: ImageItem, box: int) -> Image.Image:
    layered = item.num_targets > 1
    alpha = "keep" if layered else "drop"
    thumbs = [_thumb(resize_to_bucket(load_image(item.image_path, alpha=alpha), key.bucket), box)]
    thumbs += [
        _thumb(resize_to_bucket(load_image(p, alpha="keep"), key.bucket), box)
        for p in item.extra_target_paths
    ]
    thumbs += [
        _thumb(
            resize_control(load_image(p), key.bucket, dataset.control_resolution, dataset.no_resize_control),
            box,
        )
        for p in item.control_paths
    ]
    width = sum(t.width for t in thumbs) + 2 * (len(thumbs) - 1)
    cell = Image.new("RGB", (width, box), _BACKGROUND)
    x = 0
    for i, t in enumerate(thumbs):
        if i == 1 + len(item.extra_target_paths):  # marker before the controls
            ImageDraw.Draw(cell).line((x - 2, 0, x - 2, box), fill=(255, 160, 0), width=2)
        cell.paste(t, (x, (box - t.height) // 2))
        x += t.width + 2
    return cell


def write_contact_sheet(
    datasets: Sequence[DatasetConfig],
    path: str | os.PathLike[str],
    *,
    thumb_size: int = 128,
    max_per_bucket: int = 8,
) -> Path:
    """Write a PNG with one labelled row per (dataset, bucket) showing the cropped items; returns its path."""
    font = ImageFont.load_default()
    rows: list[tuple[str, list[Image.Image]]] = []
    for dataset in datasets:
        for key, members in bucket_items(dataset).items():
            label = f"{dataset.name}  {_key_label(key)}  ({len(members)} item(s))"
            cells = [_item_cell(dataset, key, item, thumb_size) for item in members[:max_per_bucket]]
            rows.append((label, cells))
    width = max([_PAD + sum(c.width + _PAD for c in cells) for _, cells in rows] + [400])
    row_h = _LABEL_H + thumb_size + _PAD
    sheet = Image.new("RGB", (width, _PAD + row_h * max(len(rows), 1)), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if not rows:
        draw.text((_PAD, _PAD), "no items", fill=_TEXT, font=font)
    for r, (label, cells) in enumerate(rows):
        y = _PAD + r * row_h
        draw.text((_PAD, y + 2), label, fill=_TEXT, font=font)
        x = _PAD
        for cell in cells:
            sheet.paste(cell, (x, y + _LABEL_H))
            x += cell.width + _PAD
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
