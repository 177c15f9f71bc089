"""Before training: every dataset item must have current caches, or training refuses with the reason.

Musubi trains on whatever cache files it finds; a changed caption, image, control image, resolution or
Edit version silently trains on the old data. Here each item of the dataset config is matched with its
two cache files, and their metadata is compared with what caching the item now would write: Musubi's
``architecture`` and ``format_version``, and tsumugi's record of the bucket, model version, caption and
every source image (target and controls; for Edit versions the text cache too). Source images are
hashed only when their size or mtime differ from the recorded ones, so an unchanged dataset costs one
``stat`` per image. Caches made by Musubi (no ``tsumugi.*`` keys) are checked on what they do record:
the caption, the latent shape and the number of control latents.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tsumugi.caching.cache_files import stale_reasons
from tsumugi.caching.fingerprint import current_fingerprints, text_fingerprint
from tsumugi.caching.latent_cache import latent_path
from tsumugi.caching.metadata import (
    header_problems,
    latent_identity,
    recorded_latent_sources,
    recorded_text_sources,
    text_identity,
    text_uses_images,
)
from tsumugi.caching.text_cache import text_path
from tsumugi.data.batching import BatchKey, batch_key, selector_for
from tsumugi.data.config import DatasetConfig
from tsumugi.data.items import ImageItem
from tsumugi.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedItem:
    """One training item: its cache files and the batch key it belongs to."""

    dataset_index: int
    latent_path: Path
    text_path: Path
    bucket: tuple[int, int]
    control_sizes: tuple[tuple[int, int], ...]


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, list[int]]] | None:
    """Metadata and tensor shapes by key, or None when the file is missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:
        return None


