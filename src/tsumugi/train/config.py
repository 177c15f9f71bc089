"""The run configuration of the training scripts: every training flag, checked, plus what the checks derive.

:func:`tsumugi.cli.train_validation.validate_train_args` builds one :class:`TrainConfig` from the parsed
flags; the trainer, its hooks, the sampler and the metadata writers read it and never change it (the
dataclass is frozen). Values that depend on the data -- the step count of ``--max_train_epochs``, the
epoch count, a drawn seed -- belong to the run (:class:`tsumugi.train.run_setup.TrainingRun`), not here.

Field names are the flags' ``dest`` names, so ``config.learning_rate`` reads ``--learning_rate``. The
fields are the union of the four training parsers (Qwen-Image / Z-Image, LoRA / full fine-tune): a flag
that only one family or kind has (``--fp8_vl``, ``--network_dim``, ``--full_bf16`` ...) is a field with
its parser default everywhere else. List values are the parsed lists; treat them as read-only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SCOPES = ("qwen_image", "zimage", "network", "full")
"""what a field may be limited to: a family, LoRA training (``network``) or full fine-tuning (``full``)"""


def _only(scope: str, default: Any) -> Any:
    """A field that only the scripts of ``scope`` (a family, ``network`` or ``full``) have."""
    assert scope in SCOPES, scope
    return field(default=default, metadata={"only": scope})


@dataclass(frozen=True)
class TrainConfig:
    """Checked flags of one training run (see the module docstring). Defaults are the parsers' defaults."""

    # -- set by the script, not by a flag
    arch_name: str = "qwen_image"
    """``qwen_image`` or ``zimage``"""
    network_training: bool = True
    """``*_train_network`` (LoRA) when true, ``*_train`` (full fine-tune) when false"""

    # -- derived by validation
    attn_mode: str = "torch"
    """attention of the flags: ``torch`` (--sdpa), ``flash``, ``xformers`` or ``flash3``"""
    lora_layout: str | None = _only("network", None)
    """layout of saved LoRA files (:mod:`tsumugi.networks.lora_save`) from ``--lora_format``; LoRA only"""
    is_edit: bool = _only("qwen_image", False)
    """Qwen-Image-Edit (``model_version`` edit, edit-2509 or edit-2511)"""
    is_layered: bool = _only("qwen_image", False)
    """Qwen-Image-Layered (``model_version`` layered)"""

    # -- the flags, in the parsers' order; _only(scope, default): a field of one family or kind only.
    # mixed_precision is the resolved precision (accelerate's when the flag is omitted) and model_version
    # the resolved Qwen-Image version (None for Z-Image).
    config_file: str | None = None
    dataset_config: str | None = None
    dit: str | None = None
    vae: str | None = None
    vae_dtype: str | None = None
    text_encoder: str | None = None
    tokenizer: str | None = None
    fp8_base: bool = False
    fp8_scaled: bool = False
    fp8_vl: bool = _only("qwen_image", False)
    num_layers: int | None = _only("qwen_image", None)
    remove_first_image_from_target: bool = _only("qwen_image", False)
    model_version: str | None = _only("qwen_image", None)
    edit: bool = _only("qwen_image", False)
    edit_plus: bool = _only("qwen_image", False)
    disable_numpy_memmap: bool = False
    sdpa: bool = False
    flash_attn: bool = False
    sage_attn: bool = False
    xformers: bool = False
    flash3: bool = False
    split_attn: bool = False
    max_train_steps: int = 1600
    max_train_epochs: int | None = None
    max_data_loader_n_workers: int = 8
    persistent_data_loader_workers: bool = False
    seed: int | None = None
    gradient_checkpointing: bool = False
    gradient_checkpointing_cpu_offload: bool = False
    gradient_accumulation_steps: int = 1
    mixed_precision: str | None = None
    save_precision: str | None = None
    guidance_scale: float = 1.0
    show_timesteps: str | None = None
    optimizer_type: str = ""
    optimizer_args: list[str] | None = None
    learning_rate: float = 2e-06
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int | float = 0
    lr_decay_steps: int | float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1
    lr_scheduler_timescale: int | None = None
    lr_scheduler_min_lr_ratio: float | None = None
    lr_scheduler_type: str = ""
    lr_scheduler_args: list[str] | None = None
    output_dir: str | None = None
    output_name: str | None = None
    resume: str | None = None
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_last_n_epochs: int | None = None
    save_last_n_epochs_state: int | None = None
    save_last_n_steps: int | None = None
    save_last_n_steps_state: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    logging_dir: str | None = None
    log_with: str | None = None
    log_prefix: str | None = None
    log_tracker_name: str | None = None
    wandb_run_name: str | None = None
    log_tracker_config: str | None = None
    wandb_api_key: str | None = None
    log_config: bool = False
    sample_prompts: str | None = None
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_at_first: bool = False
    timestep_sampling: str = "sigma"
    discrete_flow_shift: float = 1.0
    sigmoid_scale: float = 1.0
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    min_timestep: int | None = None
    max_timestep: int | None = None
    preserve_distribution_shape: bool = False
    num_timestep_buckets: int | None = None
    blocks_to_swap: int | None = None
    use_pinned_memory_for_block_swap: bool = False
    block_swap_h2d_only: bool = False
    block_swap_ring_size: int = 2
    img_in_txt_in_offloading: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str = "default"
    compile_dynamic: str | None = None
    compile_fullgraph: bool = False
    compile_cache_size_limit: int | None = None
    cuda_allow_tf32: bool = False
    cuda_cudnn_benchmark: bool = False
    dynamo_backend: str = "NO"
    dynamo_mode: str | None = None
    dynamo_fullgraph: bool = False
    dynamo_dynamic: bool = False
    network_module: str | None = _only("network", None)
    network_dim: int | None = _only("network", None)
    network_alpha: float = _only("network", 1)
    network_dropout: float | None = _only("network", None)
    network_args: list[str] | None = _only("network", None)
    network_weights: str | None = _only("network", None)
    dim_from_weights: bool = _only("network", False)
    scale_weight_norms: float | None = _only("network", None)
    base_weights: list[str] | None = _only("network", None)
    base_weights_multiplier: list[float] | None = _only("network", None)
    lora_format: str = _only("network", "default")
    no_metadata: bool = False
    training_comment: str | None = None
    metadata_title: str | None = None
    metadata_author: str | None = None
    metadata_description: str | None = None
    metadata_license: str | None = None
    metadata_tags: str | None = None
    metadata_reso: str | None = None
    metadata_arch: str | None = None
    huggingface_repo_id: str | None = None
    huggingface_repo_type: str | None = None
    huggingface_path_in_repo: str | None = None
    huggingface_token: str | None = None
    huggingface_repo_visibility: str | None = None
    save_state_to_huggingface: bool = False
    resume_from_huggingface: bool = False
    async_upload: bool = False
    ddp_timeout: int | None = None
    ddp_gradient_as_bucket_view: bool = False
    ddp_static_graph: bool = False
    mem_eff_save: bool = _only("full", False)
    full_bf16: bool = _only("full", False)
    fused_backward_pass: bool = _only("full", False)
    block_swap_optimizer_patch_params: bool = _only("full", False)
    fp8_llm: bool = _only("zimage", False)
    use_32bit_attention: bool = _only("zimage", False)

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> TrainConfig:
        """The configuration of ``values`` (flag dest -> value); a name that is no field is a programming
        error (``TypeError``), not a user error: the parsers only produce known names."""
        unknown = sorted(set(values) - FIELD_NAMES)
        if unknown:
            raise TypeError(f"TrainConfig has no field(s) {', '.join(unknown)}")
        return cls(**values)

    def script_fields(self) -> dict[str, Any]:
        """The fields this run's script has, by name: what ``vars()`` of its parsed and checked flags held
        (states and trackers record these; the fields of the other family or kind are left out)."""
        kept = {self.arch_name, "network" if self.network_training else "full"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("only") is None or f.metadata["only"] in kept}


def flag_items(args: Any) -> dict[str, Any]:
    """``vars()`` of parsed flags, or the script's fields of a :class:`TrainConfig`."""
    return args.script_fields() if isinstance(args, TrainConfig) else dict(vars(args))


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(TrainConfig))
