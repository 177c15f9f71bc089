"""Errors that name what is wrong: the flag, the model family, the expected value."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from tsumugi.models.loader import load_dit
from tsumugi.networks.lora_save import save_lora
from tsumugi.qwen_image_generate_image import main as qwen_main
from tsumugi.zimage_generate_image import main as zimage_main

MAINS = {"qwen_image": qwen_main, "zimage": zimage_main}
OTHER = {"qwen_image": "zimage", "zimage": "qwen_image"}
DISPLAY = {"qwen_image": "Qwen-Image", "zimage": "Z-Image"}


def _error(capsys, arch: str, argv: list[str]) -> str:
    assert MAINS[arch](argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def _lora_file(arch: str, files: dict[str, Path], path: Path) -> Path:
    """A rank-2 LoRA made by tsumugi's own network for ``arch``'s tiny DiT."""
    dit = load_dit(str(files["dit"]), arch)
    network = importlib.import_module(f"tsumugi.networks.lora_{arch}").create_network(dit, 2, 1.0, None, None)
    save_lora(network, path)
    return path


@pytest.mark.parametrize("arch", ["qwen_image", "zimage"])
def test_lora_of_the_other_family_is_named_in_generate(arch, tiny_sets, tmp_path, capsys):
    files = tiny_sets(arch)
    lora = _lora_file(OTHER[arch], tiny_sets(OTHER[arch]), tmp_path / "other.safetensors")
    err = _error(capsys, arch, ["--dit", str(files["dit"]), "--vae", str(files["vae"]), "--text_encoder",
                                str(files["text_encoder"]), "--prompt", "x", "--save_path", str(tmp_path / "out"),
                                "--device", "cpu", "--infer_steps", "1", "--lora_weight", str(lora)])
    assert err.startswith("error: --lora_weight: ") and "other.safetensors" in err  # before any model loads
    assert f"looks like a {DISPLAY[OTHER[arch]]} LoRA" in err
    assert f"expected a {DISPLAY[arch]} LoRA" in err and "match no layer" not in err


def test_image_size_error_names_image_size(tiny_sets, tmp_path, capsys):
    files = tiny_sets("zimage")
    err = _error(capsys, "zimage", ["--dit", str(files["dit"]), "--vae", str(files["vae"]), "--text_encoder",
                                    str(files["text_encoder"]), "--prompt", "x", "--save_path", str(tmp_path),
                                    "--image_size", "100", "72"])
    assert err == ("error: --image_size 100 72: height and width must each be a positive multiple of 16 "
                   "(e.g. --image_size 96 80)")


@pytest.mark.parametrize("arch", ["qwen_image", "zimage"])
def test_non_finite_generation_is_reported_not_saved(arch, tiny_sets, tmp_path, capsys):
    """A LoRA holding NaN merged into the DiT: the run names the bad weight and writes no (black) PNG."""
    import torch
    from safetensors.torch import load_file, save_file

    files = tiny_sets(arch)
    lora = _lora_file(arch, files, tmp_path / "nan.safetensors")
    tensors = load_file(lora)
    first_up = next(k for k in sorted(tensors) if "lora_up" in k or "lora_B" in k)
    tensors[first_up] = torch.full_like(tensors[first_up], float("nan"))
    save_file(tensors, lora)
    out = tmp_path / "out"
    status = MAINS[arch](["--dit", str(files["dit"]), "--vae", str(files["vae"]), "--text_encoder",
                          str(files["text_encoder"]), "--prompt", "x", "--save_path", str(out),
                          "--device", "cpu", "--infer_steps", "1", "--lora_weight", str(lora)])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert status == 2 and err.startswith("error: ")
    assert "1 of 1 image(s) not written" in err and "NaN or inf" in err
    assert "is not finite" in err and "--lora_weight" in err
    assert not list(out.glob("*.png"))
