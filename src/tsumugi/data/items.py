"""The training items of one dataset: target image(s), caption, control images.

See ``docs/design.md``, "Dataset items and batches".

Directory form: images (``.png .jpg .jpeg .webp .bmp .avif``, any letter case, plus ``.jxl`` when
``pillow_jxl`` is installed; hidden files and subfolders ignored) with ``<stem><caption_extension>``
captions read as UTF-8 (a BOM is dropped) and stripped. Layered datasets (``multiple_target``): the
captioned ``name.png`` is the base, uncaptioned ``name_1.png``, ``name_2.png``... are its layers.

JSONL form: one object per line with ``image_path`` (or ``image_path_0``... for layers), ``caption``
(used as written) and optional ``control_path``/``control_path_<n>``; blank lines are skipped; relative
paths as in ``paths.py`` with the JSONL's folder as the fallback base. Other fields are ignored.

Decisions where Musubi is silent or silent-failing (see also config.py):

* image without caption: skipped with one warning listing them (Musubi skips silently);
  caption without image, control images matching no target: warning;
* layered: a captioned ``name_1.png`` next to a captioned ``name.png`` is an error (Musubi would train
  the layer as an item of its own), as are layers without alpha and items with no layers;
* JSONL layered items may differ in layer count (as in Musubi); batching keeps them apart;
* Qwen-Image-Edit items without control images (a directory dataset without ``control_directory``, an
  image whose control is missing from it, a JSONL line without ``control_path``) train as text-to-image
  items, as in Musubi (musubi-tuner#682): a warning counts them where a dataset mixes both kinds or its
  ``control_directory`` matches nothing (Musubi refuses an image without its control in a
  ``control_directory``; tsumugi trains it without one);
* Qwen-Image and Layered keep the first control only, Z-Image none;
* ``original_size`` is the size after EXIF orientation (what the model is trained on).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tsumugi.data.controls import jsonl_control_paths, match_controls
from tsumugi.data.images import ImageInfo, probe_image
from tsumugi.data.paths import resolve_path
from tsumugi.data.problems import Problems, short_list
from tsumugi.errors import UserError

if TYPE_CHECKING:
    from tsumugi.data.config import DatasetConfig

BASE_IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif")
MIN_SIDE = 16
_LAYER_STEM = re.compile(r"(.+)_([0-9]+)")


@dataclass(frozen=True)
class ImageItem:
    """One training item. Sizes are (width, height) after EXIF orientation."""

    image_path: Path
    caption: str
    original_size: tuple[int, int]
    control_paths: tuple[Path, ...] = ()
    control_sizes: tuple[tuple[int, int], ...] = ()
    extra_target_paths: tuple[Path, ...] = ()
    """Qwen-Image-Layered: the layer images after the base (first) target, in order."""

    @property
    def cache_stem(self) -> str:
        """Stem used in cache file names (``docs/design.md``, "Cache files"); unique within a dataset."""
        return self.image_path.stem

    @property
    def num_targets(self) -> int:
        return 1 + len(self.extra_target_paths)


@dataclass
class _Draft:
    image_path: Path
    caption: str
    where: str
    controls: list[Path] = field(default_factory=list)
    extra_targets: list[Path] = field(default_factory=list)


def image_extensions() -> tuple[str, ...]:
    """Image file extensions of directory datasets (lower case)."""
    try:
        import pillow_jxl  # noqa: F401  (registers the JPEG-XL plugin with Pillow)
    except ImportError:
        return BASE_IMAGE_EXTENSIONS
    return (*BASE_IMAGE_EXTENSIONS, ".jxl")


def list_image_files(directory: Path) -> list[Path]:
    """Image files directly in ``directory`` (not recursive, no hidden files), sorted by path."""
    extensions = image_extensions()
    try:
        entries = list(directory.iterdir())
    except OSError as exc:
        raise UserError(f"{directory}: cannot list directory ({exc.strerror or exc})") from None
    return sorted(
        # not only regular files: a FIFO or device named like an image is listed and then refused by name
        (p for p in entries if not p.name.startswith(".") and p.suffix.lower() in extensions and not p.is_dir()),
        key=str,
    )


def _list_or_report(directory: Path, problems: Problems, where: str) -> list[Path]:
    try:
        return list_image_files(directory)
    except UserError as exc:
        problems.error(where, str(exc))
        return []


def list_items(dataset: DatasetConfig) -> list[ImageItem]:
    """The dataset's items sorted by image path.

    Returns the items found by :func:`~tsumugi.data.config.load_dataset_config`; a config built by
    hand (``items is None``) is scanned now and raises :class:`UserError` on problems.
    """
    if dataset.items is None:
        problems = Problems(str(dataset.config_path) if dataset.config_path else "<dataset config>")
        items = scan_items(dataset, problems)
        problems.raise_if_errors()
        return items
    return sorted(dataset.items, key=lambda item: str(item.image_path))


def scan_items(dataset: DatasetConfig, problems: Problems, *, verify_images: bool = True) -> list[ImageItem]:
    """Find, pair and check the dataset's files; problems are recorded, not raised."""
    before = len(problems.errors)
    if dataset.image_directory is not None:
        if dataset.multiple_target:
            drafts = _scan_layered_directory(dataset, problems)
        else:
            drafts = _scan_directory(dataset, problems)
        if dataset.control_directory is not None:
            _attach_directory_controls(dataset, drafts, problems)
    else:
        drafts = _scan_jsonl(dataset, problems)
    _apply_control_count(dataset, drafts, problems)
    if not drafts:
        if len(problems.errors) == before:
            source = dataset.image_directory or dataset.image_jsonl_file
            problems.error(dataset.name, f"no usable images found in {source}")
        return []
    items = _check_images(dataset, drafts, problems, verify_images)
    _check_unique_stems(dataset, items, problems)
    _warn_empty_captions(dataset, items, problems)
    return sorted(items, key=lambda item: str(item.image_path))


