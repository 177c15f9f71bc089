"""Musubi-format dataset configs (``.toml`` or ``.json``) -> validated :class:`DatasetConfig` objects.

Reads exactly what Musubi Tuner reads (``docs/design.md``, "Dataset items and batches"): ``[general]``
plus ``[[datasets]]``, the same keys, deprecated key renames, and the value fallback dataset table ->
``[general]`` -> same-named non-None attribute of the script's argparse namespace -> default.

Differences from Musubi, none of which changes how a config that works with Musubi is read:

* Validation runs before any work and collects every problem, then raises one :class:`UserError`
  with one line per problem naming the config file, ``datasets[i]`` and key (or the image/JSONL line).
  Unknown keys get a "did you mean" suggestion; wrong types say what was found and what was expected.
* ``cache_directory`` (and other per-dataset keys) in ``[general]`` is still rejected, as in Musubi,
  but the message says so and where to put it instead.
* Directory datasets without ``caption_extension`` use ``".txt"`` (Musubi crashes on them).
* Images whose stems collide inside one dataset (``a.png`` and ``a.jpg``) are an error: their cache
  files would overwrite each other.
* Images without a caption file are skipped as in Musubi, but with a warning listing them; caption
  files without an image, unused control images and similar leftovers are warned about too.
* Every image (targets, layers, controls) is opened and, with ``verify_images=True`` (default), fully
  decoded up front: missing, empty, corrupt, truncated and too small (< 16 px) files are errors before
  hours of caching start. Targets that will be enlarged more than 2x per side get a warning.
* Relative paths: working directory first (Musubi), then the config file's folder (see ``paths.py``).
* Video datasets fail with a message saying why (Qwen-Image and Z-Image are image models).
* ``image_directory`` plus ``image_jsonl_file`` in one dataset: Musubi silently uses the directory;
  tsumugi does the same and warns.
* ``multiple_target`` is an error outside Qwen-Image-Layered, and Layered requires it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import toml

from tsumugi.data.items import ImageItem, list_items, scan_items
from tsumugi.data.paths import resolve_path
from tsumugi.data.problems import Problems
from tsumugi.errors import UserError
from tsumugi.preflight.paths import require_file

__all__ = [
    "ARCHITECTURES",
    "DatasetConfig",
    "ImageItem",
    "build_dataset_configs",
    "list_items",
    "load_dataset_config",
    "read_config_file",
]

logger = logging.getLogger(__name__)

ARCHITECTURES: dict[str, str] = {
    "qi": "Qwen-Image",
    "qie": "Qwen-Image-Edit",
    "qil": "Qwen-Image-Layered",
    "zi": "Z-Image",
}
"""Architecture codes of the cache file names (``docs/design.md``, "Cache files") and their display names."""

# key -> value kind (see _convert)
ASCENDABLE_KEYS: dict[str, str] = {
    "resolution": "resolution",
    "caption_extension": "str",
    "batch_size": "positive_int",
    "num_repeats": "positive_int",
    "enable_bucket": "bool",
    "bucket_no_upscale": "bool",
}
IMAGE_DATASET_KEYS: dict[str, str] = {
    "image_directory": "path",
    "image_jsonl_file": "path",
    "cache_directory": "path",
    "control_directory": "path",
    "multiple_target": "bool",
    "no_resize_control": "bool",
    "control_resolution": "resolution",
    "fp_latent_window_size": "positive_int",
    "fp_1f_clean_indices": "int_list",
    "fp_1f_target_index": "int",
    "fp_1f_no_post": "bool",
}
ALL_DATASET_KEYS: dict[str, str] = {**ASCENDABLE_KEYS, **IMAGE_DATASET_KEYS}
VIDEO_KEYS: tuple[str, ...] = (
    "video_directory",
    "video_jsonl_file",
    "target_frames",
    "frame_extraction",
    "frame_stride",
    "frame_sample",
    "max_frames",
    "source_fps",
)
DEPRECATED_KEYS: dict[str, str] = {
    "flux_kontext_no_resize_control": "no_resize_control",
    "qwen_image_edit_no_resize_control": "no_resize_control",
    "qwen_image_edit_control_resolution": "control_resolution",
}
DEFAULTS: dict[str, Any] = {
    "resolution": (960, 544),
    "caption_extension": None,
    "batch_size": 1,
    "num_repeats": 1,
    "enable_bucket": False,
    "bucket_no_upscale": False,
    "image_directory": None,
    "image_jsonl_file": None,
    "cache_directory": None,
    "control_directory": None,
    "multiple_target": False,
    "no_resize_control": False,
    "control_resolution": None,
    "fp_latent_window_size": 9,
    "fp_1f_clean_indices": None,
    "fp_1f_target_index": None,
    "fp_1f_no_post": False,
}
DEFAULT_CAPTION_EXTENSION = ".txt"
MIN_SIDE = 16
_FRAMEPACK_KEYS = ("fp_latent_window_size", "fp_1f_clean_indices", "fp_1f_target_index", "fp_1f_no_post")
_CONTROL_KEYS = ("control_directory", "no_resize_control", "control_resolution")
_EXPECTED = {
    "resolution": "an integer N (N x N) or [width, height]",
    "str": "a string",
    "path": "a non-empty string (a path)",
    "positive_int": "a positive integer",
    "int": "an integer",
    "bool": "true or false",
    "int_list": "a list of integers",
}
_VIDEO_MESSAGE = "video datasets are not supported by tsumugi (Qwen-Image/Z-Image are image models)"


@dataclass
class DatasetConfig:
    """One ``[[datasets]]`` entry with every value resolved (paths absolute, sizes as (W, H))."""

    index: int
    config_path: Path | None
    architecture: str
    resolution: tuple[int, int]
    caption_extension: str | None
    batch_size: int
    num_repeats: int
    enable_bucket: bool
    bucket_no_upscale: bool
    """Effective value: always false when ``enable_bucket`` is false."""
    image_directory: Path | None
    image_jsonl_file: Path | None
    cache_directory: Path
    control_directory: Path | None
    multiple_target: bool
    no_resize_control: bool
    control_resolution: tuple[int, int] | None
    fp_latent_window_size: int = 9
    fp_1f_clean_indices: tuple[int, ...] | None = None
    fp_1f_target_index: int | None = None
    fp_1f_no_post: bool = False
    items: tuple[ImageItem, ...] | None = None
    """Filled by :func:`load_dataset_config`; ``None`` for a hand-made config not scanned yet."""

    @property
    def name(self) -> str:
        return f"datasets[{self.index}]"

    @property
    def is_jsonl(self) -> bool:
        return self.image_directory is None

    @property
    def has_control(self) -> bool:
        return self.items is not None and any(item.control_paths for item in self.items)


# ---------------------------------------------------------------------------------------------- reading


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a ``.toml`` (``toml`` package) or ``.json`` config; other extensions are an error."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise UserError(f"{path}: dataset config must be a .toml or .json file (found '{path.suffix}')")
    if not path.exists():
        raise UserError(f"{path}: dataset config file not found")
    require_file(path, "--dataset_config", "dataset config file")  # a FIFO or folder: refused unopened
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read dataset config ({exc})") from None
    try:
        data = toml.loads(text) if suffix == ".toml" else json.loads(text)
    except toml.TomlDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a table/object with [general] and [[datasets]]")
    return data


# ---------------------------------------------------------------------------------------------- values


def _describe(value: Any) -> str:
    kinds = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
    kind = "null" if value is None else kinds.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _convert(kind: str, value: Any) -> tuple[Any, str | None]:
    """(converted value, None) or (None, error text) for a raw config value."""
    wrong = (None, f"expected {_EXPECTED[kind]}, found {_describe(value)}")
    if kind == "bool":
        return (value, None) if isinstance(value, bool) else wrong
    if kind == "str":
        return (value, None) if isinstance(value, str) else wrong
    if kind == "path":
        return (value, None) if isinstance(value, str) and value.strip() else wrong
    if kind == "int":
        return (value, None) if _is_int(value) else wrong
    if kind == "positive_int":
        return (value, None) if _is_int(value) and value > 0 else wrong
    if kind == "int_list":
        ok = isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)
        return (tuple(value), None) if ok else wrong
    if kind == "resolution":
        if _is_int(value):
            pair = (value, value)
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value):
            pair = (int(value[0]), int(value[1]))
        else:
            return wrong
        if min(pair) < MIN_SIDE:
            return (
                None,
                f"expected {_EXPECTED[kind]} with sides of at least {MIN_SIDE}, found {_describe(value)}",
            )
        return pair, None
    raise AssertionError(kind)


def _suggest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _rename_deprecated(table: dict[str, Any], where: str, problems: Problems) -> dict[str, Any]:
    table = dict(table)
    for old, new in DEPRECATED_KEYS.items():
        if old not in table:
            continue
        value = table.pop(old)
        if new in table:
            problems.warn(f"{where}.{old}", f"deprecated key ignored because '{new}' is also set")
        else:
            table[new] = value
            problems.warn(f"{where}.{old}", f"deprecated key, read as '{new}'; please rename it")
    return table


class _Sources:
    """Value lookup dataset -> [general] -> argparse namespace -> default, each source checked once."""

    def __init__(self, general: Mapping[str, Any], args: argparse.Namespace | Any | None, problems: Problems):
        self.general: dict[str, Any] = {}
        self.bad_general: set[str] = set()
        for key, value in general.items():
            converted, error = _convert(ASCENDABLE_KEYS[key], value)
            if error:
                problems.error(f"[general].{key}", error)
                self.bad_general.add(key)
            else:
                self.general[key] = converted
        self.args: dict[str, Any] = {}
        self.bad_args: set[str] = set()
        for key, kind in ALL_DATASET_KEYS.items():
            value = getattr(args, key, None) if args is not None else None
            if value is None:
                continue
            converted, error = _convert(kind, value)
            if error:
                problems.error(f"command-line argument --{key}", error)
                self.bad_args.add(key)
            else:
                self.args[key] = converted

    def lookup(self, key: str, table: Mapping[str, Any], where: str, problems: Problems) -> tuple[Any, bool]:
        """(value, ok); ok is false when the value that applies is invalid (already reported)."""
        if key in table:
            converted, error = _convert(ALL_DATASET_KEYS[key], table[key])
            if error:
                problems.error(f"{where}.{key}", error)
                return None, False
            return converted, True
        if key in self.general or key in self.bad_general:
            return self.general.get(key), key not in self.bad_general
        if key in self.args or key in self.bad_args:
            return self.args.get(key), key not in self.bad_args
        return DEFAULTS[key], True


# ---------------------------------------------------------------------------------------------- building


def load_dataset_config(
    path: str | os.PathLike[str],
    args: argparse.Namespace | Any | None = None,
    *,
    architecture: str,
    verify_images: bool = True,
) -> list[DatasetConfig]:
    """Read, validate and scan a dataset config for ``architecture`` (``qi``, ``qie``, ``qil``, ``zi``).

    Raises one :class:`UserError` listing every problem; warnings go to this module's logger.
    ``verify_images=False`` reads only image headers (faster, but truncated files are not caught).
    """
    path = Path(path)
    return build_dataset_configs(
        read_config_file(path),
        args,
        architecture=architecture,
        config_path=path,
        verify_images=verify_images,
    )


def build_dataset_configs(
    data: Mapping[str, Any],
    args: argparse.Namespace | Any | None = None,
    *,
    architecture: str,
    config_path: Path | None = None,
    verify_images: bool = True,
) -> list[DatasetConfig]:
    """Same as :func:`load_dataset_config` for an already parsed config (``config_path`` for messages)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}")
    problems = Problems(str(config_path) if config_path is not None else "<dataset config>")
    config_dir = config_path.parent if config_path is not None else None

    for key in data:
        if key not in ("general", "datasets"):
            problems.error(
                key,
                f"unknown top-level key{_suggest(key, ['general', 'datasets'])}; "
                "expected [general] and [[datasets]]",
            )
    general = data.get("general", {})
    if not isinstance(general, dict):
        problems.error("general", f"expected a [general] table, found {_describe(general)}")
        general = {}
    general = _check_general_keys(_rename_deprecated(general, "[general]", problems), problems)
    sources = _Sources(general, args, problems)

    tables = data.get("datasets")
    if tables is None:
        problems.error("datasets", "no [[datasets]] entries")
        tables = []
    elif not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        problems.error("datasets", f"expected an array of tables ([[datasets]]), found {_describe(tables)}")
        tables = []
    elif not tables:
        problems.error("datasets", "no [[datasets]] entries")

    configs: list[DatasetConfig] = []
    scannable: list[DatasetConfig] = []
    for index, table in enumerate(tables):
        before = len(problems.errors)
        config = _build_one(index, table, sources, problems, config_path, config_dir, architecture)
        if config is not None:
            configs.append(config)
            if len(problems.errors) == before:
                scannable.append(config)
    _check_unique_cache_directories(configs, problems)

    for config in scannable:
        config.items = tuple(scan_items(config, problems, verify_images=verify_images))
    problems.raise_if_errors()
    problems.emit_warnings(logger)
    return configs


