"""Shared pieces of the benchmark scripts: model sizes, device description, result tables."""

from __future__ import annotations

import platform
import resource
from typing import Any

import torch

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
