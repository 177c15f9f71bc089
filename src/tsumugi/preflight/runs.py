"""The checks each script runs first: every file it will read and every folder it will write.

Each ``check_*`` function is called at the start of its script, before any model is loaded or any step
runs, and raises :class:`~tsumugi.errors.UserError` (exit 2) for the first problem found.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence

import torch

from tsumugi.errors import UserError
from tsumugi.preflight.estimates import check_image_memory, dit_save_bytes, lora_save_bytes, png_bytes
from tsumugi.preflight.models import check_any_dit, check_lora, check_model, lora_rank
from tsumugi.preflight.paths import require_file, require_output_dir, require_output_file
from tsumugi.train.config import TrainConfig

logger = logging.getLogger(__name__)

_SAVE_DTYPES = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_number(value: float | int | None, flag: str, *, minimum: float | None = None, above: float | None = None,
                 what: str = "a number") -> None:
    """``value`` (if given) must be finite and ``>= minimum`` / ``> above``."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (above is None or value > above)
    if not ok:
        raise UserError(f"{flag}: {value!r} is not valid; expected {what}")


# ---- training ---------------------------------------------------------------------------------
# flag -> (minimum, whether it is excluded); None: any finite number. argparse's float() takes "nan"/"inf".
_TRAIN_NUMBERS = {
    "learning_rate": (0, False), "max_grad_norm": (0, False), "guidance_scale": (0, False),
    "discrete_flow_shift": (0, True), "sigmoid_scale": (0, True), "logit_mean": None, "logit_std": (0, True),
    "mode_scale": None, "lr_scheduler_power": None, "lr_scheduler_min_lr_ratio": (0, False),
    "network_alpha": None, "network_dropout": (0, False), "scale_weight_norms": (0, True),
}


def check_training_numbers(args: argparse.Namespace) -> None:
    """The float training flags are finite and in range."""
    for name, bound in _TRAIN_NUMBERS.items():
        minimum, exclusive = bound or (None, False)
        what = "a finite number" + ("" if minimum is None else f" {'>' if exclusive else '>='} {minimum}")
        check_number(getattr(args, name, None), f"--{name}", minimum=None if exclusive else minimum,
                     above=minimum if exclusive else None, what=what)
    for value in getattr(args, "base_weights_multiplier", None) or []:
        check_number(value, "--base_weights_multiplier", what="finite numbers")


def check_training(arch: str, args: TrainConfig) -> None:
    """``*_train_network`` / ``*_train``: numbers, DiT, sample models and prompts, LoRA inputs, output folders."""
    network = args.network_training
    check_training_numbers(args)
    dit = check_model(args.dit, arch, "dit", "--dit")
    if args.dataset_config:
        require_file(args.dataset_config, "--dataset_config", "dataset config file (.toml or .json)")

    if args.sample_prompts:
        _check_sample_prompts(arch, args)

    rank = None
    if network:
        if args.network_weights:
            infos = check_lora(args.network_weights, arch, "--network_weights")
            if args.dim_from_weights:
                rank = lora_rank(infos)
        for path in args.base_weights or []:
            check_lora(path, arch, "--base_weights")
        rank = rank or args.network_dim or 4
        save_dtype = _SAVE_DTYPES[args.save_precision or "fp32"]
        need, what = lora_save_bytes(dit, rank, save_dtype), "one LoRA file"
    else:
        weight = torch.bfloat16 if args.full_bf16 else torch.float32
        save_dtype = _SAVE_DTYPES[args.save_precision] if args.save_precision else weight
        need, what = dit_save_bytes(dit, save_dtype), "one DiT checkpoint"
    require_output_dir(args.output_dir, "--output_dir", need, what)
    if args.logging_dir:
        require_output_dir(args.logging_dir, "--logging_dir")


def _check_sample_prompts(arch_name: str, args: argparse.Namespace) -> None:
    """The sample prompt file parsed and planned now, its control images, the sample VAE/text encoder."""
    from tsumugi.arch import get_architecture
    from tsumugi.sample.prompt_lines import read_prompt_file
    from tsumugi.train.sample_prompts import TrainingSampler, sample_jobs

    arch = get_architecture(arch_name)
    lines = read_prompt_file(args.sample_prompts, "--sample_prompts")
    jobs = sample_jobs(arch, lines, TrainingSampler.check_controls(arch, args, lines))  # control images read too
    if not args.vae:
        raise UserError("--sample_prompts needs --vae to decode the samples")
    check_model(args.vae, arch_name, "vae", "--vae")
    if args.text_encoder:
        check_model(args.text_encoder, arch_name, "text_encoder", "--text_encoder")
    device = default_device()
    for job in jobs:
        check_image_memory(arch_name, job.width, job.height, device, job.source)