# ---------------------------------------------------------------------------------------------- directory


def _read_caption(path: Path, problems: Problems, where: str) -> str | None:
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        problems.error(where, f"{path}: caption file is not valid UTF-8 ({exc.reason} at byte {exc.start})")
    except OSError as exc:
        problems.error(where, f"{path}: cannot read caption file ({exc.strerror or exc})")
    return None


def _what(path: Path) -> str:
    from tsumugi.preflight.paths import describe_mode

    return describe_mode(path.stat().st_mode)


def _caption_path(image: Path, extension: str) -> Path:
    return image.with_name(image.stem + extension)


def _warn_orphan_captions(dataset: DatasetConfig, images: list[Path], problems: Problems) -> None:
    assert dataset.image_directory is not None and dataset.caption_extension
    ext = dataset.caption_extension
    stems = {p.stem for p in images}
    try:
        entries = list(dataset.image_directory.iterdir())
    except OSError:
        return  # already reported by the image listing
    orphans = sorted(
        p.name
        for p in entries
        if p.name.endswith(ext)
        and len(p.name) > len(ext)
        and not p.name.startswith(".")
        and p.name[: -len(ext)] not in stems
        and p.suffix.lower() not in image_extensions()
        and p.is_file()
    )
    if orphans:
        problems.warn(
            dataset.name,
            f"{len(orphans)} caption file(s) without an image in "
            f"{dataset.image_directory}: {short_list(orphans)}",
        )


def _warn_uncaptioned(dataset: DatasetConfig, paths: list[Path], problems: Problems) -> None:
    if paths:
        problems.warn(
            dataset.name,
            f"{len(paths)} image(s) without a '{dataset.caption_extension}' caption file "
            f"skipped: {short_list([str(p) for p in paths])}",
        )


def _scan_directory(dataset: DatasetConfig, problems: Problems) -> list[_Draft]:
    assert dataset.image_directory is not None and dataset.caption_extension is not None
    images = _list_or_report(dataset.image_directory, problems, dataset.name)
    drafts, uncaptioned = [], []
    for image in images:
        caption_path = _caption_path(image, dataset.caption_extension)
        if not caption_path.is_file():
            if caption_path.exists():  # a FIFO, device or folder: never opened (a FIFO would block)
                problems.error(dataset.name, f"{caption_path}: caption is {_what(caption_path)}; expected a "
                               "regular text file")
            else:
                uncaptioned.append(image)
            continue
        caption = _read_caption(caption_path, problems, dataset.name)
        if caption is not None:
            drafts.append(_Draft(image, caption, dataset.name))
    _warn_uncaptioned(dataset, uncaptioned, problems)
    _warn_orphan_captions(dataset, images, problems)
    return drafts


