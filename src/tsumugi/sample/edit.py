"""Qwen-Image-Edit at inference: control-image sizing, control latents, inpainting mask and RCM.

Control sizing (``docs/design.md``, "Edit inference: control sizing, inpainting mask, RCM") goes
through the resize functions of :mod:`tsumugi.data.buckets`,
the ones caching and training samples use, so one control image gives the same tensors on every path:

* ``official`` (``--resize_control_to_official_size``): VAE/DiT input
  ``resize_control(image, ·, (1024, 1024), False)`` = ``bucket_for_area(size, 1024x1024)`` (step 16);
  VL input ``resize_to_bucket(vae_input, vl_input_size(vae_input.size))``, exactly as the text cache does;
* ``image_size`` (``--resize_control_to_image_size``): both inputs resized/center-cropped to the output W x H;
* ``native`` (neither flag): VAE input ``bucket_for_area(size, size)`` (a multiple-of-16 bucket of its own
  area), VL input the image at its native size.

Inpainting (``--mask_path``) and the Reference Consistency Mask (RCM), described in the same section,
pin regions of the latent to the first control's latent re-noised to the current noise level. Both run
through the sampler's ``step_callback`` (called before each step); :meth:`ReferenceBlend.finish`
applies the last step's blend after the sampler returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tsumugi.arch.base import Architecture, ImageGeometry
from tsumugi.caching.pixels import to_model_pixels
from tsumugi.data.buckets import bucket_for_area, resize_control, resize_to_bucket, vl_input_size
from tsumugi.data.images import load_image
from tsumugi.errors import UserError
from tsumugi.preflight.paths import require_file

logger = logging.getLogger(__name__)

EDIT_VERSIONS = ("edit", "edit-2509", "edit-2511")
OFFICIAL_CONTROL_RESOLUTION = (1024, 1024)
"""Area of the VAE/DiT control input of the official pipelines (W, H)."""
OFFICIAL_MAX_CONTROLS = 3
"""Control images per prompt the 2509/2511 releases are documented for; more only warn."""
RESIZE_MODES = ("native", "official", "image_size")


def resize_mode(args) -> str:
    """The control sizing chosen by the two flags (they exclude each other)."""
    to_image = getattr(args, "resize_control_to_image_size", False)
    official = getattr(args, "resize_control_to_official_size", False)
    if to_image and official:
        raise UserError(
            "--resize_control_to_image_size and --resize_control_to_official_size exclude each other: give one"
        )
    return "image_size" if to_image else ("official" if official else "native")


def official_control_images(image: Image.Image) -> tuple[Image.Image, Image.Image]:
    """(VAE input, VL input) of one RGB control under the official-size rule (caching and training samples too)."""
    vae_input = resize_control(image, image.size, OFFICIAL_CONTROL_RESOLUTION, False)
    return vae_input, resize_to_bucket(vae_input, vl_input_size(vae_input.size))


def control_images(image: Image.Image, mode: str, output_size: tuple[int, int] | None) -> tuple[Image.Image, Image.Image]:
    """(VAE input, VL input) of one control image; ``output_size`` (W, H) is needed for ``image_size``."""
    if mode == "official":
        return official_control_images(image)
    if mode == "image_size":
        if output_size is None:
            raise ValueError("image_size mode needs the output size")
        resized = resize_to_bucket(image, output_size)
        return resized, resized
    return resize_to_bucket(image, bucket_for_area(image.size, image.size)), image


def native_output_size(image: Image.Image, mode: str) -> tuple[int, int]:
    """(W, H) of the output when no size is given: the first control's VAE input size."""
    if mode == "official":
        return bucket_for_area(image.size, OFFICIAL_CONTROL_RESOLUTION)
    return bucket_for_area(image.size, image.size)


def load_control_image(path: str, source: str) -> Image.Image:
    require_file(path, f"{source}: control image", "image file")
    return load_image(path)  # alpha dropped (only Layered keeps it)