# ---- generation -------------------------------------------------------------------------------
def check_generate_flags(args: argparse.Namespace) -> None:
    """Numeric generate flags: finite and in range."""
    check_number(args.infer_steps, "--infer_steps", minimum=1, what="an integer >= 1")
    check_number(args.guidance_scale, "--guidance_scale", minimum=0, what="a finite number >= 0")
    check_number(args.flow_shift, "--flow_shift", above=0, what="a finite number > 0")
    check_number(args.blocks_to_swap, "--blocks_to_swap", minimum=0, what="an integer >= 0")
    for value in args.image_size or []:
        check_number(value, "--image_size", above=0, what="two positive multiples of 16 (H W)")
    multipliers, loras = args.lora_multiplier or [], args.lora_weight or []
    if len(multipliers) > len(loras):
        raise UserError(f"--lora_multiplier: {len(multipliers)} values given for {len(loras)} --lora_weight files")
    for value in multipliers:
        check_number(value, "--lora_multiplier", what="finite numbers")
    check_number(getattr(args, "rcm_threshold", None), "--rcm_threshold", what="a finite number")


def check_generation(arch: str, args: argparse.Namespace, jobs: Sequence, device: torch.device) -> None:
    """``*_generate_image``: the models it will load, the LoRAs, ``--save_path``, each job's size.

    ``jobs`` are the resolved :class:`~tsumugi.sample.jobs.GenerationJob` (empty with ``--latent_path``).
    """
    decode_device = torch.device("cpu") if args.vae_cpu else device
    if args.latent_path:
        for path in args.latent_path:
            require_file(path, "--latent_path", "latent .safetensors file")
        check_model(args.vae, arch, "vae", "--vae")
        require_output_dir(args.save_path, "--save_path", png_bytes(256, 256), "one image")
        return
    check_model(args.dit, arch, "dit", "--dit")
    check_model(args.text_encoder, arch, "text_encoder", "--text_encoder")
    if args.vae and (args.output_type != "latent" or any(job.control_paths for job in jobs)):
        check_model(args.vae, arch, "vae", "--vae")
    for path in args.lora_weight or []:
        check_lora(path, arch, "--lora_weight")
    for job in jobs:
        check_number(job.guidance_scale, f"{job.source}: guidance scale", minimum=0, what="a finite number >= 0")
        check_number(job.flow_shift, f"{job.source}: flow shift", above=0, what="a finite number > 0")
        check_image_memory(arch, job.width, job.height, decode_device, job.source)
    largest = max((job.width * job.height for job in jobs), default=0)
    need = png_bytes(largest, 1) if args.output_type != "latent" else largest // 16 + 4096
    require_output_dir(args.save_path, "--save_path", need, "one image")


# ---- caching ----------------------------------------------------------------------------------
def check_caching(arch: str, args: argparse.Namespace, datasets: Sequence, role: str) -> None:
    """``*_cache_latents`` (``role="vae"``) / ``*_cache_text_encoder_outputs`` (``"text_encoder"``):
    the model file and every cache folder."""
    flag = f"--{role}"
    path = getattr(args, role)
    if not path:
        raise UserError(f"{flag} is required")
    check_model(path, arch, role, flag)
    for dataset in datasets:
        width, height = dataset.resolution
        need = 16 * (width // 8) * (height // 8) * 4 + 4096 if role == "vae" else 8 << 20
        require_output_dir(dataset.cache_directory, f"{dataset.name}: cache_directory", need, "one cache file")


# ---- LoRA tools -------------------------------------------------------------------------------
def check_merge(dit: str, loras: Sequence[str], multipliers: Sequence[float] | None, output: str,
                save_dtype: torch.dtype | None) -> None:
    """``merge_lora``: the flags, the DiT and LoRA headers, and room for the merged file."""
    if len(multipliers or []) > len(loras):
        raise UserError(f"--lora_multiplier: {len(multipliers)} values given for {len(loras)} --lora_weight files")
    for value in multipliers or []:
        check_number(value, "--lora_multiplier", what="finite numbers")
    arch, infos = check_any_dit(dit, "--dit")
    for path in loras:
        check_lora(path, arch, "--lora_weight")
    require_output_file(output, "--save_merged_model", dit_save_bytes(infos, save_dtype), "the merged DiT")


def check_convert(input_path: str, output: str) -> None:
    """``convert_lora``: the input is a regular file; the output's folder is writable with room for it."""
    source = require_file(input_path, "--input", "LoRA .safetensors file")
    # a fused q/k/v split can triple a down matrix: twice the input is a fair estimate
    require_output_file(output, "--output", 2 * source.stat().st_size, "the converted LoRA")


__all__ = ["check_caching", "check_convert", "check_generate_flags", "check_generation", "check_merge",
           "check_number", "check_training"]
