"""Text-encoder caching: captions (and, for Edit versions, control images) -> embeddings on disk."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tsumugi.arch.base import Architecture
from tsumugi.caching.cache_files import (
    read_cache_metadata,
    remove_temporaries,
    text_cache_name,
    varlen_key,
    write_cache_file,
)
from tsumugi.caching.fingerprint import current_fingerprints
from tsumugi.caching.latent_cache import CacheReport, remove_orphans, reuse_if_current
from tsumugi.caching.metadata import (
    recorded_text_sources,
    text_identity,
    text_metadata,
    text_uses_images,
)
from tsumugi.caching.pixels import load_control
from tsumugi.data.batching import caching_batches
from tsumugi.data.buckets import resize_to_bucket
from tsumugi.data.config import DatasetConfig
from tsumugi.data.items import ImageItem, list_items

logger = logging.getLogger(__name__)


def text_path(dataset: DatasetConfig, item: ImageItem, arch_code: str) -> Path:
    return dataset.cache_directory / text_cache_name(item.cache_stem, arch_code)


def vl_control_images(item: ImageItem, bucket: tuple[int, int], dataset: DatasetConfig) -> list[Any]:
    """Control images as the VL encoder sees them: the DiT-size control, then ~384x384 area (step 16)."""
    from tsumugi.text.qwen_vl_images import vl_input_size

    images = []
    for path in item.control_paths:
        control = load_control(path, bucket, dataset)
        images.append(resize_to_bucket(control, vl_input_size(*control.size)))
    return images


def _control_sources(item: ImageItem, found: dict[str, str] | None) -> tuple[list[str], list[str | None]]:
    """(fingerprints, stat tokens) of the control images the VL encoder sees."""
    recorded = recorded_text_sources(found) if found else ([], [])
    return current_fingerprints(list(item.control_paths), *recorded)


def token_limit(arch: Architecture, model_version: str, has_controls: bool = True) -> tuple[int, Any] | None:
    """(limit, template) of the tokens the text encoder keeps, or None when nothing is truncated.

    Z-Image keeps 512 tokens of the chat text (template included); Qwen-Image 1024 after the template
    prefix; the Edit versions have no limit, except for items without control images (``has_controls``
    false), which are encoded with Qwen-Image's text-only template.
    """
    from tsumugi.text.qwen_image_edit_prompt import EDIT_VERSIONS

    if arch.name == "zimage":
        from tsumugi.text.zimage_prompt import ZIMAGE_MAX_LENGTH

        return ZIMAGE_MAX_LENGTH, None
    if model_version == "original" or (model_version in EDIT_VERSIONS and not has_controls):
        from tsumugi.text.qwen_image_prompt import TEXT_TO_IMAGE_TEMPLATE as template

        return template.max_length + template.drop_idx, template
    return None


def warn_truncated_captions(
    arch: Architecture, tokenizer: Any, items: list[ImageItem], model_version: str
) -> list[ImageItem]:
    """Items whose caption is cut at the text encoder's token limit; logs one warning counting them."""
    long = []
    for has_controls in (True, False):
        limit = token_limit(arch, model_version, has_controls)
        group = [item for item in items if bool(item.control_paths) == has_controls]
        if limit is None or not group:
            continue
        max_tokens, template = limit
        if template is None:
            from tsumugi.text.zimage_prompt import render_zimage_prompt

            texts = [render_zimage_prompt(tokenizer, item.caption) for item in group]
        else:
            texts = [template.template.format(item.caption) for item in group]
        lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
        long += [item for item, n in zip(group, lengths) if n > max_tokens]
    if long:
        from tsumugi.data.problems import short_list

        logger.warning(
            "%d caption(s) exceed the text encoder's limit of %d tokens (prompt with its chat template) and "
            "are truncated: %s", len(long), max_tokens, short_list([str(item.image_path) for item in long]),
        )
    return long


def cache_text_outputs(
    arch: Architecture,
    arch_code: str,
    datasets: list[DatasetConfig],
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    *,
    encoder_identity: str,
    model_version: str,
    device: torch.device | str,
    batch_size: int | None = None,
    num_workers: int = 1,
    skip_existing: bool = False,
    keep_cache: bool = False,
    dtype: torch.dtype | None = None,
) -> CacheReport:
    """Encode every caption; Edit versions feed each item's control images to the VL encoder too.

    Embeddings are stored in ``dtype`` (see ``cache_files.cache_dtype``; None: as computed, fp8 as bf16)."""
    report = CacheReport()
    uses_images = text_uses_images(arch_code, model_version)
    produced: dict[Path, set[Path]] = {}
    all_items = [item for d in datasets for item in list_items(d)]
    warn_truncated_captions(arch, tokenizer, all_items, model_version)
    without = sum(not item.control_paths for item in all_items)
    if uses_images and without:
        logger.info("%d of %d item(s) have no control image: their captions are encoded with the text-only "
                    "prompt (text-to-image items)", without, len(all_items))
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        for dataset in datasets:
            remove_temporaries(dataset.cache_directory)
            keep = produced.setdefault(dataset.cache_directory, set())
            batches = caching_batches([dataset])
            progress = tqdm(total=sum(len(b.items) for b in batches), desc=f"text {dataset.name}", unit="item")
            for batch in batches:
                items = list(batch.items)
                paths = [text_path(dataset, item, arch_code) for item in items]
                found = [read_cache_metadata(p) if skip_existing and p.exists() else None for p in paths]
                sources = list(pool.map(_control_sources, items, found)) if uses_images else [([], [])] * len(items)
                work = []
                for item, path, meta, (fps, stats) in zip(items, paths, found, sources):
                    keep.add(path)
                    expected = text_identity(item.caption, model_version, encoder_identity, fps)
                    if reuse_if_current(path, meta, expected, arch_code, stats, report):
                        continue
                    work.append((item, path, fps, stats))
                chunk = batch_size or dataset.batch_size
                for start in range(0, len(work), chunk):
                    part = work[start : start + chunk]
                    images = None
                    if uses_images:
                        images = list(pool.map(vl_control_images, [w[0] for w in part], repeat(batch.bucket),
                                               repeat(dataset)))
                    with torch.no_grad():
                        embeds = arch.encode_prompts_with_images(
                            text_encoder, tokenizer, [w[0].caption for w in part], images, model_version, device
                        )
                    for (item, path, fps, stats), embed in zip(part, embeds):
                        embed = embed.detach().cpu()
                        if dtype is not None or embed.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                            embed = embed.to(dtype or torch.bfloat16)
                        meta = text_metadata(arch_code, item.caption, model_version, encoder_identity, fps, stats)
                        write_cache_file(path, {varlen_key(arch.text_cache_name, embed): embed}, meta)
                        report.written.append(path)
                progress.update(len(items))
            progress.close()
    for directory, keep in produced.items():
        remove_orphans(directory, arch_code, "text", keep, keep_cache, report)
    return report
