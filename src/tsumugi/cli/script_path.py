"""Lets ``python src/tsumugi/<script>.py`` work from a checkout without installing the package.

Python puts the script's own folder (``src/tsumugi``) first on ``sys.path``; that would make our
subpackages (``data``, ``models``, ...) importable as top-level names. Replace it with ``src``.
"""

from __future__ import annotations

import sys
from pathlib import Path


def fix_sys_path(script_file: str) -> None:
    package_dir = Path(script_file).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != package_dir]
    src = str(package_dir.parent)
    if src not in sys.path:
        sys.path.insert(0, src)
