"""The tiny model factory: deterministic, non-degenerate, and its files carry their config."""

from __future__ import annotations

import json

import pytest
import torch

from tsumugi.models.configs import CONFIG_METADATA_KEY
from tsumugi.models.safetensors_io import open_safetensors
from tsumugi.testing.tiny_models import COMPONENTS, build_tiny, save_component


@pytest.mark.parametrize("component", COMPONENTS)
def test_deterministic_per_seed(tiny, component):
    again = build_tiny(component, seed=0).state_dict()
    other = build_tiny(component, seed=1).state_dict()
    for key, value in tiny(component).state_dict().items():
        assert torch.equal(value, again[key]), key
    assert any(not torch.equal(value, other[key]) for key, value in again.items())


def test_seed_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny("flux_vae", seed=5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("component", ["qwen_image_dit", "zimage_dit", "qwen2_5_vl", "qwen3"])
def test_weights_are_not_trivial(tiny, component):
    for key, value in tiny(component).state_dict().items():
        if value.is_floating_point() and value.numel() > 1:
            assert value.std() > 0, key


def test_vae_latents_are_not_degenerate(tiny):
    torch.manual_seed(0)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        qwen = tiny("qwen_image_vae").encode(image[:, :, None]).latent_dist.mean
        flux = tiny("flux_vae").encode(image).latent_dist.mean
    for latent, shape in ((qwen, (1, 16, 1, 8, 8)), (flux, (1, 16, 8, 8))):
        assert latent.shape == shape
        assert torch.isfinite(latent).all()
        assert 0.05 < latent.std().item() < 20
        # different pixels give different latents
        assert latent.flatten(2).std(dim=-1).min() > 1e-3


@pytest.mark.parametrize("fmt", ["comfy", "comfy_prefixed", "sharded"])
def test_single_file_formats_store_their_config(tiny_file, fmt):
    with open_safetensors(tiny_file("zimage_dit", fmt)) as src:
        config = json.loads(src.metadata[CONFIG_METADATA_KEY])
        assert src.metadata["tsumugi.component"] == "zimage_dit"
    assert config["dim"] == 64 and config["axes_dims"] == [8, 12, 12]


def test_unknown_component_and_format(tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown component"):
        build_tiny("sdxl_unet")
    with pytest.raises(ValueError, match="unknown format"):
        save_component(tiny("qwen3"), "qwen3", "gguf", tmp_path / "x")