@dataclass
class EncodedControls:
    """Clean control latents for the DiT: packed tokens and their latent grid sizes."""

    tokens: torch.Tensor  # (1, N_c, 64) fp32
    latent_sizes: tuple[tuple[int, int], ...]
    first_tokens: torch.Tensor  # (1, N_0, 64): the reference of the mask / RCM


def encode_controls(arch: Architecture, vae: torch.nn.Module, images: list[Image.Image]) -> EncodedControls:
    """VAE-encode the (already sized) control images, each on its own (sizes may differ)."""
    from tsumugi.arch.qwen_image import pack_latents

    packed, sizes = [], []
    for image in images:
        with torch.no_grad():
            z = arch.encode_images_for_cache(vae, to_model_pixels(image).unsqueeze(0))
        sizes.append((int(z.shape[-2]), int(z.shape[-1])))
        packed.append(pack_latents(z.float()).cpu())
    return EncodedControls(torch.cat(packed, dim=1), tuple(sizes), packed[0])


def load_mask(path: str, width: int, height: int) -> torch.Tensor:
    """Mask image -> (1, N, 1) on the packed token grid; white (1) = regenerate, black (0) = keep."""
    require_file(path, "--mask_path", "image file")
    image = resize_to_bucket(load_image(path), (width, height))
    mask = torch.from_numpy(np.asarray(image, dtype=np.float32)[..., 0] / 255.0)[None, None]
    mask = F.interpolate(mask, size=(height // 16, width // 16), mode="bilinear", align_corners=False)
    return mask.reshape(1, -1, 1)


@dataclass
class RcmSettings:
    threshold: float
    relative: bool = False
    kernel_size: int = 0
    dilate_size: int = 0
    debug_dir: Path | None = None
    debug_name: str = "control"

    def debug_path(self, step: int) -> Path:
        assert self.debug_dir is not None
        name = (f"{self.debug_name}_th{self.threshold}_rel{int(self.relative)}_ks{self.kernel_size}"
                f"_ds{self.dilate_size}_rcm_mask_{step:02d}.png")
        return self.debug_dir / name


def gaussian_blur(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, h, w), reflect padding, sigma = 0.3((k-1)/2 - 1) + 0.8 (OpenCV's)."""
    k = kernel_size | 1
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    coords = torch.arange(k, dtype=torch.float32, device=x.device) - (k - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(x.dtype)
    channels = x.shape[1]
    pad = k // 2
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    x = F.pad(x, (pad, pad, pad, pad), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, k).expand(channels, 1, 1, k), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, k, 1).expand(channels, 1, k, 1), groups=channels)


class ReferenceBlend:
    """``step_callback`` pinning latent regions to the re-noised first control (mask or RCM).

    Mask: before every step i, ``x <- x*M + (ref(1-s_i) + eps0*s_i)(1-M)``, and once more after the last step
    (s = 0, i.e. the clean reference), so the kept region ends exactly on the control's latents; Musubi
    skips that final blend and lets the last update leak into the kept region.

    RCM: the mask of step j >= 1 is computed from the latents before step j and applied to them ahead of
    step j's Euler update. The sampler's callback runs before the model call, so the blend of step j is
    applied at the next callback as ``x_{j+1} - (1-M)(x_j - noisy_ref_j)``, which is algebraically the
    same update; :meth:`finish` does it for the last step.
    """

    def __init__(self, arch: Architecture, reference: torch.Tensor, noise: torch.Tensor, geometry: ImageGeometry,
                 timesteps: torch.Tensor, sigmas: torch.Tensor, *, mask: torch.Tensor | None = None,
                 rcm: RcmSettings | None = None) -> None:
        if (mask is None) == (rcm is None):
            raise ValueError("give exactly one of mask and rcm")
        self.reference, self.noise, self.geometry = reference.float(), noise.float(), geometry
        self.timesteps, self.sigmas = timesteps.float().cpu(), sigmas.float().cpu()
        self.mask, self.rcm = mask, rcm
        self._previous: tuple[int, torch.Tensor] | None = None
        self.debug_files: list[Path] = []

    def _noisy_reference(self, sigma: float, device: torch.device) -> torch.Tensor:
        return (self.reference * (1 - sigma) + self.noise * sigma).to(device)

    def __call__(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            mask = self.mask.to(latents)
            return latents * mask + self._noisy_reference(float(self.sigmas[step]), latents.device) * (1 - mask)
        if self._previous is not None:
            latents = self._apply_rcm(latents)
        self._previous = (step, latents.clone())
        return latents

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        """The blend after the final step (mask: onto the clean reference; RCM: the last step's mask)."""
        if self.mask is not None:
            mask = self.mask.to(latents)
            return latents * mask + self.reference.to(latents) * (1 - mask)
        if self._previous is not None:
            latents = self._apply_rcm(latents)
            self._previous = None
        return latents

    def _apply_rcm(self, latents: torch.Tensor) -> torch.Tensor:
        step, before = self._previous
        if step == 0:  # RCM skips the first step
            return latents
        noisy = self._noisy_reference(float(self.timesteps[step]) / 1000, latents.device)
        keep = self.rcm_mask(step, before, noisy)
        return latents - (1 - keep) * (before - noisy)

    def rcm_mask(self, step: int, latents: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        """The RCM mask of one step (blur, difference, threshold, resize, dilate), shape (1, N, 1):
        1 = keep generating, 0 = pin to the noisy reference."""
        from tsumugi.arch.qwen_image import unpack_latents

        rcm, g = self.rcm, self.geometry
        current = unpack_latents(latents.float(), g.latent_height, g.latent_width)[:, :, 0]
        reference = unpack_latents(noisy.float(), g.latent_height, g.latent_width)[:, :, 0]
        if rcm.kernel_size > 1:
            current, reference = gaussian_blur(current, rcm.kernel_size), gaussian_blur(reference, rcm.kernel_size)
        diff = (current - reference).abs().mean(dim=1, keepdim=True)
        threshold = rcm.threshold * float(diff.max()) if rcm.relative else rcm.threshold
        mask = (diff >= threshold).float()
        mask = F.interpolate(mask, size=(g.height // 16, g.width // 16), mode="bilinear", align_corners=False)
        if rcm.dilate_size > 0:
            r = rcm.dilate_size
            mask = F.max_pool2d(mask, kernel_size=2 * r + 1, stride=1, padding=r)
        if rcm.debug_dir is not None:
            path = rcm.debug_path(step)
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = (mask[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            Image.fromarray(pixels, mode="L").save(path)
            self.debug_files.append(path)
        return mask.reshape(1, -1, 1).to(latents)


def check_same_grid(control_size: tuple[int, int], width: int, height: int, flag: str, source: str) -> None:
    """Mask and RCM need the first control's latent grid equal to the output's (sizes are (W, H))."""
    if (control_size[0] // 16, control_size[1] // 16) != (width // 16, height // 16):
        raise UserError(
            f"{source}: {flag} needs the first control image at the output size, but its VAE input is "
            f"{control_size[0]}x{control_size[1]} and the output {width}x{height} (WxH); give --image_size "
            f"{control_size[1]} {control_size[0]}, or --resize_control_to_image_size"
        )


def log_version_limits(version: str, count: int, source: str) -> None:
    if version == "edit" and count > 1:
        logger.warning("%s: %d control images; Qwen-Image-Edit ('edit') gives all to the DiT but only the first "
                       "to the text encoder", source, count)
    elif count > OFFICIAL_MAX_CONTROLS:
        logger.warning("%s: %d control images; %s is documented for up to %d (all are used)",
                       source, count, version, OFFICIAL_MAX_CONTROLS)

