"""Inputs beyond one file per component: shard sets, diffusers roots and folders, all-in-one files,
prefixes, Edit-2511 markers, pruned DiTs."""

from __future__ import annotations

import json

import pytest
import torch

from tsumugi.models.components import KINDS
from tsumugi.models.configs import config_to_metadata
from tsumugi.models.loader import load_component, load_dit, load_info, load_text_encoder, load_vae
from tsumugi.models.safetensors_write import save_file_atomic
from tsumugi.testing.tiny_models import (
    build_tiny,
    comfy_state_dict,
    model_config,
    save_component,
    write_tiny_model_root,
    write_tiny_set,
)


def test_comfy_shards_from_first_and_middle_shard(tiny, tiny_file, assert_same_state):
    first = tiny_file("qwen2_5_vl", "sharded")
    assert first.name == "qwen2_5_vl-00001-of-00003.safetensors"
    for given in (first, first.with_name("qwen2_5_vl-00002-of-00003.safetensors")):
        model = load_text_encoder(given, "qwen_image", dtype=torch.float32)
        assert_same_state(model, tiny("qwen2_5_vl").state_dict())
        assert len(load_info(model)["files"]) == 3


@pytest.mark.parametrize("component", ["zimage_dit", "qwen3"])
def test_diffusers_sharded_folder_and_index(tiny, tmp_path, assert_same_state, component):
    folder = tmp_path / component
    tiny(component).save_pretrained(str(folder), max_shard_size="200KB")
    index = next(folder.glob("*.safetensors.index.json"))
    assert len(json.loads(index.read_text())["weight_map"]) > 0
    for given in (folder, index):
        model = load_component(given, component, flag="--x", dtype=torch.float32)
        assert_same_state(model, tiny(component).state_dict())
        assert len(load_info(model)["files"]) >= 2


@pytest.mark.parametrize("arch", ["qwen_image", "zimage"])
def test_diffusers_model_root(tmp_path, assert_same_state, arch):
    root = write_tiny_model_root(tmp_path / arch, arch, seed=3)
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] in ("QwenImagePipeline", "ZImagePipeline")
    loaded = {
        "dit": load_dit(root, arch, dtype=torch.float32),
        "vae": load_vae(root, arch),
        "text_encoder": load_text_encoder(root, arch, dtype=torch.float32),
    }
    for role, model in loaded.items():
        kind = load_info(model)["kind"]
        assert KINDS[kind].role == role and KINDS[kind].arch == arch
        assert_same_state(model, build_tiny(kind, seed=3).state_dict())


def test_write_tiny_set(tmp_path):
    files = write_tiny_set(tmp_path, "zimage", fmt="comfy_prefixed")
    assert set(files) == {"dit", "vae", "text_encoder"}
    assert load_info(load_dit(files["dit"], "zimage"))["prefix"] == "model.diffusion_model."
    assert load_info(load_vae(files["vae"], "zimage"))["prefix"] == "vae."
    assert load_info(load_text_encoder(files["text_encoder"], "zimage"))["prefix"] == (
        "text_encoders.qwen3_4b.transformer."
    )


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_dit_prefixes_are_stripped(tiny, tmp_path, assert_same_state, prefix):
    sd = {prefix + k: v for k, v in comfy_state_dict(tiny("zimage_dit"), "zimage_dit").items()}
    meta = config_to_metadata(model_config(tiny("zimage_dit")), "zimage_dit")
    path = save_file_atomic(sd, tmp_path / "z.safetensors", meta)
    model = load_dit(path, "zimage", dtype=torch.float32)
    assert_same_state(model, tiny("zimage_dit").state_dict())
    assert load_info(model)["prefix"] == prefix