def _check_general_keys(general: dict[str, Any], problems: Problems) -> dict[str, Any]:
    kept = {}
    for key, value in general.items():
        if key in ASCENDABLE_KEYS:
            kept[key] = value
        elif key in VIDEO_KEYS:
            problems.error(f"[general].{key}", _VIDEO_MESSAGE)
        elif key in IMAGE_DATASET_KEYS:
            problems.error(
                f"[general].{key}",
                f"'{key}' cannot be set in [general] (Musubi rejects it too); "
                "set it in each [[datasets]] table",
            )
        else:
            problems.error(
                f"[general].{key}",
                f"unknown key{_suggest(key, list(ASCENDABLE_KEYS) + list(IMAGE_DATASET_KEYS))}; "
                f"[general] accepts {', '.join(ASCENDABLE_KEYS)}",
            )
    return kept


def _build_one(
    index: int,
    table: dict[str, Any],
    sources: _Sources,
    problems: Problems,
    config_path: Path | None,
    config_dir: Path | None,
    architecture: str,
) -> DatasetConfig | None:
    """One ``[[datasets]]`` table -> :class:`DatasetConfig`; ``None`` when it cannot be built at all.

    Every problem goes to ``problems``; the steps run in a fixed order so messages come out in it.
    """
    where = f"datasets[{index}]"
    resolved = _resolve_values(where, table, sources, problems)
    if resolved is None:
        return None
    known, values = resolved
    source = _image_source(where, values, problems)
    if source is None:
        return None
    image_directory, image_jsonl_file, control_directory, beside_config = _resolve_input_paths(
        where, values, source, config_dir, problems
    )
    cache_directory = _cache_directory(
        where, values, image_directory, image_jsonl_file, beside_config, config_dir, problems
    )
    if cache_directory is None:
        return None
    control_directory = _check_controls(
        where, architecture, known, control_directory, image_jsonl_file, problems
    )
    _check_architecture_needs(where, architecture, values, image_directory, problems)
    _check_resolution(where, values, problems)
    caption_extension = _caption_extension(where, values, image_directory, problems)
    framepack = [k for k in _FRAMEPACK_KEYS if k in known]
    if framepack:
        problems.warn(
            where, f"{', '.join(framepack)} are FramePack-only and ignored for {ARCHITECTURES[architecture]}"
        )

    enable_bucket = values["enable_bucket"]
    return DatasetConfig(
        index=index,
        config_path=config_path,
        architecture=architecture,
        resolution=values["resolution"],
        caption_extension=caption_extension,
        batch_size=values["batch_size"],
        num_repeats=values["num_repeats"],
        enable_bucket=enable_bucket,
        bucket_no_upscale=bool(values["bucket_no_upscale"] and enable_bucket),
        image_directory=image_directory,
        image_jsonl_file=image_jsonl_file,
        cache_directory=cache_directory,
        control_directory=control_directory,
        multiple_target=values["multiple_target"],
        no_resize_control=values["no_resize_control"],
        control_resolution=values["control_resolution"],
        fp_latent_window_size=values["fp_latent_window_size"],
        fp_1f_clean_indices=values["fp_1f_clean_indices"],
        fp_1f_target_index=values["fp_1f_target_index"],
        fp_1f_no_post=values["fp_1f_no_post"],
    )


