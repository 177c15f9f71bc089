"""Latent caching: dataset images -> VAE latents in Musubi's cache files, with staleness metadata."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tsumugi.arch.base import Architecture
from tsumugi.caching.cache_files import (
    is_our_cache,
    latent_cache_name,
    latent_key,
    read_cache_metadata,
    remove_temporaries,
    stale_reasons,
    update_cache_metadata,
    write_cache_file,
)
from tsumugi.caching.metadata import header_problems, latent_identity, latent_metadata
from tsumugi.caching.pixels import LoadedItem, item_sources, load_item
from tsumugi.data.batching import caching_batches
from tsumugi.data.config import DatasetConfig
from tsumugi.data.items import ImageItem

logger = logging.getLogger(__name__)


@dataclass
class CacheReport:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    kept_orphans: list[Path] = field(default_factory=list)
    not_caches: list[Path] = field(default_factory=list)
    """files named like caches that are not caches (left untouched)"""


def latent_path(dataset: DatasetConfig, item: ImageItem, arch_code: str) -> Path:
    width, height = item.original_size
    return dataset.cache_directory / latent_cache_name(item.cache_stem, width, height, arch_code)


def _encode(arch: Architecture, vae: torch.nn.Module, pixels: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            chunk = torch.stack(pixels[start : start + batch_size])
            out.extend(arch.encode_images_for_cache(vae, chunk).cpu().unbind(0))
    return out


def restamp_sources(path: Path, meta: dict[str, str], stats: list[str | None]) -> None:
    """A current cache whose sources were touched (same content, new mtime) records their new stat, so
    the training-start check need not hash them again."""
    if any(stats) and json.dumps(stats) != meta.get("tsumugi.stats"):
        update_cache_metadata(path, {"tsumugi.stats": json.dumps(stats)})



def reuse_if_current(path: Path, meta: dict[str, str] | None, expected: dict[str, str], arch_code: str,
                     stats: list[str | None], report: CacheReport) -> bool:
    """True when ``meta`` (the existing cache's metadata, ``None`` if there is none) is current for
    ``expected``: the cache is kept and its source times restamped. A stale cache is logged with why."""
    if meta is None:
        return False
    reasons = header_problems(meta, arch_code) + stale_reasons(meta, expected)
    if not reasons:
        report.skipped.append(path)
        restamp_sources(path, meta, stats)
        return True
    logger.info("%s is stale (%s): re-encoding", path.name, "; ".join(reasons))
    return False

def remove_orphans(
    directory: Path, arch_code: str, kind: str, keep: set[Path], keep_cache: bool, report: CacheReport
) -> None:
    """Delete ``kind`` cache files of ``arch_code`` in ``directory`` that no current dataset item produces.

    A file is deleted only when :func:`is_our_cache` proves it is a cache (the cache folder may be the
    image folder, where a user's ``*_zi.safetensors`` LoRA must survive); other files are left alone.
    """
    pattern = f"*_{arch_code}.safetensors" if kind == "latent" else f"*_{arch_code}_te.safetensors"
    removed = 0
    for path in sorted(directory.glob(pattern)):
        if path in keep or not path.is_file():
            continue
        if not is_our_cache(path, arch_code, kind):
            report.not_caches.append(path)
        elif keep_cache:
            report.kept_orphans.append(path)
        else:
            path.unlink()
            report.removed.append(path)
            removed += 1
    if removed:
        logger.info("removed %d orphan caches in %s (use --keep_cache to keep them)", removed, directory)


def cache_latents(
    arch: Architecture,
    arch_code: str,
    datasets: list[DatasetConfig],
    vae: torch.nn.Module,
    *,
    vae_identity: str,
    model_version: str,
    batch_size: int | None = None,
    num_workers: int = 1,
    skip_existing: bool = False,
    keep_cache: bool = False,
    dtype: torch.dtype | None = None,
) -> CacheReport:
    """Encode every item of every dataset; ``skip_existing`` keeps files whose metadata is current.

    The VAE output is stored in ``dtype`` (see ``cache_files.cache_dtype``; None: as computed)."""
    report = CacheReport()
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        for dataset in datasets:
            remove_temporaries(dataset.cache_directory)
            produced: set[Path] = set()
            batches = caching_batches([dataset])
            progress = tqdm(total=sum(len(b.items) for b in batches), desc=f"latents {dataset.name}", unit="img")
            for batch in batches:
                items = list(batch.items)
                paths = [latent_path(dataset, item, arch_code) for item in items]
                found = [read_cache_metadata(p) if skip_existing and p.exists() else None for p in paths]
                sources = list(pool.map(item_sources, items, found))
                work = []
                for item, path, meta, (fingerprints, stats) in zip(items, paths, found, sources):
                    produced.add(path)
                    controls = list(zip(fingerprints[1:], batch.key.control_sizes))
                    expected = latent_identity(batch.bucket, model_version, vae_identity, fingerprints[0], controls)
                    if reuse_if_current(path, meta, expected, arch_code, stats, report):
                        continue
                    work.append((item, path, fingerprints[0], controls, stats))
                if work:
                    loaded = list(pool.map(load_item, [w[0] for w in work], repeat(batch.bucket), repeat(dataset)))
                    _write_batch(arch, arch_code, vae, batch.bucket, work, loaded, batch_size or dataset.batch_size,
                                 model_version, vae_identity, report, dtype)
                progress.update(len(items))
            progress.close()
            remove_orphans(dataset.cache_directory, arch_code, "latent", produced, keep_cache, report)
    return report


def _write_batch(
    arch: Architecture,
    arch_code: str,
    vae: torch.nn.Module,
    bucket: tuple[int, int],
    work: list,
    loaded: list[LoadedItem],
    chunk: int,
    model_version: str,
    vae_identity: str,
    report: CacheReport,
    dtype: torch.dtype | None = None,
) -> None:
    def encode(pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.to(dtype) if dtype is not None else t for t in _encode(arch, vae, pixels, chunk)]

    targets = encode([data.target for data in loaded])
    num_controls = len(loaded[0].controls)
    control_latents = [encode([data.controls[j] for data in loaded]) for j in range(num_controls)]
    for i, (item, path, source, controls, stats) in enumerate(work):
        tensors = {latent_key(targets[i]): targets[i]}
        for j in range(num_controls):
            tensors[latent_key(control_latents[j][i], f"latents_control_{j}")] = control_latents[j][i]
        meta = latent_metadata(arch_code, item.original_size, bucket, model_version, vae_identity, source, controls,
                               stats)
        write_cache_file(path, tensors, meta)
        report.written.append(path)
