"""Fixtures for dataset-layer tests: tiny image files written with PIL, captions and config files."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _pixels(size: tuple[int, int], channels: int, seed: int) -> np.ndarray:
    w, h = size
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, channels), dtype=np.uint8)


@pytest.fixture
def make_image() -> Callable[..., Path]:
    """``make_image(path, size=(W, H), mode="RGB", seed=0, **save_kwargs)`` -> path (format from suffix)."""

    def make(
        path: Path, size: tuple[int, int] = (64, 48), mode: str = "RGB", seed: int = 0, **save_kwargs
    ) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if mode == "RGBA":
            img = Image.fromarray(_pixels(size, 4, seed), "RGBA")
        else:
            img = Image.fromarray(_pixels(size, 3, seed), "RGB")
            if mode != "RGB":
                img = img.convert(mode)
        img.save(path, **save_kwargs)
        return path

    return make


@pytest.fixture
def captioned(make_image) -> Callable[..., list[Path]]:
    """``captioned(dir, ["a.png", ...], size=..., ext=".txt")``: images plus ``<stem><ext>`` captions."""

    def make(
        directory: Path,
        names: list[str],
        size: tuple[int, int] = (64, 48),
        ext: str = ".txt",
        mode: str = "RGB",
    ) -> list[Path]:
        paths = []
        for i, name in enumerate(names):
            path = make_image(Path(directory) / name, size=size, mode=mode, seed=i)
            path.with_name(path.stem + ext).write_text(f"caption of {path.stem}\n", encoding="utf-8")
            paths.append(path)
        return paths

    return make


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """``write_config(text, name="dataset.toml")`` -> path of the written file in tmp_path."""

    def write(text: str, name: str = "dataset.toml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def data_warnings(caplog: pytest.LogCaptureFixture) -> Callable[[], str]:
    """All warnings logged by tsumugi.data so far, joined by newlines."""
    caplog.set_level(logging.INFO, logger="tsumugi.data")

    def get() -> str:
        return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)

    return get
