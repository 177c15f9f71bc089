"""Before training: every dataset item must have current caches, or training refuses with the reason.

Musubi trains on whatever cache files it finds; a changed caption, image, resolution or Edit version
silently trains on the old data. Here each item of the dataset config is matched with its two cache
files, and their metadata is compared with what caching the item now would write. Caches made by
Musubi (no ``tsumugi.*`` keys) are checked on what they do record: the caption and the latent shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tsumugi.caching.cache_files import read_cache_metadata, stale_reasons
from tsumugi.caching.fingerprint import file_fingerprint, text_fingerprint
from tsumugi.caching.latent_cache import latent_path
from tsumugi.caching.text_cache import text_path
from tsumugi.data.batching import batch_key, selector_for
from tsumugi.data.config import DatasetConfig
from tsumugi.errors import UserError


@dataclass(frozen=True)
class CachedItem:
    """One training item: its cache files and the batch key it belongs to."""

    dataset_index: int
    latent_path: Path
    text_path: Path
    bucket: tuple[int, int]
    control_sizes: tuple[tuple[int, int], ...]


def _latent_shape_matches(path: Path, bucket: tuple[int, int]) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        key = next(k for k in f.keys() if k.startswith("latents_") and not k.startswith("latents_control"))
        shape = f.get_slice(key).get_shape()
    return (shape[-1], shape[-2]) == (bucket[0] // 8, bucket[1] // 8)


def check_caches(
    datasets: list[DatasetConfig], arch_code: str, model_version: str, script_prefix: str, *, check_sources: bool = True
) -> list[list[CachedItem]]:
    """Cached items per dataset; raises one :class:`UserError` listing every missing or stale cache.

    ``script_prefix`` (``qwen_image`` / ``zimage``) names the caching scripts in the messages.
    ``check_sources`` hashes the source images to detect content changes (reads every image once).
    """
    problems: list[str] = []
    result: list[list[CachedItem]] = []
    for dataset in datasets:
        selector = selector_for(dataset)
        items: list[CachedItem] = []
        for item in dataset.items or ():
            key = batch_key(dataset, item, selector)
            latent, text = latent_path(dataset, item, arch_code), text_path(dataset, item, arch_code)
            where = f"{dataset.name} {item.image_path.name}"
            latent_meta, text_meta = read_cache_metadata(latent), read_cache_metadata(text)
            if latent_meta is None:
                problems.append(f"{where}: no latent cache {latent.name}")
            else:
                expected = {"tsumugi.bucket": f"{key.bucket[0]}x{key.bucket[1]}", "tsumugi.model_version": model_version}
                if check_sources and "tsumugi.source" in latent_meta:
                    expected["tsumugi.source"] = file_fingerprint(item.image_path)
                reasons = stale_reasons(latent_meta, expected)
                if "tsumugi.bucket" not in latent_meta and not _latent_shape_matches(latent, key.bucket):
                    reasons.append(f"latent shape does not fit bucket {key.bucket[0]}x{key.bucket[1]}")
                if reasons:
                    problems.append(f"{where}: latent cache {latent.name} is stale ({'; '.join(reasons)})")
            if text_meta is None:
                problems.append(f"{where}: no text-encoder cache {text.name}")
            else:
                expected = {"tsumugi.caption": text_fingerprint(item.caption), "tsumugi.model_version": model_version}
                reasons = stale_reasons(text_meta, expected)
                if "tsumugi.caption" not in text_meta and text_meta.get("caption1", item.caption) != item.caption:
                    reasons.append("caption changed")
                if reasons:
                    problems.append(f"{where}: text-encoder cache {text.name} is stale ({'; '.join(reasons)})")
            items.append(CachedItem(dataset.index, latent, text, key.bucket, key.control_sizes))
        result.append(items)
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        config = datasets[0].config_path if datasets else "the dataset config"
        raise UserError(
            f"{len(problems)} cache problem(s) for {config}:\n  " + "\n  ".join(shown) + "\n"
            f"run {script_prefix}_cache_latents and {script_prefix}_cache_text_encoder_outputs "
            f"with --dataset_config {config} (add --skip_existing to redo only what changed)"
        )
    return result
