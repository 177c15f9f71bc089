"""``qwen_image_generate_image --model_version layered``: decompose one RGBA image into N layers.

One job per prompt (``--prompt`` or each ``--from_file`` line). The input image is ``--control_image_path``
(or the line's ``--ci``; exactly one), alpha kept (an opaque one added to RGB images). Sizing follows the
Edit rules of :mod:`tsumugi.sample.edit`: without a resize flag the input enters at the multiple-of-16
bucket of its own area and the output takes that size; ``--resize_control_to_image_size`` resizes/crops
the input to the output size (``--image_size`` or the line's ``--w --h``). ``--output_layers`` (or the
line's ``--f``) sets N. Written: N + 1 RGBA PNGs per job, ``..._layer0`` the composite, then the layers;
latent files hold ``(1, N + 1, 16, h, w)`` (Musubi's layout) and decode with ``--latent_path``.
The denoising is the shared sampler on :class:`~tsumugi.arch.qwen_image_layered.QwenImageLayeredArchitecture`.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tsumugi.arch.base import ImageGeometry
from tsumugi.arch.qwen_image import pack_latents
from tsumugi.arch.qwen_image_layered import (
    QwenImageLayeredArchitecture,
    check_version_files,
    layered_geometry,
)
from tsumugi.data.buckets import bucket_for_area, resize_to_bucket
from tsumugi.data.images import load_image
from tsumugi.errors import UserError
from tsumugi.preflight.paths import require_file
from tsumugi.sample.edit import resize_mode
from tsumugi.sample.generate import (
    GenerationJob,
    apply_generation_memory_options,
    encode_all,
    generation_stream_options,
)
from tsumugi.sample.png_output import output_stem, save_latent, save_png, to_pil
from tsumugi.sample.prompt_lines import PromptLine, read_prompt_file
from tsumugi.sample.sampler import denoise

logger = logging.getLogger(__name__)

_NOT_FOR_LAYERED = (
    ("--mask_path", "mask_path"), ("--rcm_threshold", "rcm_threshold"),
    ("--resize_control_to_official_size", "resize_control_to_official_size"),
)


CAPTION_MAX_NEW_TOKENS = 512
"""Tokens the automatic caption may have (the official pipeline's limit)."""
CAPTION_INSTRUCTION_CN = (
    "# 图像描述\n"
    "请用自然、连贯的中文句子描述输入图像，不要使用列表、标题或格式标记。\n"
    "写出主体及其属性（数量、颜色、形状、大小、材质、位置、状态）、主体之间的关系，以及环境与光线。\n"
    "图中清晰可见的文字请加引号原样写出，不要翻译或解释。\n"
    "只描述图中可见的内容，不要猜测或概括。"
)
"""The Chinese instruction of ``--automatic_prompt_lang_for_layered cn`` (``en`` uses the captioning default)."""


@dataclass
class LayeredJob:
    job: GenerationJob
    image: Image.Image
    """The RGBA input, sized for the VAE."""
    layers: int


def validate_layered(args: argparse.Namespace) -> None:
    """Flags that have no meaning for Layered, or are not built yet, refused by name before any work."""
    given = [flag for flag, dest in _NOT_FOR_LAYERED if getattr(args, dest, None) not in (None, False)]
    if given:
        raise UserError(f"{', '.join(given)}: not available with --model_version layered (Edit options)")
    if args.output_layers < 1:
        raise UserError(f"--output_layers must be at least 1, found {args.output_layers}")


def rgba_pixels(image: Image.Image) -> torch.Tensor:
    """RGBA PIL image -> (1, 4, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGBA"), dtype=np.float32)
    return (torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0).unsqueeze(0)


def _lines(args: argparse.Namespace) -> list[PromptLine]:
    if args.from_file:
        fallback = bool(args.prompt) or args.automatic_prompt_lang_for_layered is not None
        return read_prompt_file(args.from_file, fallback_prompt=fallback)
    return [PromptLine(args.prompt or "", source="--prompt")]


def build_layered_jobs(arch: QwenImageLayeredArchitecture, args: argparse.Namespace) -> list[LayeredJob]:
    from tsumugi.sample.generate import _check_size, _random_seed

    mode = resize_mode(args)
    jobs = []
    for line in _lines(args):
        if line.given_edit_options:
            raise UserError(f"{line.source}: {', '.join(line.given_edit_options)}: not available with "
                            "--model_version layered (Edit options)")
        paths = list(line.control_images) or list(args.control_image_path or [])
        if len(paths) != 1:
            raise UserError(f"{line.source}: --model_version layered needs exactly one input image "
                            f"(--control_image_path or --ci in the prompt line), found {len(paths)}")
        require_file(paths[0], f"{line.source}: input image", "image file")
        original = load_image(paths[0], alpha="add")
        native = bucket_for_area(original.size, original.size)
        default_h, default_w = args.image_size if args.image_size is not None else (native[1], native[0])
        job = GenerationJob(
            prompt=line.prompt or (args.prompt or ""),
            negative_prompt=line.negative_prompt if line.negative_prompt is not None else (
                args.negative_prompt if args.negative_prompt is not None else arch.default_negative_prompt),
            width=line.width or default_w, height=line.height or default_h,
            seed=line.seed if line.seed is not None else (args.seed if args.seed is not None else _random_seed()),
            steps=line.steps or args.infer_steps,
            guidance_scale=line.guidance_scale if line.guidance_scale is not None else args.guidance_scale,
            flow_shift=line.flow_shift if line.flow_shift is not None else args.flow_shift,
            source=line.source, control_paths=paths,
        )
        _check_size(job)
        layers = line.frame_count if line.frame_count is not None else args.output_layers
        if layers < 1:
            raise UserError(f"{line.source}: --f (output layers) must be at least 1, found {layers}")
        size = (job.width, job.height) if mode == "image_size" else native
        jobs.append(LayeredJob(job, resize_to_bucket(original, size), layers))
    return jobs


def caption_empty_prompts(args: argparse.Namespace, jobs: list[LayeredJob], device: torch.device,
                          dtype: torch.dtype) -> None:
    """``--automatic_prompt_lang_for_layered``: jobs without prompt text get a caption of their input image,
    written by the text encoder's own language model (greedy) with an English or Chinese instruction."""
    todo = [item for item in jobs if not item.job.prompt.strip()]
    if args.automatic_prompt_lang_for_layered is None or not todo:
        if args.automatic_prompt_lang_for_layered is not None:
            logger.info("--automatic_prompt_lang_for_layered: every job has a prompt; no caption made")
        return
    from tsumugi.sample.generate import _free
    from tsumugi.text import captioning
    from tsumugi.text.tokenizers import load_tokenizer

    te_device = torch.device("cpu") if args.text_encoder_cpu else device
    model = captioning.load_captioner(args.text_encoder, device=te_device, dtype=dtype, flag="--text_encoder")
    tokenizer = load_tokenizer("qwen_image", args.tokenizer)
    instruction = captioning.DEFAULT_PROMPT if args.automatic_prompt_lang_for_layered == "en" else CAPTION_INSTRUCTION_CN
    for item in todo:
        ids = captioning.caption_token_ids(model, tokenizer, item.image.convert("RGB"), instruction,
                                           max_new_tokens=CAPTION_MAX_NEW_TOKENS)
        item.job.prompt = captioning.decode_caption(tokenizer, ids)
        logger.info("%s: automatic prompt: %s", item.job.source, item.job.prompt)
    _free(model)


def _encode_inputs(arch: QwenImageLayeredArchitecture, args: argparse.Namespace, jobs: list[LayeredJob],
                   device: torch.device) -> list[torch.Tensor]:
    """Packed clean latents of every job's input image; sets each job's geometry inputs."""
    from tsumugi.sample.generate import _free

    vae = arch.load_vae(args.vae, device="cpu" if args.vae_cpu else device)
    tokens = []
    for item in jobs:
        with torch.no_grad():
            z = arch.encode_images_for_cache(vae, rgba_pixels(item.image))
        item.job.control_latent_sizes = (int(z.shape[-2]), int(z.shape[-1]))
        tokens.append(pack_latents(z.float()).cpu())
    _free(vae)
    return tokens


def generate_layered(args: argparse.Namespace, device: torch.device) -> list[Path]:
    """The whole Layered run for ``args`` (already validated); returns the PNGs written."""
    from tsumugi.preflight.runs import check_generation
    from tsumugi.sample.generate import _dtype, _free, _latent_metadata, _name_suffix, _parameters

    arch = QwenImageLayeredArchitecture()
    validate_layered(args)
    jobs = build_layered_jobs(arch, args)
    check_generation(arch.name, args, [item.job for item in jobs], device)
    check_version_files(args.dit, args.vae, layered=True)
    dtype = _dtype(args, device, arch.name)  # reads the DiT header: only after the file is checked
    inputs = _encode_inputs(arch, args, jobs, device)
    caption_empty_prompts(args, jobs, device, dtype)
    embeds = encode_all(arch, args, [item.job for item in jobs], device, dtype, "layered")

    dit = arch.load_dit(args.dit, dtype=dtype, device=device, **generation_stream_options(arch.name, args, device, dtype))
    dit.requires_grad_(False)
    apply_generation_memory_options(dit, arch.name, args, device)
    results = []
    for item, tokens in zip(jobs, inputs):
        job = item.job
        geometry = layered_geometry(job.height, job.width, item.layers, job.control_latent_sizes)
        generator = torch.Generator("cpu").manual_seed(job.seed)
        noise = arch.initial_noise(geometry, generator, dtype)
        negative = embeds.get((job.negative_prompt, None)) if arch.uses_guidance(job.guidance_scale) else None
        start = time.perf_counter()
        latents = denoise(arch, dit, noise, embeds[(job.prompt, None)], negative, geometry, job.settings,
                          conditions=tokens, device=device)
        elapsed = time.perf_counter() - start
        logger.info("%s: %d steps in %.2f s (%.3f s/step)", job.source, job.steps, elapsed, elapsed / job.steps)
        results.append((item, geometry, latents.cpu()))
    _free(dit)

    written = []
    if args.output_type in ("latent", "latent_images", "both"):
        for item, geometry, latents in results:
            meta = None if args.no_metadata else {**_latent_metadata(item.job), "output_layers": str(item.layers)}
            stem = output_stem(item.job.seed, _name_suffix(args, item.job))
            # (1, N + 1, 16, h, w): Musubi's layout of layered latents.
            frames = arch.frames_latents(latents, geometry).permute(2, 0, 1, 3, 4)
            written.append(save_latent(frames, args.save_path, stem, meta))
    if args.output_type == "latent":
        return written
    vae = arch.load_vae(args.vae, device="cpu" if args.vae_cpu else device)
    for item, geometry, latents in results:
        stem = output_stem(item.job.seed, _name_suffix(args, item.job))
        parameters = {**_parameters(arch, args, item.job), "output_layers": item.layers}
        written += _save_frames(arch, vae, latents, geometry, stem, parameters, args.save_path)
    return written


def _save_frames(arch: QwenImageLayeredArchitecture, vae: torch.nn.Module, latents: torch.Tensor,
                 geometry: ImageGeometry, stem: str, parameters: dict, save_path: str) -> list[Path]:
    """Decode the composite and the layers; ``stem_layer0.png`` (the composite) ... ``stem_layerN.png``."""
    with torch.no_grad():
        frames = arch.decode(vae, latents, geometry)
    written = []
    for index, frame in enumerate(frames):
        path = save_png(to_pil(frame), save_path, f"{stem}_layer{index}",
                        {**parameters, "layer": index, "layer_kind": "composite" if index == 0 else "layer"})
        logger.info("saved %s", path)
        written.append(path)
    return written


def decode_layered_latent_files(args: argparse.Namespace, device: torch.device) -> list[Path]:
    """``--latent_path`` with ``--model_version layered``: decode (1, N + 1, 16, h, w) latent files (ours or
    Musubi's) to the composite and layer PNGs."""
    from safetensors import safe_open

    arch = QwenImageLayeredArchitecture()
    check_version_files(None, args.vae, layered=True)
    vae = arch.load_vae(args.vae, device="cpu" if args.vae_cpu else device)
    written = []
    for file in args.latent_path:
        try:
            with safe_open(file, framework="pt") as f:
                tensor = f.get_tensor("latent")
                meta = f.metadata() or {}
        except Exception as exc:
            raise UserError(f"--latent_path: {file} is not a latent file with a 'latent' tensor ({exc})") from None
        if tensor.dim() != 5 or tensor.shape[0] != 1 or tensor.shape[2] != arch.latent_channels:
            raise UserError(f"--latent_path: {file}: expected a (1, layers + 1, 16, h, w) Qwen-Image-Layered latent, "
                            f"found shape {tuple(tensor.shape)}")
        frames, (h, w) = tensor.shape[1], tensor.shape[-2:]
        geometry = layered_geometry(h * 8, w * 8, frames - 1, (h, w))
        packed = pack_latents(tensor[0].float().unsqueeze(2)).reshape(1, -1, 4 * arch.latent_channels)
        seed = int(meta.get("seeds", 0)) if meta.get("seeds", "0").isdigit() else 0
        params = {"decoded_from": Path(file).name, **meta}
        written += _save_frames(arch, vae, packed, geometry, output_stem(seed, "_" + Path(file).stem), params,
                                args.save_path)
    return written

