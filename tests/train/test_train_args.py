"""Training-script flags: Musubi defaults, --config_file precedence, and rejected combinations.

See docs/training.md.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from tsumugi.cli.train_config_file import parse_train_args
from tsumugi.cli.train_parser import build_train_parser
from tsumugi.cli.train_validation import resolve_lora_layout, resolve_mixed_precision, validate_train_args
from tsumugi.errors import UserError
from tsumugi.train.lr_schedulers import steps_or_ratio

SCRIPTS = [("qwen_image", True), ("qwen_image", False), ("zimage", True), ("zimage", False)]


def _parse(arch: str = "zimage", network: bool = True, *argv: str):
    return parse_train_args(build_train_parser(arch, network=network), list(argv))


def _base(arch: str, network: bool) -> list[str]:
    argv = ["--dit", "dit.safetensors", "--dataset_config", "data.toml", "--output_dir", "out", "--output_name", "x"]
    if network:
        argv += ["--network_module", f"networks.lora_{arch}"]
    return argv


def _validate(arch: str, network: bool, *extra: str, environ: dict[str, str] | None = None):
    args = _parse(arch, network, *_base(arch, network), *extra)
    return validate_train_args(args, environ={} if environ is None else environ)


# ---------------------------------------------------------------------------------------------- parser


@pytest.mark.parametrize("arch,network", SCRIPTS)
def test_defaults_match_the_spec_tables(arch, network):
    args = _parse(arch, network)
    expected = {
        "dit": None, "vae": None, "vae_dtype": None, "text_encoder": None, "dataset_config": None, "config_file": None,
        "max_train_steps": 1600, "max_train_epochs": None, "max_data_loader_n_workers": 8, "seed": None,
        "gradient_checkpointing": False, "gradient_accumulation_steps": 1, "mixed_precision": None,
        "save_precision": None, "guidance_scale": 1.0, "show_timesteps": None,
        "optimizer_type": "", "optimizer_args": None, "learning_rate": 2.0e-6, "max_grad_norm": 1.0,
        "lr_scheduler": "constant", "lr_warmup_steps": 0, "lr_decay_steps": 0, "lr_scheduler_num_cycles": 1,
        "lr_scheduler_power": 1, "lr_scheduler_timescale": None, "lr_scheduler_min_lr_ratio": None,
        "lr_scheduler_type": "", "lr_scheduler_args": None,
        "save_every_n_epochs": None, "save_state": False, "resume": None,
        "log_with": None, "log_tracker_name": None, "sample_at_first": False,
        "timestep_sampling": "sigma", "discrete_flow_shift": 1.0, "sigmoid_scale": 1.0, "weighting_scheme": "none",
        "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, "min_timestep": None, "max_timestep": None,
        "preserve_distribution_shape": False, "num_timestep_buckets": None,
        "fp8_base": False, "fp8_scaled": False, "blocks_to_swap": None, "block_swap_ring_size": 2,
        "block_swap_h2d_only": False, "compile": False, "compile_backend": "inductor", "compile_mode": "default",
        "compile_dynamic": None, "compile_cache_size_limit": None, "dynamo_backend": "NO", "dynamo_mode": None,
        "sdpa": False, "flash_attn": False, "sage_attn": False, "xformers": False, "flash3": False, "split_attn": False,
        "metadata_title": None, "huggingface_repo_id": None, "ddp_timeout": None, "tokenizer": None,
    }
    if network:
        expected.update(network_module=None, network_dim=None, network_alpha=1, network_dropout=None,
                        network_args=None, network_weights=None, dim_from_weights=False, base_weights=None,
                        base_weights_multiplier=None, no_metadata=False, lora_format="default")
    else:
        expected.update(full_bf16=False, fused_backward_pass=False, mem_eff_save=False)
    if arch == "qwen_image":
        expected.update(model_version=None, edit=False, edit_plus=False, fp8_vl=False, num_layers=None,
                        remove_first_image_from_target=False)
    else:
        expected.update(fp8_llm=False, use_32bit_attention=False)
    assert {k: getattr(args, k) for k in expected} == expected
    assert args.arch_name == arch and args.network_training is network


def test_flag_sets_per_script():
    qwen_lora = vars(_parse("qwen_image", True))
    qwen_full = vars(_parse("qwen_image", False))
    z_lora = vars(_parse("zimage", True))
    z_full = vars(_parse("zimage", False))
    assert "network_module" not in qwen_full and "lora_format" not in z_full
    assert "full_bf16" not in qwen_lora and "mem_eff_save" not in z_lora
    assert "block_swap_optimizer_patch_params" in z_full and "block_swap_optimizer_patch_params" in qwen_full
    assert "block_swap_optimizer_patch_params" not in z_lora
    assert "use_32bit_attention" not in qwen_lora and "model_version" not in z_lora
    assert build_train_parser("zimage", network=False).prog == "zimage_train"
    assert build_train_parser("qwen_image", network=True).prog == "qwen_image_train_network"


def test_hyphen_aliases_prefixes_and_list_flags():
    args = _parse("zimage", True, "--blocks-to-swap", "3", "--tokenizer_path", "tok", "--network-args", "a=1", "b=2",
                  "--lr-warmup-steps", "10%", "--base_weights_multiplier", "0.5", "1")
    assert args.blocks_to_swap == 3 and args.tokenizer == "tok"
    assert args.network_args == ["a=1", "b=2"] and args.lr_warmup_steps == pytest.approx(0.1)
    assert args.base_weights_multiplier == [0.5, 1.0]
    # a prefix shared only by a flag and its own alias is not ambiguous (Musubi accepts '--blocks')
    assert _parse("zimage", True, "--blocks", "4").blocks_to_swap == 4
    assert "--blocks-to-swap" not in build_train_parser("zimage", network=True).format_help()


def test_argparse_errors_are_user_errors():
    with pytest.raises(UserError, match="--mixed_precision"):
        _parse("zimage", True, "--mixed_precision", "fp8")
    with pytest.raises(UserError, match="unrecognized"):
        _parse("zimage", False, "--network_dim", "4")
    with pytest.raises(UserError, match="--lr_warmup_steps"):
        _parse("zimage", True, "--lr_warmup_steps", "1.5")


@pytest.mark.parametrize("text,value", [("0", 0), ("5", 5), ("5.0", 5), ("0.25", 0.25), ("10%", 0.1), ("100%", 1.0)])
def test_steps_or_ratio(text, value):
    result = steps_or_ratio(text)
    assert result == pytest.approx(value) and type(result) is type(value)


@pytest.mark.parametrize("text", ["1.5", "-1", "abc", "150%", "nan", "x%"])
def test_steps_or_ratio_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        steps_or_ratio(text)


# ---------------------------------------------------------------------------------------------- config file


def _write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_config_file_precedence_sections_and_lists(tmp_path):
    path = _write(tmp_path, """
