"""Every built-in config equals the released ``config.json`` (``tests/data/released_configs``)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from tsumugi.models.configs import RELEASED, clean_config

RELEASED_DIR = Path(__file__).resolve().parents[1] / "data" / "released_configs"
FILES = {
    "qwen_image_dit": "qwen_image_transformer.json",
    "qwen_image_vae": "qwen_image_vae.json",
    "qwen2_5_vl": "qwen_image_text_encoder.json",
    "zimage_dit": "zimage_transformer.json",
    "flux_vae": "zimage_vae.json",
    "qwen3": "zimage_text_encoder.json",
}


def _diffusers_class(kind: str):
    import diffusers

    return {"qwen_image_dit": diffusers.QwenImageTransformer2DModel, "qwen_image_vae": diffusers.AutoencoderKLQwenImage,
            "zimage_dit": diffusers.ZImageTransformer2DModel, "flux_vae": diffusers.AutoencoderKL}.get(kind)


def _same(ours, theirs) -> bool:
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return all(k not in theirs or _same(v, theirs[k]) for k, v in ours.items())
    if isinstance(ours, (list, tuple)) and isinstance(theirs, (list, tuple)):
        return len(ours) == len(theirs) and all(_same(a, b) for a, b in zip(ours, theirs))
    return ours == theirs


def test_every_built_in_config_has_a_released_copy():
    assert set(FILES) == set(RELEASED)


@pytest.mark.parametrize("kind", sorted(FILES))
def test_built_in_config_equals_released(kind):
    released = clean_config(json.loads((RELEASED_DIR / FILES[kind]).read_text()))
    ours = RELEASED[kind]
    differing = {k: (v, released[k]) for k, v in ours.items() if k in released and not _same(v, released[k])}
    assert differing == {}, f"{kind}: built-in (ours, released) values differ"
    cls = _diffusers_class(kind)
    if cls is None:
        return
    params = inspect.signature(cls.__init__).parameters
    # every constructor argument the released file sets is in the built-in config ...
    assert {k for k in released if k in params} - set(ours) == set()
    # ... and a built-in key the released file does not set is the class's own default
    for key in set(ours) - set(released):
        default = params[key].default
        assert _same(ours[key], list(default) if isinstance(default, tuple) else default), key
