"""Relative paths in dataset configs and JSONL files.

Musubi opens relative paths from the current working directory, and so does tsumugi. As a fallback
that Musubi lacks, a relative path that does not exist from the working directory but does exist next
to the referring file (the TOML/JSON config, or the JSONL file) is taken from there. ``~`` is expanded.
"""

from __future__ import annotations

import os
from pathlib import Path


def resolve_path(raw: str, base_dir: Path | None) -> tuple[Path, bool]:
    """(absolute path, True if it was found relative to ``base_dir`` instead of the CWD)."""
    path = Path(os.path.expanduser(raw))
    if path.is_absolute():
        return Path(os.path.normpath(path)), False
    from_cwd = Path(os.path.abspath(path))
    if from_cwd.exists() or base_dir is None:
        return from_cwd, False
    beside = Path(os.path.abspath(base_dir / path))
    if beside.exists():
        return beside, True
    return from_cwd, False
