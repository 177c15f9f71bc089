"""Parser pieces shared by every script: the parser class, ``--kebab-case`` aliases and the compile flags."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from typing import Any

from tsumugi.cli.flag_notes import HelpFormatter, warn_no_op_flags
from tsumugi.errors import UserError

# --compile and its options (docs/training.md, "Memory options"), shared by the training and generate scripts.
COMPILE_FLAGS: list[tuple[str, dict]] = [
    ("--compile", {"action": "store_true", "help": "torch.compile the transformer blocks"}),
    ("--compile_backend", {"type": str, "default": "inductor", "help": "torch.compile backend"}),
    ("--compile_mode", {"type": str, "default": "default", "help": "torch.compile mode",
                        "choices": ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]}),
    ("--compile_dynamic", {"type": str, "default": None, "choices": ["true", "false", "auto"],
                           "help": "torch.compile dynamic shapes (default auto)"}),
    ("--compile_fullgraph", {"action": "store_true", "help": "torch.compile fullgraph (training: not with split attention)"}),
    ("--compile_cache_size_limit", {"type": int, "default": None, "help": "torch._dynamo cache size limit"}),
]


class UserErrorParser(argparse.ArgumentParser):
    """argparse whose usage errors are :class:`UserError` (one line, no traceback, exit status 2), whose
    ``--help`` states defaults, ``required`` and no-op or refused flags, and which warns once for each
    no-op flag given (:mod:`tsumugi.cli.flag_notes`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._warned_no_ops: set[str] = set()

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = super().parse_known_args(args, namespace)
        warn_no_op_flags(self, parsed, self._warned_no_ops)
        return parsed, extras

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


class KebabHelpFormatter(HelpFormatter):
    """Also leaves the ``--kebab-case`` aliases out of ``--help``."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        shown = [s for s in action.option_strings if not _is_hyphen_alias(s, action.option_strings)]
        if shown and len(shown) != len(action.option_strings):
            action = copy.copy(action)
            action.option_strings = shown
        return super()._format_action_invocation(action)


def _is_hyphen_alias(option: str, options: Sequence[str]) -> bool:
    return option.startswith("--") and "-" in option[2:] and "--" + option[2:].replace("-", "_") in options


class KebabParser(UserErrorParser):
    """A prefix that matches only one flag and its own ``--kebab-case`` alias is not ambiguous."""

    def _get_option_tuples(self, option_string: str):  # type: ignore[override]
        # '--blocks' matches '--blocks_to_swap' and its alias '--blocks-to-swap': one flag, not ambiguous
        seen: set[int] = set()
        unique = []
        for item in super()._get_option_tuples(option_string):
            if id(item[0]) not in seen:
                seen.add(id(item[0]))
                unique.append(item)
        return unique


def add_option(group: Any, *names: str, **kwargs: Any) -> argparse.Action:
    """``add_argument`` with a ``--kebab-case`` alias for each ``--snake_case`` name."""
    options: list[str] = []
    for name in names:
        options.append(name)
        alias = "--" + name[2:].replace("_", "-")
        if alias != name:
            options.append(alias)
    return group.add_argument(*options, **kwargs)


def add_flag(group: Any, name: str, help: str | None = None) -> argparse.Action:
    """A ``store_true`` option (with its ``--kebab-case`` alias)."""
    return add_option(group, name, action="store_true", help=help)
