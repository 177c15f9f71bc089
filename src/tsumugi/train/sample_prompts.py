"""Sampling during training: the generate scripts' jobs and rendering, plus what training needs besides.

The prompt file is read by the generate scripts' reader (:func:`tsumugi.sample.prompt_lines.read_prompt_file`),
each prompt becomes a :class:`~tsumugi.sample.jobs.GenerationJob` with the generate scripts' defaults
(edit controls sized by the official-size rule), and each image is made by
:func:`tsumugi.sample.generate.render_job` and :func:`~tsumugi.sample.generate.save_job_png`: a sample equals
what ``*_generate_image`` makes from the same prompt line with the weights of that step. What is training's
own: the prompt embeddings are computed once before the DiT loads and kept in ``output_dir/sample/``, the
VAE waits on the CPU between samples, and a prompt without ``--d`` gets a new random seed at every sample.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from tsumugi.arch.base import Architecture, PromptEmbeds
from tsumugi.caching.fingerprint import text_fingerprint
from tsumugi.errors import UserError
from tsumugi.sample.generate import (
    encode_job_controls,
    encode_job_prompts,
    non_finite_latents,
    prompt_keys,
    render_job,
    save_job_png,
)
from tsumugi.sample.jobs import GenerationJob, JobDefaults, build_jobs, job_parameters, random_seed
from tsumugi.sample.prompt_lines import PromptLine, read_prompt_file
from tsumugi.train.config import TrainConfig

logger = logging.getLogger(__name__)


def sample_jobs(arch: Architecture, lines: list[PromptLine], version: str = "original") -> list[GenerationJob]:
    """The jobs of training samples: the generate defaults, controls sized by the official-size rule."""
    return build_jobs(arch, lines, JobDefaults(resize_mode="official"), version)


class TrainingSampler:
    """Sample prompts encoded once and rendered on demand; build it before the DiT is loaded.

    On the main process the text encoder is loaded, used and freed here, and the VAE is loaded onto the
    CPU (a bad ``--vae`` fails now, not at the first sample); the VAE moves to the device only while it
    encodes controls or decodes, so training never holds it there. Other processes never sample and
    load nothing. ``text_encoder_dtype`` defaults to bfloat16 on CUDA and float32 elsewhere (as caching).
    """

    def __init__(self, arch: Architecture, args: TrainConfig, device: torch.device, text_encoder_dtype: torch.dtype | None = None,
                 is_main: bool = True) -> None:
        self.arch, self.args, self.device, self._is_main = arch, args, device, is_main
        self.lines = read_prompt_file(args.sample_prompts, "--sample_prompts")
        self.model_version = self.check_controls(arch, args, self.lines)
        self.jobs = sample_jobs(arch, self.lines, self.model_version)
        if not args.vae:
            raise UserError("--sample_prompts needs --vae to decode the samples")
        self.directory = Path(args.output_dir) / "sample"
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        """The generate scripts' default DiT dtype on this device: the noise is drawn in it (Qwen-Image)."""
        self.embeds: dict[tuple, PromptEmbeds] = {}
        self.vae = None
        if not is_main:
            return
        keys = prompt_keys(arch, self.jobs)
        embeds = self._cached_embeddings(keys)
        if embeds is None:
            embeds = self._encode(keys, text_encoder_dtype or self.dtype)
        self.embeds = embeds
        self.vae = self.arch.load_vae(self.args.vae, device="cpu")

    @staticmethod
    def check_controls(arch: Architecture, args: TrainConfig, lines: list[PromptLine]) -> str:
        """Model version for lines with controls (``--ci``): edit versions only; Layered is not supported yet."""
        with_controls = [line.source for line in lines if line.control_images]
        if not with_controls:
            return "original"
        from tsumugi.model_versions import resolve_model_version
        from tsumugi.sample.edit import EDIT_VERSIONS

        version = resolve_model_version(args) if getattr(arch, "name", None) == "qwen_image" else "original"
        if version not in EDIT_VERSIONS:
            raise UserError(
                f"{with_controls[0]}: control images (--ci / control_image_path) in sample prompts need a Qwen-Image "
                f"edit model (--model_version edit, edit-2509 or edit-2511); this run trains {version!r}"
            )
        return version

    def _cache_name(self, key: tuple) -> str:
        """Name of an embedding in the cache file: the text, plus the control files it is encoded with."""
        text, control_key = key
        if control_key is None:
            return text_fingerprint(text)
        from tsumugi.caching.fingerprint import file_fingerprint

        job = next(j for j in self.jobs if j.control_key == control_key)
        identity = "|".join(file_fingerprint(p) for p in job.control_paths)
        return text_fingerprint(f"{text}\x00controls:{self.model_version}:{identity}")

    def _cache_file(self) -> Path:
        return self.directory / f".{self.arch.name}_prompt_embeds.safetensors"

    def _cached_embeddings(self, keys: list[tuple]) -> dict[tuple, PromptEmbeds] | None:
        """Embeddings saved by an earlier run of the same prompts with the same encoder, if any."""
        from tsumugi.caching.cache_files import read_cache_metadata

        meta = read_cache_metadata(self._cache_file())
        names = {key: self._cache_name(key) for key in keys}
        if meta is None or not set(names.values()) <= set(meta):
            return None
        if self.args.text_encoder and meta.get("text_encoder") != self._encoder_identity():
            return None
        tensors = load_file(str(self._cache_file()))
        logger.info("sample prompts: embeddings read from %s (no text encoder needed)", self._cache_file())
        return {key: PromptEmbeds(tensors[name]) for key, name in names.items()}

    def _encoder_identity(self) -> str:
        from tsumugi.caching.fingerprint import model_identity

        fp8 = self.args.fp8_vl or self.args.fp8_llm
        return model_identity(self.args.text_encoder) + (":fp8" if fp8 else "")

    def _encode(self, keys: list[tuple], dtype: torch.dtype) -> dict[tuple, PromptEmbeds]:
        from tsumugi.caching.cache_files import write_cache_file

        args, arch, device = self.args, self.arch, self.device
        if not args.text_encoder:
            raise UserError("--sample_prompts needs --text_encoder to encode the sample prompts (they are not cached yet)")
        encoder = arch.load_text_encoder(args.text_encoder, dtype=dtype, device=device,
                                         fp8=args.fp8_vl or args.fp8_llm)
        tokenizer = arch.load_tokenizer(args.tokenizer)
        embeds = encode_job_prompts(arch, encoder, tokenizer, self.jobs, device, self.model_version, keys)
        del encoder
        _release(device)
        embeds = {k: PromptEmbeds(e.embeds.detach().cpu()) for k, e in embeds.items()}  # moved per sample
        tensors = {self._cache_name(k): e.embeds.contiguous() for k, e in embeds.items()}
        meta = {k: "1" for k in tensors} | {"text_encoder": self._encoder_identity()}
        write_cache_file(self._cache_file(), tensors, meta)
        return embeds

    def render(self, dit: torch.nn.Module, label: str) -> list[Path]:
        """Sample every prompt with the network applied; ``label`` is ``e000003`` or ``000120``."""
        self.vae.to(self.device)
        try:
            return self._render(dit, label)
        finally:
            self.vae.to("cpu")
            _release(self.device)

    def _render(self, dit: torch.nn.Module, label: str) -> list[Path]:
        written = []
        arch = self.arch
        for index, (line, job) in enumerate(zip(self.lines, self.jobs)):
            if line.seed is None:
                job = replace(job, seed=random_seed())
            encoded = encode_job_controls(arch, self.vae, job)
            positive = self.embeds[(job.prompt, job.control_key)]
            negative = self.embeds[(job.negative_prompt, job.control_key)] if arch.uses_guidance(job.guidance_scale) else None
            latents = render_job(arch, dit, job, positive, negative, encoded, self.device, self.dtype, progress=False)
            problem = non_finite_latents(latents, dit, f"sample {label} {line.source}")
            if problem:  # training goes on; the loss check stops it if the weights themselves went bad
                logger.warning("%s; no sample image written", problem)
                continue
            stem = f"{self.args.output_name}_{label}_{index:02d}_{time.strftime('%Y%m%d%H%M%S')}_{job.seed}"
            params = job_parameters(arch, job) | {"training_point": label, **self._model_names()}
            written.append(save_job_png(arch, self.vae, job, latents, self.directory, stem, params))
        logger.info("saved %d sample(s) to %s", len(written), self.directory)
        return written

    def _model_names(self) -> dict[str, object]:
        args = self.args
        return {"dit": Path(args.dit).name if getattr(args, "dit", None) else None, "vae": Path(args.vae).name,
                "text_encoder": Path(args.text_encoder).name if getattr(args, "text_encoder", None) else None}


def _release(device: torch.device) -> None:
    """Give freed device memory back (a text encoder or VAE just left the GPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
