"""The generate scripts' shared body: prompts -> embeddings -> latents -> PNGs.

Models are loaded one at a time (text encoder, then DiT, then VAE) and freed in between, so peak
memory is that of the largest component.
"""

from __future__ import annotations

import argparse
import gc
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import tsumugi
from tsumugi.arch import get_architecture
from tsumugi.arch.base import Architecture, ImageGeometry, PromptEmbeds
from tsumugi.cli.generate_args import build_generate_parser, resolve_model_version
from tsumugi.errors import UserError
from tsumugi.memory.attention import apply_attention_mode
from tsumugi.networks.lora_merge import merge_lora_files
from tsumugi.sample.png_output import output_stem, save_latent, save_png, to_pil
from tsumugi.sample.prompt_lines import PromptLine, read_prompt_file
from tsumugi.sample.sampler import SamplingSettings, denoise

logger = logging.getLogger(__name__)


@dataclass
class GenerationJob:
    """One image to make, every setting resolved."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    seed: int
    steps: int
    guidance_scale: float
    flow_shift: float | None
    source: str

    @property
    def geometry(self) -> ImageGeometry:
        return ImageGeometry(height=self.height, width=self.width)

    @property
    def settings(self) -> SamplingSettings:
        return SamplingSettings(self.steps, self.guidance_scale, self.flow_shift)


def _random_seed() -> int:
    return random.SystemRandom().randint(0, 2**32 - 1)


def _check_size(job: GenerationJob) -> None:
    for name, value in (("height", job.height), ("width", job.width)):
        if value <= 0 or value % 16:
            raise UserError(f"{job.source}: image {name} {value} must be a positive multiple of 16")
    if job.steps < 1:
        raise UserError(f"{job.source}: infer steps must be at least 1, found {job.steps}")


def build_jobs(arch: Architecture, args: argparse.Namespace) -> list[GenerationJob]:
    """One job per prompt (``--prompt`` or each line of ``--from_file``), per-line options winning."""
    if args.from_file and args.prompt:
        logger.info("--from_file given: --prompt is used only for lines without prompt text")
    lines = read_prompt_file(args.from_file) if args.from_file else [PromptLine(args.prompt or "", source="--prompt")]
    jobs = []
    for line in lines:
        job = GenerationJob(
            prompt=line.prompt or (args.prompt or ""),
            negative_prompt=line.negative_prompt if line.negative_prompt is not None else (
                args.negative_prompt if args.negative_prompt is not None else arch.default_negative_prompt
            ),
            width=line.width or args.image_size[1],
            height=line.height or args.image_size[0],
            seed=line.seed if line.seed is not None else (args.seed if args.seed is not None else _random_seed()),
            steps=line.steps or args.infer_steps,
            guidance_scale=line.guidance_scale if line.guidance_scale is not None else args.guidance_scale,
            flow_shift=line.flow_shift if line.flow_shift is not None else args.flow_shift,
            source=line.source,
        )
        _check_size(job)
        jobs.append(job)
    return jobs


def _validate(arch: Architecture, args: argparse.Namespace) -> None:
    if not args.save_path:
        raise UserError("--save_path is required (the folder for the images)")
    if args.latent_path:
        if not args.vae:
            raise UserError("--vae is required to decode --latent_path files")
        return
    if not args.prompt and not args.from_file:
        raise UserError("give --prompt, --from_file or --latent_path")
    for flag in ("dit", "vae", "text_encoder"):
        if not getattr(args, flag) and not (flag == "vae" and args.output_type == "latent"):
            raise UserError(f"--{flag} is required")
    if arch.name == "qwen_image":
        version = resolve_model_version(args)
        if version != "original":
            raise UserError(f"--model_version {version}: only text-to-image ('original') is supported so far")


def _dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    if args.dit_dtype:
        return getattr(torch, args.dit_dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _free(*models: object) -> None:
    del models
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def encode_all(
    arch: Architecture, args: argparse.Namespace, jobs: list[GenerationJob], device: torch.device, dtype: torch.dtype
) -> dict[str, PromptEmbeds]:
    """Embeddings of every distinct prompt (and negative prompt where CFG runs), the encoder loaded once."""
    texts = []
    for job in jobs:
        texts.append(job.prompt)
        if arch.uses_guidance(job.guidance_scale):
            texts.append(job.negative_prompt)
    unique = list(dict.fromkeys(texts))
    te_device = torch.device("cpu") if args.text_encoder_cpu else device
    te_dtype = torch.float32 if te_device.type == "cpu" and args.dit_dtype is None else dtype
    tokenizer = arch.load_tokenizer(args.tokenizer)
    text_encoder = arch.load_text_encoder(args.text_encoder, dtype=te_dtype, device=te_device)
    embeds = {}
    for text in unique:  # one at a time: no padding enters the embeddings
        embeds[text] = arch.encode_prompts(text_encoder, tokenizer, [text], te_device)[0]
    _free(text_encoder)
    return embeds


def _parameters(arch: Architecture, args: argparse.Namespace, job: GenerationJob) -> dict[str, object]:
    data = asdict(job)
    data.pop("source")
    data["flow_shift"] = "dynamic" if job.flow_shift is None and arch.default_flow_shift is None else (
        job.flow_shift if job.flow_shift is not None else arch.default_flow_shift
    )
    data.update(
        model=arch.display_name,
        sampler="flow-match Euler",
        dit=Path(args.dit).name if args.dit else None,
        vae=Path(args.vae).name if args.vae else None,
        text_encoder=Path(args.text_encoder).name if args.text_encoder else None,
        loras=[
            {"file": Path(p).name, "multiplier": (args.lora_multiplier or [])[i] if i < len(args.lora_multiplier or []) else 1.0}
            for i, p in enumerate(args.lora_weight or [])
        ],
        fp8="scaled" if args.fp8_scaled else ("plain" if args.fp8 else "no"),
        software=f"tsumugi {tsumugi.__version__}",
    )
    return data


def _latent_metadata(job: GenerationJob) -> dict[str, str]:
    return {
        "seeds": str(job.seed),
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "height": str(job.height),
        "width": str(job.width),
        "infer_steps": str(job.steps),
        "guidance_scale": str(job.guidance_scale),
    }


def generate(arch: Architecture, args: argparse.Namespace) -> list[Path]:
    """Run the whole pipeline for ``args``; returns the files written."""
    _validate(arch, args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _dtype(args, device)
    if args.latent_path:
        return decode_latent_files(arch, args, device)
    jobs = build_jobs(arch, args)
    embeds = encode_all(arch, args, jobs, device, dtype)

    swap = bool(getattr(args, "blocks_to_swap", 0))
    dit = arch.load_dit(args.dit, dtype=dtype, device="cpu" if swap else device)
    dit.requires_grad_(False)
    if args.lora_weight:
        merge_lora_files(dit, args.lora_weight, args.lora_multiplier, args.include_patterns, args.exclude_patterns)
    if args.fp8 or args.fp8_scaled:
        from tsumugi.memory.fp8_dit import quantize_dit_fp8

        quantize_dit_fp8(dit, arch.name, scaled=args.fp8_scaled)
    apply_attention_mode(dit, args.attn_mode)
    if swap:
        from tsumugi.memory.block_swap import attach_block_swap

        attach_block_swap(dit, args.blocks_to_swap, device, arch.name, mode="forward",
                          pinned=args.use_pinned_memory_for_block_swap, h2d_only=True)
    results = []
    for job in jobs:
        generator = torch.Generator("cpu").manual_seed(job.seed)
        noise = arch.initial_noise(job.geometry, generator, dtype if arch.name == "qwen_image" else torch.float32)
        negative = embeds.get(job.negative_prompt) if arch.uses_guidance(job.guidance_scale) else None
        start = time.perf_counter()
        latents = denoise(arch, dit, noise, embeds[job.prompt], negative, job.geometry, job.settings, device=device)
        elapsed = time.perf_counter() - start
        logger.info("%s: %d steps in %.2f s (%.3f s/step)", job.source, job.steps, elapsed, elapsed / job.steps)
        results.append((job, latents.cpu()))
    _free(dit)

    written = []
    save_dir = Path(args.save_path)
    for job, latents in results:
        stem = output_stem(job.seed)
        if args.output_type in ("latent", "latent_images", "both"):
            meta = None if args.no_metadata else _latent_metadata(job)
            written.append(save_latent(arch.latents_for_saving(latents, job.geometry), save_dir, stem, meta))
    if args.output_type != "latent":
        vae = arch.load_vae(args.vae, device=device)
        for job, latents in results:
            with torch.no_grad():
                image = arch.decode(vae, latents, job.geometry)[0]
            path = save_png(to_pil(image), save_dir, output_stem(job.seed), _parameters(arch, args, job))
            logger.info("saved %s", path)
            written.append(path)
    return written


def decode_latent_files(arch: Architecture, args: argparse.Namespace, device: torch.device) -> list[Path]:
    """``--latent_path``: decode latent files written by ``--output_type latent`` (ours or Musubi's)."""
    from safetensors import safe_open

    vae = arch.load_vae(args.vae, device=device)
    written = []
    for file in args.latent_path:
        try:
            with safe_open(file, framework="pt") as f:
                tensor = f.get_tensor("latent")
                meta = f.metadata() or {}
        except Exception as exc:
            raise UserError(f"--latent_path: {file} is not a latent file with a 'latent' tensor ({exc})") from None
        height, width = tensor.shape[-2] * 8, tensor.shape[-1] * 8
        geometry = ImageGeometry(height=height, width=width)
        try:
            latents = arch.latents_from_file(tensor.float(), geometry)
        except ValueError as exc:
            raise UserError(f"--latent_path: {file}: {exc}") from None
        with torch.no_grad():
            image = arch.decode(vae, latents, geometry)[0]
        params = {"decoded_from": Path(file).name, **{k: v for k, v in meta.items()}}
        seed = int(meta.get("seeds", 0)) if meta.get("seeds", "0").isdigit() else 0
        written.append(save_png(to_pil(image), args.save_path, output_stem(seed, "_" + Path(file).stem), params))
    return written


def generate_main(arch_name: str, argv: list[str] | None = None) -> int:
    arch = get_architecture(arch_name)
    args = build_generate_parser(arch).parse_args(argv)
    generate(arch, args)
    return 0
