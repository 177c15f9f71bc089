"""Robust image loading: every file a dataset may contain becomes an 8-bit RGB (or RGBA) image.

* EXIF orientation is applied (``ImageOps.exif_transpose``), so sizes are the *displayed* sizes: a
  portrait photo stored landscape with orientation 6 reports (W, H) = (short, long). :func:`probe_image`
  reports the same oriented size without decoding, so cache names and loaded pixels always agree.
* 16-bit grayscale PNGs (``I;16*``) are scaled to 8 bit (``round(v / 257)``); Pillow's own conversion
  clips every value above 255 to white. Mode ``I`` is treated as 16-bit data when its maximum exceeds
  255, else as 8-bit data.
* Alpha: ``alpha="drop"`` removes it without compositing (what Musubi feeds the VAE), ``"keep"`` keeps
  RGBA when the file has transparency (RGBA, LA, PA, or a palette/gray ``transparency`` entry), ``"add"``
  always returns RGBA (opaque alpha added; for Qwen-Image-Layered composites).
* Zero-byte, missing, unidentifiable or truncated files raise :class:`UserError` naming the file.

Sizes are always (width, height); numpy arrays are (height, width, channels) uint8.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tsumugi.errors import UserError

AlphaMode = Literal["drop", "keep", "add"]

_EXIF_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # transpose / rotate 90 / transverse / rotate 270
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass(frozen=True)
class ImageInfo:
    """What a dataset check needs to know about an image file (size after EXIF orientation)."""

    width: int
    height: int
    mode: str
    has_alpha: bool

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: image file not found")
    if not path.is_file():
        from tsumugi.preflight.paths import describe_mode

        raise UserError(f"{path}: image is {describe_mode(path.stat().st_mode)}; expected a regular image file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file (0 bytes), not an image")


def _open(path: Path) -> Image.Image:
    _check_file(path)
    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise UserError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as exc:
        raise UserError(f"{path}: image too large to open safely ({exc})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read image ({exc})") from None


def _decode(img: Image.Image, path: Path) -> None:
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise UserError(f"{path}: image too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: corrupt or truncated image ({exc})") from None


def _png_exif(path: Path) -> bytes | None:
    """The eXIf chunk of a PNG found by walking the chunk headers (no pixel data is decompressed).

    Pillow's ``getexif`` on a PNG decodes the whole image to look for an eXIf chunk after the pixels.
    """
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while len(head := f.read(8)) == 8:
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind == b"eXIf":
                return f.read(length)
            if kind == b"IEND":
                return None
            f.seek(length + 4, os.SEEK_CUR)
    return None


def _orientation(img: Image.Image, path: Path | None = None) -> int:
    try:
        if path is not None and img.format == "PNG" and "exif" not in img.info:
            exif = Image.Exif()
            raw = _png_exif(path)
            if raw:
                exif.load(raw)
        else:
            exif = img.getexif()
        value = exif.get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF: treat as unrotated, exactly like load_image does
        return 1
    return value if isinstance(value, int) else 1


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or "transparency" in img.info


def probe_image(path: str | os.PathLike[str], *, decode: bool = True) -> ImageInfo:
    """Size (after EXIF orientation), mode and alpha presence of an image file.

    ``decode=True`` decodes all pixels, which is the only way to catch truncated files; ``False``
    reads the header only (still catches missing, empty and unidentifiable files).
    """
    path = Path(path)
    with _open(path) as img:
        if decode:
            _decode(img, path)
        width, height = img.size
        if _orientation(img, None if decode else path) in _SWAPPING_ORIENTATIONS:
            width, height = height, width
        return ImageInfo(width=width, height=height, mode=img.mode, has_alpha=_has_alpha(img))


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    arr = np.asarray(img).astype(np.int64)
    if img.mode == "I" and arr.size and arr.max() <= 255:
        arr8 = np.clip(arr, 0, 255)
    else:
        arr8 = (np.clip(arr, 0, 65535) * 255 + 32767) // 65535
    return Image.fromarray(arr8.astype(np.uint8), mode="L")


def normalize_mode(img: Image.Image, alpha: AlphaMode = "drop") -> Image.Image:
    """Convert any Pillow mode to ``RGB`` or ``RGBA`` according to ``alpha`` (see module docstring)."""
    transparent = _has_alpha(img)
    if img.mode.startswith("I;16") or img.mode == "I":
        img = _sixteen_bit_to_l(img)
    elif img.mode == "F":
        img = img.convert("L")
    want_rgba = alpha == "add" or (alpha == "keep" and transparent)
    target = "RGBA" if want_rgba else "RGB"
    if img.mode == target:
        return img
    if target == "RGB" and transparent and img.mode not in ("RGBA", "LA"):
        # palette/gray transparency: go through RGBA so the colour values survive, then drop alpha
        img = img.convert("RGBA")
    return img.convert(target)


def load_image(
    path: str | os.PathLike[str], *, alpha: AlphaMode = "drop", as_numpy: bool = False
) -> Image.Image | np.ndarray:
    """Decode an image file to RGB/RGBA with EXIF orientation applied.

    Returns a PIL image, or a (H, W, C) uint8 array when ``as_numpy`` is true.
    """
    path = Path(path)
    with _open(path) as raw:
        _decode(raw, path)
        try:
            oriented = ImageOps.exif_transpose(raw)
        except Exception:  # malformed EXIF: unrotated, as probe_image reports it
            oriented = raw
        img = normalize_mode(oriented, alpha)
    return to_numpy(img) if as_numpy else img


def to_numpy(img: Image.Image) -> np.ndarray:
    """(H, W, C) uint8 array of an RGB/RGBA image (width and height never swapped)."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr)
