"""Saved LoRA files: every layout reads back through lora_files/lora_merge and loads in diffusers."""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import logging
import struct

import pytest
import torch
from lora_helpers import QWEN, ZIMAGE, merged_copy, randomize_up
from safetensors import safe_open

from tsumugi.networks.lora_files import read_lora_file
from tsumugi.networks.lora_merge import merge_lora_modules
from tsumugi.networks.lora_save import LAYOUTS, lora_state_dict, model_hashes, save_lora


def trained(arch, alpha=2.0):
    dit = arch.make_dit()
    dit.requires_grad_(False)
    module = importlib.import_module(arch.network_module)
    net = module.create_network(dit, 4, alpha, None, None)
    randomize_up(net, std=0.1)
    return dit, net


def test_key_forms():
    _, net = trained(ZIMAGE)
    sd = lora_state_dict(net, "musubi")
    assert sd["lora_unet_layers_0_attention_to_q.lora_down.weight"].shape == (4, 64)
    assert sd["lora_unet_layers_1_feed_forward_w2.lora_up.weight"].shape == (64, 4)
    assert float(sd["lora_unet_layers_0_attention_to_out_0.alpha"]) == 2.0
    assert len(sd) == 3 * 14
    sd = lora_state_dict(net)  # Z-Image default
    assert set(k.rsplit(".", 2)[0] for k in sd if k.endswith("lora_A.weight")) >= {
        "diffusion_model.layers.0.attention.to_q",
        "diffusion_model.layers.0.attention.to_out.0",
        "diffusion_model.layers.1.feed_forward.w3",
    }
    assert float(sd["diffusion_model.layers.0.attention.to_q.alpha"]) == 2.0
    sd = lora_state_dict(net, "diffusers", dtype=torch.bfloat16)
    assert len(sd) == 2 * 14 and all(v.dtype == torch.bfloat16 for v in sd.values())
    assert not any(k.endswith("alpha") for k in sd)
    _, qnet = trained(QWEN)
    assert "lora_unet_transformer_blocks_1_txt_mod_1.alpha" in lora_state_dict(qnet)
    with pytest.raises(ValueError, match="layout"):
        lora_state_dict(qnet, "comfy_fused")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_saved_file_merges_like_network(arch, layout, tmp_path):
    dit, net = trained(arch)
    want = merged_copy(dit, net)
    path = save_lora(net, tmp_path / "lora.safetensors", layout)
    modules = read_lora_file(path)
    assert len(modules) == len(net.loras)
    got = copy.deepcopy(dit)
    assert merge_lora_modules(got, modules, 1.0) == len(net.loras)
    for m in net.modules_list():
        torch.testing.assert_close(
            got.get_submodule(m.path).weight, want.get_submodule(m.path).weight, rtol=1e-6, atol=1e-6
        )


def test_atomic_write_and_metadata(tmp_path):
    _, net = trained(QWEN)
    path = tmp_path / "out" / "lora.safetensors"
    meta = {"ss_network_dim": "4", "ss_network_alpha": "2.0", "modelspec.title": "t"}
    save_lora(net, path, metadata=meta, dtype=torch.float16)
    assert sorted(p.name for p in path.parent.iterdir()) == ["lora.safetensors"]
    with safe_open(str(path), framework="pt") as f:
        stored = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert stored["ss_network_dim"] == "4" and stored["modelspec.title"] == "t"
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert (stored["sshs_model_hash"], stored["sshs_legacy_hash"]) == model_hashes(tensors, meta)
    # the model hash covers the tensor bytes after the header, which do not depend on the metadata
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert json.loads(raw[8 : 8 + n])["__metadata__"]["ss_network_alpha"] == "2.0"
    assert hashlib.sha256(raw[8 + n :]).hexdigest() == stored["sshs_model_hash"]
    with pytest.raises(TypeError, match="strings"):
        save_lora(net, path, metadata={"ss_network_dim": 4})
    assert sorted(p.name for p in path.parent.iterdir()) == ["lora.safetensors"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_recorded_and_musubi_incompatibility_said_once(layout, tmp_path, caplog):
    _, net = trained(ZIMAGE)
    with caplog.at_level(logging.WARNING, logger="tsumugi.networks.lora_save"):
        for step in range(3):
            save_lora(net, tmp_path / f"lora{step}.safetensors", layout, metadata={"ss_steps": str(step)})
    told = [r.getMessage() for r in caplog.records if "Musubi Tuner does not" in r.getMessage()]
    assert len(told) == (0 if layout == "musubi" else 1), told
    if told:
        assert f"{layout!r} layout" in told[0] and "--lora_format musubi" in told[0]
    for step in range(3):
        with safe_open(str(tmp_path / f"lora{step}.safetensors"), framework="pt") as f:
            assert f.metadata()["tsumugi.lora_layout"] == layout
    # Musubi's own loader keys modules by the name before the first dot, ``lora_unet_<path with _>``:
    # only the musubi layout names its modules so.
    with safe_open(str(tmp_path / "lora0.safetensors"), framework="pt") as f:
        assert all(k.startswith("lora_unet_") for k in f.keys()) == (layout == "musubi")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _pipeline(arch, transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, ZImagePipeline

    cls = QwenImagePipeline if arch is QWEN else ZImagePipeline
    return cls(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loads_in_diffusers_pipeline(arch, layout, tmp_path):
    pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    dit, net = trained(arch)
    want_model = merged_copy(dit, net)
    path = save_lora(net, tmp_path / "lora.safetensors", layout)

    pipe = _pipeline(arch, copy.deepcopy(dit))
    records = _Records()
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(records)
    try:
        converted = type(pipe).lora_state_dict(str(path))
        pipe.load_lora_weights(str(path), adapter_name="tsumugi")
    finally:
        diffusers_logger.removeHandler(records)
    assert not [m for m in records.messages if "unexpected" in m.lower() or "missing" in m.lower()], (
        records.messages
    )

    transformer = pipe.transformer
    injected = {n for n, mod in transformer.named_modules() if isinstance(mod, LoraLayer)}
    assert injected == {m.path for m in net.modules_list()}
    loaded_keys = set(get_peft_model_state_dict(transformer, adapter_name="tsumugi"))
    file_keys = {k.removeprefix("transformer.") for k in converted}
    assert file_keys == loaded_keys  # nothing missing, nothing unexpected
    assert len(loaded_keys) == 2 * len(net.loras)

    inputs = arch.inputs(1)
    with torch.no_grad():
        got = arch.run(transformer, inputs)
        want = arch.run(want_model, inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_diffusers_layout_loads_without_conversion(arch, tmp_path):
    pytest.importorskip("peft")
    dit, net = trained(arch)
    want_model = merged_copy(dit, net)
    path = save_lora(net, tmp_path / "lora.safetensors", "diffusers")
    transformer = copy.deepcopy(dit)
    transformer.load_lora_adapter(str(path), prefix="transformer", adapter_name="plain")
    inputs = arch.inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(
            arch.run(transformer, inputs), arch.run(want_model, inputs), rtol=1e-5, atol=1e-5
        )
