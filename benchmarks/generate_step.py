"""DiT denoising time per sampling step (s/step) and peak memory of generation, for a configurable DiT size.

    python benchmarks/generate_step.py --arch qwen_image --size small --resolution 256 512 --steps 8
    python benchmarks/generate_step.py --arch qwen_image --size release --resolution 1024 1328 \\
        --device cuda --fp8 --fp8_scaled --blocks_to_swap 16          # on a lent GPU

Only the DiT part of ``*_generate_image`` is timed: the text encoder and the VAE are left out (prompt
embeddings are random, of the encoder's width). The DiT is loaded, fp8-quantized, given its attention
mode, compiled and block-swapped as ``tsumugi.sample.generate`` does, then the real sampler
(``tsumugi.sample.sampler.denoise``: flow-matching Euler, CFG as the family does it) runs once per
resolution and CFG setting. Flags other than this script's own are the generate script's (``--fp8``,
``--fp8_scaled``, ``--blocks_to_swap``, ``--use_pinned_memory_for_block_swap``, ``--attn_mode``,
``--compile`` and its options, ``--device``, ``--dit_dtype``, ``--guidance_scale``, ``--flow_shift``)
with the same defaults: bf16 on CUDA; on the CPU bf16 for a (bf16) file, fp32 for in-place weights.

CPU figures are only meaningful on an otherwise idle machine: with every core in use by torch's threads,
any other busy process stalls each parallel operation and steps can take 10-30x longer.

Weights: ``file`` writes a random bf16 DiT into ``--workdir`` once per size (streamed, one tensor at a
time: the model is never built on the host to write it) and loads it with the real loader onto the load
device; ``inplace`` (the default for ``--size release``) draws random weights directly in the DiT dtype
on the load device, because a 41 GB file costs minutes of disk I/O that the per-step time does not
depend on.

Reports the median time of the steps after the first (warm-up, compilation) per resolution, peak host
memory (process maximum so far, so rows are cumulative) and peak device memory of that run (CUDA).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    describe_device,
    dit_config,
    markdown_table,
    peak_device_gib,
    peak_host_gib,
    random_dit_inplace,
    text_width,
    written_dit_file,
)

from tsumugi.arch import get_architecture  # noqa: E402
from tsumugi.arch.base import Architecture, ImageGeometry, PromptEmbeds  # noqa: E402
from tsumugi.cli.generate_args import build_generate_parser  # noqa: E402
from tsumugi.sample.generate import apply_generation_memory_options, generation_stream_options  # noqa: E402
from tsumugi.sample.sampler import SamplingSettings, denoise  # noqa: E402

COMPONENTS = {"qwen_image": "qwen_image_dit", "zimage": "zimage_dit"}
CFG_SCALE = 4.0
"""Guidance scale of ``--cfg on`` when ``--guidance_scale`` does not already turn CFG on."""


def bench_parser() -> argparse.ArgumentParser:
    """The benchmark's own options (no abbreviations: the rest goes to the generate parser)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--arch", choices=list(COMPONENTS), default="qwen_image")
    parser.add_argument("--size", choices=["tiny", "small", "release"], default="small")
    parser.add_argument("--resolution", type=int, nargs="+", default=[1024, 1328],
                        help="square image sides (px)")
    parser.add_argument("--steps", type=int, default=8, help="sampling steps per run (the first is warm-up)")
    parser.add_argument("--cfg", choices=["on", "off"], nargs="+", default=None,
                        help="CFG settings to time (default: the family's, Qwen-Image on, Z-Image off); "
                             "on runs the DiT twice per step (batch of 2)")
    parser.add_argument("--text_tokens", type=int, default=128,
                        help="length of the random prompt embeddings (negative prompt too)")
    parser.add_argument("--weights", choices=["file", "inplace"], default=None,
                        help="file: write and load a DiT file (default for tiny/small); inplace: random "
                             "weights made on the load device (default for release)")
    parser.add_argument("--workdir", default="/tmp/tsumugi_bench")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """The benchmark's own options, and the generate script's (every flag the benchmark does not know)."""
    bench, rest = bench_parser().parse_known_args(argv)
    if bench.steps < 2:
        raise SystemExit("--steps must be at least 2 (the first step is warm-up)")
    for side in bench.resolution:
        if side <= 0 or side % 16:
            raise SystemExit(f"--resolution {side}: must be a positive multiple of 16")
    gen = build_generate_parser(get_architecture(bench.arch)).parse_args(rest)
    return bench, gen