def _scan_layered_directory(dataset: DatasetConfig, problems: Problems) -> list[_Draft]:
    assert dataset.image_directory is not None and dataset.caption_extension is not None
    images = _list_or_report(dataset.image_directory, problems, dataset.name)
    captioned = [p for p in images if _caption_path(p, dataset.caption_extension).is_file()]
    captioned_set = set(captioned)
    captioned_stems = {p.stem for p in captioned}
    layers: dict[str, list[tuple[int, Path]]] = {}
    uncaptioned = []
    for image in images:
        if image in captioned_set:
            continue
        m = _LAYER_STEM.fullmatch(image.stem)
        if m and m.group(1) in captioned_stems:
            layers.setdefault(m.group(1), []).append((int(m.group(2)), image))
        else:
            uncaptioned.append(image)
    _warn_uncaptioned(dataset, uncaptioned, problems)
    _warn_orphan_captions(dataset, images, problems)

    drafts = []
    for image in captioned:
        m = _LAYER_STEM.fullmatch(image.stem)
        if m and m.group(1) in captioned_stems:
            problems.error(
                dataset.name,
                f"{image}: looks like layer {m.group(2)} of '{m.group(1)}' but has a caption "
                f"file; layers must not have captions (remove "
                f"{_caption_path(image, dataset.caption_extension).name})",
            )
            continue
        caption = _read_caption(_caption_path(image, dataset.caption_extension), problems, dataset.name)
        if caption is None:
            continue
        own = sorted(layers.get(image.stem, []))
        numbers = [n for n, _ in own]
        for n in sorted({n for n in numbers if numbers.count(n) > 1}):
            names = ", ".join(p.name for k, p in own if k == n)
            problems.error(dataset.name, f"{image}: several files are layer {n}: {names}")
        drafts.append(_Draft(image, caption, dataset.name, extra_targets=[p for _, p in own]))

    counts = Counter(len(d.extra_targets) for d in drafts)
    usual = counts.most_common(1)[0][0] if counts else 0
    for draft in drafts:
        n = len(draft.extra_targets)
        if n == 0:
            problems.error(
                dataset.name,
                f"{draft.image_path}: no layer images (expected {draft.image_path.stem}_1"
                f"{draft.image_path.suffix}, {draft.image_path.stem}_2{draft.image_path.suffix}, ...)",
            )
        elif n != usual:
            problems.error(
                dataset.name,
                f"{draft.image_path}: has {n} layer(s) but most items have {usual}; every "
                "item of a layered directory dataset needs the same number of layers",
            )
    return drafts


def _attach_directory_controls(dataset: DatasetConfig, drafts: list[_Draft], problems: Problems) -> None:
    control_dir = dataset.control_directory
    assert control_dir is not None
    controls = _list_or_report(control_dir, problems, dataset.name)
    result = match_controls([d.image_path.stem for d in drafts], [p.name for p in controls])
    for name, stem in result.bad_suffix:
        problems.error(
            dataset.name,
            f"{control_dir / name}: control image name has a non-numeric suffix after '_' "
            f"(expected {stem}.<ext> or {stem}_<number>.<ext>)",
        )
    for stem, tied in result.ambiguous:
        problems.warn(
            dataset.name,
            f"control images {', '.join(tied)} take the same place for '{stem}'; using name order",
        )
    if result.unused:
        problems.warn(
            dataset.name,
            f"{len(result.unused)} control image(s) in {control_dir} match no target image: "
            f"{short_list(result.unused)}",
        )
    for draft in drafts:
        draft.controls = [control_dir / name for name in result.matches.get(draft.image_path.stem, [])]


