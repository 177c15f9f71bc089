"""Host memory of loading a DiT, per memory mode, as a ratio to the size of its file.

    python benchmarks/release_memory.py --arch zimage --size release --workdir /work/bench
    python benchmarks/release_memory.py --arch qwen_image --size release --workdir /work/bench \\
        --modes fp8_scaled+swap fp8_scaled+swap+step

A random bf16 DiT of ``--size`` is written once into ``--workdir`` (``{arch}_{size}/dit.safetensors``,
streamed one tensor at a time, in a subprocess whose own peak memory is the ``write`` row; an existing
file is reused). Then each mode runs in a fresh Python process, on the CPU, the way the generate
scripts do it: the real loader (``--dit_dtype bfloat16``), then fp8 quantization, attention mode and block
swap as ``tsumugi.sample.generate`` applies them; modes ending in ``+step`` then run one denoising step
(one DiT forward through the real sampler, CFG off, random prompt embeddings) at ``--resolution``.

Each row reports the load time (and the step time), the process's peak resident memory (VmHWM: the
peak of all of it, mapped file pages included) and its peak anonymous memory (RssAnon, sampled every
few milliseconds: what the process itself allocated; file pages mapped from the page cache can be
dropped by the kernel under pressure, anonymous pages cannot), each also as a ratio to the file size,
and the resident memory at the end (``end RSS``: what stays once loading, and the step, are done).
``base`` is the same process after its imports (Python, torch, the library, the model classes), before
loading, and
``over base`` is the anonymous peak minus that, over the file size. Targets are given for peak RSS
over the file size: bf16 1.05, fp8 0.6 (weights in one byte, scales, the unquantized rest), block swap
1.05 times the bf16 row, and each ``+step`` row the bound of its load mode.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tsumugi.testing.host_memory import PeakSampler, status_kib  # noqa: E402

MODES: dict[str, tuple[list[str], bool]] = {
    "bf16": ([], False),
    "fp8": (["--fp8"], False),
    "fp8_scaled": (["--fp8_scaled"], False),
    "swap": (["--blocks_to_swap", "{swap}"], False),
    "fp8_scaled+swap": (["--fp8_scaled", "--blocks_to_swap", "{swap}"], False),
    "bf16+step": ([], True),
    "fp8_scaled+step": (["--fp8_scaled"], True),
    "swap+step": (["--blocks_to_swap", "{swap}"], True),
    "fp8_scaled+swap+step": (["--fp8_scaled", "--blocks_to_swap", "{swap}"], True),
}
DEFAULT_MODES = ["bf16", "fp8", "fp8_scaled", "swap", "bf16+step", "fp8_scaled+step", "swap+step"]
COMPONENTS = {"qwen_image": "qwen_image_dit", "zimage": "zimage_dit"}
GIB = 2**30


# ---- the child processes -------------------------------------------------------------------------------
def child_write(args: argparse.Namespace) -> dict[str, Any]:
    from common import dit_config, write_random_dit_file

    component = COMPONENTS[args.arch]
    sampler = PeakSampler()
    start = time.perf_counter()
    write_random_dit_file(component, dit_config(component, args.size), Path(args.file))
    seconds = time.perf_counter() - start
    return {"load s": seconds, "anon": sampler.stop()}


def child_load(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from common import dit_config, text_width
    from generate_step import bench_parser, prepare_dit, time_steps

    from tsumugi.arch import get_architecture
    from tsumugi.cli.generate_args import build_generate_parser

    flags, step = MODES[args.child]
    flags = [f.format(swap=args.blocks_to_swap) for f in flags]
    arch = get_architecture(args.arch)
    gen = build_generate_parser(arch).parse_args([*flags, "--dit_dtype", "bfloat16", "--device", "cpu"])
    bench = bench_parser().parse_args(["--arch", args.arch, "--size", args.size, "--weights", "file",
                                       "--workdir", args.workdir, "--steps", "1", "--text_tokens", "64"])
    component = COMPONENTS[args.arch]
    config = dit_config(component, args.size)
    device, dtype = torch.device("cpu"), torch.bfloat16
    import tsumugi.memory.block_swap  # noqa: F401  (imports done before ``base``)
    import tsumugi.memory.fp8_dit  # noqa: F401
    from tsumugi.models.components import instantiate

    instantiate(component, config, empty=True)  # imports the model classes; meta device, no weights
    base = status_kib("RssAnon")
    sampler = PeakSampler()
    start = time.perf_counter()
    dit, _ = prepare_dit(arch, bench, gen, config, device, dtype)
    out: dict[str, Any] = {"base": base, "load s": time.perf_counter() - start}
    if step:
        bench.steps = 1
        seconds = time_steps(arch, dit, args.resolution, False, bench, gen, text_width(component, config),
                             device, dtype)
        out["step s"] = sum(seconds)
    out["anon"] = sampler.stop()
    out["rss"] = status_kib("VmRSS")  # the model still alive
    return out


# ---- the parent --------------------------------------------------------------------------------------
def run_child(script_args: list[str], mode: str, file: Path) -> dict[str, Any]:
    """Run ``mode`` in a fresh interpreter; its result line, with its peak RSS."""
    command = [sys.executable, str(Path(__file__).resolve()), *script_args, "--child", mode, "--file", str(file)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: exit {proc.returncode}\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"{mode}: no result line\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def target(mode: str, bf16_ratio: float | None) -> float | None:
    """The bound on peak RSS / file size of ``mode`` (None: none set)."""
    load = mode.removesuffix("+step")
    if load == "bf16":
        return 1.05
    if load in ("fp8", "fp8_scaled", "fp8_scaled+swap"):
        return 0.6
    if load == "swap" and bf16_ratio is not None:
        return 1.05 * bf16_ratio
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=list(COMPONENTS), default="zimage")
    parser.add_argument("--size", choices=["tiny", "small", "release"], default="small")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=DEFAULT_MODES,
                        help=f"what to measure, each in a fresh process (default: {' '.join(DEFAULT_MODES)})")
    parser.add_argument("--blocks_to_swap", type=int, default=10, help="blocks streamed in the swap modes")
    parser.add_argument("--resolution", type=int, default=256, help="image side (px) of the +step modes")
    parser.add_argument("--workdir", default="/tmp/tsumugi_bench",
                        help="where the DiT file is written (or reused when present)")
    parser.add_argument("--child", choices=["write", *MODES], help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.resolution <= 0 or args.resolution % 16:
        parser.error(f"--resolution {args.resolution}: must be a positive multiple of 16")
    if args.blocks_to_swap < 1:
        parser.error("--blocks_to_swap must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        result = child_write(args) if args.child == "write" else child_load(args)
        result["hwm"] = status_kib("VmHWM")
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    file = Path(args.workdir) / f"{args.arch}_{args.size}" / "dit.safetensors"
    script_args = ["--arch", args.arch, "--size", args.size, "--workdir", args.workdir,
                   "--blocks_to_swap", str(args.blocks_to_swap), "--resolution", str(args.resolution)]
    results: dict[str, dict[str, Any]] = {}
    if not file.exists():
        results["write"] = run_child(script_args, "write", file)
    size = file.stat().st_size
    for mode in args.modes:
        results[mode] = run_child(script_args, mode, file)

    bf16 = results.get("bf16", {}).get("hwm")
    rows = []
    for mode, r in results.items():
        hwm, anon = r["hwm"] * 1024, r["anon"] * 1024
        bound = None if mode == "write" else target(mode, None if bf16 is None else bf16 * 1024 / size)
        rows.append({
            "mode": mode, "load s": f"{r['load s']:.1f}", "step s": f"{r['step s']:.1f}" if "step s" in r else "-",
            "peak RSS GiB": f"{hwm / GIB:.2f}", "RSS / file": f"{hwm / size:.3f}",
            "end RSS / file": f"{r['rss'] * 1024 / size:.3f}" if "rss" in r else "-",
            "peak anon GiB": f"{anon / GIB:.2f}", "anon / file": f"{anon / size:.3f}",
            "over base / file": f"{(anon - r['base'] * 1024) / size:.3f}" if "base" in r else "-",
            "target RSS / file": "-" if bound is None else f"<= {bound:.3f}",
            "met": "-" if bound is None else ("yes" if hwm / size <= bound else "NO"),
        })

    from common import describe_device, markdown_table

    base = next((r["base"] for r in results.values() if "base" in r), 0) * 1024
    print(f"\n{describe_device('cpu')}; file {file} {size / GIB:.2f} GiB; base (imports) anon "
          f"{base / GIB:.2f} GiB; command: python benchmarks/release_memory.py {' '.join(sys.argv[1:])}")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
