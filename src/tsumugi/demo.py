"""End-to-end demo on tiny random models, on the CPU: model files -> prompts -> PNGs.

``python -m tsumugi.demo --output demo_output`` writes tiny Qwen-Image and Z-Image model files in the
layouts users download (ComfyUI single files), then runs both generate scripts exactly as a user would.
The images are noise-like (the weights are random); the point is that every stage runs for real.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tsumugi.qwen_image_generate_image import main as qwen_generate
from tsumugi.testing.tiny_models import write_tiny_set
from tsumugi.zimage_generate_image import main as zimage_generate

PROMPTS = """# prompt --w WIDTH --h HEIGHT --d SEED --s STEPS --g GUIDANCE --n NEGATIVE
a red fox in the snow, watercolor --w 128 --h 96 --d 1 --s 6
a lighthouse at dusk --w 96 --h 128 --d 2 --s 6 --g 3.0 --n blurry
"""


def run_demo(output: Path) -> int:
    output.mkdir(parents=True, exist_ok=True)
    prompts = output / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    for name, generate in (("qwen_image", qwen_generate), ("zimage", zimage_generate)):
        start = time.perf_counter()
        files = write_tiny_set(output / "models" / name, name, fmt="comfy", seed=0)
        argv = [
            "--dit", str(files["dit"]), "--vae", str(files["vae"]), "--text_encoder", str(files["text_encoder"]),
            "--from_file", str(prompts), "--save_path", str(output / "images" / name), "--device", "cpu",
        ]
        status = generate(argv)
        if status:
            return status
        print(f"[demo] {name}: images in {output / 'images' / name} ({time.perf_counter() - start:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsumugi.demo", description=__doc__)
    parser.add_argument("--output", default="demo_output", help="folder for models, prompts and images")
    args = parser.parse_args(argv)
    return run_demo(Path(args.output))


if __name__ == "__main__":
    sys.exit(main())
