"""``--config_file``: a TOML file of training flags (``docs/training.md``).

``.toml`` may be left off; sections are flattened; file values replace argparse defaults; flags given on
the command line win. Unlike Musubi, file values are converted and checked as if typed on the command
line, and an unknown key is an error naming the key and the file (with a close match, or the script
that does have that flag). Full fine-tuning warns about the LoRA script's keys (``network_*``,
``base_weights``...) instead: Musubi users share one file between LoRA and full runs.
"""

from __future__ import annotations

import argparse
import difflib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import toml

from tsumugi.errors import UserError
from tsumugi.preflight.paths import require_file

logger = logging.getLogger(__name__)


def parse_train_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (``sys.argv[1:]`` when ``None``) and apply ``--config_file``.

    Precedence: command line > file > default. File values are converted like command-line text
    (``lr_warmup_steps = "10%"``, ``network_args = ["a=1"]``, ``compile_dynamic = true``); a scalar for a
    list flag becomes a one-item list. ``args.config_file`` becomes the path actually read.
    """
    args = parser.parse_args(argv)
    if not args.config_file:
        return args
    path = _config_path(args.config_file)
    values = _read_flat_config(path)
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.default is not argparse.SUPPRESS}
    from_file: dict[str, Any] = {}
    lora_only = _lora_only_keys(parser, set(actions))
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        action = actions.get(key)
        if action is None and key in lora_only:  # one file shared by LoRA and full runs, as with Musubi
            logger.warning("--config_file %s: '%s' is unused: a LoRA training flag, and %s is full fine-tuning",
                           path, raw_key, parser.prog)
            continue
        if action is None or key == "config_file":
            raise UserError(_unknown_key_message(raw_key, key, path, parser, list(actions)))
        from_file[key] = _coerce(action, value, raw_key, path)
    args = parser.parse_args(argv, namespace=argparse.Namespace(**from_file))
    return argparse.Namespace(**{**vars(args), "config_file": str(path)})


def _config_path(name: str) -> Path:
    given = Path(name)
    if name.endswith(".toml"):
        candidates = [given]
    else:
        candidates = [Path(name + ".toml"), given]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    for candidate in candidates:
        if candidate.exists():  # a FIFO, device or folder: refused by name, never opened
            require_file(candidate, "--config_file", "TOML file")
    raise UserError(f"--config_file: {candidates[0]} not found")


def _read_flat_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--config_file {path}: cannot read ({exc})") from None
    data = _loads_toml(text, path)
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}
    for name, value in data.items():
        items = value.items() if isinstance(value, dict) else [(name, value)]
        section = f"[{name}]" if isinstance(value, dict) else "top level"
        for key, item in items:
            if isinstance(item, dict):
                raise UserError(f"--config_file {path}: '{key}' in {section} is a table; flags take a value or a list")
            if key in flat:
                logger.warning("--config_file %s: '%s' in %s replaces the value from %s", path, key, section, where[key])
            flat[key] = item
            where[key] = section
    return flat


def _loads_toml(text: str, path: Path) -> dict[str, Any]:
    """TOML 1.0 (``tomllib``, allows mixed int/float arrays); what only the older ``toml`` package that
    Musubi uses accepts is read with that as a fallback."""
    first_error: Exception | None = None
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pass
    else:
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            first_error = exc
    try:
        return toml.loads(text)
    except toml.TomlDecodeError as exc:
        raise UserError(f"--config_file {path}: not valid TOML ({first_error or exc})") from None


def _unknown_key_message(raw_key: str, key: str, path: Path, parser: argparse.ArgumentParser,
                         known: list[str]) -> str:
    if key == "config_file":
        return f"--config_file {path}: 'config_file' cannot be set inside a config file"
    message = f"--config_file {path}: unknown key '{raw_key}'"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    others = _scripts_accepting(key)
    if others:
        message += f" (it is a flag of {', '.join(others)}, not of {parser.prog})"
    elif close:
        message += f" (did you mean '{close[0]}'?)"
    return message


def _lora_only_keys(parser: argparse.ArgumentParser, known: set[str]) -> set[str]:
    """Flags of the same family's LoRA script that a full fine-tuning parser lacks (``network_*``,
    ``base_weights``...); empty for other parsers."""
    if parser.get_default("network_training") is not False:
        return set()
    from tsumugi.cli.train_parser import build_train_parser

    network = build_train_parser(parser.get_default("arch_name"), network=True)
    return {a.dest for a in network._actions if a.option_strings} - known


def _scripts_accepting(key: str) -> list[str]:
    from tsumugi.cli.train_parser import ARCH_NAMES, build_train_parser  # every training parser

    found = []
    for arch in ARCH_NAMES:
        for network in (True, False):
            other = build_train_parser(arch, network=network)
            if any(a.dest == key for a in other._actions if a.option_strings and a.default is not argparse.SUPPRESS):
                found.append(other.prog)
    return found


def _describe(value: Any) -> str:
    kinds = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}
    kind = kinds.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"


def _coerce(action: argparse.Action, value: Any, key: str, path: Path) -> Any:
    where = f"--config_file {path}: '{key}'"
    if action.nargs == 0:  # store_true
        if not isinstance(value, bool):
            raise UserError(f"{where} expects true or false, found {_describe(value)}")
        return value
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not items:
            raise UserError(f"{where} expects at least one value")
        return [_coerce_one(action, item, where) for item in items]
    if isinstance(value, list):
        raise UserError(f"{where} takes one value, found {_describe(value)}")
    return _coerce_one(action, value, where)


def _coerce_one(action: argparse.Action, value: Any, where: str) -> Any:
    kind = action.type
    if isinstance(value, (list, dict)):
        raise UserError(f"{where} expects a single value per item, found {_describe(value)}")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    result: Any
    if kind is None or kind is str:
        if isinstance(value, bool):
            result = "true" if value else "false"
        elif is_number or isinstance(value, str):
            result = str(value)
        else:
            raise UserError(f"{where} expects a string, found {_describe(value)}")
    elif kind is int:
        if is_number and float(value).is_integer():
            result = int(value)
        elif isinstance(value, str):
            try:
                result = int(value)
            except ValueError:
                raise UserError(f"{where} expects an integer, found {_describe(value)}") from None
        else:
            raise UserError(f"{where} expects an integer, found {_describe(value)}")
    elif kind is float:
        if is_number:
            result = float(value)
        elif isinstance(value, str):
            try:
                result = float(value)
            except ValueError:
                raise UserError(f"{where} expects a number, found {_describe(value)}") from None
        else:
            raise UserError(f"{where} expects a number, found {_describe(value)}")
    else:
        if not (is_number or isinstance(value, str)):
            raise UserError(f"{where}: invalid value {_describe(value)}")
        try:
            result = kind(str(value))
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise UserError(f"{where}: invalid value {_describe(value)} ({exc})") from None
    if action.choices is not None and result not in action.choices:
        choices = ", ".join(str(c) for c in action.choices)
        raise UserError(f"{where}: {result!r} is not one of {choices}")
    return result


# ---------------------------------------------------------------------------------------------- validation
