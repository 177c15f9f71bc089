"""Counts for people: ``20.43B`` parameters rather than ``20430000000`` or ``20.43e9``."""

from __future__ import annotations


def format_count(n: int) -> str:
    """``n`` with a K/M/B suffix and up to two decimals (``20.43B``, ``1.2M``, ``9.71K``, ``512``)."""
    for suffix, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.2f}".rstrip("0").rstrip(".") + suffix
    return str(n)
