"""What to generate: prompt lines plus defaults -> resolved, checked :class:`GenerationJob` s.

The generate scripts and sampling during training both build their jobs here, so a prompt line means
the same image in both places. Defaults are those of the generate scripts (Musubi's): 25 steps, 256x256
(edit: the first control's size), the family's guidance scale, flow shift and negative prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from pathlib import Path

import tsumugi
from tsumugi.arch.base import Architecture, ImageGeometry
from tsumugi.errors import UserError
from tsumugi.sample.edit import (
    EDIT_VERSIONS,
    check_same_grid,
    control_images,
    load_control_image,
    log_version_limits,
    native_output_size,
)
from tsumugi.sample.prompt_lines import PromptLine
from tsumugi.sample.sampler import SamplingSettings

DEFAULT_STEPS = 25
"""Denoising steps when neither ``--infer_steps`` nor a line's ``--s`` is given (Musubi's generate scripts)."""
DEFAULT_IMAGE_SIZE = (256, 256)
"""(height, width) when neither ``--image_size`` nor ``--w``/``--h`` is given, without control images."""


@dataclass(frozen=True)
class JobDefaults:
    """The values a prompt line falls back to (the generate flags; training samples use the defaults).

    ``None`` means the family's default (guidance scale, negative prompt), a random seed, or the size of
    the first control image (else :data:`DEFAULT_IMAGE_SIZE`).
    """

    prompt: str = ""
    negative_prompt: str | None = None
    image_size: tuple[int, int] | None = None
    seed: int | None = None
    steps: int = DEFAULT_STEPS
    guidance_scale: float | None = None
    flow_shift: float | None = None
    control_paths: tuple[str, ...] = ()
    resize_mode: str = "native"
    """Control sizing: ``native``, ``official`` (training samples) or ``image_size``."""
    mask_path: str | None = None
    rcm_threshold: float | None = None
    rcm_relative: bool = False
    rcm_kernel_size: int = 3
    rcm_dilate_size: int = 0


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


def random_seed() -> int:
    return random.SystemRandom().randint(0, 2**32 - 1)


def check_job(job: GenerationJob) -> None:
    """The checks every job passes, wherever it comes from: size and steps."""
    for name, value in (("height", job.height), ("width", job.width)):
        if value <= 0 or value % 16:
            raise UserError(f"{job.source}: image {name} {value} must be a positive multiple of 16")
    if job.steps < 1:
        raise UserError(f"{job.source}: infer steps must be at least 1, found {job.steps}")


def build_jobs(arch: Architecture, lines: list[PromptLine], defaults: JobDefaults,
               version: str = "original") -> list[GenerationJob]:
    """One checked job per prompt line, the line's options winning over ``defaults``.

    Edit versions: each job's controls (``--ci`` of its line, else ``defaults.control_paths``) are loaded
    and sized here; without a size the output takes the first control's VAE size.
    """
    edit = version in EDIT_VERSIONS
    mode = defaults.resize_mode if edit else "native"
    jobs = []
    for line in lines:
        paths = list(line.control_images) or list(defaults.control_paths)
        if paths and not edit:
            raise UserError(
                f"{line.source}: control images need an edit model: give --model_version edit, edit-2509 or "
                "edit-2511 (or --edit / --edit_plus)"
            )
        if edit and not paths:
            raise UserError(f"{line.source}: --model_version {version} needs a control image "
                            "(--control_image_path or --ci in the prompt line)")
        originals = [load_control_image(p, line.source) for p in paths]
        size = defaults.image_size
        if size is None:
            size = DEFAULT_IMAGE_SIZE
            if originals:
                w, h = native_output_size(originals[0], mode)
                size = (h, w)
        job = GenerationJob(
            prompt=line.prompt or defaults.prompt,
            negative_prompt=_first(line.negative_prompt, defaults.negative_prompt, arch.default_negative_prompt),
            width=line.width or size[1],
            height=line.height or size[0],
            seed=_first(line.seed, defaults.seed, random_seed()),
            steps=line.steps or defaults.steps,
            guidance_scale=_first(line.guidance_scale, defaults.guidance_scale, arch.default_guidance_scale),
            flow_shift=_first(line.flow_shift, defaults.flow_shift),
            source=line.source,
            control_paths=paths,
        )
        _resolve_mask_rcm(job, line, defaults, arch, edit)
        check_job(job)
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
    return jobs


def _first(*values):
    return next((v for v in values if v is not None), None)


def _resolve_mask_rcm(
    job: GenerationJob, line: PromptLine, defaults: JobDefaults, arch: Architecture, edit: bool
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
    job.mask_path = line.mask_path or defaults.mask_path
    job.mask_flag = "--m" if line.mask_path else "--mask_path"
    job.rcm_threshold = _first(line.rcm_threshold, defaults.rcm_threshold)
    job.rcm_flag = "--rcm_th" if line.rcm_threshold is not None else "--rcm_threshold"
    job.rcm_relative = _first(line.rcm_relative_threshold, defaults.rcm_relative)
    job.rcm_kernel_size = _first(line.rcm_kernel_size, defaults.rcm_kernel_size)
    job.rcm_dilate_size = _first(line.rcm_dilate_size, defaults.rcm_dilate_size)
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


def job_parameters(arch: Architecture, job: GenerationJob) -> dict[str, object]:
    """The settings of ``job`` as stored in its PNG (the caller adds the model files it used)."""
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
    data.update(model=arch.display_name, sampler="flow-match Euler", software=f"tsumugi {tsumugi.__version__}")
    return data
