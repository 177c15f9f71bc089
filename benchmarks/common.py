"""Shared pieces of the benchmark scripts: model sizes, device description, result tables."""

from __future__ import annotations

import math
import platform
import resource
import zlib
from pathlib import Path
from typing import Any

import torch

from tsumugi.models.components import instantiate
from tsumugi.models.configs import config_to_metadata, released_config
from tsumugi.models.converters import converter
from tsumugi.models.safetensors_write import LazyTensor, save_file_streamed
from tsumugi.testing.tiny_models import tiny_config

# "small" keeps the released structure with a few blocks of moderate width, to time on a CPU.
SMALL_DIT = {
    "qwen_image_dit": {"num_layers": 4, "attention_head_dim": 64, "num_attention_heads": 4,
                       "joint_attention_dim": 64, "axes_dims_rope": (16, 24, 24)},
    "zimage_dit": {"dim": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "cap_feat_dim": 64,
                   "axes_dims": [16, 24, 24]},
}


def dit_config(component: str, size: str) -> dict[str, Any]:
    if size == "tiny":
        return tiny_config(component)
    if size == "small":
        return {**tiny_config(component), **SMALL_DIT[component]}
    if size == "release":
        return released_config(component)
    raise SystemExit(f"--size must be tiny, small or release, not {size!r}")


def text_width(component: str, config: dict[str, Any]) -> int:
    return config["joint_attention_dim"] if component == "qwen_image_dit" else config["cap_feat_dim"]


def describe_device(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads, torch {torch.__version__}"


def peak_host_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_device_gib(device: str) -> float | None:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return None


def markdown_table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


@torch.no_grad()
def random_dit_inplace(component: str, config: dict[str, Any], dtype: torch.dtype, device: torch.device,
                       draw_device: torch.device) -> torch.nn.Module:
    """The DiT with random weights in ``dtype`` on ``device``, drawn tensor by tensor on ``draw_device`` (the
    GPU where there is one, also when block swap keeps the model in host memory): no fp32 copy of the model.

    Same scales as ``tsumugi.testing.tiny_models`` (weights N(0, 1/fan_in), norms 1 + N(0, 0.02), the rest
    N(0, 0.02)) so activations keep their scale through the blocks.
    """
    model = instantiate(component, config, empty=True)
    generator = torch.Generator(draw_device).manual_seed(0)
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, param in list(module.named_parameters(recurse=False)):
            value = torch.randn(param.shape, generator=generator, device=draw_device, dtype=torch.float32)
            if is_norm and name in ("weight", "gamma"):
                value = value.mul_(0.02).add_(1.0)
            elif param.ndim >= 2 and name == "weight":
                value = value.div_(math.sqrt(max(math.prod(param.shape[1:]), 1)))
            else:
                value = value.mul_(0.02)
            module._parameters[name] = torch.nn.Parameter(value.to(device, dtype), requires_grad=False)
    return model.to(device).eval()  # the real buffers built on CPU (RoPE tables)


def _draw_rule(module: torch.nn.Module, name: str, shape: tuple[int, ...]) -> str:
    """How :func:`random_dit_inplace` draws a parameter: ``norm``, ``weight`` (1/fan_in) or ``other``."""
    if "norm" in type(module).__name__.lower() and name in ("weight", "gamma"):
        return "norm"
    return "weight" if len(shape) >= 2 and name == "weight" else "other"


def _draw(rule: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    value = torch.randn(shape, generator=generator, dtype=torch.float32)
    if rule == "norm":
        value = value.mul_(0.02).add_(1.0)
    elif rule == "weight":
        value = value.div_(math.sqrt(max(math.prod(shape[1:]), 1)))
    else:
        value = value.mul_(0.02)
    return value.to(dtype)


def random_dit_lazy_tensors(component: str, config: dict[str, Any],
                            dtype: torch.dtype = torch.bfloat16) -> dict[str, LazyTensor]:
    """A random DiT in the ComfyUI single-file layout as :class:`LazyTensor` entries: each tensor is drawn
    (seeded by its key, same scales as :func:`random_dit_inplace`) only when the writer asks for it, so
    writing holds one tensor at a time, never the model.

    The layout comes from the real converter run on meta tensors; tensors it computes from several
    library tensors (Z-Image's fused ``attention.qkv``) are drawn directly at their fused shape.
    """
    model = instantiate(component, config, empty=True)  # meta device: no weights allocated
    rules = {}
    for prefix, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            rules[f"{prefix}.{name}" if prefix else name] = _draw_rule(module, name, tuple(param.shape))
    meta = {k: torch.empty(v.shape, dtype=dtype, device="meta") for k, v in model.state_dict().items()}
    source_of = {id(t): k for k, t in meta.items()}
    out = {}
    for key, value in converter(component).from_diffusers(meta, config).items():
        shape = tuple(value.shape)
        source = source_of.get(id(value))
        rule = rules[source] if source else ("weight" if len(shape) >= 2 and key.endswith("weight") else "other")
        seed = zlib.crc32(key.encode())
        out[key] = LazyTensor(dtype, shape, lambda r=rule, s=shape, n=seed: _draw(r, s, n, dtype))
    return out


def write_random_dit_file(component: str, config: dict[str, Any], path: Path) -> Path:
    """A random bf16 DiT as a ComfyUI single file (with its config in the metadata), streamed to disk one
    tensor at a time: the writer's memory is one tensor (in fp32 while drawn), not the model, so the
    41 GB Qwen-Image file can be written on a machine with far less memory."""
    return save_file_streamed(random_dit_lazy_tensors(component, config), path,
                              config_to_metadata(config, component))


def written_dit_file(component: str, config: dict[str, Any], path: Path) -> Path:
    """``path``, written by :func:`write_random_dit_file` unless it already exists (reused across runs)."""
    if not path.exists():
        write_random_dit_file(component, config, path)
    return path
