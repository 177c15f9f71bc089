"""Built-in configs of the released models, and configs derived from tensor shapes."""

from __future__ import annotations

import pytest
import torch

from tsumugi.models.components import KINDS, instantiate
from tsumugi.models.configs import (
    config_from_metadata,
    config_to_metadata,
    derive_from_shapes,
    released_config,
    resolve_config,
)
from tsumugi.models.convert_qwen_image_vae import from_diffusers, to_diffusers
from tsumugi.models.loader import load_dit, load_info
from tsumugi.models.safetensors_write import save_file_atomic
from tsumugi.testing.tiny_models import COMPONENTS, comfy_state_dict, tiny_config

# Parameter counts of the releases (Qwen3-4B as Z-Image's Qwen3Model, i.e. without the tied head).
RELEASED_PARAMS = {
    "qwen2_5_vl": 8_292_166_656,
    "zimage_dit": 6_154_908_736,
    "qwen3": 4_022_468_096,
}


@pytest.mark.parametrize("kind", sorted(RELEASED_PARAMS))
def test_released_configs_build_the_released_sizes(kind):
    model = instantiate(kind, released_config(kind))  # meta device: no memory
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMS[kind]


def test_released_qwen_image_configs():
    assert released_config("qwen_image_dit")["num_layers"] == 60
    assert sum(released_config("qwen_image_dit")["axes_dims_rope"]) == 128
    assert released_config("flux_vae")["scaling_factor"] == 0.3611
    assert released_config("flux_vae")["shift_factor"] == 0.1159
    assert not released_config("flux_vae")["use_quant_conv"]
    assert len(released_config("qwen_image_vae")["latents_std"]) == 16


@pytest.mark.parametrize("kind", COMPONENTS)
def test_shapes_prove_the_structure(tiny, kind):
    """From the tiny model's shapes, with the tiny config as the base for what shapes cannot tell,
    derivation reproduces every structural value."""
    shapes = {k: tuple(v.shape) for k, v in tiny(kind).state_dict().items()}
    base = tiny_config(kind)
    derived = derive_from_shapes(kind, shapes, {**released_config(kind), **base})
    for key, value in derived.items():
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                if sub_key in base.get(key, {}):
                    assert sub_value == base[key][sub_key], f"{key}.{sub_key}"
        elif key in base:
            expected = list(base[key]) if isinstance(base[key], tuple) else base[key]
            assert (list(value) if isinstance(value, tuple) else value) == expected, key


@pytest.mark.parametrize("kind", ["qwen_image_dit", "qwen_image_vae", "qwen3"])
def test_released_base_plus_shapes_fit_the_tiny_weights(tiny, kind):
    """Without any stored config, the released config completed from shapes builds a module whose keys
    and shapes match the file. (Left out: Z-Image, whose RoPE axes diffusers checks against the head size,
    and the FLUX VAE, whose GroupNorm count must divide the tiny widths; no shape tells either.)"""
    reference = tiny(kind).state_dict()
    config = resolve_config(kind, {k: tuple(v.shape) for k, v in reference.items()})
    model = instantiate(kind, config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in reference.items()
    }


def test_metadata_config_selection():
    meta = config_to_metadata({"a": 1}, "flux_vae")
    assert config_from_metadata(meta, "flux_vae") == {"a": 1}
    assert config_from_metadata(meta, "qwen3") is None  # belongs to another component
    meta["tsumugi.config.qwen3"] = '{"b": 2}'
    assert config_from_metadata(meta, "qwen3") == {"b": 2}
    assert config_from_metadata({}, "qwen3") is None


def test_qwen_vae_converter_agrees_with_diffusers_on_the_release():
    """Reference check: for the released block layout, diffusers' own Wan converter maps our original
    keys back to the same diffusers keys."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    model = instantiate("qwen_image_vae", released_config("qwen_image_vae"))
    sd = model.state_dict()
    original = from_diffusers(sd)
    assert "decoder.upsamples.14.residual.6.weight" in original
    assert set(convert_wan_vae_to_diffusers(original)) == set(sd)
    assert list(to_diffusers(original)) == list(sd)


def test_derived_config_loads_without_metadata(tiny, tmp_path):
    """A VAE file without metadata loads from shapes alone (the VAE has nothing shapes cannot tell
    besides latent statistics, which default to the released ones)."""
    sd = comfy_state_dict(tiny("qwen_image_vae"), "qwen_image_vae")
    path = save_file_atomic(sd, tmp_path / "qwen_image_vae.safetensors")
    from tsumugi.models.loader import load_vae

    model = load_vae(path, "qwen_image")
    assert model.config.num_res_blocks == 1 and list(model.config.dim_mult) == [1, 2, 2, 2]
    assert load_info(model)["config"]["base_dim"] == 16
    with torch.no_grad():
        image = torch.rand(1, 3, 1, 32, 32) * 2 - 1
        assert torch.equal(model.encode(image).latent_dist.mean, tiny("qwen_image_vae").encode(image).latent_dist.mean)


def test_build_failure_hints_at_missing_config(tiny, tmp_path):
    """Tiny Z-Image heads are 32 wide; without a stored config the released RoPE axes (sum 128) do not fit."""
    from tsumugi.errors import UserError

    sd = comfy_state_dict(tiny("zimage_dit"), "zimage_dit")
    path = save_file_atomic(sd, tmp_path / "z.safetensors")
    with pytest.raises(UserError, match=r"cannot determine the RoPE split axes_dims .*config\.json.*'tsumugi\.config'"):
        load_dit(path, "zimage")


def test_kinds_table():
    assert {k.role for k in KINDS.values()} == {"dit", "vae", "text_encoder"}
    assert {(k.arch, k.role) for k in KINDS.values()} == {
        (a, r) for a in ("qwen_image", "zimage") for r in ("dit", "vae", "text_encoder")
    }