def test_all_in_one_checkpoint(tiny, tmp_path, assert_same_state):
    sd, metadata = {}, {}
    for kind in ("zimage_dit", "flux_vae", "qwen3"):
        prefix = KINDS[kind].prefixes[0]
        sd.update({prefix + k: v for k, v in comfy_state_dict(tiny(kind), kind).items()})
        metadata[f"tsumugi.config.{kind}"] = config_to_metadata(model_config(tiny(kind)))["tsumugi.config"]
    path = save_file_atomic(sd, tmp_path / "z_image_aio.safetensors", metadata)
    assert_same_state(load_dit(path, "zimage", dtype=torch.float32), tiny("zimage_dit").state_dict())
    assert_same_state(load_vae(path, "zimage"), tiny("flux_vae").state_dict())
    assert_same_state(load_text_encoder(path, "zimage", dtype=torch.float32), tiny("qwen3").state_dict())


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_edit_2511_marker_is_removed_and_reported(tiny, tmp_path, assert_same_state, prefix):
    sd = comfy_state_dict(tiny("qwen_image_dit"), "qwen_image_dit")
    sd["__index_timestep_zero__"] = torch.empty(0)
    sd = {prefix + k: v for k, v in sd.items()}
    meta = config_to_metadata(model_config(tiny("qwen_image_dit")), "qwen_image_dit")
    path = save_file_atomic(sd, tmp_path / "edit_2511.safetensors", meta)
    model = load_dit(path, "qwen_image", dtype=torch.float32)
    assert_same_state(model, tiny("qwen_image_dit").state_dict())
    assert load_info(model)["edit_2511_marker"] is True
    assert model.config.zero_cond_t is True
    plain = load_dit(save_component(tiny("qwen_image_dit"), "qwen_image_dit", "comfy", tmp_path / "p.safetensors"),
                     "qwen_image")
    assert load_info(plain)["edit_2511_marker"] is False and plain.config.zero_cond_t is False


def test_config_overrides_win(tiny_file):
    model = load_dit(tiny_file("qwen_image_dit", "comfy"), "qwen_image", config_overrides={"zero_cond_t": True})
    assert model.config.zero_cond_t is True


def test_pruned_dit_with_sparse_blocks(tmp_path):
    full = build_tiny("zimage_dit")  # 2 layers
    from tsumugi.models.components import instantiate
    from tsumugi.testing.tiny_configs import tiny_zimage_dit_config

    three = instantiate("zimage_dit", tiny_zimage_dit_config(n_layers=3), empty=False)
    three.load_state_dict(
        {k.replace("layers.1.", "layers.2."): v for k, v in full.state_dict().items()}
        | {k: v for k, v in three.state_dict().items() if k.startswith("layers.1.")}
    )
    sd = {k: v for k, v in comfy_state_dict(three, "zimage_dit").items() if not k.startswith("layers.1.")}
    config = model_config(full)
    path = save_file_atomic(sd, tmp_path / "pruned.safetensors", config_to_metadata(config))
    model = load_dit(path, "zimage", dtype=torch.float32)
    assert load_info(model)["remapped_blocks"] is True
    assert model.config.n_layers == 2
    state = model.state_dict()
    for key, value in full.state_dict().items():
        assert torch.equal(state[key], value), key


def test_qwen3_causal_lm_folder(tiny, tmp_path, assert_same_state):
    """Z-Image's text_encoder/ is saved from Qwen3ForCausalLM: ``model.*`` keys (+ maybe lm_head)."""
    qwen3 = tiny("qwen3")
    folder = tmp_path / "text_encoder"
    sd = {"model." + k: v for k, v in qwen3.state_dict().items()}
    sd["lm_head.weight"] = qwen3.state_dict()["embed_tokens.weight"].clone()
    save_file_atomic(sd, folder / "model.safetensors")
    config = qwen3.config.to_dict() | {"architectures": ["Qwen3ForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config))
    model = load_text_encoder(folder, "zimage", dtype=torch.float32)
    assert_same_state(model, qwen3.state_dict())


def test_qwen_vl_folder_with_runtime_names(tiny, tmp_path, assert_same_state):
    """Some Qwen-Image text_encoder/ folders store ``model.language_model.*`` / ``model.visual.*`` names."""
    vl = tiny("qwen2_5_vl")
    folder = tmp_path / "text_encoder"
    save_file_atomic(vl.state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text(vl.config.to_json_string())
    model = load_text_encoder(folder, "qwen_image", dtype=torch.float32)
    assert_same_state(model, vl.state_dict())
    assert load_info(model)["layout"] == "diffusers"
