"""Image decoding: EXIF orientation, odd modes, bad files."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tsumugi.data.images import load_image, probe_image, to_numpy
from tsumugi.errors import UserError


def _two_tone(size: tuple[int, int]) -> Image.Image:
    """Left half red, right half blue."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2 :] = (0, 0, 255)
    return Image.fromarray(arr)


def test_exif_rotated_jpeg_is_turned_upright(tmp_path: Path):
    path = tmp_path / "rotated.jpg"
    img = _two_tone((40, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise
    img.save(path, exif=exif.tobytes(), quality=95)

    assert probe_image(path).size == (20, 40)
    assert probe_image(path, decode=False).size == (20, 40)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    arr = load_image(path, as_numpy=True)
    assert arr.shape == (40, 20, 3)
    # the stored left (red) half is on top after a clockwise turn
    assert arr[5, 10, 0] > 200 and arr[5, 10, 2] < 60
    assert arr[35, 10, 2] > 200 and arr[35, 10, 0] < 60


def test_numpy_is_height_width_channels(tmp_path: Path, make_image):
    path = make_image(tmp_path / "wide.png", size=(64, 48))
    arr = load_image(path, as_numpy=True)
    assert arr.shape == (48, 64, 3) and arr.dtype == np.uint8
    assert to_numpy(load_image(path)).shape == (48, 64, 3)


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path: Path):
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    arr = load_image(path, as_numpy=True)
    assert arr.shape == (4, 4, 3)
    assert arr[0, :, 0].tolist() == [0, 4, 128, 255]
    assert (arr[..., 0] == arr[..., 2]).all()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def test_16bit_rgb_png(tmp_path: Path):
    w, h = 3, 2
    pixel = struct.pack(">HHH", 0x1234, 0x8000, 0xFFFF)
    raw = b"".join(b"\x00" + pixel * w for _ in range(h))
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
    png += _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")
    path = tmp_path / "rgb16.png"
    path.write_bytes(png)
    arr = load_image(path, as_numpy=True)
    assert arr.shape == (2, 3, 3)
    expected = np.array([0x1234, 0x8000, 0xFFFF]) / 257
    assert np.abs(arr[0, 0].astype(float) - expected).max() <= 1


def test_palette_png_with_transparency(tmp_path: Path):
    img = Image.new("P", (16, 16), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.paste(1, (0, 0, 8, 16))
    path = tmp_path / "pal.png"
    img.save(path, transparency=0)

    rgb = load_image(path)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (200, 100, 50) and rgb.getpixel((15, 0)) == (10, 20, 30)
    rgba = load_image(path, alpha="keep")
    assert rgba.mode == "RGBA"
    assert rgba.getpixel((0, 0))[3] == 255 and rgba.getpixel((15, 0))[3] == 0
    assert probe_image(path).has_alpha


def test_la_and_grayscale_and_add_alpha(tmp_path: Path, make_image):
    la = make_image(tmp_path / "la.png", mode="LA")
    assert load_image(la).mode == "RGB"
    assert load_image(la, alpha="keep").mode == "RGBA"
    gray = make_image(tmp_path / "gray.png", mode="L")
    arr = load_image(gray, as_numpy=True)
    assert arr.shape == (48, 64, 3) and (arr[..., 0] == arr[..., 1]).all()
    rgb = make_image(tmp_path / "rgb.png")
    assert load_image(rgb, alpha="keep").mode == "RGB"
    added = load_image(rgb, alpha="add", as_numpy=True)
    assert added.shape == (48, 64, 4) and (added[..., 3] == 255).all()


def test_cmyk_jpeg(tmp_path: Path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 16), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (32, 16)
    r, g, b = img.getpixel((16, 8))
    assert r > 220 and g < 40 and b < 40


def test_webp_lossless_keeps_pixels(tmp_path: Path, make_image):
    path = make_image(tmp_path / "a.webp", size=(24, 16), mode="RGBA", lossless=True)
    original = np.asarray(Image.open(path).convert("RGBA"))
    assert (load_image(path, alpha="keep", as_numpy=True) == original).all()
    assert load_image(path).mode == "RGB"


def test_zero_byte_file_is_named(tmp_path: Path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    for call in (lambda: load_image(path), lambda: probe_image(path)):
        with pytest.raises(UserError, match=r"empty\.png.*0 bytes"):
            call()


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file_is_named(tmp_path: Path, make_image, suffix: str):
    path = make_image(tmp_path / f"cut{suffix}", size=(128, 96))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=rf"cut\{suffix}.*(corrupt|truncated)"):
        load_image(path)
    with pytest.raises(UserError, match=rf"cut\{suffix}"):
        probe_image(path)
    assert probe_image(path, decode=False).size == (128, 96)  # the header alone looks fine


def test_not_an_image_and_missing(tmp_path: Path):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(UserError, match=r"notes\.png.*not a readable image"):
        probe_image(path)
    with pytest.raises(UserError, match=r"nowhere\.png.*not found"):
        load_image(tmp_path / "nowhere.png")
