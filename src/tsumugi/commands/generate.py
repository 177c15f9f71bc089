"""The ``*_generate_image`` scripts: parse the flags, build the :class:`GenerateConfig`, run it."""

from __future__ import annotations

from tsumugi.arch import get_architecture
from tsumugi.cli.generate_args import build_generate_parser, resolve_model_version
from tsumugi.sample.config import GenerateConfig
from tsumugi.sample.generate import generate


def generate_main(arch_name: str, argv: list[str] | None = None) -> int:
    arch = get_architecture(arch_name)
    args = build_generate_parser(arch).parse_args(argv)
    version = resolve_model_version(args) if arch.name == "qwen_image" else "original"
    generate(arch, GenerateConfig.from_args(args, version))
    return 0
