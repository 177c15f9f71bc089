"""``*_train_network`` and ``*_train``: parse and check the flags, then train."""

from __future__ import annotations

from tsumugi.cli.train_config_file import parse_train_args
from tsumugi.cli.train_parser import build_train_parser
from tsumugi.cli.train_validation import validate_train_args
from tsumugi.train.full_training import train_full
from tsumugi.train.network_training import train_network


def train_network_main(arch_name: str, argv: list[str] | None = None) -> int:
    """LoRA training (``<arch>_train_network``)."""
    parser = build_train_parser(arch_name, network=True)
    args = validate_train_args(parse_train_args(parser, argv))
    train_network(arch_name, args)
    return 0


def train_full_main(arch_name: str, argv: list[str] | None = None) -> int:
    """Full fine-tuning (``<arch>_train``)."""
    parser = build_train_parser(arch_name, network=False)
    args = validate_train_args(parse_train_args(parser, argv))
    train_full(arch_name, args)
    return 0
