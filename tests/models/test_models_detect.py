"""Format detection: component kind, layout, prefixes, model roots, flags."""

from __future__ import annotations

import pytest
import torch

from tsumugi.errors import UserError
from tsumugi.models.detect import classify, detect
from tsumugi.models.safetensors_write import save_file_atomic
from tsumugi.testing.tiny_models import COMPONENTS, FORMATS, comfy_state_dict, write_tiny_model_root

LAYOUT = {"comfy": "comfy", "comfy_prefixed": "comfy_prefixed", "sharded": "comfy", "diffusers": "diffusers"}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("component", COMPONENTS)
def test_kind_and_layout(tiny_file, component, fmt):
    det = detect(tiny_file(component, fmt))  # nothing expected: the keys alone tell
    with det.source:
        assert det.kind == component
        assert det.layout == LAYOUT[fmt]
        assert not det.fp8_scaled and not det.fp8_weights and not det.edit_2511_marker
        assert (det.folder_config is not None) == (fmt == "diffusers")


@pytest.mark.parametrize("component", COMPONENTS)
def test_library_names_classify_as_library_layout(tiny, component):
    kind, library_names = classify(set(tiny(component).state_dict()))
    assert kind == component
    assert library_names


def test_unknown_keys():
    assert classify({"foo.weight", "bar.bias"}) == (None, False)


def test_all_in_one_file_selects_the_requested_component(tiny, tmp_path):
    sd = {}
    for kind in ("qwen_image_dit", "qwen_image_vae", "qwen2_5_vl"):
        from tsumugi.models.components import KINDS

        prefix = KINDS[kind].prefixes[0]
        sd.update({prefix + k: v for k, v in comfy_state_dict(tiny(kind), kind).items()})
    path = save_file_atomic(sd, tmp_path / "aio.safetensors")
    for expected, prefix in (
        ("dit", "model.diffusion_model."),
        ("vae", "vae."),
        ("text_encoder", "text_encoders.qwen25_7b.transformer."),
    ):
        det = detect(path, expected)
        with det.source:
            assert det.prefix == prefix
            assert det.layout == "comfy_prefixed"
            assert det.kind == {"dit": "qwen_image_dit", "vae": "qwen_image_vae", "text_encoder": "qwen2_5_vl"}[expected]


def test_prefixed_file_of_another_component_is_described(tiny_file):
    det = detect(tiny_file("qwen_image_vae", "comfy_prefixed"), "dit")
    with det.source:
        assert det.kind == "qwen_image_vae"
        assert det.describe() == "a Qwen-Image VAE (ComfyUI layout, prefix vae.)"


def test_model_root_needs_a_role(tmp_path):
    root = write_tiny_model_root(tmp_path / "root", "zimage")
    with pytest.raises(UserError, match="model root"):
        detect(root)
    det = detect(root, "vae")
    with det.source:
        assert det.kind == "flux_vae" and det.path == root / "vae"


def test_flags(tiny, tmp_path):
    sd = comfy_state_dict(tiny("qwen_image_dit"), "qwen_image_dit")
    marked = {**sd, "__index_timestep_zero__": torch.empty(0)}
    det = detect(save_file_atomic(marked, tmp_path / "m.safetensors"))
    with det.source:
        assert det.edit_2511_marker and "__index_timestep_zero__" not in det.keymap

    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in sd.items()}
    det = detect(save_file_atomic(fp8, tmp_path / "f.safetensors"))
    with det.source:
        assert det.fp8_weights and not det.fp8_scaled

    scaled = {**fp8, **{k[: -len("weight")] + "scale_weight": torch.ones(()) for k, v in sd.items() if v.ndim == 2}}
    det = detect(save_file_atomic(scaled, tmp_path / "s.safetensors"))
    with det.source:
        assert det.fp8_scaled and det.kind == "qwen_image_dit"
        assert not any(k.endswith("scale_weight") for k in det.keymap)
