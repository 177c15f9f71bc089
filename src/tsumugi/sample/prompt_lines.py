"""The prompt files of ``--from_file`` and ``--sample_prompts``: one reader, one meaning per option.

A line is ``prompt text --w 1024 --h 768 --s 20 --d 42 --g 4.0 --n negative text --fs 3.0``; options
follow the first `` --``. Empty lines and ``#`` comments are skipped. ``--g`` and ``--l`` both set the
classifier-free guidance (CFG) scale, in generation and in training samples alike (these models take no
embedded guidance); when a line gives both, ``--l`` wins and a warning names the line. A ``.toml``
(``[prompt]`` + ``[[prompt.subset]]``) or ``.json`` (a list of lines or tables) file holds the same
settings under Musubi's key names. Unlike Musubi, an unknown option
is an error naming the line (a typo such as ``--sd 42`` must not silently use a random seed), and so is a
value out of range (``--s 0``, ``--g nan``, ``--w -16``) and a line with options but no prompt text
(unless the caller has a fallback prompt). Files are UTF-8, or UTF-16/UTF-32 with a byte-order mark.

Lines also accept the Qwen-Image-Edit mask/RCM options ``--m PATH``, ``--rcm_th X``, ``--rcm_rel_th B``,
``--rcm_ks N``, ``--rcm_ds N``; whether the model takes them is checked in ``tsumugi.sample.jobs``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from tsumugi.errors import UserError
from tsumugi.preflight.text_files import numbered_lines, read_text

logger = logging.getLogger(__name__)


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
_FLOAT_OPTIONS = {"fs": "flow_shift"}
_CFG_OPTIONS = ("g", "l")  # both the CFG scale; --l wins when a line gives both
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
}  # --rcm_ks / --rcm_ds (>= 0) are checked with the other mask/RCM rules in tsumugi.sample.jobs
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


def parse_prompt_line(line: str, source: str = "<prompt>") -> PromptLine:
    """Parse one line; ``source`` (e.g. ``prompts.txt:3``) is used in error messages."""
    parts = _OPTION_SPLIT.split(" " + line.strip())
    result = PromptLine(prompt=parts[0].strip(), source=source)
    cfg: dict[str, float] = {}
    for part in parts[1:]:
        key, _, value = part.partition(" ")
        key, value = key.strip().lower(), value.strip()
        try:
            if key in _INT_OPTIONS:
                setattr(result, _INT_OPTIONS[key], int(value))
            elif key in _CFG_OPTIONS:
                cfg[key] = float(value)
            elif key in _FLOAT_OPTIONS:
                setattr(result, _FLOAT_OPTIONS[key], float(value))
            elif key == "n":
                result.negative_prompt = value
            elif key == "ci":
                result.control_images.append(value)
            elif key in _EDIT_INT_OPTIONS:
                setattr(result, _EDIT_INT_OPTIONS[key], int(value))
            elif key in _EDIT_FLOAT_OPTIONS:
                setattr(result, _EDIT_FLOAT_OPTIONS[key], float(value))
            elif key == "m":
                if not value:
                    raise UserError(f"{source}: option --m expects a mask file path")
                result.mask_path = value
            elif key == "rcm_rel_th":
                if value.lower() not in (*_TRUE, *_FALSE):
                    raise UserError(f"{source}: option --rcm_rel_th expects 1/true/yes or 0/false/no, found {value!r}")
                result.rcm_relative_threshold = value.lower() in _TRUE
            else:
                known = sorted([*_INT_OPTIONS, *_CFG_OPTIONS, *_FLOAT_OPTIONS, "n", "ci", *_EDIT_OPTIONS])
                raise UserError(f"{source}: unknown option --{key} (known: {', '.join('--' + k for k in known)})")
        except ValueError:
            raise UserError(f"{source}: option --{key} expects a number, found {value!r}") from None
    result.guidance_scale = _one_cfg_scale(cfg.get("g"), cfg.get("l"), source, ("--g", "--l"))
    return check_values(result)


def _one_cfg_scale(g: float | None, l_value: float | None, source: str, names: tuple[str, str]) -> float | None:
    """The CFG scale of a line from ``--g`` and ``--l`` (``guidance_scale`` / ``cfg_scale`` in TOML/JSON)."""
    if g is not None and l_value is not None and g != l_value:
        logger.warning("%s: %s %s and %s %s both set the CFG scale; %s %s is used", source, names[0], g,
                       names[1], l_value, names[1], l_value)
    return l_value if l_value is not None else g


# TOML/JSON keys (Musubi's names) -> PromptLine fields; guidance_scale / cfg_scale are --g / --l
_TABLE_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
               "seed": "seed", "sample_steps": "steps", "discrete_flow_shift": "flow_shift",
               "frame_count": "frame_count", "control_image_path": "control_images", "image_path": None,
               "guidance_scale": None, "cfg_scale": None}


def _from_table(entry: object, source: str) -> PromptLine:
    if not isinstance(entry, dict):
        raise UserError(f"{source}: expected a prompt string or a table of settings, found {entry!r}")
    line = PromptLine(prompt="", source=source)
    for key, value in entry.items():
        if key not in _TABLE_KEYS:
            raise UserError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(_TABLE_KEYS))})")
        if _TABLE_KEYS[key]:
            setattr(line, _TABLE_KEYS[key], list(value) if key == "control_image_path" else value)
    if not isinstance(line.prompt, str):
        raise UserError(f"{source}: prompt must be a string, found {line.prompt!r}")
    line.guidance_scale = _one_cfg_scale(entry.get("guidance_scale"), entry.get("cfg_scale"), source,
                                         ("guidance_scale", "cfg_scale"))
    return check_values(line)


def _entries(path: str, flag: str) -> list[PromptLine]:
    """Every prompt of the file, parsed (text still unchecked)."""
    file = Path(path)
    text = read_text(file, flag, "prompt file (.txt, .toml or .json)")
    if file.suffix == ".toml":
        import toml

        try:
            data = toml.loads(text).get("prompt", {})
        except toml.TomlDecodeError as exc:
            raise UserError(f"{flag}: {path} is not valid TOML ({exc})") from None
        shared = {k: v for k, v in data.items() if k != "subset"}
        return [_from_table({**shared, **sub}, f"{path}:subset {i}") for i, sub in enumerate(data.get("subset", []))]
    if file.suffix == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{flag}: {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(entries, list):
            raise UserError(f"{flag}: {path}: expected a JSON list of prompts")
        return [parse_prompt_line(e, f"{path}[{i}]") if isinstance(e, str) else _from_table(e, f"{path}[{i}]")
                for i, e in enumerate(entries)]
    lines = [(n, raw.strip()) for n, raw in numbered_lines(text)]
    return [parse_prompt_line(t, f"{path}:{n}") for n, t in lines if t and not t.startswith("#")]


def read_prompt_file(path: str, flag: str = "--from_file", *, fallback_prompt: bool = False) -> list[PromptLine]:
    """All prompts of ``--from_file`` or ``--sample_prompts``: ``.txt`` lines (UTF-8, or UTF-16/32 with a
    BOM), ``.toml`` or ``.json``.

    ``fallback_prompt``: prompts with options but no text are allowed (the caller has ``--prompt``).
    """
    lines = _entries(path, flag)
    if not lines:
        raise UserError(f"{flag}: {path} contains no prompt (only blank or # lines)")
    return lines if fallback_prompt else [require_text(line) for line in lines]