max_data_loader_n_workers = 2
[model]
dit = "from_file.safetensors"
blocks-to-swap = 5
[training]
max_train_steps = 10
learning_rate = 1e-4
lr_warmup_steps = "10%"
lr_decay_steps = 3.0
sdpa = true
compile_dynamic = true
metadata_reso = 1024
optimizer_args = ["weight_decay=0.01", "betas=(0.9,0.99)"]
network_args = "loraplus_lr_ratio=4"
base_weights_multiplier = [1, 0.5]
""")
    args = _parse("zimage", True, "--config_file", str(path.with_suffix("")), "--learning_rate", "3e-4")
    assert args.config_file == str(path)
    assert args.dit == "from_file.safetensors"  # file replaces the default
    assert args.max_train_steps == 10 and args.max_data_loader_n_workers == 2 and args.blocks_to_swap == 5
    assert args.learning_rate == pytest.approx(3e-4)  # the command line wins
    assert args.lr_warmup_steps == pytest.approx(0.1) and args.lr_decay_steps == 3 and type(args.lr_decay_steps) is int
    assert args.sdpa is True and args.compile_dynamic == "true" and args.metadata_reso == "1024"
    assert args.optimizer_args == ["weight_decay=0.01", "betas=(0.9,0.99)"]
    assert args.network_args == ["loraplus_lr_ratio=4"]
    assert args.base_weights_multiplier == [1.0, 0.5]
    assert args.gradient_accumulation_steps == 1  # untouched default
    # command-line list replaces the file's list
    args = _parse("zimage", True, "--config_file", str(path), "--optimizer_args", "eps=1e-6")
    assert args.optimizer_args == ["eps=1e-6"]


def test_config_file_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = _write(tmp_path, "[train]\nlearning_rat = 1e-4\n")
    with pytest.raises(UserError) as exc:
        _parse("qwen_image", True, "--config_file", str(path))
    message = str(exc.value)
    assert "learning_rat" in message and str(path) in message and "learning_rate" in message


def test_config_file_key_of_another_script(tmp_path, caplog):
    path = _write(tmp_path, "model_version = 'edit'\n")
    with pytest.raises(UserError, match="model_version.*qwen_image_train_network.*not of zimage_train"):
        _parse("zimage", False, "--config_file", str(path))
    # the LoRA keys of a file shared by LoRA and full runs are unused in full fine-tuning, not an error
    path = _write(tmp_path, "network_dim = 16\n")
    with caplog.at_level("WARNING"):
        _parse("zimage", False, "--config_file", str(path))
    assert "'network_dim' is unused: a LoRA training flag, and zimage_train is full fine-tuning" in caplog.text


@pytest.mark.parametrize("text,match", [
    ("max_train_steps = 'many'", "max_train_steps.*integer"),
    ("max_train_steps = 1.5", "max_train_steps.*integer"),
    ("sdpa = 1", "sdpa.*true or false"),
    ("mixed_precision = 'fp8'", "mixed_precision.*not one of"),
    ("learning_rate = [1, 2]", "learning_rate.*one value"),
    ("lr_warmup_steps = '1.5'", "lr_warmup_steps"),
    ("config_file = 'other'", "config_file"),
    ("[a]\n[a.b]\nx = 1", "table"),
    ("dit = ", "not valid TOML"),
])
def test_config_file_bad_values(tmp_path, text, match):
    path = _write(tmp_path, text + "\n")
    with pytest.raises(UserError, match=match):
        _parse("zimage", True, "--config_file", str(path))


def test_config_file_missing_and_duplicate_keys(tmp_path, caplog):
    with pytest.raises(UserError, match="nothere.toml not found"):
        _parse("zimage", True, "--config_file", str(tmp_path / "nothere"))
    path = _write(tmp_path, "[a]\nseed = 1\n[b]\nseed = 2\n")
    with caplog.at_level(logging.WARNING, logger="tsumugi.cli.train_validation"):
        assert _parse("zimage", True, "--config_file", str(path)).seed == 2
    assert "seed" in caplog.text


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("arch,network,argv,flags", [
    ("zimage", True, ["--fp8_scaled"], ["--fp8_scaled", "--fp8_base"]),
    ("qwen_image", True, ["--block_swap_h2d_only"], ["--block_swap_h2d_only", "--gradient_checkpointing"]),
    ("zimage", False, ["--block_swap_h2d_only", "--gradient_checkpointing"], ["--block_swap_h2d_only", "zimage_train"]),
    ("zimage", True, ["--gradient_checkpointing_cpu_offload"],
     ["--gradient_checkpointing_cpu_offload", "--gradient_checkpointing"]),
    ("zimage", True, ["--sage_attn"], ["--sage_attn", "--sdpa"]),
    ("zimage", True, ["--sdpa", "--sage_attn"], ["--sage_attn"]),
    ("qwen_image", True, ["--flash3"], ["--flash3", "Qwen-Image"]),
    ("zimage", True, ["--compile_fullgraph", "--split_attn"], ["--compile_fullgraph", "--split_attn"]),
    ("zimage", False, ["--full_bf16"], ["--full_bf16", "--mixed_precision bf16"]),
    ("qwen_image", False, ["--full_bf16", "--mixed_precision", "fp16"], ["--full_bf16", "--mixed_precision"]),
    ("zimage", True, ["--resume", "/no/such/state"], ["--resume", "/no/such/state"]),
    ("zimage", True, ["--max_train_steps", "0"], ["--max_train_steps"]),
    ("zimage", True, ["--max_train_epochs", "0"], ["--max_train_epochs"]),
    ("zimage", True, ["--save_last_n_epochs", "2"], ["--save_last_n_epochs", "--save_every_n_epochs"]),
    ("zimage", True, ["--save_last_n_epochs_state", "2"], ["--save_last_n_epochs_state", "--save_every_n_epochs"]),
    ("zimage", True, ["--save_last_n_steps", "100"], ["--save_last_n_steps", "--save_every_n_steps"]),
    ("zimage", True, ["--save_last_n_steps_state", "100"], ["--save_last_n_steps_state", "--save_every_n_steps"]),
    ("zimage", True, ["--save_every_n_steps", "5", "--save_last_n_steps_state", "10"],
     ["--save_last_n_steps_state", "--save_state"]),
    ("zimage", True, ["--lr_warmup_steps", "10"], ["--lr_warmup_steps", "--lr_scheduler constant"]),
    ("zimage", True, ["--lr_warmup_steps", "0.1", "--lr_scheduler", "adafactor"],
     ["--lr_warmup_steps", "--lr_scheduler adafactor"]),
    ("zimage", True, ["--dim_from_weights"], ["--dim_from_weights", "--network_weights"]),
    ("zimage", True, ["--network_weights", "/no/such.safetensors"], ["--network_weights"]),
    ("zimage", True, ["--base_weights", "a", "b", "--base_weights_multiplier", "1"],
     ["--base_weights_multiplier", "--base_weights"]),
    ("zimage", False, ["--fused_backward_pass", "--optimizer_type", "adafactor", "--mixed_precision", "fp16"],
     ["--fused_backward_pass", "--mixed_precision fp16", "bf16"]),
    ("qwen_image", False, ["--fused_backward_pass"], ["--fused_backward_pass", "--optimizer_type"]),
    ("qwen_image", True, ["--remove_first_image_from_target"],
     ["--remove_first_image_from_target", "--model_version layered"]),
    ("qwen_image", True, ["--model_version", "edit-2512"], ["--model_version", "edit-2511"]),
    ("qwen_image", True, ["--blocks_to_swap", "60"], ["--blocks_to_swap", "0..59"]),
    ("qwen_image", True, ["--num_layers", "20", "--blocks_to_swap", "20"], ["--blocks_to_swap", "0..19"]),
    ("zimage", True, ["--blocks_to_swap", "29"], ["--blocks_to_swap", "0..28"]),
    ("zimage", True, ["--sample_every_n_steps", "10"], ["--sample_every_n_steps", "--sample_prompts"]),
    ("zimage", True, ["--sample_at_first", "--sample_prompts", "p.txt"], ["--sample_prompts", "--vae"]),
    ("zimage", True, ["--timestep_sampling", "flux2_shift"], ["--timestep_sampling"]),
    ("zimage", True, ["--min_timestep", "500", "--max_timestep", "100"], ["--min_timestep", "--max_timestep"]),
    ("zimage", True, ["--max_grad_norm", "-1"], ["--max_grad_norm"]),
    ("zimage", True, ["--optimizer_args", "betas"], ["--optimizer_args", "'betas'"]),
    ("zimage", True, ["--lr_scheduler_args", "gamma=a=b"], ["--lr_scheduler_args", "'gamma=a=b'"]),
    ("zimage", True, ["--optimizer_type", "AdamW8bit"], ["--optimizer_type", "pip install bitsandbytes"]),
    ("zimage", True, ["--lr_scheduler", "cosin"], ["--lr_scheduler", "cosine"]),
    ("zimage", True, ["--lr_scheduler", "adafactor"], ["--lr_scheduler adafactor", "--optimizer_type AdaFactor"]),
    ("zimage", True, ["--lr_scheduler", "piecewise_constant", "--lr_warmup_steps", "3"],
     ["--lr_warmup_steps", "--lr_scheduler piecewise_constant"]),
    ("zimage", True, ["--optimizer_type", "adafactor", "--lr_scheduler", "cosine", "--lr_warmup_steps", "3"],
     ["--lr_warmup_steps", "--optimizer_type AdaFactor"]),
])
def test_invalid_combinations_name_the_flags(arch, network, argv, flags):
    with pytest.raises(UserError) as exc:
        _validate(arch, network, *argv)
    for flag in flags:
        assert flag in str(exc.value), (flag, str(exc.value))


@pytest.mark.parametrize("drop,flag", [("--dit", "--dit"), ("--dataset_config", "--dataset_config"),
                                       ("--network_module", "--network_module"), ("--output_dir", "--output_dir")])
def test_required_flags(drop, flag):
    argv = _base("zimage", True)
    i = argv.index(drop)
    del argv[i:i + 2]
    with pytest.raises(UserError, match=flag):
        validate_train_args(_parse("zimage", True, *argv), environ={})


def test_show_timesteps_needs_no_output():
    args = _parse("zimage", True, "--dit", "d", "--dataset_config", "c", "--network_module", "networks.lora_zimage",
                 "--show_timesteps", "console")
    validate_train_args(args, environ={})


def test_mixed_precision_resolution():
    assert _validate("zimage", True).mixed_precision == "no"
    assert _validate("zimage", True, environ={"ACCELERATE_MIXED_PRECISION": "bf16"}).mixed_precision == "bf16"
    # the script flag wins over accelerate's
    args = _validate("zimage", True, "--mixed_precision", "fp16", environ={"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert args.mixed_precision == "fp16"
    # full_bf16 passes when accelerate supplies bf16
    assert _validate("zimage", False, "--full_bf16", environ={"ACCELERATE_MIXED_PRECISION": "bf16"}).full_bf16
    with pytest.raises(UserError, match="--mixed_precision.*fp8"):
        _validate("zimage", True, environ={"ACCELERATE_MIXED_PRECISION": "fp8"})
    with pytest.raises(UserError, match="--mixed_precision"):
        resolve_mixed_precision(argparse.Namespace(mixed_precision="bf32"), {})


def test_mixed_precision_reads_os_environ(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    args = _parse("zimage", True, *_base("zimage", True))
    assert validate_train_args(args).mixed_precision == "fp16"


def test_attention_default_and_precedence(caplog):
    args = _validate("zimage", True)
    assert args.sdpa is True and args.attn_mode == "torch"
    with caplog.at_level(logging.WARNING, logger="tsumugi.cli.train_validation"):
        args = _validate("zimage", True, "--xformers", "--flash_attn", "--flash3")
    assert args.attn_mode == "flash" and args.flash_attn and not args.xformers and not args.flash3
    assert "--flash_attn" in caplog.text
    assert _validate("zimage", True, "--xformers", "--flash3").attn_mode == "xformers"
    assert _validate("zimage", True, "--flash3").attn_mode == "flash3"
    assert _validate("qwen_image", True, "--sdpa", "--flash_attn").attn_mode == "torch"


def test_resolved_values(tmp_path, caplog):
    args = _validate("qwen_image", True, "--edit_plus")
    assert args.model_version == "edit-2509" and args.is_edit and not args.is_layered
    assert args.lora_layout == "musubi"
    args = _validate("qwen_image", True, "--model_version", "Layered", "--remove_first_image_from_target")
    assert args.model_version == "layered" and args.is_layered
    assert _validate("zimage", True).lora_layout == "diffusion_model"
    assert _validate("zimage", True, "--lora_format", "musubi").lora_layout == "musubi"
    assert resolve_lora_layout("zimage", "comfyui") == "diffusion_model"
    assert resolve_lora_layout("qwen_image", "diffusers") == "diffusers"
    with caplog.at_level(logging.WARNING, logger="tsumugi.cli.train_validation"):
        args = _validate("qwen_image", False, "--fp8_base", "--fp8_scaled")
    assert not args.fp8_base and not args.fp8_scaled and "full fine-tuning" in caplog.text
    state = tmp_path / "state"
    state.mkdir()
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    args = _validate("zimage", True, "--resume", str(state), "--network_weights", str(weights), "--dim_from_weights",
                     "--save_every_n_epochs", "1", "--save_last_n_epochs", "2", "--lr_scheduler", "cosine",
                     "--lr_warmup_steps", "10", "--block_swap_h2d_only", "--gradient_checkpointing",
                     "--gradient_checkpointing_cpu_offload", "--fp8_base", "--fp8_scaled", "--blocks_to_swap", "28")
    assert args.blocks_to_swap == 28
    _validate("zimage", False, "--fused_backward_pass", "--optimizer_type", "AdaFactor", "--full_bf16",
              "--mixed_precision", "bf16", "--block_swap_optimizer_patch_params")
    # unlike Musubi, the fused backward pass accumulates gradients
    args = _validate("qwen_image", False, "--fused_backward_pass", "--optimizer_type", "adafactor",
                     "--gradient_accumulation_steps", "4")
    assert args.gradient_accumulation_steps == 4
    # warmup with a scheduler given by class is not checked against --lr_scheduler
    _validate("zimage", True, "--lr_warmup_steps", "5", "--lr_scheduler_type", "StepLR")
