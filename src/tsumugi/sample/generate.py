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
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

import tsumugi
from tsumugi.arch import get_architecture
from tsumugi.arch.base import Architecture, ImageGeometry, PromptEmbeds
from tsumugi.cli.generate_args import build_generate_parser, resolve_model_version
from tsumugi.errors import UserError
from tsumugi.memory.attention import apply_attention_mode
from tsumugi.networks.lora_merge import LoraMergeStep
from tsumugi.preflight.runs import check_generate_flags, check_generation
from tsumugi.sample.edit import (
    EDIT_VERSIONS,
    RcmSettings,
    ReferenceBlend,
    check_same_grid,
    control_images,
    encode_controls,
    load_control_image,
    load_mask,
    log_version_limits,
    native_output_size,
    resize_mode,
)
from tsumugi.sample.png_output import output_stem, save_latent, save_png, to_pil
from tsumugi.sample.prompt_lines import PromptLine, read_prompt_file
from tsumugi.sample.sampler import SamplingSettings, denoise, sigma_schedule

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
    control_paths: list[str] = field(default_factory=list)
    vae_controls: list = field(default_factory=list, repr=False)
    """Control images sized for the VAE/DiT (PIL), in order."""
    vl_controls: list = field(default_factory=list, repr=False)
    """Control images sized for the VL text encoder (PIL)."""
    control_latent_sizes: tuple[tuple[int, int], ...] = ()
    mask_path: str | None = None
    """Inpainting mask of this job (``--m`` of its line, else ``--mask_path``)."""
    rcm_threshold: float | None = None
    """RCM threshold of this job (``--rcm_th`` of its line, else ``--rcm_threshold``); None: no RCM."""
    rcm_relative: bool = False
    rcm_kernel_size: int = 0
    rcm_dilate_size: int = 0
    mask_flag: str = "--mask_path"
    """Where the mask came from, for error messages (``--m`` or ``--mask_path``)."""
    rcm_flag: str = "--rcm_threshold"

    @property
    def geometry(self) -> ImageGeometry:
        return ImageGeometry(height=self.height, width=self.width, control_latent_sizes=self.control_latent_sizes)

    @property
    def control_key(self) -> tuple | None:
        """What the prompt embedding depends on besides the text (None: text-only)."""
        if not self.vl_controls:
            return None
        return tuple((p, im.size) for p, im in zip(self.control_paths, self.vl_controls))

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


