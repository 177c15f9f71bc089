"""Collect every problem of a dataset config before raising, so one run shows them all.

Each message is one line that starts with the config file and names the place: a key
(``datasets[1].resolution``), a JSONL line, or an image path.
"""

from __future__ import annotations

import logging

from tsumugi.errors import UserError

MAX_LISTED = 20
"""Warnings that list files show at most this many names, then "... and N more"."""


def short_list(names: list[str], limit: int = MAX_LISTED) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... and {len(names) - limit} more"


class Problems:
    """Errors and warnings of one config file."""

    def __init__(self, source: str):
        self.source = source
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, where: str, message: str) -> None:
        self.errors.append(f"{self.source}: {where}: {message}")

    def warn(self, where: str, message: str) -> None:
        self.warnings.append(f"{self.source}: {where}: {message}")

    def raise_if_errors(self) -> None:
        if not self.errors:
            return
        count = len(self.errors)
        header = f"dataset config {self.source}: {count} problem{'s' if count > 1 else ''}"
        raise UserError(header + "\n" + "\n".join(f"  {line}" for line in self.errors))

    def emit_warnings(self, logger: logging.Logger) -> None:
        for line in self.warnings:
            logger.warning("%s", line)
