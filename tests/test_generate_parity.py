"""Our generate scripts against diffusers' pipelines on the same tiny weights, seed and settings
(reference side: :mod:`tsumugi.testing.reference`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tsumugi.qwen_image_generate_image import main as qwen_main
from tsumugi.testing.reference import reference_image
from tsumugi.zimage_generate_image import main as zimage_main

HEIGHT, WIDTH, STEPS, SEED = 64, 96, 4, 1234
PROMPT, NEGATIVE = "a small red house by a lake", "blurry, low quality"


def _reference_image(arch: str, folders: dict[str, Path], guidance: float, lora: Path | None = None) -> np.ndarray:
    return reference_image(arch, folders, prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH,
                           steps=STEPS, seed=SEED, guidance=guidance, lora=lora)


def _our_image(arch: str, files: dict[str, Path], out_dir: Path, guidance: float, extra: list[str] = ()) -> np.ndarray:
    main = qwen_main if arch == "qwen_image" else zimage_main
    argv = [
        "--dit", str(files["dit"]), "--vae", str(files["vae"]), "--text_encoder", str(files["text_encoder"]),
        "--prompt", PROMPT, "--negative_prompt", NEGATIVE, "--image_size", str(HEIGHT), str(WIDTH),
        "--infer_steps", str(STEPS), "--guidance_scale", str(guidance), "--seed", str(SEED),
        "--save_path", str(out_dir), "--device", "cpu", *extra,
    ]
    assert main(argv) == 0
    (png,) = sorted(out_dir.glob("*.png"))
    return np.asarray(Image.open(png).convert("RGB"))


def _random_musubi_lora(arch: str, path: Path, files: dict[str, Path]) -> Path:
    """A LoRA on every Linear of the transformer blocks, in Musubi's key layout, with non-zero up weights."""
    from safetensors.torch import save_file

    from tsumugi.models.loader import load_dit

    dit = load_dit(str(files["dit"]), arch, dtype=torch.float32, device="cpu")
    container = "transformer_blocks." if arch == "qwen_image" else "layers."
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for name, module in dit.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(container):
            key = "lora_unet_" + name.replace(".", "_")
            rank = 4
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.2
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.2
            tensors[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))
    return path


CASES = [("qwen_image", 4.0), ("qwen_image", 1.0), ("zimage", 0.0), ("zimage", 2.5)]


@pytest.mark.parametrize(("arch", "guidance"), CASES)
def test_generate_matches_diffusers_pipeline(arch, guidance, tiny_sets, tmp_path):
    ours = _our_image(arch, tiny_sets(arch, "comfy"), tmp_path / "ours", guidance)
    reference = _reference_image(arch, tiny_sets(arch, "diffusers"), guidance)
    assert ours.shape == (HEIGHT, WIDTH, 3)
    assert reference.std() > 5, "degenerate reference image: the comparison would prove nothing"
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1


@pytest.mark.parametrize("arch", ["qwen_image", "zimage"])
def test_generate_with_lora_matches_diffusers(arch, tiny_sets, tmp_path):
    guidance = 4.0 if arch == "qwen_image" else 2.5
    lora = _random_musubi_lora(arch, tmp_path / "lora.safetensors", tiny_sets(arch, "comfy"))
    ours = _our_image(arch, tiny_sets(arch, "comfy"), tmp_path / "ours", guidance, ["--lora_weight", str(lora)])
    plain = _our_image(arch, tiny_sets(arch, "comfy"), tmp_path / "plain", guidance)
    reference = _reference_image(arch, tiny_sets(arch, "diffusers"), guidance, lora=lora)
    assert np.abs(ours.astype(int) - plain.astype(int)).max() > 8, "the LoRA must change the image"
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1
