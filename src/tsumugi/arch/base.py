"""What the shared core may ask of an architecture.

Everything that differs between the Qwen-Image family and Z-Image sits behind :class:`Architecture`:
which loaders and prompt encoder to use, how latents are packed and (de)normalised, how the DiT is
called and what it predicts, and the default sampling settings. The sampler, the generate scripts and
(later) the trainer only talk to this interface.

Velocity convention: :meth:`Architecture.predict_velocity` returns ``v`` such that an Euler step from
noise level ``sigma_i`` to ``sigma_{i+1}`` is ``x + (sigma_{i+1} - sigma_i) * v``. Qwen-Image predicts
``noise - x0`` directly; Z-Image predicts ``x0 - noise`` and is negated by its adapter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class PromptEmbeds:
    """Text conditioning for one prompt: the encoder output without padding, shape (L, D)."""

    embeds: torch.Tensor


@dataclass
class ImageGeometry:
    """Pixel and latent sizes of one target image (pixels are multiples of 16)."""

    height: int
    width: int
    control_latent_sizes: tuple[tuple[int, int], ...] = ()
    """(h, w) in latent pixels of each control image appended to the DiT input (Qwen-Image Edit)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_height(self) -> int:
        return self.height // 8

    @property
    def latent_width(self) -> int:
        return self.width // 8

    @property
    def num_tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)


class Architecture(ABC):
    """One model family. Stateless: models are passed in, never stored."""

    name: str
    """Short id used in messages and metadata, e.g. ``qwen_image``."""
    display_name: str
    arch_code: str
    """Cache-file suffix of the Musubi format (``qi``, ``zi``, ...)."""
    latent_channels: int = 16
    default_guidance_scale: float
    default_negative_prompt: str
    default_flow_shift: float | None = None
    """None: the family's resolution-dependent shift."""

    # ---- components (loaded by tsumugi.models.loader under the family's name) -------------------
    def load_dit(
        self, path: str, *, dtype: torch.dtype, device: torch.device | str, model_version: str = "original",
        **stream: Any,
    ) -> torch.nn.Module:
        """``stream``: the streaming options of :func:`tsumugi.models.loader.load_dit` (``steps``,
        ``host_tensors``, ``pin_host``)."""
        from tsumugi.models.loader import load_dit

        return load_dit(path, self.name, dtype=dtype, device=device, **stream)

    def load_vae(self, path: str, *, device: torch.device | str) -> torch.nn.Module:
        """Both families run their VAE in float32."""
        from tsumugi.models.loader import load_vae

        return load_vae(path, self.name, dtype=torch.float32, device=device)

    def load_text_encoder(
        self, path: str, *, dtype: torch.dtype, device: torch.device | str, fp8: bool = False
    ) -> torch.nn.Module:
        """``fp8``: ``--fp8_vl`` / ``--fp8_llm``, the Linears quantized as they stream in."""
        from tsumugi.models.loader import load_text_encoder

        steps = []
        if fp8:
            from tsumugi.memory.fp8_linear import Fp8LinearStep

            steps.append(Fp8LinearStep())
        return load_text_encoder(path, self.name, dtype=dtype, device=device, steps=steps)

    def load_tokenizer(self, override: str | None = None) -> Any:
        from tsumugi.text.tokenizers import load_tokenizer

        return load_tokenizer(self.name, override)

    @abstractmethod
    def encode_prompts(
        self, text_encoder: torch.nn.Module, tokenizer: Any, prompts: list[str], device: torch.device | str
    ) -> list[PromptEmbeds]: ...

    def encode_prompts_with_images(
        self,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        prompts: list[str],
        images: list[list[Any]] | None,
        model_version: str,
        device: torch.device | str,
    ) -> list[torch.Tensor]:
        """Prompt embeddings (L_i, D) as caches store them; edit-capable families use ``images``."""
        return [p.embeds for p in self.encode_prompts(text_encoder, tokenizer, prompts, device)]

    # ---- caching ----------------------------------------------------------------------------
    def cache_arch_code(self, model_version: str) -> str:
        """Cache-file suffix for a model version (the family's code unless versions differ)."""
        return self.arch_code

    text_cache_name: str
    """Batch name of the text-encoder output in caches (``vl_embed`` / ``llm_embed``)."""

    @abstractmethod
    def encode_images_for_cache(self, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> per-item latents as Musubi caches store them (posterior mode)."""

    # ---- sampling ---------------------------------------------------------------------------
    @abstractmethod
    def make_scheduler(self, flow_shift: float | None) -> Any:
        """A diffusers FlowMatchEulerDiscreteScheduler configured like the released model."""

    @abstractmethod
    def scheduler_kwargs(self, geometry: ImageGeometry) -> dict[str, Any]:
        """Extra ``set_timesteps`` arguments (e.g. ``mu`` for a resolution-dependent shift)."""

    def base_sigmas(self, steps: int) -> list[float]:
        """Unshifted sigmas handed to the scheduler: ``linspace(1, 1/N, N)`` in float64, as the Qwen-Image
        pipeline builds them (families whose reference differs in precision override this)."""
        return np.linspace(1.0, 1.0 / steps, steps).tolist()

    @abstractmethod
    def initial_noise(self, geometry: ImageGeometry, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """Gaussian noise drawn exactly as the diffusers pipeline draws it, in the sampler's latent layout."""

    @abstractmethod
    def predict_velocity(
        self,
        dit: torch.nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompts: list[PromptEmbeds],
        geometry: ImageGeometry,
        conditions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the DiT on a batch: ``latents`` (B, ...) in the sampler layout, ``timesteps`` (B,) equal to
        1000 * sigma, one prompt per row (padded and masked as the family needs); returns fp32 velocities
        of the target only. ``conditions``: clean control latents in the sampler layout, appended to the
        input sequence (sizes in ``geometry.control_latent_sizes``); families without them refuse.
        Used by the sampler and by the trainer alike."""

    @abstractmethod
    def latents_from_cache(self, cached: torch.Tensor) -> torch.Tensor:
        """A batch of cached latents (B, ...) -> clean latents in the sampler layout (normalised/scaled)."""

    @abstractmethod
    def combine_guidance(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance on velocities."""

    @abstractmethod
    def uses_guidance(self, scale: float) -> bool: ...

    @abstractmethod
    def decode(self, vae: torch.nn.Module, latents: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
        """Latents in the sampler layout -> images (B, 3, H, W) in [0, 1]."""

    @abstractmethod
    def latents_for_saving(self, latents: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
        """Sampler-layout latents -> the tensor stored in a latent file (Musubi's shapes)."""

    @abstractmethod
    def latents_from_file(self, tensor: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
        """Inverse of :meth:`latents_for_saving`."""
