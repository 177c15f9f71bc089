"""Every user-facing loading error: one line naming the flag, the file, what it is and what was expected."""

from __future__ import annotations

import re

import pytest
import torch

from tsumugi.errors import UserError
from tsumugi.models.loader import load_dit, load_text_encoder, load_vae
from tsumugi.models.safetensors_io import open_safetensors
from tsumugi.models.safetensors_write import save_file_atomic
from tsumugi.testing.tiny_models import comfy_state_dict


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_vae_passed_as_dit(tiny_file):
    path = tiny_file("qwen_image_vae", "comfy")
    with pytest.raises(UserError) as e:
        load_dit(path, "qwen_image")
    assert _one_line(e) == f"--dit: {path} is a Qwen-Image VAE (ComfyUI layout), expected a Qwen-Image DiT"


def test_zimage_dit_into_qwen_loader(tiny_file):
    path = tiny_file("zimage_dit", "comfy")
    with pytest.raises(UserError) as e:
        load_dit(path, "qwen_image", flag="--dit")
    assert _one_line(e) == f"--dit: {path} is a Z-Image DiT (ComfyUI layout), expected a Qwen-Image DiT"


def test_wrong_text_encoder(tiny_file):
    path = tiny_file("qwen3", "diffusers")
    with pytest.raises(UserError) as e:
        load_text_encoder(path, "qwen_image")
    assert _one_line(e) == (
        f"--text_encoder: {path} is a Qwen3 text encoder (transformers layout), expected a Qwen2.5-VL text encoder"
    )


def test_flux_vae_into_qwen_vae(tiny_file):
    path = tiny_file("flux_vae", "diffusers")
    with pytest.raises(UserError, match=r"^--vae: .* is a FLUX VAE \(Z-Image\) \(diffusers layout\), expected a Qwen-Image VAE$"):
        load_vae(path, "qwen_image")


def test_unknown_file(tmp_path):
    path = save_file_atomic({"foo.weight": torch.zeros(2)}, tmp_path / "lora.safetensors")
    with pytest.raises(UserError, match=r"^--dit: .*lora.safetensors is not a model file we recognise \(keys such as 'foo.weight'\), expected a Z-Image DiT$"):
        load_dit(path, "zimage")


def test_truncated_file(tiny_file, tmp_path):
    data = tiny_file("zimage_dit", "comfy").read_bytes()
    path = tmp_path / "partial.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        load_dit(path, "zimage")
    assert re.match(rf"--dit: {re.escape(str(path))} is truncated", _one_line(e))


def test_fp8_scaled_not_supported(tiny, tmp_path):
    sd = comfy_state_dict(tiny("zimage_dit"), "zimage_dit")
    scaled = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in sd.items()}
    scaled.update({k.removesuffix("weight") + "scale_weight": torch.ones(()) for k, v in sd.items() if v.ndim == 2})
    path = save_file_atomic(scaled, tmp_path / "z_fp8_scaled.safetensors")
    with pytest.raises(UserError) as e:
        load_dit(path, "zimage")
    message = _one_line(e)
    assert message.startswith(f"--dit: {path} is an fp8_scaled checkpoint")
    assert "not supported yet" in message


def test_plain_fp8_weights_are_upcast(tiny, tmp_path):
    sd = comfy_state_dict(tiny("qwen_image_dit"), "qwen_image_dit")
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in sd.items()}
    from tsumugi.models.configs import config_to_metadata
    from tsumugi.testing.tiny_configs import tiny_qwen_image_dit_config

    # the tiny RoPE split is not provable from shapes: store the config as any tiny file does
    path = save_file_atomic(fp8, tmp_path / "q_fp8.safetensors", config_to_metadata(tiny_qwen_image_dit_config()))
    model = load_dit(path, "qwen_image", dtype=torch.float32)
    state = model.state_dict()
    for key, value in fp8.items():
        assert torch.equal(state[key], value.to(torch.float32)), key
    assert model._tsumugi_info["fp8_weights"]


def test_missing_file(tmp_path):
    with pytest.raises(UserError) as e:
        load_vae(tmp_path / "nope.safetensors", "zimage")
    assert _one_line(e) == f"--vae: {tmp_path / 'nope.safetensors'} does not exist"