def load_device(gen: argparse.Namespace, weights: str) -> tuple[torch.device, torch.dtype]:
    """Device and DiT dtype as ``generate`` picks them: CUDA when available, bf16 there; on the CPU the
    dtype of the (bf16) file for ``--weights file``, fp32 for ``inplace`` (no file)."""
    device = torch.device(gen.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if gen.dit_dtype:
        return device, getattr(torch, gen.dit_dtype)
    return device, torch.bfloat16 if device.type == "cuda" or weights == "file" else torch.float32


def dit_file(arch: str, size: str, config: dict[str, Any], workdir: str) -> Path:
    """The random bf16 DiT of ``size`` in the ComfyUI single-file layout, written once into ``workdir``
    (streamed, tensor by tensor: no model on the host while it is written)."""
    return written_dit_file(COMPONENTS[arch], config, Path(workdir) / f"{arch}_{size}" / "dit.safetensors")


def weights_mode(bench: argparse.Namespace) -> str:
    return bench.weights or ("inplace" if bench.size == "release" else "file")


def prepare_dit(
    arch: Architecture, bench: argparse.Namespace, gen: argparse.Namespace, config: dict[str, Any],
    device: torch.device, dtype: torch.dtype,
) -> tuple[torch.nn.Module, int]:
    """Load the DiT and apply fp8, attention mode, compile and block swap in ``generate``'s order;
    returns it and its parameter count (before quantization)."""
    swap = bool(gen.blocks_to_swap)
    where = torch.device("cpu") if swap else device
    if weights_mode(bench) == "file":  # as ``generate`` loads it: fp8, LoRA and block swap placement while streaming
        gen.dit = str(dit_file(bench.arch, bench.size, config, bench.workdir))
        dit = arch.load_dit(gen.dit, dtype=dtype, device=device,
                            **generation_stream_options(arch.name, gen, device, dtype))
    else:
        dit = random_dit_inplace(COMPONENTS[bench.arch], config, dtype, where, device)
    dit.requires_grad_(False)
    params = sum(p.numel() for p in dit.parameters())
    apply_generation_memory_options(dit, arch.name, gen, device)
    return dit, params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(arch: Architecture, dit: torch.nn.Module, side: int, cfg: bool, bench: argparse.Namespace,
               gen: argparse.Namespace, width: int, device: torch.device, dtype: torch.dtype) -> list[float]:
    """Seconds of each sampling step of one ``denoise`` run at ``side`` x ``side`` px.

    Step boundaries are taken in the sampler's per-step callback (after a device synchronisation), and
    the last step ends when ``denoise`` returns.
    """
    geometry = ImageGeometry(height=side, width=side)
    scale = gen.guidance_scale
    if cfg and not arch.uses_guidance(scale):
        scale = CFG_SCALE
    settings = SamplingSettings(bench.steps, scale if cfg else 0.0, gen.flow_shift)
    generator = torch.Generator("cpu").manual_seed(0)
    positive = PromptEmbeds(torch.randn(bench.text_tokens, width, generator=generator).to(device, dtype))
    negative = PromptEmbeds(torch.randn(bench.text_tokens, width, generator=generator).to(device, dtype))
    noise = arch.initial_noise(geometry, generator, dtype if arch.name == "qwen_image" else torch.float32)
    marks: list[float] = []

    def mark(i: int, latents: torch.Tensor) -> torch.Tensor:
        _sync(device)
        marks.append(time.perf_counter())
        return latents

    latents = denoise(arch, dit, noise, positive, negative if cfg else None, geometry, settings,
                      progress=False, step_callback=mark, device=device)
    _sync(device)
    marks.append(time.perf_counter())
    if not torch.isfinite(latents).all():
        print(f"warning: non-finite latents at {side}px (random weights); timing kept", file=sys.stderr)
    return [b - a for a, b in pairwise(marks)]


def options_label(gen: argparse.Namespace) -> str:
    """The memory/speed options of a row, as the generate flags that set them."""
    parts = ["--fp8_scaled" if gen.fp8_scaled else "--fp8" if gen.fp8 else ""]
    parts.append(f"--blocks_to_swap {gen.blocks_to_swap}" if gen.blocks_to_swap else "")
    parts.append(f"--attn_mode {gen.attn_mode}" if gen.attn_mode not in ("torch", "sdpa") else "")
    parts.append("--compile" if gen.compile else "")
    return " ".join(p for p in parts if p) or "none"


def main(argv: list[str] | None = None) -> int:
    bench, gen = parse_args(argv)
    arch = get_architecture(bench.arch)
    component = COMPONENTS[bench.arch]
    config = dit_config(component, bench.size)
    device, dtype = load_device(gen, weights_mode(bench))
    dit, params = prepare_dit(arch, bench, gen, config, device, dtype)
    cfgs = bench.cfg or (["on"] if arch.uses_guidance(arch.default_guidance_scale) else ["off"])
    rows = []
    for side in bench.resolution:
        for cfg in cfgs:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = time_steps(arch, dit, side, cfg == "on", bench, gen, text_width(component, config),
                                 device, dtype)
            device_gib = peak_device_gib(str(device))
            rows.append({
                "arch": bench.arch, "size": bench.size, "params": f"{params / 1e6:.1f}M",
                "resolution": f"{side}x{side}", "CFG": cfg, "dtype": str(dtype).removeprefix("torch."),
                "options": options_label(gen), "steps": bench.steps,
                "s/step": f"{statistics.median(seconds[1:]):.3f}", "first step s": f"{seconds[0]:.3f}",
                "peak host GiB": f"{peak_host_gib():.2f}",
                "peak device GiB": "-" if device_gib is None else f"{device_gib:.2f}",
            })
    command = " ".join(["python benchmarks/generate_step.py", *sys.argv[1:]])
    print(f"\n{describe_device(str(device))}; command: {command}")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
