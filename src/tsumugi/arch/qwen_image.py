"""Qwen-Image family (Qwen-Image, 2512, Edit, Edit-2509, Edit-2511).

Facts (``docs/design.md``, sections "Latents and packing" to "Classifier-free guidance"): the DiT
predicts ``noise - x0`` from the packed latent sequence with time input ``sigma``; latents are
normalised per channel with the VAE's ``latents_mean``/``latents_std``; packing is 2x2, channel-major
inside a token; sampling uses the dynamic (resolution) shift with a terminal sigma of 0.02 and "true
CFG" with a per-token norm rescale.
"""

from __future__ import annotations

from typing import Any

import torch

from tsumugi.arch.base import Architecture, ImageGeometry, PromptEmbeds

# The scheduler_config.json of the Qwen-Image release.
QWEN_IMAGE_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, h, w) -> (B, (h/2)(w/2), 4C); feature index ``c*4 + dy*2 + dx``."""
    b, c, _, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: (B, N, 4C) -> (B, C, 1, h, w)."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.reshape(b, latent_height // 2, latent_width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, 1, latent_height, latent_width)


def dynamic_shift_mu(num_tokens: int, config: dict[str, Any] = QWEN_IMAGE_SCHEDULER_CONFIG) -> float:
    """Resolution-dependent shift exponent: linear in the token count between the config's two anchors."""
    x1, x2 = config["base_image_seq_len"], config["max_image_seq_len"]
    y1, y2 = config["base_shift"], config["max_shift"]
    slope = (y2 - y1) / (x2 - x1)
    return num_tokens * slope + (y1 - slope * x1)


