"""Running generation jobs: prompts -> embeddings -> latents -> PNGs.

:func:`generate` is the generate scripts' run: models are loaded one at a time (text encoder, then DiT,
then VAE) and freed in between, so peak memory is that of the largest component. Sampling during
training renders its jobs with the same pieces (:func:`encode_job_prompts`, :func:`encode_job_controls`,
:func:`render_job`, :func:`save_job_png`), so a prompt line gives the same image in both places.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import torch

from tsumugi.arch.base import Architecture, ImageGeometry, PromptEmbeds
from tsumugi.errors import UserError
from tsumugi.memory.attention import apply_attention_mode
from tsumugi.networks.lora_merge import LoraMergeStep
from tsumugi.preflight.runs import check_generate_flags, check_generation
from tsumugi.sample.config import GenerateConfig
from tsumugi.sample.edit import (
    EDIT_VERSIONS,
    RcmSettings,
    ReferenceBlend,
    encode_controls,
    load_mask,
    resize_mode,
)
from tsumugi.sample.jobs import GenerationJob, JobDefaults, build_jobs, job_parameters
from tsumugi.sample.png_output import output_stem, save_latent, save_png, to_pil
from tsumugi.sample.prompt_lines import PromptLine, read_prompt_file
from tsumugi.sample.sampler import denoise, sigma_schedule

logger = logging.getLogger(__name__)


def prompt_lines(config: GenerateConfig) -> list[PromptLine]:
    """``--from_file``'s prompts, else the one ``--prompt``."""
    if config.from_file and config.prompt:
        logger.info("--from_file given: --prompt is used only for lines without prompt text")
    if config.from_file:
        return read_prompt_file(config.from_file, fallback_prompt=bool(config.prompt))
    return [PromptLine(config.prompt or "", source="--prompt")]


def job_defaults(config: GenerateConfig, edit: bool) -> JobDefaults:
    """What the generate flags give every prompt line."""
    return JobDefaults(
        prompt=config.prompt or "", negative_prompt=config.negative_prompt,
        image_size=tuple(config.image_size) if config.image_size is not None else None,
        seed=config.seed, steps=config.infer_steps, guidance_scale=config.guidance_scale, flow_shift=config.flow_shift,
        control_paths=tuple(config.control_image_path or ()),
        resize_mode=resize_mode(config) if edit else "native",
        mask_path=config.mask_path, rcm_threshold=config.rcm_threshold, rcm_relative=config.rcm_relative_threshold,
        rcm_kernel_size=config.rcm_kernel_size, rcm_dilate_size=config.rcm_dilate_size,
    )


def generation_jobs(arch: Architecture, config: GenerateConfig, version: str = "original") -> list[GenerationJob]:
    """One job per prompt (``--prompt`` or each prompt of ``--from_file``), per-line options winning."""
    jobs = build_jobs(arch, prompt_lines(config), job_defaults(config, version in EDIT_VERSIONS), version)
    if config.from_file and not any(job.rcm_threshold is not None for job in jobs):
        if config.rcm_relative_threshold or config.rcm_debug_save:
            raise UserError("--rcm_relative_threshold / --rcm_debug_save need --rcm_threshold "
                            "(on the command line or --rcm_th in a prompt line)")
    return jobs


