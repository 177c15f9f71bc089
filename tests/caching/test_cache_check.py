"""The training-start cache check: a source image is hashed only when its size or mtime changed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tsumugi.caching.validate import check_caches
from tsumugi.data.config import load_dataset_config
from tsumugi.errors import UserError
from tsumugi.testing.tiny_dataset import write_tiny_dataset
from tsumugi.zimage_cache_latents import main as zimage_latents


def _age(path: Path, seconds: float = 3600) -> None:
    """Give ``path`` an mtime in the past (as an image copied long before caching has)."""
    ns = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(ns, ns))


def _flip_byte(path: Path) -> None:
    """Same size, different content (the header stays intact; the check never decodes)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def cached_latents(tiny_sets, tmp_path):
    """(datasets, image path): one Z-Image item whose latent cache was made from an image an hour old.

    Only latents are cached: the check reports the missing text cache, and whether it also calls the
    latent cache stale is what these tests look at.
    """
    files = tiny_sets("zimage")
    toml = write_tiny_dataset(tmp_path / "ds", 1, sizes=[(64, 64)])
    image = tmp_path / "ds/images/img000.png"
    _age(image)
    assert zimage_latents(["--dataset_config", str(toml), "--device", "cpu", "--vae", str(files["vae"])]) == 0
    return load_dataset_config(toml, architecture="zi"), image


def _latent_stale(datasets, **kwargs) -> bool:
    with pytest.raises(UserError) as info:
        check_caches(datasets, "zi", "original", "zimage", **kwargs)
    assert "no text-encoder cache" in str(info.value)
    return "latent cache" in str(info.value)


def test_content_change_with_new_mtime_is_detected(cached_latents):
    datasets, image = cached_latents
    assert not _latent_stale(datasets)
    _flip_byte(image)
    assert _latent_stale(datasets)


def test_touched_but_unchanged_image_is_current(cached_latents):
    datasets, image = cached_latents
    os.utime(image)  # mtime now: the stat differs, so it is hashed, and the hash matches
    assert not _latent_stale(datasets)


def test_unchanged_stat_is_trusted_unless_told_otherwise(cached_latents):
    """Size and mtime restored after a same-size edit: only hashing every image (the old cost) sees it."""
    datasets, image = cached_latents
    before = image.stat()
    _flip_byte(image)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert not _latent_stale(datasets)
    assert _latent_stale(datasets, trust_stat=False)


def test_recently_modified_image_is_not_vouched_for_by_its_stat(tiny_sets, tmp_path):
    """An image written just before caching gets no stat record, so a same-stat edit is still caught."""
    files = tiny_sets("zimage")
    toml = write_tiny_dataset(tmp_path / "ds", 1, sizes=[(64, 64)])
    image = tmp_path / "ds/images/img000.png"
    os.utime(image)
    assert zimage_latents(["--dataset_config", str(toml), "--device", "cpu", "--vae", str(files["vae"])]) == 0
    datasets = load_dataset_config(toml, architecture="zi")
    before = image.stat()
    _flip_byte(image)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert _latent_stale(datasets)


def test_skip_existing_records_the_new_stat_of_a_touched_image(cached_latents, tiny_sets):
    """Copying a dataset without its times makes every start hash; --skip_existing records the new times."""
    from tsumugi.caching.cache_files import read_cache_file
    from tsumugi.caching.fingerprint import stat_token

    datasets, image = cached_latents
    files = tiny_sets("zimage")
    (cache,) = datasets[0].cache_directory.glob("*_zi.safetensors")
    tensors, meta = read_cache_file(cache)
    _age(image, 1800)  # touched: new mtime, same content
    toml = datasets[0].config_path
    assert zimage_latents(["--dataset_config", str(toml), "--device", "cpu", "--vae", str(files["vae"]),
                           "--skip_existing"]) == 0
    new_tensors, new_meta = read_cache_file(cache)
    assert new_tensors["latents"].equal(tensors["latents"])
    assert meta["tsumugi.stats"] != new_meta["tsumugi.stats"] == f'["{stat_token(image)}"]'
    assert {k: v for k, v in new_meta.items() if k != "tsumugi.stats"} == {
        k: v for k, v in meta.items() if k != "tsumugi.stats"}
