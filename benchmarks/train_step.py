"""LoRA training step time and peak memory through the real trainer, for a configurable DiT size.

    python benchmarks/train_step.py --arch qwen_image --size small --resolution 256 --steps 12
    python benchmarks/train_step.py --arch qwen_image --size release --resolution 1024 --device cuda \\
        --mixed_precision bf16 --gradient_checkpointing          # on a lent GPU

Caches are synthetic (random latents and text embeddings of the right shapes, written in the real
cache format), so only the DiT's size matters; the DiT file is written once per size into
``--workdir``. Reports the median step time over the steps after the first, and peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    describe_device,
    dit_config,
    markdown_table,
    peak_device_gib,
    peak_host_gib,
    text_width,
    written_dit_file,
)

from tsumugi.caching.cache_files import latent_key, varlen_key, write_cache_file  # noqa: E402
from tsumugi.caching.fingerprint import file_fingerprint  # noqa: E402
from tsumugi.caching.latent_cache import latent_path  # noqa: E402
from tsumugi.caching.metadata import latent_metadata, text_metadata  # noqa: E402
from tsumugi.caching.text_cache import text_path  # noqa: E402
from tsumugi.cli.train_config_file import parse_train_args  # noqa: E402
from tsumugi.cli.train_parser import build_train_parser  # noqa: E402
from tsumugi.cli.train_validation import validate_train_args  # noqa: E402
from tsumugi.data.batching import batch_key, selector_for  # noqa: E402
from tsumugi.data.config import load_dataset_config  # noqa: E402
from tsumugi.models.components import instantiate  # noqa: E402
from tsumugi.testing.tiny_dataset import write_tiny_dataset  # noqa: E402
from tsumugi.train.full_training import train_full  # noqa: E402
from tsumugi.train.network_training import train_network  # noqa: E402

ARCH = {"qwen_image": ("qwen_image_dit", "qi", "vl_embed", (16, 1)), "zimage": ("zimage_dit", "zi", "llm_embed", (16,))}


def synthetic_caches(arch: str, toml: Path, width: int) -> None:
    component, code, text_name, lead = ARCH[arch]
    generator = torch.Generator().manual_seed(0)
    for dataset in load_dataset_config(toml, architecture=code):
        selector = selector_for(dataset)
        for item in dataset.items:
            bucket = batch_key(dataset, item, selector).bucket
            latent = torch.randn(*lead, bucket[1] // 8, bucket[0] // 8, generator=generator)
            meta = latent_metadata(code, item.original_size, bucket, "original", "synthetic",
                                   file_fingerprint(item.image_path), [])
            write_cache_file(latent_path(dataset, item, code), {latent_key(latent): latent}, meta)
            embed = torch.randn(77, width, generator=generator)
            write_cache_file(text_path(dataset, item, code), {varlen_key(text_name, embed): embed},
                             text_metadata(code, item.caption, "original", "synthetic", []))


KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


def estimate_mfu(args, params: int, seconds: float) -> float | None:
    """Model FLOPs utilisation, approximated as (2 forward + 2 input-gradient [+ 2 weight-gradient with --full]
    [+ 2 recompute]) x params x tokens per step (LoRA: frozen base weights, no weight gradients; attention
    score FLOPs left out)."""
    peak = args.peak_tflops
    if peak is None and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in KNOWN_PEAK_TFLOPS.items() if k in name), None)
    if peak is None:
        return None
    tokens = (args.resolution // 16) ** 2 * args.batch_size + 77 * args.batch_size
    passes = 4 + (2 if args.gradient_checkpointing else 0) + (2 if args.full else 0)
    return passes * params * tokens / seconds / (peak * 1e12)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["qwen_image", "zimage"], default="qwen_image")
    parser.add_argument("--size", choices=["tiny", "small", "release"], default="small")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--device", default="cpu", help="for the report: training uses CUDA when it is available")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--network_dim", type=int, default=16)
    parser.add_argument("--full", action="store_true", help="full fine-tuning (*_train) instead of LoRA training")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more training flags")
    parser.add_argument("--workdir", default="/tmp/tsumugi_bench")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="dense bf16 peak of the device for MFU (H100/H200 SXM: 989); default: known GPUs only")
    args = parser.parse_args()

    component = ARCH[args.arch][0]
    config = dit_config(component, args.size)
    work = Path(args.workdir) / f"{args.arch}_{args.size}"
    dit_file = work / "dit.safetensors"
    written_dit_file(component, config, dit_file)
    toml = write_tiny_dataset(work / f"data_{args.resolution}", 4, sizes=[(args.resolution, args.resolution)],
                              resolution=args.resolution, batch_size=args.batch_size)
    synthetic_caches(args.arch, toml, text_width(component, config))
    network = [] if args.full else ["--network_module", f"networks.lora_{args.arch}", "--network_dim",
                                    str(args.network_dim)]
    argv = [
        "--dit", str(dit_file), "--dataset_config", str(toml), *network, "--max_train_steps", str(args.steps),
        "--learning_rate", "1e-4", "--output_dir", str(work / "out"), "--output_name", "bench",
        "--mixed_precision", args.mixed_precision, "--seed", "0",
        *(["--gradient_checkpointing"] if args.gradient_checkpointing else []), *args.extra,
    ]
    parser = build_train_parser(args.arch, network=not args.full)
    train_args = validate_train_args(parse_train_args(parser, argv))
    result = (train_full if args.full else train_network)(args.arch, train_args)
    step = statistics.median(result.step_seconds)
    params = sum(t.numel() for t in instantiate(component, config, empty=True).parameters())  # meta: no weights
    mfu = estimate_mfu(args, params, step)
    row = {
        "arch": args.arch, "training": "full" if args.full else "LoRA", "size": args.size, "params": f"{params / 1e6:.1f}M",
        "resolution": args.resolution, "batch": args.batch_size, "precision": args.mixed_precision,
        "grad ckpt": args.gradient_checkpointing, "s/step": f"{step:.3f}",
        "peak host GiB": f"{peak_host_gib():.2f}",
        "peak device GiB": "-" if peak_device_gib(args.device) is None else f"{peak_device_gib(args.device):.2f}",
        "MFU": "-" if mfu is None else f"{100 * mfu:.1f}%",
    }
    print(f"\n{describe_device(args.device)}; command: python benchmarks/train_step.py {' '.join(sys.argv[1:])}")
    print(markdown_table([row]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