def _resolve_values(
    where: str, table: dict[str, Any], sources: _Sources, problems: Problems
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(keys given in the table, every key's value after the fallback chain); ``None`` for video tables."""
    table = _rename_deprecated(table, where, problems)
    video = [k for k in table if k in VIDEO_KEYS]
    if video:
        problems.error(f"{where}.{video[0]}", f"{_VIDEO_MESSAGE}; found video keys {', '.join(video)}")
        return None
    known = {k: v for k, v in table.items() if k in ALL_DATASET_KEYS}
    for key in table:
        if key not in ALL_DATASET_KEYS:
            problems.error(f"{where}.{key}", f"unknown key{_suggest(key, list(ALL_DATASET_KEYS))}")

    values: dict[str, Any] = {}
    for key in ALL_DATASET_KEYS:
        value, good = sources.lookup(key, known, where, problems)
        # an invalid value is already reported; the default lets the remaining checks run
        values[key] = value if good else DEFAULTS[key]
    return known, values


def _image_source(where: str, values: dict[str, Any], problems: Problems) -> str | None:
    """``"directory"`` or ``"jsonl"`` (image_directory wins when both are set); ``None`` when neither is."""
    if values["image_directory"] is None and values["image_jsonl_file"] is None:
        problems.error(where, "needs image_directory or image_jsonl_file")
        return None
    if values["image_directory"] is not None and values["image_jsonl_file"] is not None:
        problems.warn(
            where,
            "both image_directory and image_jsonl_file are set; image_jsonl_file is ignored (as in Musubi)",
        )
    return "directory" if values["image_directory"] is not None else "jsonl"


def _resolve_input_paths(
    where: str, values: dict[str, Any], source: str, config_dir: Path | None, problems: Problems
) -> tuple[Path | None, Path | None, Path | None, bool]:
    """(image_directory, image_jsonl_file, control_directory, whether any was found next to the config)."""
    beside_config = False

    def resolve(key: str) -> Path | None:
        nonlocal beside_config
        raw = values[key]
        if raw is None:
            return None
        path, beside = resolve_path(raw, config_dir)
        if beside:
            beside_config = True
            logger.info(
                "%s.%s: '%s' not found from the working directory; using %s (next to the config)",
                where,
                key,
                raw,
                path,
            )
        return path

    image_directory = resolve("image_directory")
    image_jsonl_file = resolve("image_jsonl_file") if source == "jsonl" else None
    control_directory = resolve("control_directory")
    if image_directory is not None and not image_directory.is_dir():
        problems.error(f"{where}.image_directory", f"directory not found: {image_directory}")
    if image_jsonl_file is not None and not image_jsonl_file.is_file():
        problems.error(f"{where}.image_jsonl_file", f"file not found: {image_jsonl_file}")
    return image_directory, image_jsonl_file, control_directory, beside_config


def _cache_directory(
    where: str,
    values: dict[str, Any],
    image_directory: Path | None,
    image_jsonl_file: Path | None,
    beside_config: bool,
    config_dir: Path | None,
    problems: Problems,
) -> Path | None:
    """The cache folder: ``cache_directory``, else the image directory; ``None`` for a JSONL without one."""
    cache_raw = values["cache_directory"]
    if cache_raw is None:
        if image_jsonl_file is not None:
            problems.error(
                f"{where}.cache_directory",
                "required for image_jsonl_file datasets (there is no image directory to default to)",
            )
            return None
        cache_directory = image_directory
    else:
        cache_directory, beside = resolve_path(cache_raw, config_dir)
        if beside_config and config_dir is not None and not beside and not cache_directory.exists():
            # the dataset's inputs were found next to the config, so a new cache folder goes there too
            cache_directory, _ = resolve_path(str(config_dir / os.path.expanduser(cache_raw)), None)
    assert cache_directory is not None
    if cache_directory.exists() and not cache_directory.is_dir():
        problems.error(f"{where}.cache_directory", f"exists but is not a directory: {cache_directory}")
    return cache_directory


def _check_controls(
    where: str,
    architecture: str,
    known: dict[str, Any],
    control_directory: Path | None,
    image_jsonl_file: Path | None,
    problems: Problems,
) -> Path | None:
    """The control directory the dataset really uses (``None`` where it does not apply)."""
    control_keys_set = [k for k in _CONTROL_KEYS if k in known]
    if architecture == "zi" and control_keys_set:
        problems.warn(where, f"{', '.join(control_keys_set)} unused: Z-Image has no control images")
        control_directory = None
    if control_directory is not None:
        if image_jsonl_file is not None:
            problems.warn(
                f"{where}.control_directory",
                "ignored for image_jsonl_file datasets; give control_path in each JSONL line",
            )
            control_directory = None
        elif not control_directory.is_dir():
            problems.error(f"{where}.control_directory", f"directory not found: {control_directory}")
    if architecture == "qil" and control_directory is not None:
        problems.warn(
            f"{where}.control_directory",
            "Qwen-Image-Layered conditions on the first target; only "
            "the first control image per item is kept",
        )
    return control_directory


def _check_architecture_needs(
    where: str, architecture: str, values: dict[str, Any], image_directory: Path | None, problems: Problems
) -> None:
    """Layered needs ``multiple_target`` (and only Layered takes it).

    An Edit dataset without control images is valid: its items train as text-to-image items.
    """
    multiple_target = values["multiple_target"]
    if multiple_target and architecture != "qil":
        problems.error(
            f"{where}.multiple_target",
            f"multiple_target is for Qwen-Image-Layered only, not {ARCHITECTURES[architecture]}",
        )
    if architecture == "qil" and not multiple_target:
        problems.error(where, "Qwen-Image-Layered needs multiple_target = true (base image + layer images)")


def _check_resolution(where: str, values: dict[str, Any], problems: Problems) -> None:
    enable_bucket = values["enable_bucket"]
    resolution = values["resolution"]
    if values["bucket_no_upscale"] and not enable_bucket:
        problems.warn(f"{where}.bucket_no_upscale", "has no effect without enable_bucket = true")
    if not enable_bucket and (resolution[0] % 16 or resolution[1] % 16):
        problems.error(
            f"{where}.resolution",
            f"{resolution[0]}x{resolution[1]} must be multiples of 16 when "
            "enable_bucket is false (it is then the only image size)",
        )


def _caption_extension(
    where: str, values: dict[str, Any], image_directory: Path | None, problems: Problems
) -> str | None:
    """``caption_extension``, defaulting to ``.txt`` for image directories."""
    caption_extension = values["caption_extension"]
    if image_directory is not None:
        if caption_extension is None:
            caption_extension = DEFAULT_CAPTION_EXTENSION
            logger.info("%s: caption_extension not set; using '%s'", where, DEFAULT_CAPTION_EXTENSION)
        elif not caption_extension.startswith("."):
            problems.warn(
                f"{where}.caption_extension",
                f"'{caption_extension}' does not start with '.'; caption "
                f"files are looked up as <image stem>{caption_extension}",
            )
    return caption_extension


def _check_unique_cache_directories(configs: list[DatasetConfig], problems: Problems) -> None:
    seen: dict[str, DatasetConfig] = {}
    for config in configs:
        key = os.path.realpath(config.cache_directory)
        if key in seen:
            problems.error(
                f"{config.name}.cache_directory",
                f"same cache directory as {seen[key].name} ({config.cache_directory}); "
                "every dataset needs its own "
                "(when omitted it is the image_directory)",
            )
        else:
            seen[key] = config
