"""The prompt-line syntax of ``--from_file`` and training sample files.

A line is ``prompt text --w 1024 --h 768 --s 20 --d 42 --g 4.0 --n negative text --fs 3.0``; options
follow the first `` --``. Empty lines and ``#`` comments are skipped. Unlike Musubi, an unknown option
is an error naming the line (a typo such as ``--sd 42`` must not silently use a random seed), and so is a
value out of range (``--s 0``, ``--g nan``, ``--w -16``) and a line with options but no prompt text
(unless the caller has a fallback prompt). Files are UTF-8, or UTF-16/UTF-32 with a byte-order mark.

Generate prompt files (``read_prompt_file``) also accept the Qwen-Image-Edit mask/RCM options ``--m PATH``,
``--rcm_th X``, ``--rcm_rel_th B``, ``--rcm_ks N``, ``--rcm_ds N``; the architecture checks happen in
``tsumugi.sample.generate``. Training sample files do not accept them (unknown option).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from tsumugi.errors import UserError
from tsumugi.preflight.text_files import numbered_lines, read_text


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
    mask_path: str | None = None
    """``--m``: inpainting mask (Qwen-Image Edit)."""
    rcm_threshold: float | None = None
    """``--rcm_th``."""
    rcm_relative_threshold: bool | None = None
    """``--rcm_rel_th``."""
    rcm_kernel_size: int | None = None
    """``--rcm_ks``."""
    rcm_dilate_size: int | None = None
    """``--rcm_ds``."""
    source: str = ""

    @property
    def given_edit_options(self) -> list[str]:
        """The mask/RCM options this line gives (as written), for error messages."""
        given = (("--m", self.mask_path), ("--rcm_th", self.rcm_threshold),
                 ("--rcm_rel_th", self.rcm_relative_threshold), ("--rcm_ks", self.rcm_kernel_size),
                 ("--rcm_ds", self.rcm_dilate_size))
        return [name for name, value in given if value is not None]


_INT_OPTIONS = {"w": "width", "h": "height", "d": "seed", "s": "steps", "f": "frame_count"}
_FLOAT_OPTIONS = {"g": "guidance_scale", "l": "guidance_scale", "fs": "flow_shift"}
_EDIT_INT_OPTIONS = {"rcm_ks": "rcm_kernel_size", "rcm_ds": "rcm_dilate_size"}
_EDIT_FLOAT_OPTIONS = {"rcm_th": "rcm_threshold"}
_EDIT_OPTIONS = [*_EDIT_INT_OPTIONS, *_EDIT_FLOAT_OPTIONS, "m", "rcm_rel_th"]
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")
_OPTION_SPLIT = re.compile(r"\s--(?=[A-Za-z])")

# field -> (option as written in a text line, smallest allowed value, whether the minimum is excluded)
_RANGES = {
    "width": ("--w", 0, True), "height": ("--h", 0, True), "steps": ("--s", 1, False),
    "frame_count": ("--f", 1, False), "guidance_scale": ("--g/--l", 0, False), "flow_shift": ("--fs", 0, True),
    "rcm_threshold": ("--rcm_th", None, False), "seed": ("--d", None, False),
}  # --rcm_ks / --rcm_ds (>= 0) are checked with the other mask/RCM rules in tsumugi.sample.generate
_INT_FIELDS = {"width", "height", "steps", "frame_count", "seed"}


def check_values(line: PromptLine) -> PromptLine:
    """Every numeric setting of ``line`` is a finite number of the right type in range; returns ``line``."""
    for name, (option, minimum, exclusive) in _RANGES.items():
        value = getattr(line, name)
        if value is None:
            continue
        integer = name in _INT_FIELDS
        ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
        ok = ok and not isinstance(value, bool)
        if ok and minimum is not None:
            ok = value > minimum if exclusive else value >= minimum
        if not ok:
            kind = "an integer" if integer else "a finite number"
            bound = "" if minimum is None else f" {'>' if exclusive else '>='} {minimum}"
            raise UserError(f"{line.source}: {option} ({name}) expects {kind}{bound}, found {value!r}")
    return line


def require_text(line: PromptLine) -> PromptLine:
    """A line that sets options but has no prompt text is a mistake (the text was probably lost)."""
    if not line.prompt.strip():
        raise UserError(f"{line.source}: options but no prompt text; expected 'prompt text --w 1024 --h 1024 ...'")
    return line


def parse_prompt_line(
    line: str, source: str = "<prompt>", *, g_is_cfg: bool = True, edit_options: bool = False
) -> PromptLine:
    """Parse one line; ``source`` (e.g. ``prompts.txt:3``) is used in error messages.

    ``edit_options``: accept ``--m``, ``--rcm_th``, ``--rcm_rel_th``, ``--rcm_ks``, ``--rcm_ds`` (generate
    prompt files; whether the model takes them is checked by the caller).

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
                if not math.isfinite(float(value)):  # validated, then ignored (embedded guidance)
                    raise UserError(f"{source}: option --g expects a finite number, found {value!r}")
            elif key in _FLOAT_OPTIONS:
                setattr(result, _FLOAT_OPTIONS[key], float(value))
            elif key == "n":
                result.negative_prompt = value
            elif key == "ci":
                result.control_images.append(value)
            elif edit_options and key in _EDIT_INT_OPTIONS:
                setattr(result, _EDIT_INT_OPTIONS[key], int(value))
            elif edit_options and key in _EDIT_FLOAT_OPTIONS:
                setattr(result, _EDIT_FLOAT_OPTIONS[key], float(value))
            elif edit_options and key == "m":
                if not value:
                    raise UserError(f"{source}: option --m expects a mask file path")
                result.mask_path = value
            elif edit_options and key == "rcm_rel_th":
                if value.lower() not in (*_TRUE, *_FALSE):
                    raise UserError(f"{source}: option --rcm_rel_th expects 1/true/yes or 0/false/no, found {value!r}")
                result.rcm_relative_threshold = value.lower() in _TRUE
            else:
                known = sorted([*_INT_OPTIONS, *_FLOAT_OPTIONS, "n", "ci", *(_EDIT_OPTIONS if edit_options else [])])
                raise UserError(f"{source}: unknown option --{key} (known: {', '.join('--' + k for k in known)})")
        except ValueError:
            raise UserError(f"{source}: option --{key} expects a number, found {value!r}") from None
    return check_values(result)


def read_prompt_file(path: str, *, fallback_prompt: bool = False) -> list[PromptLine]:
    """All prompt lines of ``--from_file`` (UTF-8, or UTF-16/32 with a BOM).

    ``fallback_prompt``: lines with options but no text are allowed (the caller has ``--prompt``).
    """
    lines = []
    for number, raw in numbered_lines(read_text(path, "--from_file", "prompt text file")):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        line = parse_prompt_line(text, f"{path}:{number}", edit_options=True)
        lines.append(line if fallback_prompt else require_text(line))
    if not lines:
        raise UserError(f"--from_file: {path} contains no prompt (only blank or # lines)")
    return lines
