"""Every component in every file format: save the tiny model, load it back, compare every tensor."""

from __future__ import annotations

import json

import pytest
import torch

from tsumugi.models.loader import load_component, load_dit, load_info, load_text_encoder, load_vae
from tsumugi.testing.tiny_models import COMPONENTS, FORMATS

EXPECTED_LAYOUT = {"comfy": "comfy", "comfy_prefixed": "comfy_prefixed", "sharded": "comfy", "diffusers": "diffusers"}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("component", COMPONENTS)
def test_round_trip_is_exact(tiny, tiny_file, assert_same_state, component, fmt):
    path = tiny_file(component, fmt)
    model = load_component(path, component, flag="--x", dtype=torch.float32)
    assert type(model) is type(tiny(component))
    assert_same_state(model, tiny(component).state_dict())
    info = load_info(model)
    assert info["kind"] == component
    assert info["layout"] == EXPECTED_LAYOUT[fmt]
    assert not model.training
    if fmt == "sharded":
        assert len(info["files"]) >= 2


@pytest.mark.parametrize("component", COMPONENTS)
def test_loaded_config_matches(tiny, tiny_file, component):
    """The single-file config (metadata + shapes) rebuilds the same module configuration."""
    model = load_component(tiny_file(component, "comfy"), component, flag="--x", dtype=torch.float32)
    original = tiny(component).config
    loaded = model.config
    if hasattr(original, "to_dict"):
        for sub in ("text_config", "vision_config"):
            if hasattr(original, sub):
                assert getattr(loaded, sub).to_dict() == getattr(original, sub).to_dict()
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"):
            assert getattr(loaded, key, None) == getattr(original, key, None)
    else:
        def public(config):  # JSON-normalised (tuples become lists, as stored in the file)
            return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))

        assert public(loaded) == public(original)


def test_dtype_is_applied_per_tensor(tiny, tiny_file, assert_same_state):
    model = load_dit(tiny_file("qwen_image_dit", "comfy"), "qwen_image")  # default bfloat16
    assert_same_state(model, tiny("qwen_image_dit").state_dict(), dtype=torch.bfloat16)


@pytest.mark.parametrize("arch", ["qwen_image", "zimage"])
def test_public_loaders_pick_the_arch_component(tiny, tiny_file, assert_same_state, arch):
    dit_kind, vae_kind, te_kind = {
        "qwen_image": ("qwen_image_dit", "qwen_image_vae", "qwen2_5_vl"),
        "zimage": ("zimage_dit", "flux_vae", "qwen3"),
    }[arch]
    dit = load_dit(tiny_file(dit_kind, "comfy"), arch, dtype=torch.float32)
    vae = load_vae(tiny_file(vae_kind, "comfy"), arch)
    te = load_text_encoder(tiny_file(te_kind, "comfy"), arch, dtype=torch.float32)
    for model, kind in ((dit, dit_kind), (vae, vae_kind), (te, te_kind)):
        assert_same_state(model, tiny(kind).state_dict())
    assert next(vae.parameters()).dtype == torch.float32


def test_loaded_models_compute_like_the_original(tiny, tiny_file):
    """Beyond equal tensors: the rebuilt module (config, buffers) produces the same outputs."""
    torch.manual_seed(0)
    image = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    vae = load_vae(tiny_file("qwen_image_vae", "comfy"), "qwen_image")
    with torch.no_grad():
        assert torch.equal(vae.encode(image).latent_dist.mean, tiny("qwen_image_vae").encode(image).latent_dist.mean)

    ids = torch.tensor([[151644, 872, 198, 9707]])
    te = load_text_encoder(tiny_file("qwen2_5_vl", "comfy"), "qwen_image", dtype=torch.float32)
    with torch.no_grad():
        got = te(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        ref = tiny("qwen2_5_vl")(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(got, ref)
