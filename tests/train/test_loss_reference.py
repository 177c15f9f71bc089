"""The trainer's micro-batch loss against an independent computation built from diffusers.

The reference side never calls tsumugi's math: it loads the diffusers-format copy of the tiny DiT with
``from_pretrained``, packs latents with the pipelines' own ``_pack_latents``, calls the transformer the
way diffusers' pipelines do (installed diffusers, ``pipelines/qwenimage/pipeline_qwenimage.py``,
``pipeline_qwenimage_edit_plus.py``, ``pipelines/z_image/pipeline_z_image.py``), and takes the loss
weights from ``diffusers.training_utils.compute_loss_weighting_for_sd3``:

* flow matching: ``x_t = (1 - sigma) * x0 + sigma * noise``; diffusers' FlowMatchEulerDiscreteScheduler
  steps ``x + (sigma_next - sigma) * v``, so the velocity that leads back to ``x0`` is ``noise - x0``
  (checked below with the scheduler's own ``step``);
* Qwen-Image (and Edit-Plus): timestep ``t = 1000 * sigma``, the transformer gets ``t / 1000`` and predicts
  that velocity; control latents are packed and appended after the target tokens, the output is cut back
  to the target tokens;
* Z-Image: the transformer gets ``(1000 - t) / 1000`` and a list of (C, 1, h, w) latents; the pipeline
  negates its output before the scheduler step, so the raw output's target is ``x0 - noise``.

Only the random draws (noise, sigma) are shared: the reference replays the trainer's per-item generators.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch

from tsumugi.arch import get_architecture
from tsumugi.caching.validate import CachedItem
from tsumugi.testing.tiny_configs import tiny_qwen_image_dit_config
from tsumugi.testing.tiny_models import build_random, build_tiny, save_component
from tsumugi.train.cached_data import TrainBatch
from tsumugi.train.timesteps import TimestepConfig, sample_sigmas
from tsumugi.train.trainer import micro_batch_loss

# The released Z-Image VAE's latent scaling (Tongyi-MAI/Z-Image-Turbo, vae/config.json): the pipeline
# decodes ``z / scaling_factor + shift_factor``, so training latents are ``(z - shift) * scaling``.
ZIMAGE_VAE_SHIFT, ZIMAGE_VAE_SCALING = 0.1159, 0.3611

WIDTH, HEIGHT = 64, 48  # pixels of the target image: latent 8 x 6, 4 x 3 tokens
CONTROL_SIZES = ((4, 10), (8, 6))  # (h, w) in latent pixels of the two Edit-2509 control images
TEXT_LENGTHS = (5, 9)  # two items with different caption lengths: padding and masks come into play


class FixedBatch:
    """The one batch of cached tensors this test feeds the trainer (its ``data.load``)."""

    def __init__(self, batch: TrainBatch) -> None:
        self.batch = batch

    def load(self, items: list[CachedItem]) -> TrainBatch:
        return self.batch


def _cached_batch(arch: str, with_controls: bool) -> TrainBatch:
    """Random tensors in the cache layout: Qwen-Image (16, 1, h, w) normalised, Z-Image (16, h, w) raw."""
    g = torch.Generator().manual_seed(7)
    h, w = HEIGHT // 8, WIDTH // 8
    frame = (1,) if arch == "qwen_image" else ()
    latents = torch.randn(len(TEXT_LENGTHS), 16, *frame, h, w, generator=g)
    text = [torch.randn(n, 64, generator=g) for n in TEXT_LENGTHS]
    controls = []
    if with_controls:
        controls = [torch.randn(len(TEXT_LENGTHS), 16, 1, ch, cw, generator=g) for ch, cw in CONTROL_SIZES]
    return TrainBatch(latents, text, controls, (WIDTH, HEIGHT), [Path(f"item{i}") for i in range(len(text))])


def _items(batch: TrainBatch) -> list[CachedItem]:
    sizes = tuple((c.shape[-2] * 8, c.shape[-1] * 8) for c in batch.controls)
    return [CachedItem(0, p, p, batch.bucket, sizes) for p in batch.paths]


def _generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 + i) for i in range(len(TEXT_LENGTHS))]


@pytest.fixture(scope="module")
def dits(tmp_path_factory):
    """``dits(arch)`` -> (tsumugi's DiT from the ComfyUI file, diffusers' from its folder)."""
    made = {}

    def get(arch: str):
        if arch not in made:
            from diffusers import QwenImageTransformer2DModel, ZImageTransformer2DModel

            root = tmp_path_factory.mktemp(f"loss_{arch}")
            component = "qwen_image_dit" if arch == "qwen_image" else "zimage_dit"
            model = build_tiny(component, seed=3)
            if arch == "qwen_image":  # one block is enough here
                model = build_random(component, tiny_qwen_image_dit_config(num_layers=1), seed=3)
            comfy = save_component(model, component, "comfy", root / "dit.safetensors")
            folder = save_component(model, component, "diffusers", root / "diffusers")
            cls = QwenImageTransformer2DModel if arch == "qwen_image" else ZImageTransformer2DModel
            ours = get_architecture(arch).load_dit(str(comfy), dtype=torch.float32, device="cpu")
            made[arch] = ours, cls.from_pretrained(str(folder)).eval()
        return made[arch]

    return get


def _replayed_draws(x0_shape: torch.Size, num_tokens: int, config: TimestepConfig):
    """The noise and sigma each item's generator gives (same seeds as the trainer's generators)."""
    noises, sigmas = [], []
    for g in _generators():
        noises.append(torch.randn(x0_shape, generator=g))
        sigmas.append(sample_sigmas(config, 1, num_tokens, g))
    return torch.stack(noises), torch.cat(sigmas)


def _reference_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """diffusers' SD3 loss weighting at the nearest sigma of the 1000-step training schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    schedule = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).sigmas
    nearest = schedule[(schedule[None, :] - sigmas[:, None]).abs().argmin(dim=1)]
    return compute_loss_weighting_for_sd3(scheme, nearest).float()


