"""Shared fixtures: tiny model sets written once per test session, in the layouts users have."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# block swap on the CPU makes real copies, as on a GPU, so the GPU path runs here (memory/block_swap.py)
os.environ.setdefault("TSUMUGI_BLOCK_SWAP_CPU_COPIES", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_sets(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_sets(arch, fmt)`` -> {"dit", "vae", "text_encoder"} paths, written once per (arch, fmt)."""
    from tsumugi.testing.tiny_models import write_tiny_set

    cache: dict[tuple[str, str], dict[str, Path]] = {}

    def get(arch: str, fmt: str = "comfy") -> dict[str, Path]:
        if (arch, fmt) not in cache:
            cache[(arch, fmt)] = write_tiny_set(tmp_path_factory.mktemp(f"{arch}_{fmt}"), arch, fmt=fmt, seed=0)
        return cache[(arch, fmt)]

    return get