def test_folder_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError) as e:
        load_dit(tmp_path, "qwen_image")
    assert _one_line(e) == f"--dit: {tmp_path} is a folder without .safetensors files"


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(UserError, match=r"^--dit: .*model.ckpt is not a \.safetensors file"):
        load_dit(path, "qwen_image")


def test_folder_with_several_weight_files(tiny_file, tmp_path):
    data = tiny_file("flux_vae", "comfy").read_bytes()
    (tmp_path / "a.safetensors").write_bytes(data)
    (tmp_path / "b.safetensors").write_bytes(data)
    with pytest.raises(UserError, match="several weight files .*pass the file itself"):
        load_vae(tmp_path, "zimage")


def test_model_root_without_component(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match=r"model root without a vae/ folder"):
        load_vae(tmp_path, "qwen_image")


def test_missing_and_unexpected_keys(tiny, tmp_path):
    sd = comfy_state_dict(tiny("qwen_image_vae"), "qwen_image_vae")
    del sd["decoder.head.2.bias"]
    sd["encoder.extra.weight"] = torch.zeros(1)
    path = save_file_atomic(sd, tmp_path / "broken_vae.safetensors")
    with pytest.raises(UserError) as e:
        load_vae(path, "qwen_image")
    message = _one_line(e)
    assert message.startswith(f"--vae: {path} does not match the Qwen-Image VAE model")
    assert "1 missing keys (e.g. decoder.conv_out.bias)" in message
    assert "1 unexpected keys (e.g. encoder.extra.weight)" in message


def test_bad_config_metadata(tiny, tmp_path):
    sd = comfy_state_dict(tiny("flux_vae"), "flux_vae")
    path = save_file_atomic(sd, tmp_path / "v.safetensors", {"tsumugi.config": "{not json"})
    with pytest.raises(UserError, match=r"^--vae: .*v.safetensors: metadata 'tsumugi.config' is not a valid JSON"):
        load_vae(path, "zimage")


def test_header_only_errors_happen_before_reading_data(tiny_file, monkeypatch):
    """A wrong file is refused from its header: no tensor is read."""
    from tsumugi.models import safetensors_io

    def fail(*args, **kwargs):
        raise AssertionError("tensor data read")

    monkeypatch.setattr(safetensors_io.SafetensorsSource, "get", fail)
    with pytest.raises(UserError):
        load_dit(tiny_file("qwen2_5_vl", "comfy"), "zimage")
    with open_safetensors(tiny_file("qwen2_5_vl", "comfy")) as src:
        assert len(src) > 0


def _without_metadata(path, tmp_path, name="bare.safetensors"):
    from safetensors.torch import load_file, save_file

    bare = tmp_path / name
    save_file(load_file(str(path)), str(bare))  # same tensors, no tsumugi.config
    return bare


@pytest.mark.parametrize(("component", "arch", "key"), [("zimage_dit", "zimage", "axes_dims"),
                                                        ("qwen_image_dit", "qwen_image", "axes_dims_rope")])
def test_dit_with_unreleased_heads_and_no_config_is_refused_at_load(tiny_file, tmp_path, component, arch, key):
    """The tiny DiTs have 2 heads of 32 (the releases: 128-wide heads, RoPE axes summing to 128): the
    shapes prove the head size, but not how RoPE splits it. Without the stored config the loader must
    say so, not build a model that fails at its first forward."""
    path = tiny_file(component, "comfy")
    load_dit(path, arch)  # with its tsumugi.config metadata it loads
    bare = _without_metadata(path, tmp_path)
    with pytest.raises(UserError) as e:
        load_dit(bare, arch)
    message = _one_line(e)
    assert message.startswith(f"--dit: {bare}: cannot determine the RoPE split {key}")
    assert "head size is 32" in message and "config.json" in message and "'tsumugi.config'" in message


def test_zimage_dit_without_qk_norm_and_unknown_head_count_is_refused(tmp_path):
    from diffusers import ZImageTransformer2DModel
    from safetensors.torch import save_file

    from tsumugi.testing.tiny_configs import tiny_zimage_dit_config

    config = {**tiny_zimage_dit_config(), "qk_norm": False}
    path = tmp_path / "no_qk_norm.safetensors"
    save_file({k: v.contiguous() for k, v in ZImageTransformer2DModel(**config).state_dict().items()}, str(path))
    with pytest.raises(UserError) as e:
        load_dit(path, "zimage")
    message = _one_line(e)
    assert "cannot determine the attention head count n_heads" in message and "width 64" in message