def build_jobs(arch: Architecture, args: argparse.Namespace, version: str = "original") -> list[GenerationJob]:
    """One job per prompt (``--prompt`` or each line of ``--from_file``), per-line options winning.

    Edit versions: each job's controls (``--ci`` of its line, else ``--control_image_path``) are loaded and
    sized here; without ``--image_size`` / ``--w --h`` the output takes the first control's VAE size.
    """
    if args.from_file and args.prompt:
        logger.info("--from_file given: --prompt is used only for lines without prompt text")
    lines = read_prompt_file(args.from_file, fallback_prompt=bool(args.prompt)) if args.from_file else [PromptLine(args.prompt or "", source="--prompt")]
    edit = version in EDIT_VERSIONS
    mode = resize_mode(args) if edit else "native"
    jobs = []
    for line in lines:
        paths = list(line.control_images) or list(getattr(args, "control_image_path", None) or [])
        if paths and not edit:
            raise UserError(
                f"{line.source}: control images need an edit model: give --model_version edit, edit-2509 or "
                "edit-2511 (or --edit / --edit_plus)"
            )
        if edit and not paths:
            raise UserError(f"{line.source}: --model_version {version} needs a control image "
                            "(--control_image_path or --ci in the prompt line)")
        originals = [load_control_image(p, line.source) for p in paths]
        default_size = args.image_size
        if default_size is None:
            default_size = [256, 256]
            if originals:
                w, h = native_output_size(originals[0], mode)
                default_size = [h, w]
        job = GenerationJob(
            prompt=line.prompt or (args.prompt or ""),
            negative_prompt=line.negative_prompt if line.negative_prompt is not None else (
                args.negative_prompt if args.negative_prompt is not None else arch.default_negative_prompt
            ),
            width=line.width or default_size[1],
            height=line.height or default_size[0],
            seed=line.seed if line.seed is not None else (args.seed if args.seed is not None else _random_seed()),
            steps=line.steps or args.infer_steps,
            guidance_scale=line.guidance_scale if line.guidance_scale is not None else args.guidance_scale,
            flow_shift=line.flow_shift if line.flow_shift is not None else args.flow_shift,
            source=line.source,
            control_paths=paths,
        )
        _resolve_mask_rcm(job, line, args, arch, edit)
        _check_size(job)
        for image in originals:
            vae_image, vl_image = control_images(image, mode, (job.width, job.height))
            job.vae_controls.append(vae_image)
            job.vl_controls.append(vl_image)
        if edit:
            log_version_limits(version, len(paths), line.source)
            if version == "edit":
                job.vl_controls = job.vl_controls[:1]
            if job.mask_path:
                check_same_grid(job.vae_controls[0].size, job.width, job.height, job.mask_flag, job.source)
            if job.rcm_threshold is not None:
                check_same_grid(job.vae_controls[0].size, job.width, job.height, job.rcm_flag, job.source)
        jobs.append(job)
    if args.from_file and not any(job.rcm_threshold is not None for job in jobs):
        if getattr(args, "rcm_relative_threshold", False) or getattr(args, "rcm_debug_save", False):
            raise UserError("--rcm_relative_threshold / --rcm_debug_save need --rcm_threshold "
                            "(on the command line or --rcm_th in a prompt line)")
    return jobs


def _resolve_mask_rcm(
    job: GenerationJob, line: PromptLine, args: argparse.Namespace, arch: Architecture, edit: bool
) -> None:
    """The job's mask/RCM settings: the line's ``--m`` / ``--rcm_*`` win over the command-line flags."""
    given = line.given_edit_options
    if given and arch.name != "qwen_image":
        raise UserError(f"{line.source}: {', '.join(given)}: mask/RCM prompt-line options are for Qwen-Image Edit "
                        f"only; {arch.display_name} does not take them")
    if given and not edit:
        raise UserError(f"{line.source}: {', '.join(given)}: only for edit models "
                        "(--model_version edit, edit-2509, edit-2511)")
    if arch.name != "qwen_image":
        return
    job.mask_path = line.mask_path or args.mask_path
    job.mask_flag = "--m" if line.mask_path else "--mask_path"
    job.rcm_threshold = line.rcm_threshold if line.rcm_threshold is not None else args.rcm_threshold
    job.rcm_flag = "--rcm_th" if line.rcm_threshold is not None else "--rcm_threshold"
    job.rcm_relative = (line.rcm_relative_threshold if line.rcm_relative_threshold is not None
                        else args.rcm_relative_threshold)
    job.rcm_kernel_size = line.rcm_kernel_size if line.rcm_kernel_size is not None else args.rcm_kernel_size
    job.rcm_dilate_size = line.rcm_dilate_size if line.rcm_dilate_size is not None else args.rcm_dilate_size
    if job.mask_path and job.rcm_threshold is not None:
        raise UserError(f"{line.source}: {job.mask_flag} and {job.rcm_flag} exclude each other: give one for this "
                        "line (prompt-line options override the command line only for the same setting)")
    rcm_line_options = [o for o in given if o in ("--rcm_rel_th", "--rcm_ks", "--rcm_ds")]
    if rcm_line_options and job.rcm_threshold is None:
        raise UserError(f"{line.source}: {', '.join(rcm_line_options)} need an RCM threshold "
                        "(--rcm_th in the line or --rcm_threshold)")
    for name, value in (("--rcm_ks", line.rcm_kernel_size), ("--rcm_ds", line.rcm_dilate_size)):
        if value is not None and value < 0:
            raise UserError(f"{line.source}: {name} must be >= 0, found {value}")
    if line.mask_path and not Path(line.mask_path).is_file():
        raise UserError(f"{line.source}: --m: mask {line.mask_path} does not exist")


