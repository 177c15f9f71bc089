"""Sampling during training: the prompt file (.txt lines, .toml, .json), encoded once, and the images.

Settings per prompt follow the family's real inference defaults (Qwen-Image: resolution-dependent
shift and guidance 4.0; Z-Image: shift 3.0 and guidance 0.0) unless the prompt sets them; Musubi uses
a fixed shift of 14.5 for Qwen-Image samples. Sizes must be multiples of 16 (an error names the
prompt); Musubi rounds to 8, which the packed latents cannot use.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from tsumugi.arch.base import Architecture, ImageGeometry, PromptEmbeds
from tsumugi.caching.fingerprint import text_fingerprint
from tsumugi.errors import UserError
from tsumugi.preflight.text_files import numbered_lines, read_text
from tsumugi.sample.png_output import save_png, to_pil
from tsumugi.sample.prompt_lines import PromptLine, check_values, parse_prompt_line, require_text
from tsumugi.sample.sampler import SamplingSettings, denoise
from tsumugi.train.config import TrainConfig

logger = logging.getLogger(__name__)

_TOML_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
              "seed": "seed", "sample_steps": "steps", "cfg_scale": "guidance_scale",
              "discrete_flow_shift": "flow_shift", "frame_count": "frame_count", "guidance_scale": None,
              "control_image_path": "control_images", "image_path": None}


def _from_dict(entry: dict, source: str) -> PromptLine:
    if not isinstance(entry, dict):
        raise UserError(f"{source}: expected a prompt string or a table of settings, found {entry!r}")
    line = PromptLine(prompt="", source=source)
    for key, value in entry.items():
        if key not in _TOML_KEYS:
            raise UserError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(_TOML_KEYS))})")
        if _TOML_KEYS[key]:
            setattr(line, _TOML_KEYS[key], list(value) if key == "control_image_path" else value)
    if not isinstance(line.prompt, str):
        raise UserError(f"{source}: prompt must be a string, found {line.prompt!r}")
    return require_text(check_values(line))


def read_sample_prompts(path: str) -> list[PromptLine]:
    """Prompts of a ``.txt`` (one prompt line each), ``.toml`` ([prompt] + [[prompt.subset]]) or ``.json`` file."""
    file = Path(path)
    text = read_text(file, "--sample_prompts", "prompt file (.txt, .toml or .json)")
    if file.suffix == ".toml":
        import toml

        try:
            data = toml.loads(text).get("prompt", {})
        except toml.TomlDecodeError as exc:
            raise UserError(f"--sample_prompts: {path} is not valid TOML ({exc})") from None
        shared = {k: v for k, v in data.items() if k != "subset"}
        return [_from_dict({**shared, **sub}, f"{path}:subset {i}") for i, sub in enumerate(data.get("subset", []))]
    if file.suffix == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"--sample_prompts: {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(entries, list):
            raise UserError(f"--sample_prompts: {path}: expected a JSON list of prompts")
        return [require_text(parse_prompt_line(e, f"{path}[{i}]", g_is_cfg=False)) if isinstance(e, str)
                else _from_dict(e, f"{path}[{i}]") for i, e in enumerate(entries)]
    lines = [(n, raw.strip()) for n, raw in numbered_lines(text)]
    return [require_text(parse_prompt_line(t, f"{path}:{n}", g_is_cfg=False))
            for n, t in lines if t and not t.startswith("#")]


@dataclass
class SamplePlan:
    line: PromptLine
    index: int
    width: int
    height: int
    steps: int
    guidance: float
    negative: str


def plan_samples(arch: Architecture, lines: list[PromptLine]) -> list[SamplePlan]:
    plans = []
    for index, line in enumerate(lines):
        width, height = line.width or 256, line.height or 256
        if width % 16 or height % 16:
            raise UserError(f"{line.source}: sample size {width}x{height} must be multiples of 16")
        guidance = arch.default_guidance_scale if line.guidance_scale is None else line.guidance_scale
        negative = arch.default_negative_prompt if line.negative_prompt is None else line.negative_prompt
        steps = min(max(line.steps or 20, 1), 1000)
        plans.append(SamplePlan(line, index, width, height, steps, guidance, negative))
    return plans


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
        lines = read_sample_prompts(args.sample_prompts)
        self.model_version = self.check_controls(arch, args, lines)
        self.plans = plan_samples(arch, lines)
        if not args.vae:
            raise UserError("--sample_prompts needs --vae to decode the samples")
        self.directory = Path(args.output_dir) / "sample"
        self.controls = {p.index: self._load_controls(p.line) for p in self.plans if p.line.control_images}
        self.embeds: dict[str, PromptEmbeds] = {}
        self.vae = None
        if not is_main:
            return
        texts = list(dict.fromkeys(self._key(p, t) for p in self.plans for t in (p.line.prompt, p.negative)))
        embeds = self._cached_embeddings(texts)
        if embeds is None:
            dtype = text_encoder_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
            embeds = self._encode(texts, dtype)
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

    def _load_controls(self, line: PromptLine) -> tuple[list, list, str]:
        """(VAE inputs, VL inputs, identity) of a line's controls, sized by the official-size rule caching uses."""
        from tsumugi.caching.fingerprint import file_fingerprint
        from tsumugi.sample.edit import load_control_image, log_version_limits, official_control_images

        log_version_limits(self.model_version, len(line.control_images), line.source)
        pairs = [official_control_images(load_control_image(p, line.source)) for p in line.control_images]
        vl = [pair[1] for pair in pairs]
        if self.model_version == "edit":
            vl = vl[:1]
        identity = "|".join(file_fingerprint(p) for p in line.control_images)
        return [pair[0] for pair in pairs], vl, f"{self.model_version}:{identity}"

    def _key(self, plan: SamplePlan, text: str) -> str:
        """Embedding key: the text, plus the control images it is encoded with (edit samples)."""
        if plan.index not in self.controls:
            return text
        return f"{text}\x00controls:{self.controls[plan.index][2]}"

    def _cache_file(self) -> Path:
        return self.directory / f".{self.arch.name}_prompt_embeds.safetensors"

    def _cached_embeddings(self, texts: list[str]) -> dict[str, PromptEmbeds] | None:
        """Embeddings saved by an earlier run of the same prompts with the same encoder, if any."""
        from tsumugi.caching.cache_files import read_cache_metadata

        meta = read_cache_metadata(self._cache_file())
        keys = {text_fingerprint(t) for t in texts}
        if meta is None or not keys <= set(meta):
            return None
        if self.args.text_encoder and meta.get("text_encoder") != self._encoder_identity():
            return None
        tensors = load_file(str(self._cache_file()))
        logger.info("sample prompts: embeddings read from %s (no text encoder needed)", self._cache_file())
        return {t: PromptEmbeds(tensors[text_fingerprint(t)]) for t in texts}

    def _encoder_identity(self) -> str:
        from tsumugi.caching.fingerprint import model_identity

        fp8 = self.args.fp8_vl or self.args.fp8_llm
        return model_identity(self.args.text_encoder) + (":fp8" if fp8 else "")

    def _encode(self, texts: list[str], dtype: torch.dtype) -> dict[str, PromptEmbeds]:
        from tsumugi.caching.cache_files import write_cache_file

        args, arch, device = self.args, self.arch, self.device
        if not args.text_encoder:
            raise UserError("--sample_prompts needs --text_encoder to encode the sample prompts (they are not cached yet)")
        encoder = arch.load_text_encoder(args.text_encoder, dtype=dtype, device=device,
                                         fp8=args.fp8_vl or args.fp8_llm)
        tokenizer = arch.load_tokenizer(args.tokenizer)
        images = {self._key(p, t): self.controls[p.index][1] for p in self.plans if p.index in self.controls
                  for t in (p.line.prompt, p.negative)}
        embeds = {}
        with torch.no_grad():
            for key in texts:
                if key in images:
                    text = key.split("\x00controls:")[0]
                    (tensor,) = arch.encode_prompts_with_images(
                        encoder, tokenizer, [text], [images[key]], self.model_version, device
                    )
                    embeds[key] = PromptEmbeds(tensor)
                else:
                    embeds[key] = arch.encode_prompts(encoder, tokenizer, [key], device)[0]
        del encoder
        _release(device)
        embeds = {t: PromptEmbeds(e.embeds.detach().cpu()) for t, e in embeds.items()}  # moved per sample
        tensors = {text_fingerprint(t): e.embeds.contiguous() for t, e in embeds.items()}
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
        for plan in self.plans:
            seed = plan.line.seed if plan.line.seed is not None else random.SystemRandom().randint(0, 2**32 - 1)
            conditions, sizes = None, ()
            if plan.index in self.controls:
                from tsumugi.sample.edit import encode_controls

                encoded = encode_controls(self.arch, self.vae, self.controls[plan.index][0])
                conditions, sizes = encoded.tokens, encoded.latent_sizes
            geometry = ImageGeometry(height=plan.height, width=plan.width, control_latent_sizes=sizes)
            generator = torch.Generator("cpu").manual_seed(seed)
            noise = self.arch.initial_noise(geometry, generator, torch.float32)
            use_negative = self.arch.uses_guidance(plan.guidance)
            settings = SamplingSettings(plan.steps, plan.guidance, plan.line.flow_shift)
            with torch.no_grad():
                latents = denoise(
                    self.arch, dit, noise, self.embeds[self._key(plan, plan.line.prompt)],
                    self.embeds[self._key(plan, plan.negative)] if use_negative else None, geometry, settings,
                    progress=False, device=self.device, conditions=conditions,
                )
                image = self.arch.decode(self.vae, latents, geometry)[0]
            stem = f"{self.args.output_name}_{label}_{plan.index:02d}_{time.strftime('%Y%m%d%H%M%S')}_{seed}"
            params = {"prompt": plan.line.prompt, "negative_prompt": plan.negative, "seed": seed, "steps": plan.steps,
                      "guidance_scale": plan.guidance, "flow_shift": plan.line.flow_shift or "default",
                      "width": plan.width, "height": plan.height, "training_point": label,
                      "model": self.arch.display_name}
            if plan.line.control_images:
                params["control_images"] = [Path(c).name for c in plan.line.control_images]
            written.append(save_png(to_pil(image), self.directory, stem, params))
        logger.info("saved %d sample(s) to %s", len(written), self.directory)
        return written


def _release(device: torch.device) -> None:
    """Give freed device memory back (a text encoder or VAE just left the GPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
