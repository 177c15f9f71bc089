"""Generated image datasets for tests, the demo and benchmarks: images, captions and a dataset TOML."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_SIZES = [(64, 48), (48, 64), (64, 64), (80, 48)]


def _image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth colour gradient with a random blob: learnable structure, not white noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    grad = rng.uniform(-1.5, 1.5, (3, 2))
    cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(6, 16)
    blob = ((x - cx) ** 2 + (y - cy) ** 2) < r**2
    channels = [np.clip(base[c] + grad[c, 0] * x + grad[c, 1] * y + 80 * blob, 0, 255) for c in range(3)]
    return Image.fromarray(np.stack(channels, -1).astype(np.uint8))


def write_tiny_dataset(
    root: str | Path,
    count: int = 4,
    *,
    sizes: list[tuple[int, int]] | None = None,
    controls_per_item: int = 0,
    resolution: int = 64,
    batch_size: int = 1,
    seed: int = 0,
    extra_dataset_keys: str = "",
) -> Path:
    """Write ``count`` images (+ captions, + controls in ``controls/``) and return the dataset TOML path."""
    root = Path(root)
    images, controls, cache = root / "images", root / "controls", root / "cache"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = sizes or DEFAULT_SIZES
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        _image(rng, width, height).save(images / f"img{i:03d}.png")
        (images / f"img{i:03d}.txt").write_text(f"a test picture number {i}, colour study", encoding="utf-8")
        for j in range(controls_per_item):
            controls.mkdir(exist_ok=True)
            _image(rng, width + 16 * j, height).save(controls / f"img{i:03d}_{j}.png")
    control_line = f'control_directory = "{controls}"\n' if controls_per_item else ""
    toml = root / "dataset.toml"
    toml.write_text(
        "[general]\n"
        f"resolution = {resolution}\n"
        'caption_extension = ".txt"\n'
        f"batch_size = {batch_size}\n"
        "enable_bucket = true\n\n"
        "[[datasets]]\n"
        f'image_directory = "{images}"\n'
        f'cache_directory = "{cache}"\n'
        f"{control_line}{extra_dataset_keys}",
        encoding="utf-8",
    )
    return toml
