"""Shared pieces of the benchmark scripts: model sizes, device description, result tables."""

from __future__ import annotations

import math
import platform
import resource
from pathlib import Path
from typing import Any

import torch

from tsumugi.models.components import instantiate
from tsumugi.models.configs import released_config
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


def write_random_dit_file(component: str, config: dict[str, Any], path: Path) -> Path:
    """A random bf16 DiT as a ComfyUI single file, built tensor by tensor and streamed to disk.

    For the released sizes: never an fp32 copy (Qwen-Image would be 82 GB), at most the bf16 model in host
    memory while it is written (41 GB), and a 41 GB file.
    """
    from tsumugi.models.dit_checkpoint import save_dit_checkpoint

    draw = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = random_dit_inplace(component, config, torch.bfloat16, torch.device("cpu"), draw)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_dit_checkpoint(model, path, dtype=torch.bfloat16)
