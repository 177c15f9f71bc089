"""A trained LoRA carries every ``ss_*`` key Musubi Tuner writes, the model hashes and its layout."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from safetensors import safe_open
from test_train_network import cached, run  # noqa: F401  (cached is a fixture)

MUSUBI_KEYS = json.loads((Path(__file__).with_name("musubi_lora_ss_keys.json")).read_text())


def _old_webui_hash(path: Path) -> str:
    """stable-diffusion-webui's "old" model hash, computed here independently."""
    data = path.read_bytes()
    return hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_trained_lora_has_musubis_full_key_set(cached, tmp_path, caplog):  # noqa: F811
    toml, files = cached("zimage")
    with caplog.at_level(logging.WARNING, logger="tsumugi.networks.lora_save"):
        run("zimage", toml, files, tmp_path, "--max_train_steps", "2", "--save_every_n_steps", "1",
            "--vae", str(files["vae"]), "--network_args", "loraplus_lr_ratio=4")
    saved = sorted(tmp_path.glob("*.safetensors"))
    assert len(saved) == 2  # the step-1 file and the final one
    told = [r.getMessage() for r in caplog.records if "Musubi Tuner does not" in r.getMessage()]
    assert len(told) == 1 and "'diffusion_model' layout" in told[0], told  # once per run, not per file
    meta = _metadata(tmp_path / "lora.safetensors")
    wanted = set(MUSUBI_KEYS["always"]) | set(MUSUBI_KEYS["when_given"])
    assert wanted - meta.keys() == set()
    assert meta["ss_network_dropout"] == "None" and meta["ss_training_comment"] == "None"  # as Musubi writes them
    assert meta["ss_full_fp16"] == "False" and meta["ss_gradient_checkpointing_cpu_offload"] == "False"
    assert json.loads(meta["ss_network_args"]) == {"loraplus_lr_ratio": "4"}
    assert meta["ss_sd_model_hash"] == _old_webui_hash(files["dit"])
    assert meta["ss_vae_hash"] == _old_webui_hash(files["vae"])
    assert meta["ss_sd_model_name"] == files["dit"].name and meta["ss_vae_name"] == files["vae"].name
    assert meta["tsumugi.dit_identity"].startswith(files["dit"].name + ":")
    assert meta["tsumugi.lora_layout"] == "diffusion_model"


def test_no_metadata_keeps_musubis_minimum(cached, tmp_path):  # noqa: F811
    toml, files = cached("zimage")
    run("zimage", toml, files, tmp_path, "--max_train_steps", "1", "--no_metadata", "--lora_format", "musubi")
    meta = _metadata(tmp_path / "lora.safetensors")
    ss = {k for k in meta if k.startswith("ss_")}
    assert ss == set(MUSUBI_KEYS["minimum"]) - {"ss_network_args"}
    assert meta["tsumugi.lora_layout"] == "musubi"
