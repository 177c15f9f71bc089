"""Flags of the caching scripts (``docs/caching.md``)."""

from __future__ import annotations

import argparse

from tsumugi.arch.base import Architecture
from tsumugi.cli.common import UserErrorParser
from tsumugi.cli.generate_args import add_model_version_flags


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset_config", required=True, help="dataset TOML (or JSON), Musubi format")
    parser.add_argument("--device", default=None, help="cuda if available, else cpu")
    parser.add_argument("--batch_size", type=int, default=None, help="items per encoder call (dataset batch size)")
    parser.add_argument("--num_workers", type=int, default=None, help="image-loading threads (cpu count - 1)")
    parser.add_argument("--skip_existing", action="store_true", help="keep caches that are present and current")
    parser.add_argument("--keep_cache", action="store_true", help="do not delete caches of removed images")
    parser.add_argument("--debug_mode", choices=["image", "console", "video"], default=None,
                        help="preview buckets and crops (summary + contact-sheet PNG) instead of caching")
    parser.add_argument("--console_width", type=int, default=80, help="see tsumugi.cli.flag_notes")
    parser.add_argument("--console_back", default=None, help="see tsumugi.cli.flag_notes")
    parser.add_argument("--console_num_images", type=int, default=None, help="see tsumugi.cli.flag_notes")
    parser.add_argument("--disable_cudnn_backend", action="store_true", help="torch.backends.cudnn.enabled=False")
    parser.add_argument("--cache_dtype", choices=["bfloat16", "float32"], default=None,
                        help="dtype of the cached tensors (default: Musubi's: bfloat16, except float32 for Z-Image "
                        "latents)")


def build_cache_latents_parser(arch: Architecture) -> argparse.ArgumentParser:
    parser = UserErrorParser(prog=f"{arch.name}_cache_latents", description=f"{arch.display_name} latent caching.")
    _common(parser)
    parser.add_argument("--vae", default=None, help="VAE file or folder (required unless --debug_mode)")
    parser.add_argument("--vae_dtype", default=None, help="Qwen-Image: refused; Z-Image: no effect (warns); the VAE "
                        "runs in float32")
    if arch.name == "qwen_image":
        add_model_version_flags(parser)
        for flag in ("--vae_tiling", "--vae_chunk_size", "--vae_spatial_tile_sample_min_size"):
            parser.add_argument(flag, nargs="?", const=True, default=None, help="see tsumugi.cli.flag_notes")
    return parser


def build_cache_text_parser(arch: Architecture) -> argparse.ArgumentParser:
    parser = UserErrorParser(
        prog=f"{arch.name}_cache_text_encoder_outputs", description=f"{arch.display_name} text-encoder caching."
    )
    _common(parser)
    parser.add_argument("--text_encoder", required=True, help="text encoder file, first shard or folder")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder overriding the bundled files")
    fp8 = "--fp8_vl" if arch.name == "qwen_image" else "--fp8_llm"
    parser.add_argument(fp8, dest="fp8_text_encoder", action="store_true", help="store the encoder's Linears in fp8")
    if arch.name == "qwen_image":
        add_model_version_flags(parser)
    return parser
