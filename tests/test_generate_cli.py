"""The generate scripts as a user runs them: outputs, metadata, prompt files, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tsumugi.qwen_image_generate_image import main as qwen_main
from tsumugi.zimage_generate_image import main as zimage_main

REPO = Path(__file__).resolve().parents[1]
MAINS = {"qwen_image": qwen_main, "zimage": zimage_main}


def _models(files: dict[str, Path]) -> list[str]:
    return ["--dit", str(files["dit"]), "--vae", str(files["vae"]), "--text_encoder", str(files["text_encoder"])]


def _run(arch: str, files: dict[str, Path], *extra: str) -> int:
    return MAINS[arch]([*_models(files), "--device", "cpu", "--infer_steps", "2", *extra])


@pytest.mark.parametrize("arch", ["qwen_image", "zimage"])
def test_png_metadata_and_unique_names(arch, tiny_sets, tmp_path):
    files = tiny_sets(arch)
    args = ("--prompt", "a blue bird", "--image_size", "32", "48", "--seed", "5", "--save_path", str(tmp_path))
    assert _run(arch, files, *args) == 0
    assert _run(arch, files, *args) == 0
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 2, "a second run with the same seed must not overwrite the first image"
    image = Image.open(pngs[0])
    assert image.size == (48, 32)
    params = json.loads(image.text["tsumugi_parameters"])
    assert params["prompt"] == "a blue bird" and image.text["prompt"] == "a blue bird"
    assert params["seed"] == 5 and params["steps"] == 2
    assert params["width"] == 48 and params["height"] == 32
    assert params["dit"] == Path(files["dit"]).name
    expected_negative = " " if arch == "qwen_image" else ""
    assert params["negative_prompt"] == expected_negative
    assert params["flow_shift"] == ("dynamic" if arch == "qwen_image" else 3.0)
    first, second = (np.asarray(Image.open(p)) for p in pngs)
    assert np.array_equal(first, second), "same seed and settings must give the same image"


def test_from_file_per_line_options(tiny_sets, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\n\nfirst prompt --w 32 --h 48 --d 1\nsecond --w 64 --h 32 --d 2 --g 1.0\n")
    assert _run("qwen_image", tiny_sets("qwen_image"), "--from_file", str(prompts), "--save_path", str(tmp_path / "o")) == 0
    sizes = sorted(Image.open(p).size for p in (tmp_path / "o").glob("*.png"))
    assert sizes == [(32, 48), (64, 32)]
    seeds = sorted(json.loads(Image.open(p).text["tsumugi_parameters"])["seed"] for p in (tmp_path / "o").glob("*.png"))
    assert seeds == [1, 2]


@pytest.mark.parametrize("arch", ["qwen_image", "zimage"])
def test_latent_output_decodes_to_same_image(arch, tiny_sets, tmp_path):
    files = tiny_sets(arch)
    common = ("--prompt", "x", "--image_size", "32", "32", "--seed", "3")
    assert _run(arch, files, *common, "--save_path", str(tmp_path / "a"), "--output_type", "latent_images") == 0
    (latent,) = (tmp_path / "a").glob("*.safetensors")
    (png,) = (tmp_path / "a").glob("*.png")
    assert MAINS[arch](["--vae", str(files["vae"]), "--latent_path", str(latent), "--save_path", str(tmp_path / "b"),
                        "--device", "cpu"]) == 0
    (decoded,) = (tmp_path / "b").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(decoded)))


def _error(capsys, arch: str, argv: list[str]) -> str:
    assert MAINS[arch](argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_vae_passed_as_dit_names_flag_and_file(tiny_sets, tmp_path, capsys):
    files = tiny_sets("qwen_image")
    err = _error(capsys, "qwen_image", ["--dit", str(files["vae"]), "--vae", str(files["vae"]), "--text_encoder",
                                        str(files["text_encoder"]), "--prompt", "x", "--save_path", str(tmp_path),
                                        "--device", "cpu"])
    assert "--dit" in err and Path(files["vae"]).name in err and "VAE" in err


def test_zimage_dit_given_to_qwen_script(tiny_sets, tmp_path, capsys):
    q, z = tiny_sets("qwen_image"), tiny_sets("zimage")
    err = _error(capsys, "qwen_image", ["--dit", str(z["dit"]), "--vae", str(q["vae"]), "--text_encoder",
                                        str(q["text_encoder"]), "--prompt", "x", "--save_path", str(tmp_path),
                                        "--device", "cpu"])
    assert "--dit" in err and "Z-Image" in err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--image_size", "30", "32"], "multiple of 16"),
        (["--lora_weight", "a.safetensors", "--lora_multiplier", "1", "2"], "--lora_multiplier"),
        (["--model_version", "edit-3000"], "--model_version"),
        (["--attn_mode", "flash"], "flash"),
    ],
)
def test_bad_options(tiny_sets, tmp_path, capsys, extra, needle):
    files = tiny_sets("qwen_image")
    argv = [*_models(files), "--prompt", "x", "--save_path", str(tmp_path), "--device", "cpu", *extra]
    assert needle in _error(capsys, "qwen_image", argv)


def test_missing_save_path_and_prompt(tiny_sets, capsys):
    files = tiny_sets("zimage")
    assert "--save_path" in _error(capsys, "zimage", [*_models(files), "--prompt", "x"])
    assert "--prompt" in _error(capsys, "zimage", [*_models(files), "--save_path", "out"])


def test_unknown_prompt_line_option(tiny_sets, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --sd 42\n")
    err = _error(capsys, "zimage", [*_models(tiny_sets("zimage")), "--from_file", str(prompts), "--save_path",
                                    str(tmp_path)])
    assert f"{prompts}:1" in err and "--sd" in err


@pytest.mark.parametrize("style", ["script", "module"])
def test_entry_points_run(style):
    target = [str(REPO / "src/tsumugi/zimage_generate_image.py")] if style == "script" else [
        "-m", "tsumugi.zimage_generate_image"]
    result = subprocess.run([sys.executable, *target, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--flow_shift" in result.stdout and "--lora_weight" in result.stdout


@pytest.mark.parametrize("arch", ["qwen_image", "zimage"])
def test_fp8_scaled_generation_is_close(arch, tiny_sets, tmp_path):
    files = tiny_sets(arch)
    common = ("--prompt", "a red house", "--image_size", "32", "32", "--seed", "9")
    assert _run(arch, files, *common, "--save_path", str(tmp_path / "full")) == 0
    assert _run(arch, files, *common, "--save_path", str(tmp_path / "fp8"), "--fp8_scaled") == 0
    (full,), (fp8,) = (tmp_path / "full").glob("*.png"), (tmp_path / "fp8").glob("*.png")
    a, b = np.asarray(Image.open(full)).astype(int), np.asarray(Image.open(fp8)).astype(int)
    assert 0 < np.abs(a - b).mean() < 3
    assert json.loads(Image.open(fp8).text["tsumugi_parameters"])["fp8"] == "scaled"


def test_block_swap_generation_is_identical(tiny_sets, tmp_path, caplog):
    files = tiny_sets("qwen_image")
    common = ("--prompt", "a red house", "--image_size", "32", "32", "--seed", "9")
    assert _run("qwen_image", files, *common, "--save_path", str(tmp_path / "a")) == 0
    caplog.set_level("INFO")
    assert _run("qwen_image", files, *common, "--save_path", str(tmp_path / "b"), "--blocks_to_swap", "1") == 0
    assert "block swap: 1 of 2 blocks streamed" in caplog.text
    (a,), (b,) = (tmp_path / "a").glob("*.png"), (tmp_path / "b").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


@pytest.mark.parametrize("arch", ["qwen_image", "zimage"])
def test_single_step_generation_is_finite(arch, tiny_sets, tmp_path):
    from tsumugi.arch import get_architecture
    from tsumugi.arch.base import ImageGeometry
    from tsumugi.sample.sampler import SamplingSettings, sigma_schedule

    timesteps, sigmas = sigma_schedule(get_architecture(arch), SamplingSettings(1, 4.0, None), ImageGeometry(64, 64))
    assert timesteps.tolist() == [1000.0] and sigmas.tolist() == [1.0, 0.0]
    files = tiny_sets(arch)
    assert MAINS[arch]([*_models(files), "--device", "cpu", "--infer_steps", "1", "--prompt", "x",
                        "--image_size", "32", "32", "--save_path", str(tmp_path)]) == 0
    (png,) = tmp_path.glob("*.png")
    assert np.asarray(Image.open(png)).std() > 0


def test_compile_and_vae_cpu_generation(tiny_sets, tmp_path):
    files = tiny_sets("zimage")
    common = ("--prompt", "a red house", "--image_size", "32", "32", "--seed", "9")
    assert _run("zimage", files, *common, "--save_path", str(tmp_path / "a")) == 0
    assert _run("zimage", files, *common, "--save_path", str(tmp_path / "b"), "--compile", "--compile_backend",
                "aot_eager", "--vae_cpu") == 0
    (a,), (b,) = (tmp_path / "a").glob("*.png"), (tmp_path / "b").glob("*.png")
    assert np.abs(np.asarray(Image.open(a)).astype(int) - np.asarray(Image.open(b)).astype(int)).max() <= 1
