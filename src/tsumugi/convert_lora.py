"""Convert a Qwen-Image / Z-Image LoRA between the Musubi layout and the diffusers/ComfyUI layout.

Musubi-compatible flags (``--input``, ``--output``, ``--target other|default``, ``--diffusers_prefix``,
``--diffusers_adapter_name``) plus ``--architecture`` and ``--keep_alpha``. See ``docs/lora_tools.md``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:  # run as a file: import the package from src/, not src/tsumugi/
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402

from tsumugi.cli.entry import run_main  # noqa: E402
from tsumugi.cli.generate_args import UserErrorParser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
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


def convert_main(argv: list[str] | None = None) -> int:
    from tsumugi.networks.lora_convert import DEFAULT_DIFFUSERS_PREFIX, convert_lora_file
    from tsumugi.preflight.runs import check_convert

    args = build_parser().parse_args(argv)
    check_convert(args.input, args.output)
    prefix = args.diffusers_prefix
    if prefix == "-":
        prefix = None
    elif prefix is None:
        prefix = DEFAULT_DIFFUSERS_PREFIX
    else:
        prefix = prefix.rstrip(".")
    convert_lora_file(
        args.input,
        args.output,
        args.target,
        diffusers_prefix=prefix,
        arch=args.architecture,
        keep_alpha=args.keep_alpha,
        adapter_name=args.diffusers_adapter_name,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: convert_main(argv))


if __name__ == "__main__":
    sys.exit(main())