def _validate(arch: Architecture, args: argparse.Namespace) -> None:
    if not args.save_path:
        raise UserError("--save_path is required (the folder for the images)")
    if args.latent_path:
        if not args.vae:
            raise UserError("--vae is required to decode --latent_path files")
        return
    if not args.prompt and not args.from_file and not getattr(args, "automatic_prompt_lang_for_layered", None):
        raise UserError("give --prompt, --from_file or --latent_path")
    if args.image_size is not None and any(v <= 0 or v % 16 for v in args.image_size):
        near = " ".join(str(max(16, (v + 8) // 16 * 16)) for v in args.image_size)
        raise UserError(f"--image_size {' '.join(map(str, args.image_size))}: height and width must each be a positive "
                        f"multiple of 16 (e.g. --image_size {near})")
    for flag in ("dit", "vae", "text_encoder"):
        if not getattr(args, flag) and not (flag == "vae" and args.output_type == "latent"):
            raise UserError(f"--{flag} is required")
    if arch.name == "qwen_image":
        version = resolve_model_version(args)
        if version == "layered":
            from tsumugi.sample.layered import validate_layered

            return validate_layered(args)
        layered_only = [flag for flag, on in (("--output_layers", args.output_layers != 4), (
            "--automatic_prompt_lang_for_layered", args.automatic_prompt_lang_for_layered is not None)) if on]
        if layered_only:
            raise UserError(f"{', '.join(layered_only)}: only for --model_version layered (got {version})")
        _validate_edit(args, version)


def _validate_edit(args: argparse.Namespace, version: str) -> None:
    edit = version in EDIT_VERSIONS
    resize_mode(args)  # both resize flags: error
    edit_only = [name for name, on in (
        ("--mask_path", args.mask_path), ("--rcm_threshold", args.rcm_threshold is not None),
        ("--resize_control_to_image_size", args.resize_control_to_image_size),
        ("--resize_control_to_official_size", args.resize_control_to_official_size),
        ("--append_original_name", args.append_original_name),
    ) if on]
    if edit_only and not edit:
        raise UserError(f"{', '.join(edit_only)}: only for edit models (--model_version edit, edit-2509, edit-2511)")
    if args.mask_path and args.rcm_threshold is not None:
        raise UserError("--mask_path and --rcm_threshold exclude each other: give one")
    if args.rcm_threshold is None and not args.from_file and (args.rcm_relative_threshold or args.rcm_debug_save):
        raise UserError("--rcm_relative_threshold / --rcm_debug_save need --rcm_threshold")
    if args.rcm_kernel_size < 0 or args.rcm_dilate_size < 0:
        raise UserError("--rcm_kernel_size and --rcm_dilate_size must be >= 0")


def _dtype(args: argparse.Namespace, device: torch.device, arch_name: str = "qwen_image") -> torch.dtype:
    """``--dit_dtype``; else bf16 on CUDA, and on the CPU the dtype the DiT file stores (bf16 or fp32)."""
    if args.dit_dtype:
        return getattr(torch, args.dit_dtype)
    from tsumugi.models.host_memory import default_dtype

    return default_dtype(args.dit if not args.latent_path else None, "dit", arch_name, device, flag="--dit")


def _free(*models: object) -> None:
    del models
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def encode_all(
    arch: Architecture, args: argparse.Namespace, jobs: list[GenerationJob], device: torch.device, dtype: torch.dtype,
    version: str = "original",
) -> dict[tuple, PromptEmbeds]:
    """Embeddings of every distinct (prompt, controls) pair (and negative prompt where CFG runs), the encoder
    loaded once. Edit prompts are encoded with their VL-sized control images, the negative prompt too."""
    keys = []
    for job in jobs:
        keys.append((job.prompt, job.control_key))
        if arch.uses_guidance(job.guidance_scale):
            keys.append((job.negative_prompt, job.control_key))
    unique = list(dict.fromkeys(keys))
    images = {job.control_key: job.vl_controls for job in jobs}
    te_device = torch.device("cpu") if args.text_encoder_cpu else device
    te_dtype = dtype
    if te_device.type == "cpu" and args.dit_dtype is None:
        from tsumugi.models.host_memory import default_dtype

        te_dtype = default_dtype(args.text_encoder, "text_encoder", arch.name, te_device, flag="--text_encoder")
    if te_device.type != "cuda":
        from tsumugi.models.host_memory import check_fits, estimate_bytes

        needed = estimate_bytes(args.text_encoder, "text_encoder", arch.name, te_dtype, flag="--text_encoder")
        check_fits(needed, what=f"--text_encoder {args.text_encoder} as {str(te_dtype).removeprefix('torch.')}",
                   hint="run the text encoder on a GPU (without --text_encoder_cpu)")
    tokenizer = arch.load_tokenizer(args.tokenizer)
    text_encoder = arch.load_text_encoder(args.text_encoder, dtype=te_dtype, device=te_device)
    embeds = {}
    for text, control_key in unique:  # one at a time: no padding enters the embeddings
        with torch.no_grad():
            if control_key is None:
                embeds[(text, None)] = arch.encode_prompts(text_encoder, tokenizer, [text], te_device)[0]
            else:
                (tensor,) = arch.encode_prompts_with_images(
                    text_encoder, tokenizer, [text], [images[control_key]], version, te_device
                )
                embeds[(text, control_key)] = PromptEmbeds(tensor)
    _free(text_encoder)
    return embeds


def _parameters(arch: Architecture, args: argparse.Namespace, job: GenerationJob) -> dict[str, object]:
    data = {f.name: getattr(job, f.name) for f in fields(job)}
    for key in ("source", "vae_controls", "vl_controls", "control_latent_sizes", "mask_flag", "rcm_flag",
                "mask_path", "rcm_threshold", "rcm_relative", "rcm_kernel_size", "rcm_dilate_size"):
        data.pop(key)
    if job.mask_path:
        data["mask_path"] = Path(job.mask_path).name
    if job.rcm_threshold is not None:
        data.update(rcm_threshold=job.rcm_threshold, rcm_relative=job.rcm_relative,
                    rcm_kernel_size=job.rcm_kernel_size, rcm_dilate_size=job.rcm_dilate_size)
    if not job.control_paths:
        data.pop("control_paths")
    else:
        data["control_paths"] = [Path(p).name for p in job.control_paths]
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


def apply_generation_memory_options(dit: torch.nn.Module, arch_name: str, args: argparse.Namespace,
                                    device: torch.device):
    """fp8 weights, the attention backend, compiled blocks and block swap, in that order, from the generate
    flags; returns the block swapper or ``None``. With block swap ``dit`` must still be on the CPU."""
    if (args.fp8 or args.fp8_scaled) and not any(hasattr(m, "scale_weight") for m in dit.modules()):
        from tsumugi.memory.fp8_dit import quantize_dit_fp8  # not quantized while loading

        quantize_dit_fp8(dit, arch_name, scaled=args.fp8_scaled)
    apply_attention_mode(dit, args.attn_mode)
    swap = bool(args.blocks_to_swap)
    if args.compile:
        from tsumugi.memory.compile_blocks import compile_blocks

        compile_blocks(dit, arch_name, backend=args.compile_backend, mode=args.compile_mode,
                       dynamic=args.compile_dynamic, fullgraph=args.compile_fullgraph,
                       cache_size_limit=args.compile_cache_size_limit, eager_linears=swap)
    if not swap:
        return None
    from tsumugi.memory.block_swap import attach_block_swap

    swapper = attach_block_swap(dit, args.blocks_to_swap, device, arch_name, mode="forward",
                                pinned=args.use_pinned_memory_for_block_swap, h2d_only=True)
    logger.info("block swap: %d of %d blocks streamed from CPU memory", args.blocks_to_swap, len(swapper.blocks))
    return swapper


def generation_stream_options(arch_name: str, args: argparse.Namespace, device: torch.device,
                              dtype: torch.dtype) -> dict[str, object]:
    """``load_dit`` options that merge ``--lora_weight`` and quantize (``--fp8``/``--fp8_scaled``) each
    weight as it streams in, and load block swap's weights straight into host memory. On the CPU the
    load is refused first when the DiT would not fit the available memory."""
    from tsumugi.memory.fp8_dit import Fp8DitStep

    fp8 = bool(args.fp8 or args.fp8_scaled)
    if device.type != "cuda":
        from tsumugi.models.host_memory import check_fits, estimate_bytes

        needed = estimate_bytes(args.dit, "dit", arch_name, dtype, flag="--dit", fp8_blocks=fp8)
        check_fits(needed, what=f"--dit {args.dit} as {str(dtype).removeprefix('torch.')}",
                   hint="use a GPU, --fp8_scaled, or a smaller --dit_dtype")
    steps: list = []
    if args.lora_weight:
        steps.append(LoraMergeStep(args.lora_weight, args.lora_multiplier, args.include_patterns,
                                   args.exclude_patterns))
    if fp8:
        steps.append(Fp8DitStep(arch_name, scaled=args.fp8_scaled))
    options: dict[str, object] = {"steps": steps}
    if args.blocks_to_swap:
        from tsumugi.memory.block_swap import swap_host_tensors

        options.update(host_tensors=swap_host_tensors(args.blocks_to_swap, arch_name),
                       pin_host=bool(args.use_pinned_memory_for_block_swap) and device.type == "cuda")
    return options


def generate(arch: Architecture, args: argparse.Namespace) -> list[Path]:
    """Run the whole pipeline for ``args``; returns the files written."""
    _validate(arch, args)
    check_generate_flags(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.latent_path:
        check_generation(arch.name, args, [], device)
        if arch.name == "qwen_image" and resolve_model_version(args) == "layered":
            from tsumugi.sample.layered import decode_layered_latent_files

            return decode_layered_latent_files(args, device)
        return decode_latent_files(arch, args, device)
    version = resolve_model_version(args) if arch.name == "qwen_image" else "original"
    if version == "layered":
        from tsumugi.sample.layered import generate_layered

        return generate_layered(args, device)
    jobs = build_jobs(arch, args, version)
    check_generation(arch.name, args, jobs, device)
    if arch.name == "qwen_image":
        from tsumugi.arch.qwen_image_layered import check_version_files

        check_version_files(args.dit, args.vae if args.output_type != "latent" or jobs[0].control_paths else None,
                            layered=False)
    dtype = _dtype(args, device, arch.name)  # reads the DiT header: only after the file is checked
    controls = _encode_all_controls(arch, args, jobs, device)
    embeds = encode_all(arch, args, jobs, device, dtype, version)

    dit = arch.load_dit(args.dit, dtype=dtype, device=device, model_version=version,
                        **generation_stream_options(arch.name, args, device, dtype))
    dit.requires_grad_(False)
    if version in ("original", "edit", "edit-2509") and getattr(getattr(dit, "config", None), "zero_cond_t", False):
        logger.warning("the DiT carries the Edit-2511 marker (zero_cond_t) but --model_version is %s", version)
    apply_generation_memory_options(dit, arch.name, args, device)
    results = []
    for job, encoded in zip(jobs, controls):
        generator = torch.Generator("cpu").manual_seed(job.seed)
        noise = arch.initial_noise(job.geometry, generator, dtype if arch.name == "qwen_image" else torch.float32)
        negative = embeds.get((job.negative_prompt, job.control_key)) if arch.uses_guidance(job.guidance_scale) else None
        blend = _reference_blend(arch, args, job, encoded, noise)
        start = time.perf_counter()
        latents = denoise(arch, dit, noise, embeds[(job.prompt, job.control_key)], negative, job.geometry,
                          job.settings, step_callback=blend, conditions=None if encoded is None else encoded.tokens,
                          device=device)
        if blend is not None:
            latents = blend.finish(latents)
        elapsed = time.perf_counter() - start
        logger.info("%s: %d steps in %.2f s (%.3f s/step)", job.source, job.steps, elapsed, elapsed / job.steps)
        results.append((job, latents.cpu()))
    _free(dit)

    written = []
    save_dir = Path(args.save_path)
    for job, latents in results:
        if args.output_type in ("latent", "latent_images", "both"):
            meta = None if args.no_metadata else _latent_metadata(job)
            stem = output_stem(job.seed, _name_suffix(args, job))
            written.append(save_latent(arch.latents_for_saving(latents, job.geometry), save_dir, stem, meta))
    if args.output_type != "latent":
        vae = arch.load_vae(args.vae, device="cpu" if args.vae_cpu else device)
        for job, latents in results:
            with torch.no_grad():
                image = arch.decode(vae, latents, job.geometry)[0]
            stem = output_stem(job.seed, _name_suffix(args, job))
            path = save_png(to_pil(image), save_dir, stem, _parameters(arch, args, job))
            logger.info("saved %s", path)
            written.append(path)
    return written


def _name_suffix(args: argparse.Namespace, job: GenerationJob) -> str:
    """``--append_original_name``: ``_<first control's base name>`` (Musubi writes a doubled ``_``)."""
    if getattr(args, "append_original_name", False) and job.control_paths:
        return "_" + Path(job.control_paths[0]).stem
    return ""


def _encode_all_controls(arch: Architecture, args: argparse.Namespace, jobs: list[GenerationJob],
                         device: torch.device) -> list:
    """VAE latents of every job's controls (None for text-to-image); sets ``control_latent_sizes``."""
    if not any(job.vae_controls for job in jobs):
        return [None] * len(jobs)
    if not args.vae:
        raise UserError("--vae is required to encode the control images")
    vae = arch.load_vae(args.vae, device="cpu" if args.vae_cpu else device)
    out = []
    for job in jobs:
        if not job.vae_controls:
            out.append(None)
            continue
        encoded = encode_controls(arch, vae, job.vae_controls)
        job.control_latent_sizes = encoded.latent_sizes
        out.append(encoded)
    _free(vae)
    return out


def _reference_blend(arch: Architecture, args: argparse.Namespace, job: GenerationJob, encoded, noise: torch.Tensor):
    """The mask / RCM step callback of one job, or None."""
    if encoded is None or (not job.mask_path and job.rcm_threshold is None):
        return None
    timesteps, sigmas = sigma_schedule(arch, job.settings, job.geometry)
    if job.mask_path:
        mask = load_mask(job.mask_path, job.width, job.height)
        return ReferenceBlend(arch, encoded.first_tokens, noise, job.geometry, timesteps, sigmas, mask=mask)
    rcm = RcmSettings(
        threshold=job.rcm_threshold, relative=job.rcm_relative, kernel_size=job.rcm_kernel_size,
        dilate_size=job.rcm_dilate_size, debug_dir=Path(args.save_path) if args.rcm_debug_save else None,
        debug_name=Path(job.control_paths[0]).stem,
    )
    return ReferenceBlend(arch, encoded.first_tokens, noise, job.geometry, timesteps, sigmas, rcm=rcm)


def decode_latent_files(arch: Architecture, args: argparse.Namespace, device: torch.device) -> list[Path]:
    """``--latent_path``: decode latent files written by ``--output_type latent`` (ours or Musubi's)."""
    from safetensors import safe_open

    vae = arch.load_vae(args.vae, device="cpu" if args.vae_cpu else device)
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
