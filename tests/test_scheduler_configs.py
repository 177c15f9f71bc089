"""The scheduler configs our sampler and the diffusers parity references use, against the released ones.

``tests/data/scheduler_configs/`` holds copies of the released ``scheduler/scheduler_config.json`` of the
Hugging Face repositories ``Qwen/Qwen-Image`` (``qwen_image.json``) and ``Tongyi-MAI/Z-Image-Turbo``
(``z_image_turbo.json``), without the ``_diffusers_version`` bookkeeping key; ``qwen_image_layered.json`` is
the scheduler config of Qwen-Image-Layered as published with the Hugging Face repository
``diffusers/Qwen-Image-Layered-modular`` (linear time shift, no terminal stretch). The same values are quoted in
the public GitHub repository ``ostris/ai-toolkit``, files
``extensions_built_in/diffusion_models/qwen_image/qwen_image.py`` and
``extensions_built_in/diffusion_models/z_image/z_image.py`` (their ``scheduler_config`` dicts).

Comparing the schedulers diffusers builds from each (every config field, defaults included) catches a
missing key whose diffusers default differs from the release, not only a wrong value.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler

from tsumugi.arch import get_architecture
from tsumugi.arch.base import ImageGeometry
from tsumugi.arch.qwen_image import QWEN_IMAGE_SCHEDULER_CONFIG
from tsumugi.arch.zimage import ZIMAGE_SCHEDULER_CONFIG

RELEASED = Path(__file__).parent / "data" / "scheduler_configs"
CASES = {
    "qwen_image": ("qwen_image.json", QWEN_IMAGE_SCHEDULER_CONFIG),
    "zimage": ("z_image_turbo.json", ZIMAGE_SCHEDULER_CONFIG),
}


def released(arch: str) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_config(json.loads((RELEASED / CASES[arch][0]).read_text()))


def full_config(scheduler: FlowMatchEulerDiscreteScheduler) -> dict:
    return {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}


@pytest.mark.parametrize("arch", list(CASES))
def test_reference_scheduler_config_is_the_released_one(arch):
    """The constant ``tsumugi.testing.reference`` and the LoRA parity tests build their scheduler from."""
    ours = FlowMatchEulerDiscreteScheduler.from_config(CASES[arch][1])
    assert full_config(ours) == full_config(released(arch))


@pytest.mark.parametrize("arch", list(CASES))
def test_sampler_scheduler_is_the_released_one(arch):
    """Without ``--flow_shift`` the generate scripts sample with the released scheduler, step for step."""
    adapter = get_architecture(arch)
    ours, reference = adapter.make_scheduler(None), released(arch)
    assert full_config(ours) == full_config(reference)
    geometry = ImageGeometry(height=1024, width=1024)
    kwargs = adapter.scheduler_kwargs(geometry)
    for steps in (8, 50):
        ours.set_timesteps(sigmas=adapter.base_sigmas(steps), **kwargs)
        reference.set_timesteps(sigmas=adapter.base_sigmas(steps), **kwargs)
        np.testing.assert_array_equal(ours.sigmas.numpy(), reference.sigmas.numpy())


def test_released_schedules_match_the_documented_examples():
    """docs/design.md's 8-step examples at 1024x1024, computed by diffusers from the released configs."""
    qwen = released("qwen_image")
    mu = get_architecture("qwen_image").scheduler_kwargs(ImageGeometry(height=1024, width=1024))["mu"]
    qwen.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8).tolist(), mu=mu)
    expected_qwen = [1.0, 0.916, 0.820, 0.709, 0.580, 0.427, 0.244, 0.020, 0.0]
    np.testing.assert_allclose(qwen.sigmas.numpy(), expected_qwen, atol=1e-3)
    zimage = released("zimage")
    zimage.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8).tolist())
    base = np.linspace(1.0, 1 / 8, 8)
    expected_zimage = [*(3 * base / (1 + 2 * base)), 0.0]  # static shift 3: 1.0, 0.955, 0.9, ..., 0.3
    np.testing.assert_allclose(zimage.sigmas.numpy(), expected_zimage, atol=1e-6)


def test_layered_scheduler_is_the_released_one():
    """Qwen-Image-Layered samples with its own released scheduler and ``mu = sqrt(input tokens / 256)``."""
    from tsumugi.arch.qwen_image_layered import QwenImageLayeredArchitecture, layered_geometry

    adapter = QwenImageLayeredArchitecture()
    reference = FlowMatchEulerDiscreteScheduler.from_config(
        json.loads((RELEASED / "qwen_image_layered.json").read_text()))
    ours = adapter.make_scheduler(None)
    assert full_config(ours) == full_config(reference)
    kwargs = adapter.scheduler_kwargs(layered_geometry(640, 640, 4, (80, 80)))
    assert kwargs["mu"] == pytest.approx((40 * 40 / 256) ** 0.5)
    ours.set_timesteps(sigmas=adapter.base_sigmas(50), **kwargs)
    reference.set_timesteps(sigmas=adapter.base_sigmas(50), **kwargs)
    np.testing.assert_array_equal(ours.sigmas.numpy(), reference.sigmas.numpy())
    assert ours.sigmas[-2] > 0.02  # no terminal stretch, unlike Qwen-Image
