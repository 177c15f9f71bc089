"""The denoising loop shared by every architecture: flow-matching Euler steps with optional CFG."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tsumugi.arch.base import Architecture, ImageGeometry, PromptEmbeds


@dataclass
class SamplingSettings:
    steps: int
    guidance_scale: float
    flow_shift: float | None


def sigma_schedule(
    arch: Architecture, settings: SamplingSettings, geometry: ImageGeometry
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps, sigmas)``: the model's time input (1000 * sigma) per step, shape (steps,), and the
    noise levels with a trailing 0, shape (steps + 1,), both fp32.

    diffusers' FlowMatchEulerDiscreteScheduler computes them, configured as the released model's
    scheduler, so that shifts and the terminal stretch are exactly the reference's.
    """
    if settings.steps == 1:  # the terminal stretch divides by zero for a single step (diffusers too)
        return torch.tensor([1000.0]), torch.tensor([1.0, 0.0])
    scheduler = arch.make_scheduler(settings.flow_shift)
    scheduler.set_timesteps(
        sigmas=arch.base_sigmas(settings.steps), device="cpu", **arch.scheduler_kwargs(geometry)
    )
    return scheduler.timesteps.float(), scheduler.sigmas.float()


StepCallback = Callable[[int, torch.Tensor], torch.Tensor]


def denoise(
    arch: Architecture,
    dit: torch.nn.Module,
    noise: torch.Tensor,
    positive: PromptEmbeds,
    negative: PromptEmbeds | None,
    geometry: ImageGeometry,
    settings: SamplingSettings,
    *,
    progress: bool = True,
    step_callback: StepCallback | None = None,
    conditions: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Run the sampler from ``noise`` and return the final latents (fp32, sampler layout).

    ``step_callback(i, latents)`` may replace the latents before step ``i`` (inpainting hooks in there).
    ``conditions``: clean control latents (1, N_c, D) appended to the DiT input every step (Edit).
    ``device``: where the latents live (default: the DiT's first parameter's device; pass it with block swap).
    """
    timesteps, sigmas = sigma_schedule(arch, settings, geometry)
    use_cfg = negative is not None and arch.uses_guidance(settings.guidance_scale)
    prompts = [positive, negative] if use_cfg else [positive]
    device = torch.device(device) if device is not None else next(dit.parameters()).device
    latents = noise.to(device=device, dtype=torch.float32)
    sigmas = sigmas.to(device)
    with torch.no_grad():
        for i in tqdm(range(settings.steps), desc="denoising", disable=not progress):
            if step_callback is not None:
                latents = step_callback(i, latents)
            batch = len(prompts)
            velocity = arch.predict_velocity(
                dit,
                latents.expand(batch, *latents.shape[1:]),
                timesteps[i : i + 1].expand(batch),
                prompts,
                geometry,
                None if conditions is None else conditions.to(device).expand(batch, *conditions.shape[1:]),
            )
            if use_cfg:
                velocity = arch.combine_guidance(velocity[0:1], velocity[1:2], settings.guidance_scale)
            latents = latents + (sigmas[i + 1] - sigmas[i]) * velocity
    return latents
