"""Command lines of the LoRA tools and companion scripts: ``merge_lora``, ``convert_lora``, ``qwen_extract_lora``,
``lora_post_hoc_ema``, ``caption_images_by_qwen_vl``.

Flag names and defaults are Musubi Tuner's; the few additions (``--lora_format``, ``--architecture``,
``--sort_by``, ``--output_dir``, ``--overwrite``, ``--device``) are marked in ``docs/lora_tools.md``.
"""

from __future__ import annotations

import argparse

from tsumugi.cli.common import UserErrorParser
from tsumugi.cli.train_parser import LORA_FORMATS

SAVE_PRECISIONS = ("float", "fp32", "fp16", "bf16")
# --save_dtype of merge_lora
MERGE_SAVE_DTYPES = ("bf16", "bfloat16", "float16", "float32", "fp16", "fp32")


def build_merge_parser() -> argparse.ArgumentParser:
    parser = UserErrorParser(
        prog="merge_lora",
        description="Merge LoRA files into a Qwen-Image / Z-Image DiT and save one ComfyUI-layout file.",
    )
    parser.add_argument("--dit", required=True, help="DiT: ComfyUI single file, shard, index or diffusers folder")
    parser.add_argument("--dit_in_channels", type=int, default=None, help="HunyuanVideo only in Musubi; ignored")
    parser.add_argument("--lora_weight", nargs="*", default=None, help="LoRA files to merge, in order")
    parser.add_argument(
        "--lora_multiplier", nargs="*", type=float, default=None, help="one per --lora_weight (missing: 1.0)"
    )
    parser.add_argument("--save_merged_model", required=True, help="output .safetensors file (written atomically)")
    parser.add_argument("--device", default=None, help="where the LoRA products are computed (cuda if available)")
    parser.add_argument(
        "--architecture", default="auto", choices=["auto", "qwen_image", "zimage"],
        help="DiT architecture (default: detected from the DiT file)",
    )
    parser.add_argument(
        "--save_dtype", default=None, choices=sorted(MERGE_SAVE_DTYPES),
        help="dtype of the saved weights (default: the DiT's; bfloat16 for float8 DiTs)",
    )
    return parser


def build_convert_parser() -> argparse.ArgumentParser:
    parser = UserErrorParser(
        prog="convert_lora",
        description="Convert LoRA weights between the Musubi (default) and diffusers/ComfyUI (other) layouts.",
    )
    parser.add_argument("--input", required=True, help="source LoRA (.safetensors), any supported layout")
    parser.add_argument("--output", required=True, help="destination file (written atomically)")
    parser.add_argument(
        "--target", required=True, choices=["other", "default"],
        help="other: diffusers/ComfyUI keys (<prefix>.<module>.lora_A/B.weight); default: Musubi lora_unet_ keys",
    )
    parser.add_argument(
        "--diffusers_prefix", default=None,
        help="key prefix for --target other (default diffusion_model; '-' for none)",
    )
    parser.add_argument(
        "--diffusers_adapter_name", default=None,
        help="PEFT adapter name inserted in --target other keys (lora_A.<name>.weight); none by default",
    )
    parser.add_argument(
        "--architecture", default="auto", choices=["auto", "qwen_image", "zimage"],
        help="model the LoRA is for (default: detected from the module names)",
    )
    parser.add_argument(
        "--keep_alpha", action="store_true",
        help="--target other: keep the factors and write <module>.alpha instead of folding alpha into them",
    )
    return parser


