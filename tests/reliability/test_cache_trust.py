"""Caches and files we write: never delete what is not ours, never train on stale caches, ordinary modes."""

from __future__ import annotations

from pathlib import Path

import torch

from tsumugi.testing.tiny_dataset import write_tiny_dataset
from tsumugi.zimage_cache_latents import main as zimage_latents
from tsumugi.zimage_cache_text_encoder_outputs import main as zimage_text


def _cache_zimage(toml: Path, files: dict[str, Path], *extra: str) -> None:
    common = ["--dataset_config", str(toml), "--device", "cpu", *extra]
    assert zimage_latents([*common, "--vae", str(files["vae"])]) == 0
    assert zimage_text([*common, "--text_encoder", str(files["text_encoder"])]) == 0


def _without_cache_directory(toml: Path) -> Path:
    """The dataset TOML with ``cache_directory`` removed: caches go beside the images."""
    lines = [line for line in toml.read_text().splitlines() if not line.startswith("cache_directory")]
    toml.write_text("\n".join(lines) + "\n")
    return toml


def write_real_lora(path: Path) -> Path:
    """A Z-Image LoRA as the trainer saves it (tiny DiT, real network, real metadata)."""
    from diffusers import ZImageTransformer2DModel

    from tsumugi.networks.lora_save import save_lora
    from tsumugi.networks.lora_zimage import create_network
    from tsumugi.testing.tiny_configs import tiny_zimage_dit_config

    torch.manual_seed(0)
    dit = ZImageTransformer2DModel(**tiny_zimage_dit_config())
    network = create_network(dit, 4, 1.0, None, None)
    network.apply_to()
    return save_lora(network, path, None, {"ss_network_module": "networks.lora_zimage", "ss_network_dim": "4"})


def test_orphan_removal_keeps_a_lora_named_like_a_cache(tiny_sets, tmp_path, caplog):
    """cache_directory omitted: caches live beside the images, and so may the user's LoRAs."""
    files = tiny_sets("zimage")
    toml = _without_cache_directory(write_tiny_dataset(tmp_path / "ds", 3))
    images = tmp_path / "ds/images"
    lora = write_real_lora(images / "style_zi.safetensors")
    te_lookalike = write_real_lora(images / "other_zi_te.safetensors")
    lora_bytes = lora.read_bytes()
    _cache_zimage(toml, files)
    orphan_latent = next(images.glob("img002_*_zi.safetensors"))
    orphan_text = images / "img002_zi_te.safetensors"
    assert orphan_latent.is_file() and orphan_text.is_file()
    for suffix in ("png", "txt"):
        (images / f"img002.{suffix}").unlink()
    with caplog.at_level("WARNING"):
        _cache_zimage(toml, files, "--skip_existing")
    assert not orphan_latent.exists() and not orphan_text.exists(), "real orphan caches are removed"
    assert lora.read_bytes() == lora_bytes and te_lookalike.is_file(), "a user's LoRA must survive"
    assert "style_zi.safetensors" in caplog.text and "not caches" in caplog.text


def test_is_our_cache_needs_architecture_metadata_and_cache_keys(tmp_path):
    from tsumugi.caching.cache_files import is_our_cache, latent_key, write_cache_file
    from tsumugi.caching.metadata import latent_metadata

    latent = torch.zeros(16, 8, 8)
    meta = latent_metadata("zi", (64, 64), (64, 64), "original", "vae", "fp", [])
    ours = tmp_path / "a_0064x0064_zi.safetensors"
    write_cache_file(ours, {latent_key(latent): latent}, meta)
    assert is_our_cache(ours, "zi", "latent")
    assert not is_our_cache(ours, "qi", "latent"), "another architecture is not a cache of this one"
    musubi_like = tmp_path / "b_0064x0064_zi.safetensors"  # Musubi's metadata only
    write_cache_file(musubi_like, {latent_key(latent): latent},
                     {"architecture": "z_image", "width": "64", "height": "64", "format_version": "1.0.1"})
    assert is_our_cache(musubi_like, "zi", "latent")
    foreign_keys = tmp_path / "c_0064x0064_zi.safetensors"
    write_cache_file(foreign_keys, {"lora_down.weight": latent}, meta)
    assert not is_our_cache(foreign_keys, "zi", "latent")
    not_safetensors = tmp_path / "d_0064x0064_zi.safetensors"
    not_safetensors.write_bytes(b"user data")
    assert not is_our_cache(not_safetensors, "zi", "latent")
