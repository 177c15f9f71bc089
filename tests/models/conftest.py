"""Shared tiny models and files for the model-loading tests (built once per session)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tsumugi.testing.tiny_models import build_tiny, save_component


@pytest.fixture(scope="session")
def tiny() -> Callable[[str], torch.nn.Module]:
    """``tiny(component)``: the seed-0 tiny model, built once."""
    cache: dict[str, torch.nn.Module] = {}

    def get(component: str) -> torch.nn.Module:
        if component not in cache:
            cache[component] = build_tiny(component, seed=0)
        return cache[component]

    return get


@pytest.fixture(scope="session")
def tiny_file(tiny, tmp_path_factory) -> Callable[[str, str], Path]:
    """``tiny_file(component, fmt)``: the path of the tiny model saved in ``fmt``, written once."""
    root = tmp_path_factory.mktemp("tiny_files")
    cache: dict[tuple[str, str], Path] = {}

    def get(component: str, fmt: str) -> Path:
        if (component, fmt) not in cache:
            target = root / fmt / (component if fmt == "diffusers" else f"{component}.safetensors")
            cache[component, fmt] = save_component(tiny(component), component, fmt, target)
        return cache[component, fmt]

    return get


def _assert_same_state(loaded: torch.nn.Module, reference: dict[str, torch.Tensor], dtype=None) -> None:
    state = loaded.state_dict()
    assert set(state) == set(reference)
    for key, ref in reference.items():
        expected = ref.to(dtype) if dtype is not None and ref.is_floating_point() else ref
        got = state[key]
        assert got.dtype == expected.dtype, key
        assert torch.equal(got, expected), key


@pytest.fixture(scope="session")
def assert_same_state():
    """``assert_same_state(model, reference_sd, dtype=None)``: every tensor equal, exactly (after the cast)."""
    return _assert_same_state
