"""Flags of the training scripts (``*_train_network`` and ``*_train``), see ``docs/training.md``.

Names, types and defaults are Musubi Tuner's. Three steps:

* :func:`build_train_parser` -- the argparse parser of one script. Every ``--snake_case`` flag also
  answers to ``--kebab-case`` (hidden in ``--help``); unambiguous prefixes work as in Musubi, and a
  prefix that matches only a flag and its own hyphen alias is not "ambiguous".
* :func:`parse_train_args` -- command line plus ``--config_file`` (TOML; ``.toml`` may be left off;
  sections are flattened; file values replace defaults; the command line wins). Unlike Musubi, file
  values are converted and checked as if typed on the command line, and unknown keys are an error.
* :func:`validate_train_args` -- impossible combinations become :class:`UserError` naming the flags;
  it also resolves ``--mixed_precision`` (from accelerate when omitted), the attention mode
  (``args.attn_mode``), the Qwen-Image model version and the saved LoRA layout (``args.lora_layout``).

Differences from Musubi (all deliberate): no attention flag means ``--sdpa`` (Musubi stops with an
error); ``--dim_from_weights`` requires ``--network_weights`` (the rank comes from those weights; Musubi's
flag cannot work); ``--lr_warmup_steps``/``--lr_decay_steps`` reject negative values and non-integer
values >= 1; config files are read as TOML 1.0 (falling back to the ``toml`` package Musubi uses), may
spell keys with hyphens, and a key used twice in different sections warns; ``--fused_backward_pass``
with gradient accumulation and ``--block_swap_h2d_only`` in full fine-tuning are rejected; combinations
Musubi fails on late (or silently ignores) are reported before any model is loaded.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from tsumugi.cli.common import COMPILE_FLAGS, KebabHelpFormatter, KebabParser
from tsumugi.cli.common import add_flag as _flag
from tsumugi.cli.common import add_option as _add
from tsumugi.cli.train_config_file import parse_train_args  # noqa: F401  (re-exported)
from tsumugi.errors import UserError
from tsumugi.model_versions import MODEL_VERSIONS, resolve_model_version
from tsumugi.train.accelerator_options import validate_logging_flags
from tsumugi.train.lr_schedulers import LR_SCHEDULERS, steps_or_ratio
from tsumugi.train.optimizers import (
    is_schedule_free,
    parse_literal_args,
    parse_optimizer_args,
    resolve_optimizer_class,
)
from tsumugi.train.timesteps import TimestepConfig

logger = logging.getLogger(__name__)

ARCH_NAMES = ("qwen_image", "zimage")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
LORA_FORMATS = ("default", "musubi", "diffusers", "comfyui")
TIMESTEP_SAMPLING_CHOICES = (
    "sigma",
    "uniform",
    "sigmoid",
    "shift",
    "flux_shift",
    "flux2_shift",
    "ideogram4_shift",
    "qwen_shift",
    "krea2_shift",
    "logsnr",
    "qinglong_flux",
    "qinglong_qwen",
)
# (flag dest, attn_mode) in Musubi's order of precedence
ATTENTION_FLAGS = (("sdpa", "torch"), ("flash_attn", "flash"), ("sage_attn", "sageattn"),
                   ("xformers", "xformers"), ("flash3", "flash3"))
DIT_BLOCKS = {"qwen_image": 60, "zimage": 30}
MAX_BLOCKS_TO_SWAP = {"qwen_image": 59, "zimage": 28}
SCRIPT_SUFFIX = {True: "train_network", False: "train"}
NETWORK_MODULES = {"qwen_image": "networks.lora_qwen_image", "zimage": "networks.lora_zimage"}
DISPLAY_NAMES = {"qwen_image": "Qwen-Image", "zimage": "Z-Image"}


# ---------------------------------------------------------------------------------------------- parser


def build_train_parser(arch_name: str, *, network: bool) -> argparse.ArgumentParser:
    """Parser of ``<arch>_train_network`` (``network=True``) or ``<arch>_train`` (full fine-tune)."""
    if arch_name not in ARCH_NAMES:
        raise ValueError(f"unknown architecture {arch_name!r}; expected one of {ARCH_NAMES}")
    from accelerate.utils import DynamoBackend

    qwen = arch_name == "qwen_image"
    display = "Qwen-Image" if qwen else "Z-Image"
    kind = "LoRA training" if network else "full fine-tuning"
    parser = KebabParser(
        prog=f"{arch_name}_{SCRIPT_SUFFIX[network]}",
        description=f"{display} {kind} with Musubi Tuner's flags. Every --snake_case flag also accepts "
        "--kebab-case. Values from --config_file replace the defaults; the command line wins.",
        formatter_class=KebabHelpFormatter,
        allow_abbrev=True,
    )
    parser.set_defaults(arch_name=arch_name, network_training=network)

    g = parser.add_argument_group("general")
    _add(g, "--config_file", type=str, default=None,
         help="TOML file with flag values (.toml may be left off); [sections] are flattened")
    _add(g, "--dataset_config", type=str, default=None, help="dataset config (.toml or .json); required")

    g = parser.add_argument_group("models")
    _add(g, "--dit", type=str, default=None, help="DiT checkpoint (single file, first shard or diffusers folder); required")
    _add(g, "--vae", type=str, default=None, help="VAE checkpoint (needed for sample images)")
    _add(g, "--vae_dtype", type=str, default=None,
         help="no effect (warns): the VAE that decodes sample images runs in float32")
    te = "Qwen2.5-VL" if qwen else "Qwen3"
    _add(g, "--text_encoder", type=str, default=None, help=f"{te} text encoder (only to encode sample prompts)")
    _add(g, "--tokenizer", "--tokenizer_path", type=str, default=None,
         help="tokenizer folder (or hub id) overriding the bundled tokenizer files")
    _flag(g, "--fp8_base", "DiT weights in float8_e4m3fn" + ("" if network else " (ignored for full fine-tuning)"))
    _flag(g, "--fp8_scaled", "block-scaled fp8 DiT weights; needs --fp8_base")
    if qwen:
        _flag(g, "--fp8_vl", "fp8 Qwen2.5-VL for sample-prompt encoding")
        _add(g, "--num_layers", type=int, default=None, help="DiT blocks (pruned checkpoints); default 60")
        _flag(g, "--remove_first_image_from_target",
              "layered model only: drop the composite (first) image from the noisy input and the target")
        _add(g, "--model_version", type=str, default=None,
             help=f"one of {', '.join(MODEL_VERSIONS)} (original)")
        _flag(g, "--edit", "legacy alias of --model_version edit")
        _flag(g, "--edit_plus", "legacy alias of --model_version edit-2509")
    else:
        _flag(g, "--fp8_llm", "fp8 Qwen3 for sample-prompt encoding")
        _flag(g, "--use_32bit_attention",
              "keep q/k in float32 into attention (original behaviour); default casts to 16-bit")
    _flag(g, "--disable_numpy_memmap", "see tsumugi.cli.flag_notes")

    g = parser.add_argument_group("attention (none given: --sdpa)")
    _flag(g, "--sdpa", "PyTorch scaled_dot_product_attention (default)")
    _flag(g, "--flash_attn", "FlashAttention 2 (use --split_attn with batch > 1)")
    _flag(g, "--sage_attn", "SageAttention: not usable for training (rejected)")
    _flag(g, "--xformers", "xformers (use --split_attn with batch > 1)")
    _flag(g, "--flash3", "FlashAttention 3" + (" (not usable with Qwen-Image)" if qwen else ""))
    _flag(g, "--split_attn", "attention one sample at a time (drops padding)")

    g = parser.add_argument_group("training loop")
    _add(g, "--max_train_steps", type=int, default=1600, help="optimizer steps (default 1600)")
    _add(g, "--max_train_epochs", type=int, default=None, help="epochs; overrides --max_train_steps")
    _add(g, "--max_data_loader_n_workers", type=int, default=8, help="see tsumugi.cli.flag_notes")
    _flag(g, "--persistent_data_loader_workers", "see tsumugi.cli.flag_notes")
    _add(g, "--seed", type=int, default=None, help="random seed (random when omitted)")
    _flag(g, "--gradient_checkpointing", "recompute block activations in the backward pass")
    _flag(g, "--gradient_checkpointing_cpu_offload", "offload checkpointed activations to the CPU")
    _add(g, "--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    _add(g, "--mixed_precision", type=str, default=None, choices=MIXED_PRECISIONS,
         help="default: accelerate's --mixed_precision (ACCELERATE_MIXED_PRECISION), else no")
    _add(g, "--save_precision", type=str, default=None, choices=["float", "fp32", "fp16", "bf16"],
         help="dtype of saved weights (default fp32)" if network else
         "dtype of saved weights (default: the training dtype, fp32 or bf16 with --full_bf16)")
    _add(g, "--guidance_scale", type=float, default=1.0,
         help="written to the metadata as ss_guidance_scale only; training does not use it (Musubi's HunyuanVideo flag)")
    _add(g, "--show_timesteps", type=str, default=None, choices=["image", "console"],
         help="show the sampled-timestep distribution and exit")

    g = parser.add_argument_group("optimizer")
    _add(g, "--optimizer_type", type=str, default="",
         help="AdamW (default), AdamW8bit, AdaFactor, Lion, Prodigy, any torch.optim class (case-insensitive), "
         "or a dotted path such as bitsandbytes.optim.AdEMAMix8bit or schedulefree.AdamWScheduleFree")
    _add(g, "--optimizer_args", type=str, default=None, nargs="*",
         help="key=value constructor arguments, values as Python literals (weight_decay=0.01 betas=(0.9,0.99))")
    _add(g, "--learning_rate", type=float, default=2.0e-6, help="learning rate (default 2e-6)")
    _add(g, "--max_grad_norm", type=float, default=1.0, help="gradient clipping norm; 0 disables")

    g = parser.add_argument_group("learning-rate schedule")
    _add(g, "--lr_scheduler", type=str, default="constant",
         help="constant (default), constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, "
         "inverse_sqrt, cosine_with_min_lr, warmup_stable_decay, piecewise_constant, rex, adafactor")
    _add(g, "--lr_warmup_steps", type=steps_or_ratio, default=0,
         help="warmup: steps, a ratio < 1 of the training steps, or N%%")
    _add(g, "--lr_decay_steps", type=steps_or_ratio, default=0,
         help="decay steps of warmup_stable_decay: steps, ratio < 1, or N%%")
    _add(g, "--lr_scheduler_num_cycles", type=int, default=1, help="cosine restarts / cycles")
    _add(g, "--lr_scheduler_power", type=float, default=1, help="power of the polynomial schedule")
    _add(g, "--lr_scheduler_timescale", type=int, default=None, help="inverse_sqrt timescale (default: warmup steps)")
    _add(g, "--lr_scheduler_min_lr_ratio", type=float, default=None,
         help="final LR / LR for cosine_with_min_lr, warmup_stable_decay and rex (rex default 0.01)")
    _add(g, "--lr_scheduler_type", type=str, default="",
         help="any scheduler class: torch.optim.lr_scheduler name or dotted path; overrides --lr_scheduler")
    _add(g, "--lr_scheduler_args", type=str, default=None, nargs="*",
         help="key=value scheduler arguments as Python literals (rex_alpha=0.1 rex_beta=0.9)")

    g = parser.add_argument_group("saving and resuming")
    _add(g, "--output_dir", type=str, default=None, help="output folder; required")
    _add(g, "--output_name", type=str, default=None, help="base name of the saved files; required")
    _add(g, "--resume", type=str, default=None, help="state folder to resume from")
    _add(g, "--save_every_n_epochs", type=int, default=None, help="save a checkpoint every N epochs")
    _add(g, "--save_every_n_steps", type=int, default=None, help="save a checkpoint every N steps")
    _add(g, "--save_last_n_epochs", type=int, default=None, help="keep only the last N epoch checkpoints")
    _add(g, "--save_last_n_epochs_state", type=int, default=None, help="keep only the last N epoch states")
    _add(g, "--save_last_n_steps", type=int, default=None, help="remove step checkpoints older than N steps")
    _add(g, "--save_last_n_steps_state", type=int, default=None, help="remove step states older than N steps")
    _flag(g, "--save_state", "also save the training state (optimizer, scheduler, RNG) with each checkpoint")
    _flag(g, "--save_state_on_train_end", "save the training state at the end")
    if not network:
        _flag(g, "--mem_eff_save", "see tsumugi.cli.flag_notes")

    g = parser.add_argument_group("logging")
    _add(g, "--logging_dir", type=str, default=None, help="TensorBoard log folder (enables logging)")
    _add(g, "--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"], help="logging tool(s)")
    _add(g, "--log_prefix", type=str, default=None, help="prefix of the run folder name")
    _add(g, "--log_tracker_name", type=str, default=None,
         help="tracker / wandb project name (default " + ("network_train)" if network else "fine-tuning)"))
    _add(g, "--wandb_run_name", type=str, default=None, help="wandb run name (with --log_with wandb or all)")
    _add(g, "--log_tracker_config", type=str, default=None,
         help="TOML file of tracker init arguments, one table per tracker ([wandb], [tensorboard]); "
         "its values win over --wandb_run_name")
    _add(g, "--wandb_api_key", type=str, default=None,
         help="wandb API key, used to log in before the run (with --log_with wandb or all)")
    _flag(g, "--log_config", "send the training settings to the trackers (file paths and secrets left out)")

    g = parser.add_argument_group("sample images")
    _add(g, "--sample_prompts", type=str, default=None, help="prompt file (.txt, .toml or .json)")
    _add(g, "--sample_every_n_steps", type=int, default=None, help="sample every N steps")
    _add(g, "--sample_every_n_epochs", type=int, default=None, help="sample every N epochs")
    _flag(g, "--sample_at_first", "sample before the first step")

    g = parser.add_argument_group("timesteps and loss weighting")
    _add(g, "--timestep_sampling", default="sigma", choices=TIMESTEP_SAMPLING_CHOICES, help="timestep sampling mode")
    _add(g, "--discrete_flow_shift", type=float, default=1.0, help="flow shift of shift/sigma modes")
    _add(g, "--sigmoid_scale", type=float, default=1.0, help="scale of the normal draw before the sigmoid")
    _add(g, "--weighting_scheme", type=str, default="none",
         choices=["logit_normal", "mode", "cosmap", "sigma_sqrt", "none"], help="timestep density / loss weight")
    _add(g, "--logit_mean", type=float, default=0.0, help="logit_normal / logsnr mean")
    _add(g, "--logit_std", type=float, default=1.0, help="logit_normal / logsnr std")
    _add(g, "--mode_scale", type=float, default=1.29, help="scale of the mode scheme")
    _add(g, "--min_timestep", type=int, default=None, help="lowest timestep (0-999, default 0)")
    _add(g, "--max_timestep", type=int, default=None, help="highest timestep (1-1000, default 1000)")
    _flag(g, "--preserve_distribution_shape", "reject draws outside the timestep range instead of rescaling")
    _add(g, "--num_timestep_buckets", type=int, default=None, help=">= 2: stratified per-epoch timestep pool")

    g = parser.add_argument_group("memory and speed")
    _add(g, "--blocks_to_swap", type=int, default=None,
         help=f"DiT blocks offloaded to the CPU (max {MAX_BLOCKS_TO_SWAP[arch_name]})")
    _flag(g, "--use_pinned_memory_for_block_swap", "pinned host memory for block swap")
    _flag(g, "--block_swap_h2d_only", "LoRA only: copy swapped blocks host-to-device only; needs --gradient_checkpointing")
    _add(g, "--block_swap_ring_size", type=int, default=2,
         help="with --blocks_to_swap: how many swapped blocks may be on the device at once (>= 2)")
    _flag(g, "--img_in_txt_in_offloading", "see tsumugi.cli.flag_notes")
    if not network:
        _flag(g, "--full_bf16", "weights and gradients in bfloat16; needs --mixed_precision bf16")
        _flag(g, "--fused_backward_pass", "Adafactor step inside the backward pass, per parameter (works with "
              "gradient accumulation)")
        _flag(g, "--block_swap_optimizer_patch_params", "accepted for compatibility: with block swap, gradients "
              "always move to their parameter's device before the optimizer step")
    for name, kwargs in COMPILE_FLAGS:
        _add(g, name, **kwargs)
    _flag(g, "--cuda_allow_tf32", "allow TF32 matmuls")
    _flag(g, "--cuda_cudnn_benchmark", "cuDNN benchmark mode")
    _add(g, "--dynamo_backend", type=str, default="NO", choices=[e.value for e in DynamoBackend],
         help="accelerate dynamo backend")
    _add(g, "--dynamo_mode", type=str, default=None, choices=["default", "reduce-overhead", "max-autotune"],
         help="accelerate dynamo mode")
    _flag(g, "--dynamo_fullgraph", "accelerate dynamo fullgraph")
    _flag(g, "--dynamo_dynamic", "accelerate dynamo dynamic shapes")

    if network:
        g = parser.add_argument_group("network (LoRA)")
        _add(g, "--network_module", type=str, default=None,
             help=f"network module, e.g. networks.lora_{arch_name}; required")
        _add(g, "--network_dim", type=int, default=None, help="rank (default 4)")
        _add(g, "--network_alpha", type=float, default=1, help="alpha (default 1; 0 means alpha = rank)")
        _add(g, "--network_dropout", type=float, default=None, help="dropout on the down-projection output")
        _add(g, "--network_args", type=str, default=None, nargs="*", help="key=value network arguments")
        _add(g, "--network_weights", type=str, default=None, help="initial LoRA weights")
        _flag(g, "--dim_from_weights", "take the rank (and alpha) from --network_weights")
        _add(g, "--scale_weight_norms", type=float, default=None, help="max-norm regularisation per module")
        _add(g, "--base_weights", type=str, default=None, nargs="*", help="LoRAs merged into the DiT before training")
        _add(g, "--base_weights_multiplier", type=float, default=None, nargs="*", help="one per --base_weights (1.0)")
        _flag(g, "--no_metadata", "write only the minimum metadata")
        _add(g, "--training_comment", type=str, default=None, help="ss_training_comment metadata")
        if qwen:
            fmt_help = ("layout of the saved LoRA: default = musubi for Qwen-Image (Musubi's lora_unet_ keys, "
                        "which ComfyUI and diffusers both load); musubi = Musubi's keys; diffusers = PEFT "
                        "transformer.* keys with alpha folded in; comfyui = same as default")
        else:
            fmt_help = ("layout of the saved LoRA: default = diffusion_model.* keys with alpha, a layout that "
                        "ComfyUI and diffusers both load; musubi = Musubi's lora_unet_ keys (ComfyUI drops "
                        "the attention modules of those); diffusers = PEFT transformer.* keys with alpha folded "
                        "in; comfyui = same as default")
        _add(g, "--lora_format", type=str, default="default", choices=LORA_FORMATS, help=fmt_help)

    g = parser.add_argument_group("metadata")
    _add(g, "--metadata_title", type=str, default=None, help="modelspec.title (default: --output_name)")
    _add(g, "--metadata_author", type=str, default=None, help="modelspec.author")
    _add(g, "--metadata_description", type=str, default=None, help="modelspec.description")
    _add(g, "--metadata_license", type=str, default=None, help="modelspec.license")
    _add(g, "--metadata_tags", type=str, default=None, help="modelspec.tags, comma separated")
    _add(g, "--metadata_reso", type=str, default=None, help="modelspec.resolution: 'W,H' or 'N'")
    _add(g, "--metadata_arch", type=str, default=None, help="overrides modelspec.architecture")

    g = parser.add_argument_group("Hugging Face and DDP")
    _add(g, "--huggingface_repo_id", type=str, default=None, help="repo to upload to")
    _add(g, "--huggingface_repo_type", type=str, default=None, help="repo type")
    _add(g, "--huggingface_path_in_repo", type=str, default=None, help="path inside the repo")
    _add(g, "--huggingface_token", type=str, default=None, help="token")
    _add(g, "--huggingface_repo_visibility", type=str, default=None, help="public, or private (default)")
    _flag(g, "--save_state_to_huggingface", "upload states too")
    _flag(g, "--resume_from_huggingface", "--resume is repo_id/path:revision:repo_type")
    _flag(g, "--async_upload", "upload in the background")
    _add(g, "--ddp_timeout", type=int, default=None,
         help="timeout in minutes of the process-group setup and collectives (several processes)")
    _flag(g, "--ddp_gradient_as_bucket_view", "see tsumugi.cli.flag_notes")
    _flag(g, "--ddp_static_graph", "see tsumugi.cli.flag_notes")
    return parser


# ---------------------------------------------------------------------------------------------- config file


def resolve_mixed_precision(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> str:
    """``--mixed_precision`` when given, else accelerate's (``ACCELERATE_MIXED_PRECISION``, set by
    ``accelerate launch``), else ``no``. Sets and returns ``args.mixed_precision``."""
    environ = os.environ if environ is None else environ
    value = getattr(args, "mixed_precision", None)
    if value is None:
        launched = environ.get("ACCELERATE_MIXED_PRECISION")
        if launched is None or not launched.strip():
            value = "no"
        else:
            value = launched.strip().lower()
            if value not in MIXED_PRECISIONS:
                raise UserError(
                    f"--mixed_precision: accelerate's --mixed_precision is {launched!r}, which training does not "
                    f"support; pass --mixed_precision with one of {', '.join(MIXED_PRECISIONS)}"
                )
            logger.info("--mixed_precision taken from accelerate: %s", value)
    elif value not in MIXED_PRECISIONS:
        raise UserError(f"--mixed_precision: {value!r} is not one of {', '.join(MIXED_PRECISIONS)}")
    args.mixed_precision = value
    return value


def resolve_attention(args: argparse.Namespace) -> str:
    """Sets ``args.attn_mode`` (``torch``, ``flash``, ``xformers``, ``flash3``); no flag means ``--sdpa``;
    with several, Musubi's precedence sdpa > flash_attn > sage_attn > xformers > flash3 picks one and the
    other flags are switched off (with a warning)."""
    if getattr(args, "sage_attn", False):
        raise UserError(
            "--sage_attn: SageAttention cannot be used for training; use --sdpa (default), --flash_attn or --xformers"
        )
    given = [dest for dest, _ in ATTENTION_FLAGS if getattr(args, dest, False)]
    if not given:
        args.sdpa = True
        given = ["sdpa"]
        logger.info("no attention flag given: using --sdpa")
    chosen = given[0]
    if len(given) > 1:
        logger.warning("several attention flags (%s): using --%s", ", ".join("--" + d for d in given), chosen)
        for dest in given[1:]:
            setattr(args, dest, False)
    args.attn_mode = dict(ATTENTION_FLAGS)[chosen]
    if chosen == "flash3" and getattr(args, "arch_name", None) == "qwen_image":
        raise UserError("--flash3 cannot be used with Qwen-Image; use --sdpa, --flash_attn or --xformers")
    return args.attn_mode


def resolve_lora_layout(arch_name: str, lora_format: str) -> str:
    """``--lora_format`` -> layout name of :mod:`tsumugi.networks.lora_save` (``musubi``,
    ``diffusion_model``, ``diffusers``)."""
    if lora_format not in LORA_FORMATS:
        raise UserError(f"--lora_format: {lora_format!r} is not one of {', '.join(LORA_FORMATS)}")
    if lora_format in ("default", "comfyui"):
        return "diffusion_model" if arch_name == "zimage" else "musubi"
    return lora_format


def _positive(args: argparse.Namespace, dest: str, minimum: int = 1) -> None:
    value = getattr(args, dest, None)
    if value is not None and value < minimum:
        raise UserError(f"--{dest}: must be >= {minimum}, got {value}")


def validate_train_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Reject impossible flag combinations (one :class:`UserError` naming the flags) and resolve derived
    values in place: ``mixed_precision``, ``attn_mode``, ``model_version``/``is_edit``/``is_layered``
    (Qwen-Image), ``lora_layout`` (LoRA). Returns ``args``."""
    arch = getattr(args, "arch_name", "qwen_image")
    network = getattr(args, "network_training", hasattr(args, "network_module"))
    script = f"{arch}_{SCRIPT_SUFFIX[bool(network)]}"

    # required inputs
    if not args.dataset_config:
        raise UserError("--dataset_config is required (the dataset TOML used to cache latents and text outputs)")
    if not args.dit:
        raise UserError("--dit is required (the DiT checkpoint to train)")
    if network and not args.network_module:
        raise UserError(f"--network_module is required for {script} (e.g. --network_module networks.lora_{arch})")
    if not args.show_timesteps:
        if not args.output_dir:
            raise UserError("--output_dir is required (where checkpoints are written)")
        if not args.output_name:
            raise UserError("--output_name is required (base name of the saved files)")

    # precision
    mixed = resolve_mixed_precision(args, environ)
    if getattr(args, "full_bf16", False) and mixed != "bf16":
        raise UserError(f"--full_bf16 needs --mixed_precision bf16 (got --mixed_precision {mixed})")

    # fp8
    if network:
        if args.fp8_scaled and not args.fp8_base:
            raise UserError("--fp8_scaled needs --fp8_base")
    elif args.fp8_base or args.fp8_scaled:
        logger.warning("--fp8_base/--fp8_scaled are not supported for full fine-tuning; turned off")
        args.fp8_base = False
        args.fp8_scaled = False

    # memory
    if args.gradient_checkpointing_cpu_offload and not args.gradient_checkpointing:
        raise UserError("--gradient_checkpointing_cpu_offload needs --gradient_checkpointing")
    if args.block_swap_h2d_only:
        if not network:
            raise UserError(f"--block_swap_h2d_only is for LoRA training only (frozen base), not for {script}")
        if not args.gradient_checkpointing:
            raise UserError("--block_swap_h2d_only needs --gradient_checkpointing")
    if args.block_swap_ring_size < 2:
        raise UserError(f"--block_swap_ring_size: must be >= 2 (the block in use and the next one), "
                        f"got {args.block_swap_ring_size}")
    if args.block_swap_ring_size != 2 and not args.blocks_to_swap:
        logger.warning("--block_swap_ring_size has no effect without --blocks_to_swap")
    if args.blocks_to_swap is not None:
        blocks = getattr(args, "num_layers", None) or DIT_BLOCKS[arch]
        limit = blocks - 1 if arch == "qwen_image" else MAX_BLOCKS_TO_SWAP[arch]
        if not 0 <= args.blocks_to_swap <= limit:
            raise UserError(f"--blocks_to_swap: {args.blocks_to_swap} is out of range; expected 0..{limit}")
    if not network:
        if args.fused_backward_pass and mixed == "fp16":
            raise UserError("--fused_backward_pass cannot be combined with --mixed_precision fp16 (the loss "
                            "scaler would have to unscale gradients that are consumed inside the backward); "
                            "use --mixed_precision bf16")
        if args.fused_backward_pass and (args.optimizer_type or "").lower() not in ("adafactor",
                                                                                    "transformers.optimization.adafactor"):
            raise UserError(f"--fused_backward_pass works with --optimizer_type AdaFactor only, "
                            f"not --optimizer_type {args.optimizer_type or 'AdamW'}")
        if getattr(args, "block_swap_optimizer_patch_params", False):
            logger.info("--block_swap_optimizer_patch_params: tsumugi always moves gradients to their "
                        "parameter's device before the optimizer step; the flag changes nothing")

    # attention and compile
    resolve_attention(args)
    if args.compile_fullgraph and args.split_attn:
        raise UserError("--compile_fullgraph cannot be combined with --split_attn")

    # loop
    if args.max_train_epochs is None:
        if args.max_train_steps is None or args.max_train_steps < 1:
            raise UserError(f"--max_train_steps: must be >= 1, got {args.max_train_steps}")
    else:
        _positive(args, "max_train_epochs")
    _positive(args, "gradient_accumulation_steps")
    _positive(args, "max_data_loader_n_workers", 0)
    if args.max_grad_norm < 0:
        raise UserError(f"--max_grad_norm: must be >= 0 (0 disables clipping), got {args.max_grad_norm}")

    # saving
    for dest in ("save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs", "save_last_n_epochs_state",
                 "save_last_n_steps", "save_last_n_steps_state", "sample_every_n_steps", "sample_every_n_epochs"):
        _positive(args, dest)
    for keep, every in (("save_last_n_epochs", "save_every_n_epochs"), ("save_last_n_epochs_state", "save_every_n_epochs"),
                        ("save_last_n_steps", "save_every_n_steps"), ("save_last_n_steps_state", "save_every_n_steps")):
        if getattr(args, keep) is not None and getattr(args, every) is None:
            raise UserError(f"--{keep} needs --{every}")
    for keep in ("save_last_n_epochs_state", "save_last_n_steps_state"):
        if getattr(args, keep) is not None and not args.save_state:
            raise UserError(f"--{keep} needs --save_state")
    resume_old = Path(f"{args.resume}.old") if args.resume else None  # an interrupted save: recovered later
    if args.resume and not args.resume_from_huggingface and not Path(args.resume).exists() and not resume_old.is_dir():
        raise UserError(f"--resume: {args.resume} not found")

    # optimizer and learning-rate schedule (bad key=value items and missing packages fail here, early)
    resolve_optimizer_class(args.optimizer_type)
    optimizer_kwargs = parse_optimizer_args(args.optimizer_args)
    parse_literal_args(args.lr_scheduler_args, "--lr_scheduler_args")
    name = (args.lr_scheduler or "").lower()
    if not args.lr_scheduler_type and not is_schedule_free(args.optimizer_type):
        if not (name in LR_SCHEDULERS or name.startswith("adafactor:")):
            close = difflib.get_close_matches(name, LR_SCHEDULERS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(
                f"--lr_scheduler: unknown scheduler {args.lr_scheduler!r}{hint}; expected one of {', '.join(LR_SCHEDULERS)}"
            )
        if (name in ("constant", "piecewise_constant") or name.startswith("adafactor")) and args.lr_warmup_steps:
            raise UserError(
                f"--lr_warmup_steps {args.lr_warmup_steps} has no effect with --lr_scheduler {args.lr_scheduler}; "
                "use --lr_scheduler constant_with_warmup (or another scheduler) or drop the warmup"
            )
        if name.startswith("adafactor") and (args.optimizer_type or "").lower() != "adafactor":
            raise UserError(
                f"--lr_scheduler {args.lr_scheduler} needs --optimizer_type AdaFactor "
                f"(got --optimizer_type {args.optimizer_type or 'AdamW'})"
            )
        relative_step = optimizer_kwargs.get("relative_step", True) or optimizer_kwargs.get("warmup_init", False)
        if (args.optimizer_type or "").lower() == "adafactor" and relative_step and args.lr_warmup_steps:
            raise UserError(
                "--lr_warmup_steps cannot be used with --optimizer_type AdaFactor and relative_step=True (its own "
                "adafactor schedule replaces --lr_scheduler); drop the warmup or pass --optimizer_args relative_step=False"
            )

    # sampling
    sampling = args.sample_every_n_steps or args.sample_every_n_epochs or args.sample_at_first
    if sampling and not args.sample_prompts:
        given = [f for f in ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first") if getattr(args, f)]
        raise UserError(f"--{given[0]} needs --sample_prompts")
    if args.sample_prompts and sampling and not args.vae:
        # --text_encoder may be left out once the sample prompts' embeddings are cached (checked later)
        raise UserError("--sample_prompts needs --vae to make sample images")

    # timesteps (raises UserError for bad values)
    TimestepConfig.from_args(args)

    # network
    if network:
        if args.dim_from_weights and not args.network_weights:
            raise UserError("--dim_from_weights needs --network_weights (the rank is read from those weights)")
        if args.network_weights and not Path(args.network_weights).exists():
            raise UserError(f"--network_weights: {args.network_weights} not found")
        if args.network_dim is not None and args.network_dim < 1:
            raise UserError(f"--network_dim: must be >= 1, got {args.network_dim}")
        multipliers = args.base_weights_multiplier
        if multipliers and len(multipliers) != len(args.base_weights or []):
            raise UserError(
                f"--base_weights_multiplier has {len(multipliers)} values but --base_weights has "
                f"{len(args.base_weights or [])} files; give one multiplier per file"
            )
        args.lora_layout = resolve_lora_layout(arch, args.lora_format)

    # architecture specifics
    if arch == "qwen_image":
        version = resolve_model_version(args)
        args.model_version = version
        args.is_edit = version in ("edit", "edit-2509", "edit-2511")
        args.is_layered = version == "layered"
        if args.remove_first_image_from_target and not args.is_layered:
            raise UserError(
                f"--remove_first_image_from_target needs --model_version layered (got --model_version {version})"
            )
        _positive(args, "num_layers")
    if args.vae_dtype is not None:
        logger.warning("--vae_dtype has no effect: the VAE that decodes sample images runs in float32")
    if network:
        _check_network_family(args.network_module, arch)
    validate_logging_flags(args)
    return args


def _check_network_family(module: str, arch: str) -> None:
    """A network module of the other family fails here, naming the right one (not later, after the
    DiT is loaded, as "no modules" of the include/exclude patterns)."""
    name = module.removeprefix("tsumugi.")
    for other in ARCH_NAMES:
        if other != arch and name == NETWORK_MODULES[other]:
            raise UserError(
                f"--network_module {module} is the {DISPLAY_NAMES[other]} network; {arch}_train_network trains "
                f"{DISPLAY_NAMES[arch]}: use --network_module {NETWORK_MODULES[arch]}"
            )
