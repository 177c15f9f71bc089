"""Z-Image (Turbo, De-Turbo, Base).

Facts (``docs/design.md``, sections "Latents and packing" to "Classifier-free guidance"): the DiT
takes a list of (C, 1, h, w) latents and a list of caption embeddings, time input ``1 - sigma``, and
predicts ``x0 - noise`` (negated here into a velocity).
The FLUX-style VAE latents are scaled ``(z - 0.1159) * 0.3611``. Sampling uses a static shift
(default 3.0) and plain CFG ``cond + g * (cond - uncond)`` whenever ``g > 0``.
"""

from __future__ import annotations

from typing import Any

import torch

from tsumugi.arch.base import Architecture, ImageGeometry, PromptEmbeds

# The FLUX VAE's latent shift and scale (the VAE config's shift_factor / scaling_factor).
VAE_SHIFT_FACTOR = 0.1159
VAE_SCALING_FACTOR = 0.3611

# The scheduler_config.json of the Z-Image release.
ZIMAGE_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
}


class ZImageArchitecture(Architecture):
    name = "zimage"
    display_name = "Z-Image"
    arch_code = "zi"
    default_guidance_scale = 0.0
    default_negative_prompt = ""
    default_flow_shift = 3.0

    def encode_prompts(
        self, text_encoder: torch.nn.Module, tokenizer: Any, prompts: list[str], device: torch.device | str
    ) -> list[PromptEmbeds]:
        from tsumugi.text.zimage_prompt import encode_zimage_prompts

        embeds = encode_zimage_prompts(text_encoder, tokenizer, prompts, device, text_encoder.dtype)
        return [PromptEmbeds(e) for e in embeds]

    text_cache_name = "llm_embed"

    def encode_images_for_cache(self, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> raw (unscaled) fp32 posterior mode (B, 16, h, w), as Musubi caches it."""
        device = next(vae.parameters()).device
        return vae.encode(pixels.to(device, vae.dtype)).latent_dist.mode()

    def make_scheduler(self, flow_shift: float | None) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = dict(ZIMAGE_SCHEDULER_CONFIG)
        config["shift"] = float(self.default_flow_shift if flow_shift is None else flow_shift)
        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def scheduler_kwargs(self, geometry: ImageGeometry) -> dict[str, Any]:
        return {}

    def base_sigmas(self, steps: int) -> list[float]:
        # The Z-Image pipeline builds them in float32 (torch.linspace); keep its exact values.
        return torch.linspace(1.0, 1.0 / steps, steps).tolist()

    def initial_noise(self, geometry: ImageGeometry, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        shape = (1, self.latent_channels, geometry.latent_height, geometry.latent_width)
        return torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device)

    def predict_velocity(
        self,
        dit: torch.nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompts: list[PromptEmbeds],
        geometry: ImageGeometry,
        conditions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if conditions is not None:
            raise ValueError("Z-Image takes no control images")
        dtype = dit.dtype
        device = latents.device
        t = (1000 - timesteps.to(device=device, dtype=torch.float32)) / 1000
        out = dit(
            list(latents.to(dtype).unsqueeze(2).unbind(0)),
            t,
            [p.embeds.to(device=device, dtype=dtype) for p in prompts],
            return_dict=False,
        )[0]
        return -torch.stack(out).float().squeeze(2)

    def latents_from_cache(self, cached: torch.Tensor) -> torch.Tensor:
        """Cached raw VAE latents (B, 16, h, w) -> the model's scaled latents."""
        return (cached.float() - VAE_SHIFT_FACTOR) * VAE_SCALING_FACTOR

    def uses_guidance(self, scale: float) -> bool:
        return scale > 0.0

    def combine_guidance(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        return cond + scale * (cond - uncond)

    def decode(self, vae: torch.nn.Module, latents: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
        device = next(vae.parameters()).device
        z = latents.to(device, vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def latents_for_saving(self, latents: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
        return latents

    def latents_from_file(self, tensor: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
        if tensor.dim() != 4:
            raise ValueError(f"expected a (1, 16, h, w) Z-Image latent, found shape {tuple(tensor.shape)}")
        return tensor