def _apply_control_count(dataset: DatasetConfig, drafts: list[_Draft], problems: Problems) -> None:
    if dataset.architecture == "zi":
        if any(d.controls for d in drafts):
            problems.warn(dataset.name, "control images are unused: Z-Image has no control images")
        for draft in drafts:
            draft.controls = []
    elif dataset.architecture in ("qi", "qil"):
        several = [d.image_path.name for d in drafts if len(d.controls) > 1]
        if several:
            problems.warn(
                dataset.name,
                f"only the first control image is used for this architecture; "
                f"{len(several)} item(s) have more: {short_list(several)}",
            )
        for draft in drafts:
            draft.controls = draft.controls[:1]
    elif dataset.architecture == "qie" and drafts:
        missing = [str(d.image_path) for d in drafts if not d.controls]
        # a whole text-to-image dataset is intended, unless it names a control_directory
        if missing and (len(missing) < len(drafts) or dataset.control_directory is not None):
            expected = (
                f"in {dataset.control_directory} (<stem>.<ext> or <stem>_0.<ext>, ...)"
                if dataset.control_directory is not None else "(no control_path in its JSONL line)"
            )
            problems.warn(
                dataset.name,
                f"{len(missing)} of {len(drafts)} item(s) have no control image {expected} and train as "
                f"text-to-image items: {short_list(missing)}",
            )


# ---------------------------------------------------------------------------------------------- JSONL


def _suggest_field(name: str, record: dict) -> str:
    close = difflib.get_close_matches(name, [k for k in record if isinstance(k, str)], n=1, cutoff=0.7)
    return f" (found '{close[0]}'; did you mean '{name}'?)" if close else ""


def _jsonl_path(value: object, field_name: str, base: Path, problems: Problems, where: str) -> Path | None:
    if not isinstance(value, str) or not value.strip():
        problems.error(where, f"'{field_name}' must be a non-empty string, found {value!r}")
        return None
    path, _ = resolve_path(value, base)
    if not path.is_file():
        problems.error(where, f"'{field_name}': image file not found: {path}")
        return None
    return path


