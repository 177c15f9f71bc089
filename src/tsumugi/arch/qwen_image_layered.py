"""Qwen-Image-Layered: one RGBA input image in, a composite plus N RGBA layers out.

Facts (diffusers' ``QwenImageLayeredPipeline`` and the release's scheduler config):

* latents: ``N + 1`` frames of the output size (frame 0 the composite, then the layers), drawn as one
  ``(1, N + 1, 16, h, w)`` normal tensor and packed frame after frame (2x2, channel-major inside a token);
  the clean latents of the input image follow them in the DiT sequence (as Edit's controls do);
* the DiT has an extra time embedding (``use_additional_t_cond``, index 0 = RGBA) and a layer-3D RoPE;
* the VAE is an RGBA VAE (4 input and output channels) with Qwen-Image's latent mean/std, run frame by frame;
* sampling: the release's scheduler uses the *linear* time shift with ``mu = sqrt(input tokens / 256)``
  (input tokens: the packed tokens of the input image) and no terminal stretch.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tsumugi.arch.base import ImageGeometry
from tsumugi.arch.qwen_image import (
    QWEN_IMAGE_SCHEDULER_CONFIG,
    QwenImageArchitecture,
    pack_latents,
    unpack_latents,
)
from tsumugi.errors import UserError

# The scheduler_config.json of the Qwen-Image-Layered release (differs from Qwen-Image's in the shift).
QWEN_IMAGE_LAYERED_SCHEDULER_CONFIG: dict[str, Any] = {
    **QWEN_IMAGE_SCHEDULER_CONFIG,
    "shift_terminal": False,
    "time_shift_type": "linear",
}

RGBA_CHANNELS = 4


def layered_geometry(height: int, width: int, layers: int, input_latent_size: tuple[int, int]) -> ImageGeometry:
    """Geometry of one Layered job: ``layers`` + 1 output frames of H x W, the input image's latent (h, w)."""
    return ImageGeometry(height=height, width=width, control_latent_sizes=(input_latent_size,),
                         extra={"frames": layers + 1})


def layered_shift_mu(input_latent_size: tuple[int, int]) -> float:
    h, w = input_latent_size
    return math.sqrt((h // 2) * (w // 2) / 256)


ADDITION_T_KEY = "time_text_embed.addition_t_embedding.weight"
"""The Layered DiT's extra time embedding: only Layered has it."""


def _check_dit(has_addition_t: bool, path: str, layered: bool) -> None:
    if layered and not has_addition_t:
        raise UserError(f"--dit {path}: not a Qwen-Image-Layered DiT (no {ADDITION_T_KEY}); --model_version layered "
                        "needs qwen_image_layered_bf16.safetensors or the Layered transformer folder")
    if has_addition_t and not layered:
        raise UserError(f"--dit {path}: this is a Qwen-Image-Layered DiT (it has {ADDITION_T_KEY}); give "
                        "--model_version layered, or the DiT of the chosen model version")


def _check_vae(channels: int, path: str, layered: bool) -> None:
    if layered and channels != RGBA_CHANNELS:
        raise UserError(f"--vae {path}: a {channels}-channel (RGB) Qwen-Image VAE; --model_version layered needs the "
                        "RGBA VAE of Qwen-Image-Layered (qwen_image_layered_vae.safetensors, 4 channels)")
    if not layered and channels != 3:
        raise UserError(f"--vae {path}: the {channels}-channel (RGBA) Qwen-Image-Layered VAE; this model version "
                        "needs the RGB Qwen-Image VAE (qwen_image_vae.safetensors), or give --model_version layered")


def check_layered_dit(dit: torch.nn.Module, path: str, layered: bool) -> None:
    """The Layered DiT carries the extra time embedding; other Qwen-Image DiTs do not."""
    _check_dit(bool(getattr(getattr(dit, "config", None), "use_additional_t_cond", False)), path, layered)


def check_layered_vae(vae: torch.nn.Module, path: str, layered: bool) -> None:
    """Layered needs its RGBA VAE (4 channels); the other versions the RGB Qwen-Image VAE (3)."""
    _check_vae(int(getattr(vae.config, "input_channels", 3)), path, layered)


def check_version_files(dit: str | None, vae: str | None, layered: bool) -> None:
    """The same checks from the file headers (no tensor data read), before any work starts."""
    from tsumugi.preflight.models import check_model

    if dit:
        _check_dit(ADDITION_T_KEY in check_model(dit, "qwen_image", "dit", "--dit"), dit, layered)
    if vae:
        infos = check_model(vae, "qwen_image", "vae", "--vae")
        # The encoder's first convolution: diffusers ``conv_in``, ComfyUI/Wan ``conv1``.
        conv_in = infos.get("encoder.conv_in.weight") or infos.get("encoder.conv1.weight")
        _check_vae(conv_in.shape[1] if conv_in is not None and len(conv_in.shape) > 1 else 3, vae, layered)


class QwenImageLayeredArchitecture(QwenImageArchitecture):
    display_name = "Qwen-Image-Layered"
    layered = True

    def make_scheduler(self, flow_shift: float | None) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = dict(QWEN_IMAGE_LAYERED_SCHEDULER_CONFIG)
        if flow_shift is not None:
            config.update(use_dynamic_shifting=False, shift=float(flow_shift))
        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def scheduler_kwargs(self, geometry: ImageGeometry) -> dict[str, Any]:
        return {"mu": layered_shift_mu(geometry.control_latent_sizes[0])}

    def initial_noise(self, geometry: ImageGeometry, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        frames, h, w = geometry.extra["frames"], geometry.latent_height, geometry.latent_width
        noise = torch.randn((1, frames, self.latent_channels, h, w), generator=generator, dtype=dtype,
                            device=generator.device)
        packed = pack_latents(noise.reshape(frames, self.latent_channels, 1, h, w))  # (frames, N, 64)
        return packed.reshape(1, -1, packed.shape[-1])

    def frames_latents(self, latents: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
        """Packed (1, frames * N, 64) -> (frames, 16, 1, h, w), normalised."""
        frames = geometry.extra["frames"]
        return unpack_latents(latents.reshape(frames, -1, latents.shape[-1]), geometry.latent_height,
                              geometry.latent_width)

    def decode(self, vae: torch.nn.Module, latents: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
        """(frames, 4, H, W) RGBA in [0, 1]: the composite, then the layers; each frame decoded on its own."""
        device = next(vae.parameters()).device
        z = self._denormalize(vae, self.frames_latents(latents, geometry).to(device, vae.dtype))
        images = [vae.decode(z[i : i + 1], return_dict=False)[0][:, :, 0] for i in range(z.shape[0])]
        return (torch.cat(images).float() / 2 + 0.5).clamp(0, 1)
