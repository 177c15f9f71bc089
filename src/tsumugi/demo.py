"""End-to-end demo on tiny random models, on the CPU: cache -> train a LoRA -> sample with it.

``python -m tsumugi.demo --output demo_output`` does, for Qwen-Image and Z-Image, what a user does
with the released weights: model files in the ComfyUI layout, a generated image dataset with captions
and a Musubi-format dataset TOML, latent and text-encoder caching, LoRA training (with samples during
training), then generation from a prompt file with and without the trained LoRA. The images are
noise-like (the weights are random); the point is that every stage runs for real.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tsumugi.cli.flag_notes import HelpFormatter
from tsumugi.qwen_image_cache_latents import main as qwen_cache_latents
from tsumugi.qwen_image_cache_text_encoder_outputs import main as qwen_cache_text
from tsumugi.qwen_image_generate_image import main as qwen_generate
from tsumugi.qwen_image_train_network import main as qwen_train
from tsumugi.testing.tiny_dataset import write_tiny_dataset
from tsumugi.testing.tiny_models import write_tiny_set
from tsumugi.zimage_cache_latents import main as zimage_cache_latents
from tsumugi.zimage_cache_text_encoder_outputs import main as zimage_cache_text
from tsumugi.zimage_generate_image import main as zimage_generate
from tsumugi.zimage_train_network import main as zimage_train

DESCRIPTION = (
    "End-to-end demo on tiny random models, on the CPU. For Qwen-Image and Z-Image it writes model files in "
    "the ComfyUI layout and an image dataset with captions and a Musubi dataset TOML, caches latents and "
    "text-encoder outputs, trains a LoRA (with sample images during training), then generates images from a "
    "prompt file with and without the LoRA. The images look like noise (the weights are random); the point "
    "is that every stage runs for real. Output: OUTPUT/<model>/ with images/, lora/, lora/sample/ and logs/."
)
PROMPTS = """# prompt --w WIDTH --h HEIGHT --d SEED --s STEPS --g CFG_SCALE --n NEGATIVE
a red fox in the snow, watercolor --w 128 --h 96 --d 1 --s 6
a lighthouse at dusk --w 96 --h 128 --d 2 --s 6 --g 3.0 --n blurry
"""
SCRIPTS = {
    "qwen_image": (qwen_cache_latents, qwen_cache_text, qwen_train, qwen_generate),
    "zimage": (zimage_cache_latents, zimage_cache_text, zimage_train, zimage_generate),
}


def _step(label: str, status: int) -> None:
    if status:
        raise SystemExit(f"[demo] {label} failed with status {status}")


def run_demo(output: Path, steps: int = 30) -> int:
    output.mkdir(parents=True, exist_ok=True)
    prompts = output / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    for name, (cache_latents, cache_text, train, generate) in SCRIPTS.items():
        start = time.perf_counter()
        root = output / name
        files = write_tiny_set(root / "models", name, fmt="comfy", seed=0)
        toml = write_tiny_dataset(root / "dataset", 8, resolution=64, batch_size=2)
        models = ["--dit", str(files["dit"]), "--vae", str(files["vae"]), "--text_encoder", str(files["text_encoder"])]
        data = ["--dataset_config", str(toml), "--device", "cpu"]
        _step("latent caching", cache_latents([*data, "--vae", str(files["vae"])]))
        _step("text-encoder caching", cache_text([*data, "--text_encoder", str(files["text_encoder"])]))
        _step("LoRA training", train([
            *models, "--dataset_config", str(toml), "--network_module", f"networks.lora_{name}",
            "--network_dim", "8", "--learning_rate", "2e-2", "--max_train_steps", str(steps), "--seed", "0",
            "--mixed_precision", "no", "--output_dir", str(root / "lora"), "--output_name", f"{name}_demo",
            "--sample_prompts", str(prompts), "--sample_every_n_steps", str(steps),
            "--logging_dir", str(root / "logs"),
        ]))
        lora = root / "lora" / f"{name}_demo.safetensors"
        for label, extra in (("base", []), ("with_lora", ["--lora_weight", str(lora)])):
            _step(f"generation ({label})", generate([
                *models, "--from_file", str(prompts), "--save_path", str(root / "images" / label), "--device", "cpu",
                *extra,
            ]))
        print(f"[demo] {name}: cache -> train -> sample done in {time.perf_counter() - start:.1f} s; "
              f"LoRA {lora}, images in {root / 'images'}, samples in {root / 'lora' / 'sample'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsumugi.demo", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--output", default="demo_output", help="folder for models, data, LoRAs and images")
    parser.add_argument("--steps", type=int, default=30, help="LoRA training steps per model")
    args = parser.parse_args(argv)
    return run_demo(Path(args.output), args.steps)


if __name__ == "__main__":
    sys.exit(main())