class QwenImageArchitecture(Architecture):
    name = "qwen_image"
    display_name = "Qwen-Image"
    arch_code = "qi"
    default_guidance_scale = 4.0
    default_negative_prompt = " "
    layered = False
    """Qwen-Image-Layered (its own subclass): the DiT and VAE loaded must be Layered's."""

    def load_dit(
        self, path: str, *, dtype: torch.dtype, device: torch.device | str, model_version: str = "original",
        **stream: Any,
    ) -> torch.nn.Module:
        """Edit-2511 modulates control tokens with t = 0 (``zero_cond_t``), also for files without its marker."""
        from tsumugi.arch.qwen_image_layered import check_layered_dit
        from tsumugi.models.loader import load_dit

        overrides = {"zero_cond_t": True} if model_version == "edit-2511" else None
        dit = load_dit(path, "qwen_image", dtype=dtype, device=device, config_overrides=overrides, **stream)
        check_layered_dit(dit, path, layered=self.layered)
        return dit

    def load_vae(self, path: str, *, device: torch.device | str) -> torch.nn.Module:
        """Refuses the RGBA VAE of Layered for the other versions, and the reverse."""
        from tsumugi.arch.qwen_image_layered import check_layered_vae

        vae = super().load_vae(path, device=device)
        check_layered_vae(vae, path, layered=self.layered)
        return vae

    def encode_prompts(
        self, text_encoder: torch.nn.Module, tokenizer: Any, prompts: list[str], device: torch.device | str
    ) -> list[PromptEmbeds]:
        from tsumugi.text.qwen_image_prompt import encode_qwen_image_prompts

        embeds = encode_qwen_image_prompts(text_encoder, tokenizer, prompts, device, text_encoder.dtype)
        return [PromptEmbeds(e) for e in embeds]

    def encode_prompts_with_images(
        self,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        prompts: list[str],
        images: list[list[Any]] | None,
        model_version: str,
        device: torch.device | str,
    ) -> list[torch.Tensor]:
        if model_version == "original" or images is None:
            return super().encode_prompts_with_images(text_encoder, tokenizer, prompts, None, model_version, device)
        from tsumugi.text.qwen_image_edit_prompt import encode_qwen_image_edit_prompts

        return encode_qwen_image_edit_prompts(
            text_encoder, tokenizer, prompts, images, model_version, device, text_encoder.dtype
        )

    def cache_arch_code(self, model_version: str) -> str:
        return {"original": "qi", "layered": "qil"}.get(model_version, "qie")

    text_cache_name = "vl_embed"

    def encode_images_for_cache(self, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalised (B, 16, 1, h, w) in the VAE's dtype."""
        device = next(vae.parameters()).device
        z = vae.encode(pixels.to(device, vae.dtype).unsqueeze(2)).latent_dist.mode()
        channels = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, channels, 1, 1, 1).to(z)
        std = torch.tensor(vae.config.latents_std).view(1, channels, 1, 1, 1).to(z)
        return (z - mean) / std

    def make_scheduler(self, flow_shift: float | None) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = dict(QWEN_IMAGE_SCHEDULER_CONFIG)
        if flow_shift is not None:
            config.update(use_dynamic_shifting=False, shift=float(flow_shift))
        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def scheduler_kwargs(self, geometry: ImageGeometry) -> dict[str, Any]:
        return {"mu": dynamic_shift_mu(geometry.num_tokens)}

    def initial_noise(self, geometry: ImageGeometry, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        shape = (1, 1, self.latent_channels, geometry.latent_height, geometry.latent_width)
        noise = torch.randn(shape, generator=generator, dtype=dtype, device=generator.device)
        # The pipeline draws (B, 1, C, h, w) and reinterprets it as (B, C, 1, h, w) before packing.
        noise = noise.reshape(1, self.latent_channels, 1, geometry.latent_height, geometry.latent_width)
        return pack_latents(noise)

    def predict_velocity(
        self,
        dit: torch.nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompts: list[PromptEmbeds],
        geometry: ImageGeometry,
        conditions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = dit.dtype
        device = latents.device
        from tsumugi.text.qwen_image_prompt import pad_prompt_embeds

        embeds, mask = pad_prompt_embeds([p.embeds.to(device=device, dtype=dtype) for p in prompts])
        batch, num_target = latents.shape[0], latents.shape[1]
        # Layered: the target is several frames (composite + layers) of the same size.
        shapes = [(1, geometry.latent_height // 2, geometry.latent_width // 2)] * geometry.extra.get("frames", 1)
        shapes += [(1, h // 2, w // 2) for h, w in geometry.control_latent_sizes]
        hidden = latents if conditions is None else torch.cat([latents, conditions.to(latents)], dim=1)
        extra = {}
        if getattr(getattr(dit, "config", None), "use_additional_t_cond", False):  # Layered: is_rgb = 0
            extra["additional_t_cond"] = torch.zeros(batch, dtype=torch.long, device=device)
        out = dit(
            hidden_states=hidden.to(dtype),
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=None if bool(mask.all()) else mask.to(device),
            timestep=(timesteps.to(device=device, dtype=dtype) / 1000),
            img_shapes=[shapes] * batch,
            return_dict=False,
            **extra,
        )[0]
        return out[:, :num_target].float()

    def latents_from_cache(self, cached: torch.Tensor) -> torch.Tensor:
        """Cached (B, 16, 1, h, w) latents are already normalised: only packed."""
        return pack_latents(cached.float())

    def uses_guidance(self, scale: float) -> bool:
        return scale > 1.0

    def combine_guidance(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        combined = uncond + scale * (cond - uncond)
        cond_norm = torch.norm(cond, dim=-1, keepdim=True)
        combined_norm = torch.norm(combined, dim=-1, keepdim=True)
        return combined * (cond_norm / combined_norm)

    def _denormalize(self, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        channels = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, channels, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, channels, 1, 1, 1)
        return latents * std.to(latents) + mean.to(latents)

    def decode(self, vae: torch.nn.Module, latents: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
        device = next(vae.parameters()).device
        z = unpack_latents(latents, geometry.latent_height, geometry.latent_width).to(device, vae.dtype)
        image = vae.decode(self._denormalize(vae, z), return_dict=False)[0][:, :, 0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def latents_for_saving(self, latents: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
        return unpack_latents(latents, geometry.latent_height, geometry.latent_width)

    def latents_from_file(self, tensor: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
        if tensor.dim() != 5:
            raise ValueError(f"expected a (1, 16, 1, h, w) Qwen-Image latent, found shape {tuple(tensor.shape)}")
        return pack_latents(tensor)
