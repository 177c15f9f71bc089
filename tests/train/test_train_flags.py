"""Training flags that reach accelerate, the trackers, the metadata and block swap, checked on real runs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from tsumugi.cli.train_config_file import parse_train_args
from tsumugi.cli.train_parser import build_train_parser
from tsumugi.cli.train_validation import validate_train_args
from tsumugi.errors import UserError
from tsumugi.testing.tiny_dataset import write_tiny_dataset
from tsumugi.train.accelerator_options import kwargs_handlers, tracker_config
from tsumugi.train.network_training import train_network
from tsumugi.zimage_cache_latents import main as zimage_latents
from tsumugi.zimage_cache_text_encoder_outputs import main as zimage_text

REPO = Path(__file__).resolve().parents[2]


def _args(*extra: str, arch: str = "zimage", module: str | None = None):
    argv = ["--dit", "dit.safetensors", "--dataset_config", "data.toml", "--output_dir", "out", "--output_name", "x",
            "--network_module", module or f"networks.lora_{arch}", "--mixed_precision", "no", *extra]
    return validate_train_args(parse_train_args(build_train_parser(arch, network=True), argv), environ={})


@pytest.fixture(scope="module")
def zimage_cached(tiny_sets, tmp_path_factory):
    files = tiny_sets("zimage")
    toml = write_tiny_dataset(tmp_path_factory.mktemp("flags"), count=2, sizes=[(64, 64)])
    common = ["--dataset_config", str(toml), "--device", "cpu"]
    assert zimage_latents([*common, "--vae", str(files["vae"])]) == 0
    assert zimage_text([*common, "--text_encoder", str(files["text_encoder"])]) == 0
    return toml, files


def test_tracker_config_metadata_and_ring_size_reach_their_consumers(zimage_cached, tmp_path, caplog):
    from tsumugi.testing.tiny_configs import tiny_zimage_dit_config
    from tsumugi.testing.tiny_models import build_random, save_component

    toml, files = zimage_cached
    dit = build_random("zimage_dit", tiny_zimage_dit_config(n_layers=5))  # 3 of 5 layers can be swapped
    files = dict(files, dit=save_component(dit, "zimage_dit", "comfy", tmp_path / "dit5.safetensors"))
    tracker_toml = tmp_path / "trackers.toml"
    tracker_toml.write_text('[tensorboard]\nfilename_suffix = ".from_tracker_config"\n')
    argv = ["--dit", str(files["dit"]), "--dataset_config", str(toml), "--network_module", "networks.lora_zimage",
            "--network_dim", "2", "--max_train_steps", "2", "--output_dir", str(tmp_path / "out"),
            "--output_name", "lora", "--seed", "1", "--mixed_precision", "no", "--logging_dir", str(tmp_path / "logs"),
            "--log_config", "--log_tracker_config", str(tracker_toml), "--guidance_scale", "3.5",
            "--blocks_to_swap", "3", "--block_swap_ring_size", "3", "--wandb_api_key", "secret-key"]
    with caplog.at_level(logging.INFO):
        args = validate_train_args(parse_train_args(build_train_parser("zimage", network=True), argv), environ={})
        result = train_network("zimage", args)
    messages = [r.getMessage() for r in caplog.records]
    # block swap got the slot count (the swapper's own log line)
    assert any("block swap:" in m and "3 device slots" in m for m in messages), messages
    # --wandb_api_key without wandb logging: a warning, not silence
    assert "--wandb_api_key has no effect without --log_with wandb (or all)" in messages
    # ss_guidance_scale in the LoRA file
    with safe_open(str(result.path), "pt") as f:
        assert f.metadata()["ss_guidance_scale"] == "3.5"
    # --log_tracker_config went to SummaryWriter: its event file carries the suffix
    (run_dir,) = (tmp_path / "logs").iterdir()
    assert list(run_dir.rglob("events.out.*.from_tracker_config")), list(run_dir.rglob("*"))
    # --log_config: accelerate's TensorBoard tracker wrote the settings, paths and secrets left out
    (hparams,) = run_dir.rglob("hparams.yml")
    logged = yaml.safe_load(hparams.read_text())
    assert logged["learning_rate"] == args.learning_rate and logged["guidance_scale"] == 3.5
    assert logged["block_swap_ring_size"] == 3
    assert not {"dit", "dataset_config", "output_dir", "logging_dir", "wandb_api_key"} & set(logged)
    assert "secret-key" not in hparams.read_text()


def test_tracker_config_is_none_without_log_config():
    assert tracker_config(_args()) is None


def test_ddp_timeout_becomes_the_process_group_timeout():
    from accelerate import Accelerator

    (handler,) = kwargs_handlers(_args("--ddp_timeout", "7"))
    assert Accelerator(cpu=True, kwargs_handlers=[handler]).init_handler.timeout == timedelta(minutes=7)
    assert kwargs_handlers(_args()) == []


@pytest.mark.parametrize("extra,match", [
    (["--block_swap_ring_size", "1"], "--block_swap_ring_size: must be >= 2"),
    (["--ddp_timeout", "0"], "--ddp_timeout: must be >= 1"),
    (["--log_with", "tensorboard"], "--log_with tensorboard needs --logging_dir"),
    (["--logging_dir", "logs", "--log_tracker_config", "missing.toml"], "--log_tracker_config: missing.toml not found"),
])
def test_bad_values_are_refused_before_loading(extra, match):
    with pytest.raises(UserError, match=match):
        _args(*extra)


def test_tracker_config_must_hold_tables(tmp_path):
    bad = tmp_path / "t.toml"
    bad.write_text('name = "run"\n')
    with pytest.raises(UserError, match="'name' must be a table"):
        _args("--logging_dir", "logs", "--log_tracker_config", str(bad))


def test_flags_without_their_logger_warn(caplog):
    with caplog.at_level(logging.WARNING):
        _args("--wandb_run_name", "r", "--log_config", "--block_swap_ring_size", "4", "--vae_dtype", "bfloat16")
    messages = [r.getMessage() for r in caplog.records]
    assert "--wandb_run_name has no effect without --log_with wandb (or all)" in messages
    assert "--log_config has no effect without --logging_dir or --log_with" in messages
    assert "--block_swap_ring_size has no effect without --blocks_to_swap" in messages
    assert any(m.startswith("--vae_dtype has no effect") for m in messages)


@pytest.mark.parametrize("arch,wrong,right", [("qwen_image", "networks.lora_zimage", "networks.lora_qwen_image"),
                                              ("zimage", "networks.lora_qwen_image", "networks.lora_zimage")])
def test_network_module_of_the_other_family_names_the_right_one(arch, wrong, right):
    with pytest.raises(UserError) as info:
        _args(arch=arch, module=wrong)
    message = str(info.value)
    assert f"--network_module {wrong} is the" in message and f"use --network_module {right}" in message
    assert "pattern" not in message


def test_user_error_under_accelerate_launch_is_one_line(tmp_path):
    """As documented: ``accelerate launch --quiet`` shows our one-line error and no traceback."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--num_processes", "1", "--cpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--num_cpu_threads_per_process", "1", str(REPO / "src/tsumugi/zimage_train_network.py"),
               "--dit", "dit.safetensors", "--dataset_config", "data.toml", "--network_module", "networks.lora_zimage",
               "--output_dir", str(tmp_path), "--output_name", "x", "--optimizer_type", "no_such_package.Optimizer"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--optimizer_type" in errors[0] and "no_such_package" in errors[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout
