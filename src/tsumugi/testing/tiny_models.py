"""Tiny random models with the real classes, and files of them in every layout we load.

``build_tiny(component, seed)`` builds the diffusers/transformers module of a component from
:mod:`tsumugi.testing.tiny_configs` with deterministic random weights:

* transformers models (text encoders): every weight ``N(0, 0.02)`` like their own initialiser, but with
  biases random too and norm weights ``1 + N(0, 0.02)``, so every tensor is distinct and outputs are
  not trivial;
* diffusers models (DiTs, VAEs): weights ``N(0, 1/fan_in)`` so activations keep unit scale through
  the stacks (the VAEs give latents of order 1, not ~0), biases ``N(0, 0.02)``, norms ``1 + N(0, 0.02)``.

``save_component`` writes one in a file format (:data:`FORMATS`):

* ``comfy``: one safetensors file in the ComfyUI/original layout;
* ``comfy_prefixed``: the same with the all-in-one prefix (``model.diffusion_model.``, ``vae.``,
  ``text_encoders.<name>.transformer.``);
* ``sharded``: the comfy layout split into ``name-0000N-of-0000M.safetensors`` (2 or 3 shards);
* ``diffusers``: a component folder written by the library's ``save_pretrained`` (``config.json`` +
  ``diffusion_pytorch_model.safetensors`` or ``model.safetensors``).

The single-file formats carry the model config in the ``tsumugi.config`` metadata key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tsumugi.models.components import KINDS, instantiate, kind_for
from tsumugi.models.configs import clean_config, config_to_metadata
from tsumugi.models.converters import converter
from tsumugi.models.safetensors_write import save_file_atomic, write_text_atomic
from tsumugi.testing import tiny_configs

COMPONENTS: tuple[str, ...] = tuple(KINDS)
FORMATS: tuple[str, ...] = ("comfy", "comfy_prefixed", "sharded", "diffusers")

_TINY_CONFIGS: dict[str, Callable[[], dict[str, Any]]] = {
    "qwen_image_dit": tiny_configs.tiny_qwen_image_dit_config,
    "qwen_image_vae": tiny_configs.tiny_qwen_image_vae_config,
    "qwen2_5_vl": tiny_configs.tiny_qwen2_5_vl_config,
    "zimage_dit": tiny_configs.tiny_zimage_dit_config,
    "flux_vae": tiny_configs.tiny_flux_vae_config,
    "qwen3": tiny_configs.tiny_qwen3_config,
}

_PIPELINES = {"qwen_image": "QwenImagePipeline", "zimage": "ZImagePipeline",
              "qwen_image_layered": "QwenImageLayeredPipeline"}

VARIANTS: dict[str, str] = {"qwen_image_layered": "qwen_image"}
"""Tiny sets that are a variant of an architecture (same component kinds, other configs)."""

_VARIANT_CONFIGS: dict[tuple[str, str], Callable[[], dict[str, Any]]] = {
    ("qwen_image_layered", "qwen_image_dit"): lambda: tiny_configs.tiny_qwen_image_dit_config(layered=True),
    ("qwen_image_layered", "qwen_image_vae"): lambda: tiny_configs.tiny_qwen_image_vae_config(layered=True),
}


def tiny_config(component: str) -> dict[str, Any]:
    """Constructor kwargs of the tiny ``component``."""
    try:
        return _TINY_CONFIGS[component]()
    except KeyError:
        raise ValueError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}") from None


def _tiny_component(arch: str, component: str, seed: int) -> torch.nn.Module:
    """The tiny ``component`` of ``arch`` or of a variant such as ``qwen_image_layered``."""
    variant = _VARIANT_CONFIGS.get((arch, component))
    return build_random(component, variant(), seed) if variant else build_tiny(component, seed)


def _is_norm(module: torch.nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int, fan_in_scaled: bool) -> None:
    """Give every parameter (typically still on the meta device) its deterministic random value."""
    generator = torch.Generator().manual_seed(seed)
    done: dict[int, torch.nn.Parameter] = {}  # shared (tied) parameters stay shared
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in done:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                if _is_norm(module) and name in ("weight", "gamma"):
                    value = 1.0 + 0.02 * noise
                elif param.ndim >= 2 and name == "weight" and fan_in_scaled:
                    value = noise / math.sqrt(max(math.prod(param.shape[1:]), 1))
                else:
                    value = 0.02 * noise
                done[id(param)] = torch.nn.Parameter(value, requires_grad=param.requires_grad)
            module._parameters[name] = done[id(param)]


def build_tiny(component: str, seed: int = 0) -> torch.nn.Module:
    """The tiny ``component`` (a key of :data:`COMPONENTS`) with deterministic random weights, in eval mode."""
    return build_random(component, tiny_config(component), seed)


def build_random(component: str, config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """``component`` of any size (e.g. the released config) with deterministic random weights."""
    # Parameters start on the meta device (no library init cost); buffers are built for real.
    model = instantiate(component, config, empty=True)
    _randomize(model, seed, fan_in_scaled=KINDS[component].library == "diffusers")
    return model.eval()


def model_config(model: torch.nn.Module) -> dict[str, Any]:
    """Constructor config of a diffusers or transformers module, without bookkeeping keys."""
    config = model.config
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return clean_config({k: v for k, v in as_dict.items() if not k.startswith("_")})


def comfy_state_dict(model: torch.nn.Module, component: str) -> dict[str, torch.Tensor]:
    """``model``'s weights in the ComfyUI/original layout of ``component``."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return converter(component).from_diffusers(sd, model_config(model))


def _split(keys: list[str], parts: int) -> list[list[str]]:
    size = math.ceil(len(keys) / parts)
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def save_component(model: torch.nn.Module, component: str, fmt: str, path: str | Path) -> Path:
    """Write ``model`` (a ``component``) in format ``fmt`` and return the path to give the loader.

    ``path`` is the file to write for single-file formats, the first shard's name is derived from it for
    ``sharded`` (``x.safetensors`` -> ``x-00001-of-0000M.safetensors``), and it is the folder for
    ``diffusers``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    path = Path(path)
    if fmt == "diffusers":
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(path), safe_serialization=True)
        return path

    sd = comfy_state_dict(model, component)
    metadata = config_to_metadata(model_config(model), component)
    if fmt == "comfy_prefixed":
        prefix = KINDS[component].prefixes[0]
        sd = {prefix + k: v for k, v in sd.items()}
    if fmt != "sharded":
        return save_file_atomic(sd, path, metadata)

    keys = list(sd)
    shards = _split(keys, 3 if len(keys) >= 30 else 2)
    stem = path.name.removesuffix(".safetensors")
    files = []
    for i, shard_keys in enumerate(shards, start=1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        files.append(save_file_atomic({k: sd[k] for k in shard_keys}, path.with_name(name), metadata))
    return files[0]


def write_tiny_model_root(root: str | Path, arch: str, seed: int = 0) -> Path:
    """A diffusers model root for ``arch`` (or a variant): ``model_index.json`` + ``transformer/``, ``vae/``,
    ``text_encoder/`` (no tokenizer or scheduler)."""
    import diffusers

    root = Path(root)
    index: dict[str, Any] = {"_class_name": _PIPELINES[arch], "_diffusers_version": diffusers.__version__}
    for role in ("dit", "vae", "text_encoder"):
        spec = kind_for(role, VARIANTS.get(arch, arch))
        save_component(_tiny_component(arch, spec.name, seed), spec.name, "diffusers", root / spec.subfolder)
        index[spec.subfolder] = [spec.library, spec.class_name]
    write_text_atomic(root / "model_index.json", json.dumps(index, indent=2))
    return root


def write_tiny_set(directory: str | Path, arch: str, fmt: str = "comfy", seed: int = 0) -> dict[str, Path]:
    """Tiny DiT, VAE and text encoder of ``arch`` in format ``fmt``: ``{"dit": p, "vae": p, "text_encoder": p}``.

    ``arch`` may also be a variant of :data:`VARIANTS` (``qwen_image_layered``: the Layered DiT and RGBA VAE
    with the Qwen-Image text encoder)."""
    directory = Path(directory)
    out = {}
    for role in ("dit", "vae", "text_encoder"):
        name = kind_for(role, VARIANTS.get(arch, arch)).name
        target = directory / name if fmt == "diffusers" else directory / f"{name}.safetensors"
        out[role] = save_component(_tiny_component(arch, name, seed), name, fmt, target)
    return out
