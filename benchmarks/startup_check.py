"""Training start-up cost of the dataset + cache check, old way vs new way, on a generated dataset.

    python benchmarks/startup_check.py --images 1000 --size 64
    python benchmarks/startup_check.py --images 1000 --size 512
    python benchmarks/startup_check.py --images 1000 --size 512 --noise

What ``start_run`` does before any model is loaded: read the dataset config and check every item's
caches. Rows: median wall and CPU seconds (all threads) of ``--repeats`` runs in one process, file
data in the OS page cache:

* old: images decoded while reading the config, every source image hashed (SHA-256) by the check
  (what every process did before; under ``accelerate launch`` the new check runs on the main process only);
* new, cold: image headers only, and every image hashed once because every mtime changed (a dataset
  copied without its times; caching with ``--skip_existing`` records the new times);
* new, warm: image headers only, nothing changed since caching: one ``stat`` per image.

The images are PNGs of ``--size`` x ``--size`` pixels with an mtime an hour in the past (a dataset
older than its caches; images modified less than 2 s before caching are always hashed). The caches
(Z-Image) hold zero tensors of the right shapes (the check reads only metadata and shapes) and the
metadata the caching scripts write, made by the same functions; encoding 1,000 images with even tiny
models would take minutes on a shared CPU and measure nothing this benchmark is about.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import markdown_table  # noqa: E402
from PIL import Image  # noqa: E402

from tsumugi.caching.cache_files import latent_key, varlen_key, write_cache_file  # noqa: E402
from tsumugi.caching.latent_cache import latent_path  # noqa: E402
from tsumugi.caching.metadata import latent_metadata, text_metadata  # noqa: E402
from tsumugi.caching.pixels import item_sources  # noqa: E402
from tsumugi.caching.text_cache import text_path  # noqa: E402
from tsumugi.caching.validate import check_caches  # noqa: E402
from tsumugi.data.batching import batch_key  # noqa: E402
from tsumugi.data.config import load_dataset_config  # noqa: E402
from tsumugi.testing.tiny_dataset import write_tiny_dataset  # noqa: E402


def _set_mtimes(images: list[Path], seconds_ago: float) -> None:
    ns = time.time_ns() - int(seconds_ago * 1e9)
    for path in images:
        os.utime(path, ns=(ns, ns))


def _write_caches(toml: Path) -> None:
    """Both caches of every item, with the metadata ``cache_latents`` / ``cache_text_outputs`` write."""
    (dataset,) = load_dataset_config(toml, architecture="zi")
    for item in dataset.items:
        bucket = batch_key(dataset, item).bucket
        fingerprints, stats = item_sources(item, None)
        latent = torch.zeros(16, bucket[1] // 8, bucket[0] // 8)
        write_cache_file(latent_path(dataset, item, "zi"), {latent_key(latent): latent},
                         latent_metadata("zi", item.original_size, bucket, "original", "vae", fingerprints[0], [],
                                         stats))
        embed = torch.zeros(8, 64)
        write_cache_file(text_path(dataset, item, "zi"), {varlen_key("llm_embed", embed): embed},
                         text_metadata("zi", item.caption, "original", "text_encoder", []))


def _start(toml: Path, *, old: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of what a training start does before loading models (CPU: all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    datasets = load_dataset_config(toml, architecture="zi", verify_images=old)
    check_caches(datasets, "zi", "original", "zimage", trust_stat=not old)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--noise", action="store_true",
                        help="random-noise pixels: PNGs as large as photos (the generated gradients compress ~50x)")
    parser.add_argument("--workdir", default=None, help="folder for the dataset (default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        toml = write_tiny_dataset(root / "data", args.images, sizes=[(args.size, args.size)],
                                  resolution=min(args.size, 256), batch_size=8)
        images = sorted((root / "data/images").glob("*.png"))
        if args.noise:
            rng = np.random.default_rng(0)
            for path in images:
                Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(path)
        _set_mtimes(images, 3600)
        _write_caches(toml)
        _start(toml, old=False)  # imports and first-call costs out of the way
        total_mb = sum(p.stat().st_size for p in images) / 2**20

        cached_times = {p: p.stat().st_mtime_ns for p in images}
        timings: dict[str, list[tuple[float, float]]] = {"old": [], "new, cold": [], "new, warm": []}
        for i in range(args.repeats):
            timings["old"].append(_start(toml, old=True))
            timings["new, warm"].append(_start(toml, old=False))
            _set_mtimes(images, 1800 + i)  # touched: every image is hashed
            timings["new, cold"].append(_start(toml, old=False))
            for path, ns in cached_times.items():  # back to the times the caches recorded
                os.utime(path, ns=(ns, ns))
        old_wall = statistics.median(w for w, _ in timings["old"])
        old_cpu = statistics.median(c for _, c in timings["old"])
        rows = []
        for name, values in timings.items():
            wall, cpu = statistics.median(w for w, _ in values), statistics.median(c for _, c in values)
            rows.append({"images": args.images, "image size": f"{args.size}x{args.size} ({total_mb:.1f} MiB)",
                         "check": name, "wall s": f"{wall:.3f}", "CPU s": f"{cpu:.3f}",
                         "old/new wall": f"{old_wall / wall:.1f}", "old/new CPU": f"{old_cpu / cpu:.1f}"})
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
