"""The generate run's configuration: typed, frozen, built once from the parsed flags.

The attribute names are the flags' (``--infer_steps`` -> ``infer_steps``), so the checks that take flags
(:mod:`tsumugi.preflight.runs`) read a configuration the same way. ``model_version`` is resolved from
``--model_version`` / ``--edit`` / ``--edit_plus`` by the script before the configuration is built;
the no-op flags (``--embedded_cfg_scale``, ``--cpu_noise``) are warned about by the parser and not kept.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from tsumugi.sample.jobs import DEFAULT_STEPS


def _tuple(values) -> tuple | None:
    return None if values is None else tuple(values)


@dataclass(frozen=True)
class GenerateConfig:
    # models
    dit: str | None = None
    vae: str | None = None
    text_encoder: str | None = None
    tokenizer: str | None = None
    lora_weight: tuple[str, ...] | None = None
    lora_multiplier: tuple[float, ...] | None = None
    include_patterns: tuple[str, ...] | None = None
    exclude_patterns: tuple[str, ...] | None = None
    model_version: str = "original"
    # prompts and sampling
    prompt: str | None = None
    negative_prompt: str | None = None
    from_file: str | None = None
    image_size: tuple[int, int] | None = None
    infer_steps: int = DEFAULT_STEPS
    guidance_scale: float = 0.0
    flow_shift: float | None = None
    seed: int | None = None
    # Qwen-Image-Edit
    control_image_path: tuple[str, ...] | None = None
    resize_control_to_image_size: bool = False
    resize_control_to_official_size: bool = False
    append_original_name: bool = False
    mask_path: str | None = None
    rcm_threshold: float | None = None
    rcm_relative_threshold: bool = False
    rcm_kernel_size: int = 3
    rcm_dilate_size: int = 0
    rcm_debug_save: bool = False
    # Qwen-Image-Layered
    output_layers: int = 4
    automatic_prompt_lang_for_layered: str | None = None
    # output
    save_path: str | None = None
    output_type: str = "images"
    no_metadata: bool = False
    latent_path: tuple[str, ...] | None = None
    # device and precision
    device: str | None = None
    dit_dtype: str | None = None
    fp8: bool = False
    fp8_scaled: bool = False
    blocks_to_swap: int = 0
    use_pinned_memory_for_block_swap: bool = False
    vae_cpu: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str = "default"
    compile_dynamic: str | None = None
    compile_fullgraph: bool = False
    compile_cache_size_limit: int | None = None
    attn_mode: str = "torch"
    text_encoder_cpu: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, model_version: str = "original") -> GenerateConfig:
        """The configuration of parsed generate flags (Z-Image has no edit/Layered flags: their defaults)."""
        edit = {}
        if hasattr(args, "mask_path"):  # the Qwen-Image-Edit flags
            edit = dict(
                control_image_path=_tuple(args.control_image_path),
                resize_control_to_image_size=args.resize_control_to_image_size,
                resize_control_to_official_size=args.resize_control_to_official_size,
                append_original_name=args.append_original_name, mask_path=args.mask_path,
                rcm_threshold=args.rcm_threshold, rcm_relative_threshold=args.rcm_relative_threshold,
                rcm_kernel_size=args.rcm_kernel_size, rcm_dilate_size=args.rcm_dilate_size,
                rcm_debug_save=args.rcm_debug_save,
            )
        if hasattr(args, "output_layers"):  # the Qwen-Image-Layered flags
            edit.update(output_layers=args.output_layers,
                        automatic_prompt_lang_for_layered=args.automatic_prompt_lang_for_layered)
        return cls(
            dit=args.dit, vae=args.vae, text_encoder=args.text_encoder, tokenizer=args.tokenizer,
            lora_weight=_tuple(args.lora_weight), lora_multiplier=_tuple(args.lora_multiplier),
            include_patterns=_tuple(args.include_patterns), exclude_patterns=_tuple(args.exclude_patterns),
            model_version=model_version,
            prompt=args.prompt, negative_prompt=args.negative_prompt, from_file=args.from_file,
            image_size=_tuple(args.image_size), infer_steps=args.infer_steps, guidance_scale=args.guidance_scale,
            flow_shift=args.flow_shift, seed=args.seed,
            save_path=args.save_path, output_type=args.output_type, no_metadata=args.no_metadata,
            latent_path=_tuple(args.latent_path),
            device=args.device, dit_dtype=args.dit_dtype, fp8=args.fp8, fp8_scaled=args.fp8_scaled,
            blocks_to_swap=args.blocks_to_swap, use_pinned_memory_for_block_swap=args.use_pinned_memory_for_block_swap,
            vae_cpu=args.vae_cpu, compile=args.compile, compile_backend=args.compile_backend,
            compile_mode=args.compile_mode, compile_dynamic=args.compile_dynamic,
            compile_fullgraph=args.compile_fullgraph, compile_cache_size_limit=args.compile_cache_size_limit,
            attn_mode=args.attn_mode, text_encoder_cpu=args.text_encoder_cpu,
            **edit,
        )
