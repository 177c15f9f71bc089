"""The ``*_generate_image`` scripts: parse the flags, run :func:`tsumugi.sample.generate.generate`."""

from __future__ import annotations

from tsumugi.arch import get_architecture
from tsumugi.cli.generate_args import build_generate_parser
from tsumugi.sample.generate import generate


def generate_main(arch_name: str, argv: list[str] | None = None) -> int:
    arch = get_architecture(arch_name)
    args = build_generate_parser(arch).parse_args(argv)
    generate(arch, args)
    return 0
