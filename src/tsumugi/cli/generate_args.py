"""Flags of the ``*_generate_image`` scripts (Musubi's names and defaults, see ``docs/generate.md``)."""

from __future__ import annotations

import argparse

from tsumugi.arch.base import Architecture
from tsumugi.cli.common import COMPILE_FLAGS, UserErrorParser  # noqa: F401  (also imported from here)
from tsumugi.model_versions import MODEL_VERSIONS, resolve_model_version  # noqa: F401  (also imported from here)
from tsumugi.sample.jobs import DEFAULT_STEPS

OUTPUT_TYPES = ("images", "latent", "latent_images", "both")


def build_generate_parser(arch: Architecture) -> argparse.ArgumentParser:
    parser = UserErrorParser(
        prog=f"{arch.name}_generate_image",
        description=f"{arch.display_name} text-to-image generation.",
        allow_abbrev=True,
    )
    models = parser.add_argument_group("models")
    models.add_argument("--dit", help="DiT: ComfyUI single file, first shard of a split set, or diffusers folder; required")
    models.add_argument("--vae", help="VAE: single file (ComfyUI/original or diffusers keys) or diffusers folder; required "
                        "unless --output_type latent")
    models.add_argument("--text_encoder", help="text encoder: single file, first shard, or diffusers folder; required")
    models.add_argument("--tokenizer", help="tokenizer folder (or hub id) overriding the bundled tokenizer files")
    models.add_argument("--lora_weight", nargs="*", default=None, help="LoRA files merged into the DiT")
    models.add_argument("--lora_multiplier", nargs="*", type=float, default=None, help="one per LoRA (1.0)")
    models.add_argument("--include_patterns", nargs="*", default=None, help="one regex per LoRA: merge only the modules it matches")
    models.add_argument("--exclude_patterns", nargs="*", default=None, help="one regex per LoRA: skip the modules it matches")
    if arch.name == "qwen_image":
        add_model_version_flags(models)
        add_edit_flags(parser)
        add_layered_flags(parser)

    prompt = parser.add_argument_group("prompt and sampling")
    prompt.add_argument("--prompt", help="prompt text (this, --from_file or --latent_path is required)")
    prompt.add_argument(
        "--negative_prompt", default=None, help=f"negative prompt (default {arch.default_negative_prompt!r})"
    )
    prompt.add_argument("--from_file", help="prompt file: .txt, one prompt per line, per-line options (w, h, s, d, g or l = CFG "
                        "scale, n, fs) written with two hyphens after the prompt as in Musubi; or Musubi's .toml/.json "
                        "sample-prompt forms (docs/generate.md)")
    prompt.add_argument("--image_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="output height and width, positive multiples of 16 (default: the first control's VAE size "
                        "for edit, else 256 256)")
    prompt.add_argument("--infer_steps", type=int, default=DEFAULT_STEPS, help="denoising steps")
    prompt.add_argument("--guidance_scale", type=float, default=arch.default_guidance_scale,
                        help="classifier-free guidance scale")
    shift_help = "static flow shift (default: resolution-dependent)" if arch.default_flow_shift is None else (
        f"static flow shift (default {arch.default_flow_shift})"
    )
    prompt.add_argument("--flow_shift", type=float, default=None, help=shift_help)
    prompt.add_argument("--seed", type=int, default=None, help="random when omitted")
    prompt.add_argument("--embedded_cfg_scale", type=float, default=None, help="see tsumugi.cli.flag_notes")
    if arch.name == "zimage":
        prompt.add_argument(
            "--cpu_noise", action="store_true", help="see tsumugi.cli.flag_notes"
        )

    output = parser.add_argument_group("output")
    output.add_argument("--save_path", help="output folder; required")
    output.add_argument("--output_type", default="images", choices=OUTPUT_TYPES,
                        help="PNG images, latent files, or both (latent_images = both)")
    output.add_argument("--no_metadata", action="store_true", help="no settings in saved latent files")
    output.add_argument("--latent_path", nargs="*", default=None, help="decode saved latent files only")

    device = parser.add_argument_group("device and precision")
    device.add_argument("--device", default=None, help="cuda if available, else cpu")
    device.add_argument("--dit_dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="bfloat16 on GPU, float32 on CPU by default")
    device.add_argument("--fp8", action="store_true", help="DiT block Linears stored in float8 (plain cast)")
    device.add_argument("--fp8_scaled", action="store_true",
                        help="DiT block Linears in float8 with per-block scales (better quality; works without --fp8)")
    device.add_argument("--blocks_to_swap", type=int, default=0,
                        help="keep N transformer blocks in CPU memory, streamed to the GPU ahead of use")
    device.add_argument("--use_pinned_memory_for_block_swap", action="store_true", help="pinned CPU copies")
    device.add_argument("--vae_cpu", action="store_true", help="decode with the VAE on the CPU (saves GPU memory)")
    for name, kwargs in COMPILE_FLAGS:
        device.add_argument(name, **kwargs)
    device.add_argument("--attn_mode", default="torch", help="attention: torch (= sdpa), flash, xformers or sageattn")
    device.add_argument("--text_encoder_cpu", action="store_true", help="run the text encoder on the CPU")
    return parser


def add_model_version_flags(group: argparse._ActionsContainer) -> None:
    group.add_argument("--model_version", default=None, help=f"one of {', '.join(MODEL_VERSIONS)} (original)")
    group.add_argument("--edit", action="store_true", help="legacy alias of --model_version edit")
    group.add_argument("--edit_plus", action="store_true", help="legacy alias of --model_version edit-2509")


def add_edit_flags(parser: argparse.ArgumentParser) -> None:
    edit = parser.add_argument_group("Qwen-Image-Edit")
    edit.add_argument("--control_image_path", nargs="*", default=None,
                      help="control image(s) in order (edit: DiT uses all, the text encoder only the first)")
    edit.add_argument("--resize_control_to_image_size", action="store_true",
                      help="resize/crop controls to the output size (VAE and text encoder)")
    edit.add_argument("--resize_control_to_official_size", action="store_true",
                      help="VAE controls at ~1024x1024 area, text-encoder controls at ~384x384 area (recommended)")
    edit.add_argument("--append_original_name", action="store_true",
                      help="add the first control's base name to the output names")
    edit.add_argument("--mask_path", default=None, help="inpainting mask (white = regenerate, black = keep)")
    edit.add_argument("--rcm_threshold", type=float, default=None,
                      help="Reference Consistency Mask: pin regions whose latent differs less than this")
    edit.add_argument("--rcm_relative_threshold", action="store_true",
                      help="--rcm_threshold is a fraction of the step's largest difference")
    edit.add_argument("--rcm_kernel_size", type=int, default=3,
                      help="RCM Gaussian blur kernel (forced odd; 0/1: none; default 3, as Musubi)")
    edit.add_argument("--rcm_dilate_size", type=int, default=0, help="RCM dilation radius of the regenerate region")
    edit.add_argument("--rcm_debug_save", action="store_true", help="save the RCM mask of every step as PNG")


def add_layered_flags(parser: argparse.ArgumentParser) -> None:
    layered = parser.add_argument_group("Qwen-Image-Layered (--model_version layered; input image: --control_image_path)")
    layered.add_argument("--output_layers", type=int, default=4,
                         help="layers to decompose the input image into; the composite is written too (N + 1 PNGs)")
    layered.add_argument("--automatic_prompt_lang_for_layered", default=None, choices=["en", "cn"],
                         help="layered: a job without prompt text gets a caption of its input image, written by "
                         "the text encoder's language model with an English or Chinese instruction")

