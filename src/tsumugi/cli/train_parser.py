"""Flags of the training scripts (``*_train_network`` and ``*_train``), see ``docs/training.md``.

Names, types and defaults are Musubi Tuner's. :func:`build_train_parser` builds the argparse parser of one
script. Every ``--snake_case`` flag also answers to ``--kebab-case`` (hidden in ``--help``); unambiguous
prefixes work as in Musubi, and a prefix that matches only a flag and its own hyphen alias is not
"ambiguous". :func:`tsumugi.cli.train_config_file.parse_train_args` adds ``--config_file`` values and
:func:`tsumugi.cli.train_validation.validate_train_args` checks the result.
"""

from __future__ import annotations

import argparse

from tsumugi.cli.common import COMPILE_FLAGS, KebabHelpFormatter, KebabParser
from tsumugi.cli.common import add_flag as _flag
from tsumugi.cli.common import add_option as _add
from tsumugi.model_versions import MODEL_VERSIONS
from tsumugi.train.lr_schedulers import steps_or_ratio

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
    _flag(g, "--no_metadata", "write only the minimum metadata")
    _add(g, "--training_comment", type=str, default=None, help="ss_training_comment metadata")
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