def _check_velocity_convention(x0: torch.Tensor, noise: torch.Tensor, sigma: float, velocity: torch.Tensor):
    """One step of diffusers' Euler scheduler from ``sigma`` to 0 with ``velocity`` must land on ``x0``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(sigmas=[sigma], device="cpu")
    x_t = (1 - sigma) * x0 + sigma * noise
    landed = scheduler.step(velocity, scheduler.timesteps[0], x_t, return_dict=False)[0]
    torch.testing.assert_close(landed, x0, rtol=1e-5, atol=1e-5)


def _qwen_reference(dit, batch: TrainBatch, config: TimestepConfig, scheme: str):
    """(loss, sigmas) the Qwen-Image / Edit-Plus pipelines' conventions give."""
    from diffusers import QwenImageEditPlusPipeline, QwenImagePipeline

    pack = QwenImageEditPlusPipeline._pack_latents if batch.controls else QwenImagePipeline._pack_latents
    b = batch.latents.shape[0]
    h, w = batch.latents.shape[-2:]
    x0 = pack(batch.latents, b, 16, h, w)
    noise, sigmas = _replayed_draws(x0.shape[1:], (h // 2) * (w // 2), config)
    s = sigmas.view(-1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    image_latents = [pack(c, b, 16, c.shape[-2], c.shape[-1]) for c in batch.controls]
    hidden = torch.cat([x_t, *image_latents], dim=1)
    longest = max(t.shape[0] for t in batch.text)
    embeds = torch.stack([torch.cat([t, t.new_zeros(longest - t.shape[0], t.shape[1])]) for t in batch.text])
    mask = torch.stack([torch.arange(longest) < t.shape[0] for t in batch.text]).long()
    controls = [(1, c.shape[-2] // 2, c.shape[-1] // 2) for c in batch.controls]
    img_shapes = [[(1, h // 2, w // 2), *controls]] * b
    timestep = sigmas * 1000
    with torch.no_grad():
        pred = dit(hidden_states=hidden, timestep=timestep / 1000, encoder_hidden_states=embeds,
                   encoder_hidden_states_mask=mask, img_shapes=img_shapes, return_dict=False)[0]
    pred = pred[:, : x0.shape[1]]
    target = noise - x0
    _check_velocity_convention(x0[0], noise[0], float(sigmas[0]), target[0])
    loss = torch.nn.functional.mse_loss(pred.float(), target, reduction="none")
    return (loss * _reference_weights(scheme, sigmas).view(-1, 1, 1)).mean(), sigmas


def _zimage_reference(dit, batch: TrainBatch, config: TimestepConfig, scheme: str):
    """(loss, sigmas) the Z-Image pipeline's conventions give."""
    x0 = (batch.latents - ZIMAGE_VAE_SHIFT) * ZIMAGE_VAE_SCALING
    h, w = x0.shape[-2:]
    noise, sigmas = _replayed_draws(x0.shape[1:], (h // 2) * (w // 2), config)
    s = sigmas.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    timestep = sigmas * 1000
    with torch.no_grad():
        out = dit(list(x_t.unsqueeze(2).unbind(dim=0)), (1000 - timestep) / 1000, list(batch.text),
                  return_dict=False)[0]
    raw = torch.stack([o.float() for o in out]).squeeze(2)
    target = x0 - noise  # the pipeline steps with -raw, so raw predicts x0 - noise
    _check_velocity_convention(x0[0], noise[0], float(sigmas[0]), -target[0])
    loss = torch.nn.functional.mse_loss(raw, target, reduction="none")
    return (loss * _reference_weights(scheme, sigmas).view(-1, 1, 1, 1)).mean(), sigmas


CASES = {"qwen_image": ("qwen_image", False), "edit_2509": ("qwen_image", True), "zimage": ("zimage", False)}


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
@pytest.mark.parametrize("case", list(CASES))
def test_micro_batch_loss_matches_diffusers_reference(case, scheme, dits):
    arch_name, with_controls = CASES[case]
    ours, reference = dits(arch_name)
    batch = _cached_batch(arch_name, with_controls)
    config = TimestepConfig(timestep_sampling="uniform", weighting_scheme=scheme)
    with torch.no_grad():
        loss, sigmas = micro_batch_loss(
            get_architecture(arch_name), ours, FixedBatch(batch), _items(batch), _generators(), config,
            scheme, torch.device("cpu"), contextlib.nullcontext,
        )
    reference_fn = _qwen_reference if arch_name == "qwen_image" else _zimage_reference
    expected, expected_sigmas = reference_fn(reference, batch, config, scheme)
    assert torch.equal(sigmas, expected_sigmas)
    assert len(set(sigmas.tolist())) == len(TEXT_LENGTHS) and 0 < sigmas.min() < sigmas.max() < 1
    assert loss.item() > 0 and math.isfinite(loss.item())
    torch.testing.assert_close(loss, expected, rtol=2e-5, atol=0)