def _validate(arch: Architecture, config: GenerateConfig) -> None:
    if not config.save_path:
        raise UserError("--save_path is required (the folder for the images)")
    if config.latent_path:
        if not config.vae:
            raise UserError("--vae is required to decode --latent_path files")
        return
    if not config.prompt and not config.from_file and not config.automatic_prompt_lang_for_layered:
        raise UserError("give --prompt, --from_file or --latent_path")
    if config.image_size is not None and any(v <= 0 or v % 16 for v in config.image_size):
        near = " ".join(str(max(16, (v + 8) // 16 * 16)) for v in config.image_size)
        raise UserError(f"--image_size {' '.join(map(str, config.image_size))}: height and width must each be a positive "
                        f"multiple of 16 (e.g. --image_size {near})")
    for flag in ("dit", "vae", "text_encoder"):
        if not getattr(config, flag) and not (flag == "vae" and config.output_type == "latent"):
            raise UserError(f"--{flag} is required")
    if arch.name == "qwen_image":
        version = config.model_version
        if version == "layered":
            from tsumugi.sample.layered import validate_layered

            return validate_layered(config)
        layered_only = [flag for flag, on in (("--output_layers", config.output_layers != 4), (
            "--automatic_prompt_lang_for_layered", config.automatic_prompt_lang_for_layered is not None)) if on]
        if layered_only:
            raise UserError(f"{', '.join(layered_only)}: only for --model_version layered (got {version})")
        _validate_edit(config, version)


def _validate_edit(config: GenerateConfig, version: str) -> None:
    edit = version in EDIT_VERSIONS
    resize_mode(config)  # both resize flags: error
    edit_only = [name for name, on in (
        ("--mask_path", config.mask_path), ("--rcm_threshold", config.rcm_threshold is not None),
        ("--resize_control_to_image_size", config.resize_control_to_image_size),
        ("--resize_control_to_official_size", config.resize_control_to_official_size),
        ("--append_original_name", config.append_original_name),
    ) if on]
    if edit_only and not edit:
        raise UserError(f"{', '.join(edit_only)}: only for edit models (--model_version edit, edit-2509, edit-2511)")
    if config.mask_path and config.rcm_threshold is not None:
        raise UserError("--mask_path and --rcm_threshold exclude each other: give one")
    if config.rcm_threshold is None and not config.from_file and (config.rcm_relative_threshold or config.rcm_debug_save):
        raise UserError("--rcm_relative_threshold / --rcm_debug_save need --rcm_threshold")
    if config.rcm_kernel_size < 0 or config.rcm_dilate_size < 0:
        raise UserError("--rcm_kernel_size and --rcm_dilate_size must be >= 0")


def _dtype(config: GenerateConfig, device: torch.device, arch_name: str = "qwen_image") -> torch.dtype:
    """``--dit_dtype``; else bf16 on CUDA, and on the CPU the dtype the DiT file stores (bf16 or fp32)."""
    if config.dit_dtype:
        return getattr(torch, config.dit_dtype)
    from tsumugi.models.host_memory import default_dtype

    return default_dtype(config.dit if not config.latent_path else None, "dit", arch_name, device, flag="--dit")


def _free(*models: object) -> None:
    del models
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prompt_keys(arch: Architecture, jobs: list[GenerationJob]) -> list[tuple]:
    """The distinct (text, control key) pairs the jobs need: each prompt, and its negative where CFG runs."""
    keys = []
    for job in jobs:
        keys.append((job.prompt, job.control_key))
        if arch.uses_guidance(job.guidance_scale):
            keys.append((job.negative_prompt, job.control_key))
    return list(dict.fromkeys(keys))


def encode_job_prompts(arch: Architecture, text_encoder, tokenizer, jobs: list[GenerationJob], device: torch.device,
                       version: str = "original", keys: list[tuple] | None = None) -> dict[tuple, PromptEmbeds]:
    """Embeddings of ``keys`` (default :func:`prompt_keys`), one prompt at a time (no padding enters them);
    edit prompts are encoded with their VL-sized control images."""
    images = {job.control_key: job.vl_controls for job in jobs}
    embeds = {}
    with torch.no_grad():
        for text, control_key in prompt_keys(arch, jobs) if keys is None else keys:
            if control_key is None:
                embeds[(text, None)] = arch.encode_prompts(text_encoder, tokenizer, [text], device)[0]
            else:
                (tensor,) = arch.encode_prompts_with_images(
                    text_encoder, tokenizer, [text], [images[control_key]], version, device
                )
                embeds[(text, control_key)] = PromptEmbeds(tensor)
    return embeds


def encode_all(
    arch: Architecture, config: GenerateConfig, jobs: list[GenerationJob], device: torch.device, dtype: torch.dtype,
    version: str = "original",
) -> dict[tuple, PromptEmbeds]:
    """Embeddings of every distinct (prompt, controls) pair (and negative prompt where CFG runs), the encoder
    loaded once. Edit prompts are encoded with their VL-sized control images, the negative prompt too."""
    te_device = torch.device("cpu") if config.text_encoder_cpu else device
    te_dtype = dtype
    if te_device.type == "cpu" and config.dit_dtype is None:
        from tsumugi.models.host_memory import default_dtype

        te_dtype = default_dtype(config.text_encoder, "text_encoder", arch.name, te_device, flag="--text_encoder")
    if te_device.type != "cuda":
        from tsumugi.models.host_memory import check_fits, estimate_bytes

        needed = estimate_bytes(config.text_encoder, "text_encoder", arch.name, te_dtype, flag="--text_encoder")
        check_fits(needed, what=f"--text_encoder {config.text_encoder} as {str(te_dtype).removeprefix('torch.')}",
                   hint="run the text encoder on a GPU (without --text_encoder_cpu)")
    tokenizer = arch.load_tokenizer(config.tokenizer)
    text_encoder = arch.load_text_encoder(config.text_encoder, dtype=te_dtype, device=te_device)
    embeds = encode_job_prompts(arch, text_encoder, tokenizer, jobs, te_device, version)
    _free(text_encoder)
    return embeds


def _parameters(arch: Architecture, config: GenerateConfig, job: GenerationJob) -> dict[str, object]:
    data = job_parameters(arch, job)
    data.update(
        dit=Path(config.dit).name if config.dit else None,
        vae=Path(config.vae).name if config.vae else None,
        text_encoder=Path(config.text_encoder).name if config.text_encoder else None,
        loras=[
            {"file": Path(p).name, "multiplier": (config.lora_multiplier or [])[i] if i < len(config.lora_multiplier or []) else 1.0}
            for i, p in enumerate(config.lora_weight or [])
        ],
        fp8="scaled" if config.fp8_scaled else ("plain" if config.fp8 else "no"),
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


def apply_generation_memory_options(dit: torch.nn.Module, arch_name: str, config: GenerateConfig,
                                    device: torch.device):
    """fp8 weights, the attention backend, compiled blocks and block swap, in that order, from the generate
    flags; returns the block swapper or ``None``. With block swap ``dit`` must still be on the CPU."""
    if (config.fp8 or config.fp8_scaled) and not any(hasattr(m, "scale_weight") for m in dit.modules()):
        from tsumugi.memory.fp8_dit import quantize_dit_fp8  # not quantized while loading

        quantize_dit_fp8(dit, arch_name, scaled=config.fp8_scaled)
    apply_attention_mode(dit, config.attn_mode)
    swap = bool(config.blocks_to_swap)
    if config.compile:
        from tsumugi.memory.compile_blocks import compile_blocks

        compile_blocks(dit, arch_name, backend=config.compile_backend, mode=config.compile_mode,
                       dynamic=config.compile_dynamic, fullgraph=config.compile_fullgraph,
                       cache_size_limit=config.compile_cache_size_limit, eager_linears=swap)
    if not swap:
        return None
    from tsumugi.memory.block_swap import attach_block_swap

    swapper = attach_block_swap(dit, config.blocks_to_swap, device, arch_name, mode="forward",
                                pinned=config.use_pinned_memory_for_block_swap, h2d_only=True)
    logger.info("block swap: %d of %d blocks streamed from CPU memory", config.blocks_to_swap, len(swapper.blocks))
    return swapper


def generation_stream_options(arch_name: str, config: GenerateConfig, device: torch.device,
                              dtype: torch.dtype) -> dict[str, object]:
    """``load_dit`` options that merge ``--lora_weight`` and quantize (``--fp8``/``--fp8_scaled``) each
    weight as it streams in, and load block swap's weights straight into host memory. On the CPU the
    load is refused first when the DiT would not fit the available memory."""
    from tsumugi.memory.fp8_dit import Fp8DitStep

    fp8 = bool(config.fp8 or config.fp8_scaled)
    if device.type != "cuda":
        from tsumugi.models.host_memory import check_fits, estimate_bytes

        needed = estimate_bytes(config.dit, "dit", arch_name, dtype, flag="--dit", fp8_blocks=fp8)
        check_fits(needed, what=f"--dit {config.dit} as {str(dtype).removeprefix('torch.')}",
                   hint="use a GPU, --fp8_scaled, or a smaller --dit_dtype")
    steps: list = []
    if config.lora_weight:
        steps.append(LoraMergeStep(config.lora_weight, config.lora_multiplier, config.include_patterns,
                                   config.exclude_patterns))
    if fp8:
        steps.append(Fp8DitStep(arch_name, scaled=config.fp8_scaled))
    options: dict[str, object] = {"steps": steps}
    if config.blocks_to_swap:
        from tsumugi.memory.block_swap import swap_host_tensors

        options.update(host_tensors=swap_host_tensors(config.blocks_to_swap, arch_name),
                       pin_host=bool(config.use_pinned_memory_for_block_swap) and device.type == "cuda")
    return options


def generate(arch: Architecture, config: GenerateConfig) -> list[Path]:
    """Run the whole pipeline for ``config``; returns the files written."""
    _validate(arch, config)
    check_generate_flags(config)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    version = config.model_version if arch.name == "qwen_image" else "original"
    if config.latent_path:
        check_generation(arch.name, config, [], device)
        if version == "layered":
            from tsumugi.sample.layered import decode_layered_latent_files

            return decode_layered_latent_files(config, device)
        return decode_latent_files(arch, config, device)
    if version == "layered":
        from tsumugi.sample.layered import generate_layered

        return generate_layered(config, device)
    jobs = generation_jobs(arch, config, version)
    check_generation(arch.name, config, jobs, device)
    if arch.name == "qwen_image":
        from tsumugi.arch.qwen_image_layered import check_version_files

        check_version_files(config.dit, config.vae if config.output_type != "latent" or jobs[0].control_paths else None,
                            layered=False)
    dtype = _dtype(config, device, arch.name)  # reads the DiT's header: only after the file is checked
    controls = _encode_all_controls(arch, config, jobs, device)
    embeds = encode_all(arch, config, jobs, device, dtype, version)

    dit = arch.load_dit(config.dit, dtype=dtype, device=device, model_version=version,
                        **generation_stream_options(arch.name, config, device, dtype))
    dit.requires_grad_(False)
    if version in ("original", "edit", "edit-2509") and getattr(getattr(dit, "config", None), "zero_cond_t", False):
        logger.warning("the DiT carries the Edit-2511 marker (zero_cond_t) but --model_version is %s", version)
    apply_generation_memory_options(dit, arch.name, config, device)
    results, failed = [], []
    for job, encoded in zip(jobs, controls):
        negative = embeds.get((job.negative_prompt, job.control_key)) if arch.uses_guidance(job.guidance_scale) else None
        debug_dir = Path(config.save_path) if config.rcm_debug_save else None
        start = time.perf_counter()
        latents = render_job(arch, dit, job, embeds[(job.prompt, job.control_key)], negative, encoded, device, dtype,
                             rcm_debug_dir=debug_dir)
        elapsed = time.perf_counter() - start
        logger.info("%s: %d steps in %.2f s (%.3f s/step)", job.source, job.steps, elapsed, elapsed / job.steps)
        problem = non_finite_latents(latents, dit, job.source)
        if problem:
            logger.error("%s; nothing is written for it", problem)
            failed.append(problem)
            continue
        results.append((job, latents.cpu()))
    _free(dit)

    written = []
    save_dir = Path(config.save_path)
    for job, latents in results:
        if config.output_type in ("latent", "latent_images", "both"):
            meta = None if config.no_metadata else _latent_metadata(job)
            stem = output_stem(job.seed, _name_suffix(config, job))
            written.append(save_latent(arch.latents_for_saving(latents, job.geometry), save_dir, stem, meta))
    if config.output_type != "latent":
        vae = arch.load_vae(config.vae, device="cpu" if config.vae_cpu else device)
        for job, latents in results:
            stem = output_stem(job.seed, _name_suffix(config, job))
            path = save_job_png(arch, vae, job, latents, save_dir, stem, _parameters(arch, config, job))
            logger.info("saved %s", path)
            written.append(path)
    if failed:
        raise UserError(f"{len(failed)} of {len(jobs)} image(s) not written: " + "; ".join(failed))
    return written


def _name_suffix(config: GenerateConfig, job: GenerationJob) -> str:
    """``--append_original_name``: ``_<first control's base name>`` (Musubi writes a doubled ``_``)."""
    if config.append_original_name and job.control_paths:
        return "_" + Path(job.control_paths[0]).stem
    return ""


def _encode_all_controls(arch: Architecture, config: GenerateConfig, jobs: list[GenerationJob],
                         device: torch.device) -> list:
    """VAE latents of every job's controls (None for text-to-image); sets ``control_latent_sizes``."""
    if not any(job.vae_controls for job in jobs):
        return [None] * len(jobs)
    if not config.vae:
        raise UserError("--vae is required to encode the control images")
    vae = arch.load_vae(config.vae, device="cpu" if config.vae_cpu else device)
    out = [encode_job_controls(arch, vae, job) for job in jobs]
    _free(vae)
    return out


def encode_job_controls(arch: Architecture, vae, job: GenerationJob):
    """The VAE latents of ``job``'s controls (None without controls); sets ``job.control_latent_sizes``."""
    if not job.vae_controls:
        return None
    encoded = encode_controls(arch, vae, job.vae_controls)
    job.control_latent_sizes = encoded.latent_sizes
    return encoded


def render_job(arch: Architecture, dit: torch.nn.Module, job: GenerationJob, positive: PromptEmbeds,
               negative: PromptEmbeds | None, encoded, device: torch.device, dtype: torch.dtype, *,
               progress: bool = True, rcm_debug_dir: Path | None = None) -> torch.Tensor:
    """The final latents of one job (fp32, on the CPU): its seed's noise drawn as the diffusers pipeline
    draws it in the DiT's compute ``dtype``, the mask/RCM blend, the sampler. Generation and training
    samples both call this, so the same job gives the same image."""
    generator = torch.Generator("cpu").manual_seed(job.seed)
    noise = arch.initial_noise(job.geometry, generator, dtype)
    blend = _reference_blend(arch, job, encoded, noise, rcm_debug_dir)
    with torch.no_grad():
        latents = denoise(arch, dit, noise, positive, negative, job.geometry, job.settings, progress=progress,
                          step_callback=blend, conditions=None if encoded is None else encoded.tokens, device=device)
    if blend is not None:
        latents = blend.finish(latents)
    return latents.cpu()


def non_finite_latents(latents: torch.Tensor, dit: torch.nn.Module, source: str) -> str | None:
    """``None`` when ``latents`` are finite; else what is wrong, and the first DiT weight that is not finite
    (a damaged file or a merged LoRA), so that no black image is written without a word."""
    bad = int((~torch.isfinite(latents)).sum())
    if not bad:
        return None
    weight = next((name for name, t in [*dit.named_parameters(), *dit.named_buffers()]
                   if t.is_floating_point() and t.element_size() > 1 and not bool(torch.isfinite(t).all())), None)
    cause = (f"the DiT weight {weight} is not finite (a damaged --dit file, or a --lora_weight with NaN/inf values "
             "merged into it)" if weight else
             "the DiT weights are finite, so the computation overflowed (try --dit_dtype bfloat16 or float32)")
    return f"{source}: {bad} of {latents.numel()} denoised latent values are NaN or inf: {cause}"


def save_job_png(arch: Architecture, vae, job: GenerationJob, latents: torch.Tensor, directory: Path | str,
                 stem: str, parameters: dict[str, object]) -> Path:
    """Decode ``latents`` with ``vae`` (on its device) and write the PNG with ``parameters``."""
    device = next(vae.parameters()).device
    with torch.no_grad():
        image = arch.decode(vae, latents.to(device), job.geometry)[0]
    return save_png(to_pil(image), directory, stem, parameters)


def _reference_blend(arch: Architecture, job: GenerationJob, encoded, noise: torch.Tensor,
                     debug_dir: Path | None = None):
    """The mask / RCM step callback of one job, or None."""
    if encoded is None or (not job.mask_path and job.rcm_threshold is None):
        return None
    timesteps, sigmas = sigma_schedule(arch, job.settings, job.geometry)
    if job.mask_path:
        mask = load_mask(job.mask_path, job.width, job.height)
        return ReferenceBlend(arch, encoded.first_tokens, noise, job.geometry, timesteps, sigmas, mask=mask)
    rcm = RcmSettings(
        threshold=job.rcm_threshold, relative=job.rcm_relative, kernel_size=job.rcm_kernel_size,
        dilate_size=job.rcm_dilate_size, debug_dir=debug_dir, debug_name=Path(job.control_paths[0]).stem,
    )
    return ReferenceBlend(arch, encoded.first_tokens, noise, job.geometry, timesteps, sigmas, rcm=rcm)


def decode_latent_files(arch: Architecture, config: GenerateConfig, device: torch.device) -> list[Path]:
    """``--latent_path``: decode latent files written by ``--output_type latent`` (ours or Musubi's)."""
    from safetensors import safe_open

    vae = arch.load_vae(config.vae, device="cpu" if config.vae_cpu else device)
    written = []
    for file in config.latent_path:
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
        written.append(save_png(to_pil(image), config.save_path, output_stem(seed, "_" + Path(file).stem), params))
    return written
