"""Which control images belong to which target (``docs/design.md``, "Dataset items and batches").

Directory form: a control file belongs to the image with stem ``S`` when its name starts with ``S.``
or ``S_``. Images are matched longest stem first and a matched file leaves the pool, so ``img1`` never
takes ``img10_0.png``. Several controls are ordered: exact stem (``S.png``) first, then by the integer
after the last ``_`` (``S_0``, ``S_1``, ``S_10`` or ``S_0000``...). A non-numeric suffix is an error.
Files tied on that order (``S_0.png`` and ``S_0.jpg``) are sorted by name and reported as ambiguous.

JSONL form: ``control_path`` is ``control_path_0``; ``control_path_<digits>`` keys are renumbered
0..n-1 in numeric order. Having both ``control_path`` and ``control_path_0`` (or two keys with the
same number, ``control_path_1``/``control_path_01``) is reported as ambiguous.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePath

_DIGITS = re.compile(r"[0-9]+")
_JSONL_CONTROL_KEY = re.compile(r"control_path(?:_([0-9]+))?")


@dataclass
class ControlMatch:
    """Result of matching control file names to image stems."""

    matches: dict[str, list[str]] = field(default_factory=dict)
    """image stem -> control file names in control order (stems without controls are absent)."""
    bad_suffix: list[tuple[str, str]] = field(default_factory=list)
    """(control file name, image stem) pairs whose suffix is not a number."""
    ambiguous: list[tuple[str, list[str]]] = field(default_factory=list)
    """(image stem, names) where two files have the same control position."""
    unused: list[str] = field(default_factory=list)
    """control files that matched no image."""


def _order_key(stem: str, name: str) -> tuple[int, int] | None:
    """(0, 0) for the exact stem, (1, n) for a numeric suffix n, None for a non-numeric suffix."""
    control_stem = PurePath(name).stem
    if control_stem == stem:
        return (0, 0)
    if "_" in control_stem:
        suffix = control_stem.rsplit("_", 1)[1]
        if _DIGITS.fullmatch(suffix):
            return (1, int(suffix))
    return None


def match_controls(image_stems: Iterable[str], control_names: Iterable[str]) -> ControlMatch:
    """Match control file names (no directories) to image stems; see the module docstring."""
    pool = set(control_names)
    result = ControlMatch()
    for stem in sorted(set(image_stems), key=lambda s: (-len(s), s)):
        candidates = sorted(n for n in pool if n.startswith(stem + ".") or n.startswith(stem + "_"))
        if not candidates:
            continue
        pool.difference_update(candidates)
        keyed: list[tuple[tuple[int, int], str]] = []
        for name in candidates:
            key = _order_key(stem, name)
            if key is None:
                result.bad_suffix.append((name, stem))
            else:
                keyed.append((key, name))
        keyed.sort()
        for i in range(1, len(keyed)):
            if keyed[i][0] == keyed[i - 1][0]:
                tied = [n for k, n in keyed if k == keyed[i][0]]
                if (stem, tied) not in result.ambiguous:
                    result.ambiguous.append((stem, tied))
        if keyed:
            result.matches[stem] = [name for _, name in keyed]
    result.unused = sorted(pool)
    return result


def jsonl_control_paths(record: Mapping[str, object]) -> tuple[list[object], list[str]]:
    """Control values of one JSONL record in control order, and problems (ambiguous keys).

    Values are returned as found (type checking is the caller's job).
    """
    numbered: dict[int, list[str]] = {}
    for key in record:
        m = _JSONL_CONTROL_KEY.fullmatch(key)
        if m:
            index = int(m.group(1)) if m.group(1) is not None else 0
            numbered.setdefault(index, []).append(key)
    problems = [
        f"keys {' and '.join(sorted(keys))} both mean control image {index}; keep one"
        for index, keys in sorted(numbered.items())
        if len(keys) > 1
    ]
    values = [record[sorted(numbered[i])[0]] for i in sorted(numbered)]
    return values, problems
