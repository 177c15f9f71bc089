"""The prompt-line syntax of ``--from_file`` and training sample files.

A line is ``prompt text --w 1024 --h 768 --s 20 --d 42 --g 4.0 --n negative text --fs 3.0``; options
follow the first `` --``. Empty lines and ``#`` comments are skipped. Unlike Musubi, an unknown option
is an error naming the line (a typo such as ``--sd 42`` must not silently use a random seed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tsumugi.errors import UserError


@dataclass
class PromptLine:
    """Per-prompt overrides; None means "use the command-line value"."""

    prompt: str
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    flow_shift: float | None = None
    negative_prompt: str | None = None
    frame_count: int | None = None
    """``--f``: frames (video models) / output layers (Layered); unused by text-to-image."""
    control_images: list[str] = field(default_factory=list)
    source: str = ""


_INT_OPTIONS = {"w": "width", "h": "height", "d": "seed", "s": "steps", "f": "frame_count"}
_FLOAT_OPTIONS = {"g": "guidance_scale", "l": "guidance_scale", "fs": "flow_shift"}
_OPTION_SPLIT = re.compile(r"\s--(?=[A-Za-z])")


def parse_prompt_line(line: str, source: str = "<prompt>", *, g_is_cfg: bool = True) -> PromptLine:
    """Parse one line; ``source`` (e.g. ``prompts.txt:3``) is used in error messages.

    ``g_is_cfg``: in generate prompt files ``--g`` and ``--l`` both set the CFG scale; in training sample
    files (Musubi's convention) ``--g`` is the embedded guidance, unused by these models, and only
    ``--l`` sets CFG.
    """
    parts = _OPTION_SPLIT.split(" " + line.strip())
    result = PromptLine(prompt=parts[0].strip(), source=source)
    for part in parts[1:]:
        key, _, value = part.partition(" ")
        key, value = key.strip().lower(), value.strip()
        try:
            if key in _INT_OPTIONS:
                setattr(result, _INT_OPTIONS[key], int(value))
            elif key == "g" and not g_is_cfg:
                float(value)  # validated, then ignored (embedded guidance)
            elif key in _FLOAT_OPTIONS:
                setattr(result, _FLOAT_OPTIONS[key], float(value))
            elif key == "n":
                result.negative_prompt = value
            elif key == "ci":
                result.control_images.append(value)
            else:
                known = sorted([*_INT_OPTIONS, *_FLOAT_OPTIONS, "n", "ci"])
                raise UserError(f"{source}: unknown option --{key} (known: {', '.join('--' + k for k in known)})")
        except ValueError:
            raise UserError(f"{source}: option --{key} expects a number, found {value!r}") from None
    return result


def read_prompt_file(path: str) -> list[PromptLine]:
    """All prompt lines of a text file (UTF-8)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--from_file: {path} does not exist")
    lines = []
    for number, raw in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        lines.append(parse_prompt_line(text, f"{path}:{number}"))
    if not lines:
        raise UserError(f"--from_file: {path} contains no prompt (only blank or # lines)")
    return lines