def build_extract_parser() -> argparse.ArgumentParser:
    parser = UserErrorParser(
        prog="qwen_extract_lora",
        description="Extract a LoRA from the difference of a fine-tuned and a base Qwen-Image / Z-Image DiT "
        "(truncated SVD of each LoRA target Linear, one module at a time).",
    )
    parser.add_argument("--model_org", required=True, help="base DiT: single file, shard, index or diffusers folder")
    parser.add_argument("--model_tuned", required=True, help="fine-tuned DiT of the same architecture and shapes")
    parser.add_argument("--save_to", required=True, help="output LoRA .safetensors (written atomically)")
    parser.add_argument("--dim", type=int, default=4, help="LoRA rank (capped per module at its smaller side)")
    parser.add_argument("--device", default=None, help="device of the SVDs, e.g. cuda (default: cpu)")
    parser.add_argument(
        "--clamp_quantile", type=float, default=0.99,
        help="clamp the factors' entries to this quantile of their absolute values; 1 keeps them unclamped",
    )
    parser.add_argument(
        "--save_precision", default=None, choices=SAVE_PRECISIONS,
        help="dtype of the saved tensors: float/fp32, fp16 or bf16 (default: float)",
    )
    parser.add_argument(
        "--mem_eff_safe_open", action="store_true",
        help="accepted for Musubi commands; weights are always read one tensor at a time",
    )
    parser.add_argument("--no_metadata", action="store_true", help="write the file without safetensors metadata")
    parser.add_argument(
        "--lora_format", default="default", choices=LORA_FORMATS,
        help="key layout, as for training: default = the family's (musubi for Qwen-Image, diffusion_model for "
        "Z-Image); musubi; diffusers; comfyui = default",
    )
    return parser


def build_ema_parser() -> argparse.ArgumentParser:
    parser = UserErrorParser(
        prog="lora_post_hoc_ema",
        description="Average saved LoRA checkpoints with an EMA (constant or linearly changing beta) or a "
        "power-function EMA (--sigma_rel), oldest to newest.",
    )
    parser.add_argument("path", nargs="+", help="LoRA checkpoint files (.safetensors), at least one")
    parser.add_argument("--no_sort", action="store_true", help="keep the files in the order given (else see --sort_by)")
    parser.add_argument(
        "--sort_by", default="mtime", choices=["mtime", "step"],
        help="order of the files: mtime = modification time (Musubi); step = the ss_steps metadata "
        "(else the last number in the file name)",
    )
    parser.add_argument("--beta", type=float, default=0.95, help="EMA decay of the first merge step")
    parser.add_argument(
        "--beta2", type=float, default=None,
        help="EMA decay of the last merge step; beta goes linearly from --beta to it (default: --beta)",
    )
    parser.add_argument(
        "--sigma_rel", type=float, default=None,
        help="power-function EMA with this relative width (Karras et al. 2024); replaces --beta/--beta2",
    )
    parser.add_argument("--output_file", required=True, help="output .safetensors (written atomically)")
    return parser


def build_caption_parser() -> argparse.ArgumentParser:
    from tsumugi.text.captioning import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_SIZE, DEFAULT_PROMPT_NAME

    parser = UserErrorParser(
        prog="caption_images_by_qwen_vl",
        description="Caption a folder of images with Qwen2.5-VL (the Qwen-Image text-encoder file), greedy "
        "decoding.",
    )
    parser.add_argument("--image_dir", required=True, help="folder of images (not searched recursively)")
    parser.add_argument(
        "--model_path", required=True,
        help="Qwen2.5-VL weights with vision tower and lm_head (e.g. qwen_2.5_vl_7b.safetensors)",
    )
    parser.add_argument(
        "--output_format", default="jsonl", choices=["jsonl", "text"],
        help="jsonl: one {image_path, caption} line per image in --output_file; text: a .txt per image",
    )
    parser.add_argument("--output_file", default=None, help="JSONL file to write (required for --output_format jsonl)")
    parser.add_argument(
        "--output_dir", default=None, help="folder for the .txt captions of --output_format text (default: beside "
        "the images)",
    )
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="most tokens generated per caption")
    parser.add_argument(
        "--prompt", default=None,
        help=f"instruction given with each image; \\n becomes a newline (default: {DEFAULT_PROMPT_NAME})",
    )
    parser.add_argument(
        "--max_size", type=int, default=DEFAULT_MAX_SIZE,
        help="images are resized (aspect kept, sides multiples of 28) to at most max_size*28*28 pixels of area "
        "(1280: about 1000x1000) and at least 256*28*28",
    )
    parser.add_argument("--fp8_vl", action="store_true", help="store the Linear weights (vision tower and language model; not lm_head) in float8")
    parser.add_argument("--device", default=None, help="device to run on (default: cuda if available, else cpu)")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="caption every image; without it images that already have a caption are skipped",
    )
    return parser


def parse_device(name: str | None, default: str | None = None):
    """``--device`` as a torch device; ``None`` gives ``default`` (cuda if available when that is None too)."""
    import torch

    from tsumugi.errors import UserError

    name = name or default
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--device: {name!r} is not a device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device: {name} requested but CUDA is not available")
    return device
