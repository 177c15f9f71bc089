"""Checking the parsed training flags (``*_train_network`` and ``*_train``), see ``docs/training.md``.

:func:`validate_train_args` turns impossible combinations into :class:`UserError` naming the flags; it
also resolves ``--mixed_precision`` (from accelerate when omitted), the attention mode (``attn_mode``), the
Qwen-Image model version and the saved LoRA layout (``lora_layout``), and returns the checked flags as a
frozen :class:`tsumugi.train.config.TrainConfig` (the parsed namespace is left as it was).

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
from typing import Any

from tsumugi.cli.train_parser import (
    ARCH_NAMES,
    ATTENTION_FLAGS,
    DISPLAY_NAMES,
    DIT_BLOCKS,
    LORA_FORMATS,
    MAX_BLOCKS_TO_SWAP,
    MIXED_PRECISIONS,
    NETWORK_MODULES,
    SCRIPT_SUFFIX,
)
from tsumugi.errors import UserError
from tsumugi.model_versions import EDIT_VERSIONS, resolve_model_version
from tsumugi.train.accelerator_options import validate_logging_flags
from tsumugi.train.config import TrainConfig
from tsumugi.train.lr_schedulers import LR_SCHEDULERS
from tsumugi.train.optimizers import (
    is_schedule_free,
    parse_literal_args,
    parse_optimizer_args,
    resolve_optimizer_class,
)
from tsumugi.train.timesteps import TimestepConfig

logger = logging.getLogger(__name__)


def resolve_mixed_precision(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> str:
    """``--mixed_precision`` when given, else accelerate's (``ACCELERATE_MIXED_PRECISION``, set by
    ``accelerate launch``), else ``no``."""
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
    return value


def resolve_attention(args: argparse.Namespace) -> dict[str, Any]:
    """The attention fields of the configuration: ``attn_mode`` (``torch``, ``flash``, ``xformers``,
    ``flash3``) and each attention flag, only the chosen one on. No flag means ``--sdpa``; with several,
    Musubi's precedence sdpa > flash_attn > sage_attn > xformers > flash3 picks one and the other flags are
    switched off (with a warning)."""
    if getattr(args, "sage_attn", False):
        raise UserError(
            "--sage_attn: SageAttention cannot be used for training; use --sdpa (default), --flash_attn or --xformers"
        )
    given = [dest for dest, _ in ATTENTION_FLAGS if getattr(args, dest, False)]
    if not given:
        given = ["sdpa"]
        logger.info("no attention flag given: using --sdpa")
    chosen = given[0]
    if len(given) > 1:
        logger.warning("several attention flags (%s): using --%s", ", ".join("--" + d for d in given), chosen)
    if chosen == "flash3" and getattr(args, "arch_name", None) == "qwen_image":
        raise UserError("--flash3 cannot be used with Qwen-Image; use --sdpa, --flash_attn or --xformers")
    return {"attn_mode": dict(ATTENTION_FLAGS)[chosen], **{dest: dest == chosen for dest, _ in ATTENTION_FLAGS}}


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


def validate_train_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> TrainConfig:
    """Reject impossible flag combinations (one :class:`UserError` naming the flags) and return the run
    configuration: the flags plus the derived ``mixed_precision``, ``attn_mode``, ``model_version``/
    ``is_edit``/``is_layered`` (Qwen-Image) and ``lora_layout`` (LoRA). ``args`` is not changed."""
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

    derived: dict[str, Any] = {}  # fields whose value differs from the parsed flag's (or that no flag sets)

    # precision
    mixed = derived["mixed_precision"] = resolve_mixed_precision(args, environ)
    if getattr(args, "full_bf16", False) and mixed != "bf16":
        raise UserError(f"--full_bf16 needs --mixed_precision bf16 (got --mixed_precision {mixed})")

    # fp8
    if network:
        if args.fp8_scaled and not args.fp8_base:
            raise UserError("--fp8_scaled needs --fp8_base")
    elif args.fp8_base or args.fp8_scaled:
        logger.warning("--fp8_base/--fp8_scaled are not supported for full fine-tuning; turned off")
        derived.update(fp8_base=False, fp8_scaled=False)

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
    derived.update(resolve_attention(args))
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
        derived["lora_layout"] = resolve_lora_layout(arch, args.lora_format)

    # architecture specifics
    if arch == "qwen_image":
        version = resolve_model_version(args)
        derived.update(model_version=version, is_edit=version in EDIT_VERSIONS, is_layered=version == "layered")
        if args.remove_first_image_from_target and version != "layered":
            raise UserError(
                f"--remove_first_image_from_target needs --model_version layered (got --model_version {version})"
            )
        _positive(args, "num_layers")
    if args.vae_dtype is not None:
        logger.warning("--vae_dtype has no effect: the VAE that decodes sample images runs in float32")
    if network:
        _check_network_family(args.network_module, arch)
    validate_logging_flags(args)
    return TrainConfig.from_flags({**vars(args), **derived})


def _check_network_family(module: str, arch: str) -> None:
    """A module that is not a network module, or the other family's, fails here, naming the right one
    (not later, after the DiT is loaded)."""
    from tsumugi.networks.network_modules import import_network_module, network_target

    target = network_target(import_network_module(module))
    for other in ARCH_NAMES:
        if other != arch and target is not None and target.display_name == DISPLAY_NAMES[other]:
            raise UserError(
                f"--network_module {module} is the {DISPLAY_NAMES[other]} network; {arch}_train_network trains "
                f"{DISPLAY_NAMES[arch]}: use --network_module {NETWORK_MODULES[arch]}"
            )
