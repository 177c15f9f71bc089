"""The argparse parser of every console script, by script name (shared by the structural CLI tests)."""

from __future__ import annotations

import argparse

from tsumugi.arch import get_architecture
from tsumugi.cli.cache_args import build_cache_latents_parser, build_cache_text_parser
from tsumugi.cli.generate_args import build_generate_parser
from tsumugi.cli.lora_tools_args import (
    build_caption_parser,
    build_convert_parser,
    build_ema_parser,
    build_extract_parser,
    build_merge_parser,
)
from tsumugi.cli.train_parser import build_train_parser


def script_parsers() -> dict[str, argparse.ArgumentParser]:
    parsers = {}
    for name in ("qwen_image", "zimage"):
        arch = get_architecture(name)
        for parser in (build_train_parser(name, network=True), build_train_parser(name, network=False),
                       build_generate_parser(arch), build_cache_latents_parser(arch), build_cache_text_parser(arch)):
            parsers[parser.prog] = parser
    for build in (build_merge_parser, build_convert_parser, build_extract_parser, build_ema_parser, build_caption_parser):
        parser = build()
        parsers[parser.prog] = parser
    return parsers