def _latent_reasons(
    meta: dict[str, str], shapes: dict[str, list[int]], item: ImageItem, key: BatchKey, model_version: str,
    check_sources: bool, trust_stat: bool,
) -> list[str]:
    bucket = key.bucket
    expected = {"tsumugi.bucket": f"{bucket[0]}x{bucket[1]}", "tsumugi.model_version": model_version}
    if check_sources and "tsumugi.source" in meta:
        fingerprints, _ = current_fingerprints(
            [item.image_path, *item.control_paths], *recorded_latent_sources(meta), trust_stat=trust_stat
        )
        identity = latent_identity(bucket, model_version, "", fingerprints[0],
                                   list(zip(fingerprints[1:], key.control_sizes)))
        expected["tsumugi.source"] = identity["tsumugi.source"]
        expected["tsumugi.controls"] = identity["tsumugi.controls"]
    reasons = stale_reasons(meta, expected)
    if "tsumugi.bucket" not in meta:
        targets = [s for k, s in shapes.items() if k.startswith("latents_") and not k.startswith("latents_control")]
        if not targets or (targets[0][-1], targets[0][-2]) != (bucket[0] // 8, bucket[1] // 8):
            reasons.append(f"latent shape does not fit bucket {bucket[0]}x{bucket[1]}")
    controls = sum(k.startswith("latents_control_") for k in shapes)
    if controls != len(item.control_paths):
        reasons.append(f"{controls} control latent(s), the item has {len(item.control_paths)} control image(s)")
    return reasons


def _text_reasons(
    meta: dict[str, str], item: ImageItem, arch_code: str, model_version: str, check_sources: bool, trust_stat: bool
) -> list[str]:
    expected = {"tsumugi.caption": text_fingerprint(item.caption), "tsumugi.model_version": model_version}
    if check_sources and "tsumugi.controls" in meta:
        fingerprints: list[str] = []
        if text_uses_images(arch_code, model_version):
            fingerprints, _ = current_fingerprints(list(item.control_paths), *recorded_text_sources(meta),
                                                   trust_stat=trust_stat)
        expected["tsumugi.controls"] = text_identity(item.caption, model_version, "", fingerprints)["tsumugi.controls"]
    reasons = stale_reasons(meta, expected)
    if "tsumugi.caption" not in meta and meta.get("caption1", item.caption) != item.caption:
        reasons.append("caption changed")
    return reasons


def check_caches(
    datasets: list[DatasetConfig],
    arch_code: str,
    model_version: str,
    script_prefix: str,
    *,
    check_sources: bool = True,
    trust_stat: bool = True,
) -> list[list[CachedItem]]:
    """Cached items per dataset; raises one :class:`UserError` listing every missing or stale cache.

    ``script_prefix`` (``qwen_image`` / ``zimage``) names the caching scripts in the messages.
    ``check_sources`` compares the source images (targets and controls) with the ones cached; with
    ``trust_stat`` (default) only images whose size or mtime changed are hashed, without it every
    image is hashed (the earlier behaviour, kept for the start-up benchmark).
    """
    started = time.perf_counter()
    problems: list[str] = []
    for dataset in datasets:
        selector = selector_for(dataset)
        for item in dataset.items or ():
            key = batch_key(dataset, item, selector)
            latent, text = latent_path(dataset, item, arch_code), text_path(dataset, item, arch_code)
            where = f"{dataset.name} {item.image_path.name}"
            latent_header, text_header = _read_header(latent), _read_header(text)
            if latent_header is None:
                problems.append(f"{where}: no latent cache {latent.name}")
            elif wrong := header_problems(latent_header[0], arch_code):
                problems.append(f"{where}: latent cache {latent} is refused ({'; '.join(wrong)})")
            elif reasons := _latent_reasons(*latent_header, item, key, model_version, check_sources, trust_stat):
                problems.append(f"{where}: latent cache {latent.name} is stale ({'; '.join(reasons)})")
            if text_header is None:
                problems.append(f"{where}: no text-encoder cache {text.name}")
            elif wrong := header_problems(text_header[0], arch_code):
                problems.append(f"{where}: text-encoder cache {text} is refused ({'; '.join(wrong)})")
            elif reasons := _text_reasons(text_header[0], item, arch_code, model_version, check_sources, trust_stat):
                problems.append(f"{where}: text-encoder cache {text.name} is stale ({'; '.join(reasons)})")
    logger.info("checked the caches of %d item(s) in %.2f s", sum(len(d.items or ()) for d in datasets),
                time.perf_counter() - started)
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        config = datasets[0].config_path if datasets else "the dataset config"
        raise UserError(
            f"{len(problems)} cache problem(s) for {config}:\n  " + "\n  ".join(shown) + "\n"
            f"run {script_prefix}_cache_latents and {script_prefix}_cache_text_encoder_outputs "
            f"with --dataset_config {config} (add --skip_existing to redo only what changed)"
        )
    return _list_cached_items(datasets, arch_code)


def check_caches_once(
    datasets: list[DatasetConfig], arch_code: str, model_version: str, script_prefix: str
) -> list[list[CachedItem]]:
    """:func:`check_caches` run by the main process only under ``accelerate launch``.

    The other processes wait for its verdict (broadcast) and then list the same cache files without
    reading them, so N processes do not hash the same images N times.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return check_caches(datasets, arch_code, model_version, script_prefix)
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    # the same CPU choice as the Accelerator made later (AcceleratorState reads ACCELERATE_USE_CPU)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    verdict: list[str | None] = [None]
    if state.is_main_process:
        try:
            check_caches(datasets, arch_code, model_version, script_prefix)
        except UserError as exc:
            verdict[0] = str(exc)
    broadcast_object_list(verdict, from_process=0)
    if verdict[0] is not None:
        raise UserError(verdict[0])
    return _list_cached_items(datasets, arch_code)


def _list_cached_items(datasets: list[DatasetConfig], arch_code: str) -> list[list[CachedItem]]:
    result = []
    for dataset in datasets:
        selector = selector_for(dataset)
        result.append([
            CachedItem(dataset.index, latent_path(dataset, item, arch_code), text_path(dataset, item, arch_code),
                       key.bucket, key.control_sizes)
            for item in dataset.items or ()
            for key in [batch_key(dataset, item, selector)]
        ])
    return result