def _scan_jsonl(dataset: DatasetConfig, problems: Problems) -> list[_Draft]:
    jsonl = dataset.image_jsonl_file
    assert jsonl is not None
    try:
        lines = jsonl.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        problems.error(dataset.name, f"{jsonl}: cannot read ({exc})")
        return []
    drafts = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{dataset.name}: {jsonl} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.error(where, f"not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(record, dict):
            problems.error(where, f"expected a JSON object, found {type(record).__name__}")
            continue
        draft = _jsonl_draft(dataset, record, where, jsonl.parent, problems)
        if draft is not None:
            drafts.append(draft)
    return drafts


def _jsonl_draft(
    dataset: DatasetConfig, record: dict, where: str, base: Path, problems: Problems
) -> _Draft | None:
    ok = True
    caption = record.get("caption")
    if "caption" not in record:
        problems.error(where, f"missing 'caption'{_suggest_field('caption', record)}")
        ok = False
    elif not isinstance(caption, str):
        problems.error(where, f"'caption' must be a string, found {caption!r}")
        ok = False

    target_fields: list[str]
    if dataset.multiple_target:
        first = [k for k in ("image_path_0", "image_path") if k in record]
        if len(first) == 2 and record["image_path_0"] != record["image_path"]:
            problems.error(where, "image_path and image_path_0 differ; give the first target once")
            return None
        if not first:
            problems.error(
                where, f"missing 'image_path_0' (or 'image_path'){_suggest_field('image_path_0', record)}"
            )
            return None
        target_fields = [first[0]]
        i = 1
        while f"image_path_{i}" in record:
            target_fields.append(f"image_path_{i}")
            i += 1
    else:
        if "image_path" not in record:
            problems.error(where, f"missing 'image_path'{_suggest_field('image_path', record)}")
            return None
        target_fields = ["image_path"]
    targets = [_jsonl_path(record[f], f, base, problems, where) for f in target_fields]

    values, control_problems = jsonl_control_paths(record)
    for message in control_problems:
        problems.error(where, message)
    controls = [_jsonl_path(v, f"control_path_{i}", base, problems, where) for i, v in enumerate(values)]
    found_targets = [t for t in targets if t is not None]
    found_controls = [c for c in controls if c is not None]
    if not ok or not isinstance(caption, str) or control_problems:
        return None
    if len(found_targets) != len(targets) or len(found_controls) != len(controls):
        return None
    return _Draft(found_targets[0], caption, where, controls=found_controls, extra_targets=found_targets[1:])


# ---------------------------------------------------------------------------------------------- image checks


def _probe_all(paths: Iterable[Path], decode: bool) -> dict[Path, ImageInfo | str]:
    unique = list(dict.fromkeys(paths))

    def probe(path: Path) -> ImageInfo | str:
        try:
            return probe_image(path, decode=decode)
        except UserError as exc:
            return str(exc)

    if len(unique) < 8:
        return {p: probe(p) for p in unique}
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
        return dict(zip(unique, pool.map(probe, unique)))


def _check_images(
    dataset: DatasetConfig, drafts: list[_Draft], problems: Problems, decode: bool
) -> list[ImageItem]:
    infos = _probe_all([p for d in drafts for p in (d.image_path, *d.extra_targets, *d.controls)], decode)
    area = dataset.resolution[0] * dataset.resolution[1]
    upscales = not dataset.bucket_no_upscale
    small: list[str] = []
    items = []
    for draft in drafts:
        ok = True
        for role, path in (
            [("", draft.image_path)]
            + [("layer image ", p) for p in draft.extra_targets]
            + [("control image ", p) for p in draft.controls]
        ):
            info = infos[path]
            if isinstance(info, str):
                problems.error(draft.where, f"{role}{info}")
                ok = False
            elif min(info.size) < MIN_SIDE:
                problems.error(
                    draft.where,
                    f"{role}{path}: image is {info.width}x{info.height}; both sides must be "
                    f"at least {MIN_SIDE} px",
                )
                ok = False
            elif role == "layer image " and not info.has_alpha:
                problems.error(
                    draft.where,
                    f"layer image {path}: no alpha channel (mode {info.mode}); "
                    "Qwen-Image-Layered layers must be RGBA",
                )
                ok = False
        if not ok:
            continue
        target = infos[draft.image_path]
        assert isinstance(target, ImageInfo)
        for layer in draft.extra_targets:
            layer_info = infos[layer]
            assert isinstance(layer_info, ImageInfo)
            if layer_info.size != target.size:
                problems.warn(
                    draft.where,
                    f"layer image {layer} is {layer_info.width}x{layer_info.height} but its "
                    f"base {draft.image_path.name} is {target.width}x{target.height}; both are resized to "
                    "the base's bucket and may not line up",
                )
        if upscales and target.width * target.height * 4 < area:
            small.append(f"{draft.image_path} ({target.width}x{target.height})")
        items.append(
            ImageItem(
                image_path=draft.image_path,
                caption=draft.caption,
                original_size=target.size,
                control_paths=tuple(draft.controls),
                control_sizes=tuple(_size(infos[c]) for c in draft.controls),
                extra_target_paths=tuple(draft.extra_targets),
            )
        )
    if small:
        w, h = dataset.resolution
        remedy = "bucket_no_upscale = true" if dataset.enable_bucket else "enable_bucket + bucket_no_upscale"
        problems.warn(
            dataset.name,
            f"{len(small)} image(s) smaller than 1/4 of the bucket area ({w}x{h}) will be "
            f"enlarged more than 2x per side ({remedy} avoids it): {short_list(small)}",
        )
    return items


def _size(info: ImageInfo | str) -> tuple[int, int]:
    assert isinstance(info, ImageInfo)
    return info.size


def _check_unique_stems(dataset: DatasetConfig, items: list[ImageItem], problems: Problems) -> None:
    by_stem: dict[str, list[Path]] = {}
    for item in items:
        by_stem.setdefault(item.cache_stem, []).append(item.image_path)
    for stem, paths in sorted(by_stem.items()):
        if len(paths) > 1:
            names = ", ".join(str(p) for p in sorted(paths, key=str))
            problems.error(
                dataset.name,
                f"{names} share the file stem '{stem}' and would write the same cache files; "
                "rename all but one",
            )


def _warn_empty_captions(dataset: DatasetConfig, items: list[ImageItem], problems: Problems) -> None:
    """Items are trained on with an empty caption (as in Musubi), but a failed captioning run must show."""
    empty = sorted(str(item.image_path) for item in items if not item.caption)
    if empty:
        problems.warn(
            dataset.name,
            f"{len(empty)} of {len(items)} item(s) have an empty caption (trained unconditionally; "
            f"did a captioning run fail?): {short_list(empty)}",
        )
