"""The argparse parser of every console script, by script name (shared by the structural CLI tests)."""

from __future__ import annotations

import argparse

from tsumugi import convert_lora, merge_lora
from tsumugi.arch import get_architecture
from tsumugi.cli.cache_args import build_cache_latents_parser, build_cache_text_parser
from tsumugi.cli.generate_args import build_generate_parser
from tsumugi.cli.lora_tools_args import build_caption_parser, build_ema_parser, build_extract_parser
from tsumugi.cli.train_args import build_train_parser


def script_parsers() -> dict[str, argparse.ArgumentParser]:
    parsers = {}
    for name in ("qwen_image", "zimage"):
        arch = get_architecture(name)
        for parser in (build_train_parser(name, network=True), build_train_parser(name, network=False),
                       build_generate_parser(arch), build_cache_latents_parser(arch), build_cache_text_parser(arch)):
            parsers[parser.prog] = parser
    parsers["merge_lora"] = merge_lora.build_parser()
    parsers["convert_lora"] = convert_lora.build_parser()
    for build in (build_extract_parser, build_ema_parser, build_caption_parser):
        parser = build()
        parsers[parser.prog] = parser
    return parsers
