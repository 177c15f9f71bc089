"""Latent and text-encoder caching throughput (images/s) on a generated dataset.

    python benchmarks/caching_throughput.py --arch zimage --images 200 --device cpu

Models are tiny random ones (the point on a CPU is the pipeline: decoding, bucketing, batching,
writing); ``--release_vae`` uses the released VAE size (random weights), meant for a GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import describe_device, markdown_table  # noqa: E402

from tsumugi.commands.cache import cache_latents_main, cache_text_main  # noqa: E402
from tsumugi.models.configs import released_config  # noqa: E402
from tsumugi.testing.tiny_dataset import write_tiny_dataset  # noqa: E402
from tsumugi.testing.tiny_models import build_random, save_component, write_tiny_set  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["qwen_image", "zimage"], default="zimage")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--release_vae", action="store_true", help="released VAE size (random weights)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = write_tiny_set(root / "models", args.arch)
        if args.release_vae:
            component = "qwen_image_vae" if args.arch == "qwen_image" else "flux_vae"
            vae = build_random(component, released_config(component))
            files["vae"] = save_component(vae, component, "comfy", root / "models/release_vae.safetensors")
        sizes = [(args.resolution, args.resolution), (args.resolution * 5 // 4, args.resolution * 3 // 4),
                 (args.resolution * 3 // 4, args.resolution * 5 // 4)]
        toml = write_tiny_dataset(root / "data", args.images, sizes=sizes, resolution=args.resolution,
                                  batch_size=args.batch_size)
        common = ["--dataset_config", str(toml), "--device", args.device, "--num_workers", str(args.num_workers)]
        rows = []
        for label, run, extra in (
            ("latents", cache_latents_main, ["--vae", str(files["vae"])]),
            ("text encoder", cache_text_main, ["--text_encoder", str(files["text_encoder"])]),
        ):
            start = time.perf_counter()
            run(args.arch, [*common, *extra])
            seconds = time.perf_counter() - start
            rows.append({"cache": label, "images": args.images, "seconds": f"{seconds:.1f}",
                         "images/s": f"{args.images / seconds:.1f}"})
    print(f"\n{args.arch}, {args.resolution}px, batch {args.batch_size}, {args.num_workers} workers, "
          f"{'release-size' if args.release_vae else 'tiny'} VAE; {describe_device(args.device)}")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
