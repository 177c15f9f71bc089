"""Qwen-Image-Layered generation: parity with diffusers' QwenImageLayeredPipeline, loading, output files, errors.

Parity: diffusers 0.42.1's pipeline sizes the input image to a 640x640 / 1024x1024 area (step 32); the
reference helper (:func:`tsumugi.testing.reference.reference_layered_images`) makes its size rule return the
image's own size, and ours takes a 64x64 input as is (its multiple-of-16 bucket is itself). diffusers decodes
only the layers; ours writes the composite first (``_layer0``), so ours[1:] is compared with its layers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tsumugi.qwen_image_generate_image import main as qwen_main
from tsumugi.testing.reference import reference_layered_images

STEPS, SEED, LAYERS, PROMPT, NEGATIVE = 3, 5, 2, "a cat on a sofa", "blurry"


@pytest.fixture(scope="module")
def input_image(tmp_path_factory) -> Path:
    """A smooth 64x64 RGBA image with a varying alpha channel."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    path = tmp_path_factory.mktemp("layered_input") / "input.png"
    Image.fromarray(small, "RGBA").resize((64, 64), Image.Resampling.BILINEAR).save(path)
    return path


def _models(files) -> list[str]:
    return ["--dit", str(files["dit"]), "--vae", str(files["vae"]), "--text_encoder", str(files["text_encoder"])]


def _argv(files, out: Path, image: Path, *extra: str) -> list[str]:
    return [*_models(files), "--model_version", "layered", "--control_image_path", str(image),
            "--output_layers", str(LAYERS), "--prompt", PROMPT, "--negative_prompt", NEGATIVE,
            "--infer_steps", str(STEPS), "--seed", str(SEED), "--save_path", str(out), "--device", "cpu", *extra]


def _run(files, out: Path, image: Path, *extra: str) -> list[Path]:
    assert qwen_main(_argv(files, out, image, *extra)) == 0
    return sorted(out.glob("*.png"))


def _error(argv: list[str], capsys) -> str:
    """The one-line ``error: ...`` of a refused run (exit status 2)."""
    assert qwen_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def _pixels(paths: list[Path]) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)).astype(int) for p in paths]


@pytest.fixture(scope="module")
def plain(tiny_sets, input_image, tmp_path_factory) -> list[Path]:
    """Our run on the ComfyUI-layout files: composite + LAYERS PNGs."""
    return _run(tiny_sets("qwen_image_layered"), tmp_path_factory.mktemp("plain"), input_image)


def _reference(tiny_sets, input_image, lora: Path | None = None) -> list[np.ndarray]:
    return reference_layered_images(tiny_sets("qwen_image_layered", "diffusers"), Image.open(input_image),
                                    prompt=PROMPT, negative_prompt=NEGATIVE, layers=LAYERS, steps=STEPS, seed=SEED,
                                    lora=lora)


def test_layered_matches_diffusers(plain, tiny_sets, input_image):
    ours = _pixels(plain)
    assert len(ours) == LAYERS + 1 and all(p.shape == (64, 64, 4) for p in ours)
    reference = _reference(tiny_sets, input_image)
    assert len(reference) == LAYERS
    for ref in reference:
        assert ref.std() > 5 and ref[..., 3].std() > 1, "degenerate reference: the comparison would prove nothing"
    for layer, ref in zip(ours[1:], reference):
        assert np.abs(layer - ref.astype(int)).max() <= 1


def test_layered_with_lora_matches_diffusers(plain, tiny_sets, input_image, tmp_path):
    from test_generate_parity import _random_musubi_lora

    files = tiny_sets("qwen_image_layered")
    lora = _random_musubi_lora("qwen_image", tmp_path / "lora.safetensors", files)
    ours = _pixels(_run(files, tmp_path / "o", input_image, "--lora_weight", str(lora)))
    assert np.abs(ours[1] - _pixels(plain)[1]).max() > 8, "the LoRA must change the layers"
    for layer, ref in zip(ours[1:], _reference(tiny_sets, input_image, lora=lora)):
        assert np.abs(layer - ref.astype(int)).max() <= 1


def test_block_swap_is_identical_and_fp8_close(plain, tiny_sets, input_image, tmp_path):
    files = tiny_sets("qwen_image_layered")
    swapped = _pixels(_run(files, tmp_path / "swap", input_image, "--blocks_to_swap", "1"))
    assert all(np.array_equal(a, b) for a, b in zip(swapped, _pixels(plain)))
    fp8_paths = _run(files, tmp_path / "fp8", input_image, "--fp8_scaled")
    diffs = [np.abs(a - b).mean() for a, b in zip(_pixels(fp8_paths), _pixels(plain))]
    assert all(0 < d < 3 for d in diffs), diffs
    assert json.loads(Image.open(fp8_paths[0]).text["tsumugi_parameters"])["fp8"] == "scaled"


def test_output_files_and_metadata(plain):
    assert [p.stem.rsplit("_", 1)[-1] for p in plain] == [f"layer{i}" for i in range(LAYERS + 1)]
    for index, path in enumerate(plain):
        image = Image.open(path)
        assert image.mode == "RGBA"
        params = json.loads(image.text["tsumugi_parameters"])
        assert params["prompt"] == PROMPT and params["negative_prompt"] == NEGATIVE and params["seed"] == SEED
        assert params["model"] == "Qwen-Image-Layered" and params["output_layers"] == LAYERS
        assert params["layer"] == index and params["control_paths"] == ["input.png"]
        assert image.text["prompt"] == PROMPT


def test_diffusers_folder_loads_like_comfy_file(tiny_sets):
    from tsumugi.arch.qwen_image_layered import QwenImageLayeredArchitecture

    arch = QwenImageLayeredArchitecture()
    comfy, folder = tiny_sets("qwen_image_layered"), tiny_sets("qwen_image_layered", "diffusers")
    dit_a = arch.load_dit(str(comfy["dit"]), dtype=torch.float32, device="cpu")
    dit_b = arch.load_dit(str(folder["dit"]), dtype=torch.float32, device="cpu")
    assert dit_a.config.use_additional_t_cond and dit_a.config.use_layer3d_rope and dit_b.config.use_layer3d_rope
    sd_a, sd_b = dit_a.state_dict(), dit_b.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    vae_a, vae_b = arch.load_vae(str(comfy["vae"]), device="cpu"), arch.load_vae(str(folder["vae"]), device="cpu")
    assert vae_a.config.input_channels == vae_b.config.input_channels == 4
    sd_a, sd_b = vae_a.state_dict(), vae_b.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_wrong_vae_or_dit_is_refused(tiny_sets, input_image, tmp_path, capsys):
    layered, plain_set = tiny_sets("qwen_image_layered"), tiny_sets("qwen_image")
    err = _error(_argv({**layered, "vae": plain_set["vae"]}, tmp_path / "a", input_image), capsys)
    assert re.search(r"--vae .*3-channel \(RGB\).*needs the RGBA VAE of Qwen-Image-Layered", err), err
    err = _error(_argv({**layered, "dit": plain_set["dit"]}, tmp_path / "b", input_image), capsys)
    assert re.search(r"--dit .*not a Qwen-Image-Layered DiT", err), err
    base = ["--prompt", "x", "--image_size", "32", "32", "--infer_steps", "1", "--device", "cpu",
            "--save_path", str(tmp_path / "c")]
    err = _error([*_models({**plain_set, "vae": layered["vae"]}), *base], capsys)
    assert re.search(r"--vae .*4-channel \(RGBA\) Qwen-Image-Layered VAE", err), err
    err = _error([*_models({**plain_set, "dit": layered["dit"]}), *base], capsys)
    assert re.search(r"--dit .*is a Qwen-Image-Layered DiT.*--model_version layered", err), err
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize(("extra", "message"), [
    (["--output_layers", "0"], "--output_layers must be at least 1"),
    (["--mask_path", "m.png"], "--mask_path"),
    (["--resize_control_to_official_size"], "--resize_control_to_official_size"),
    (["--control_image_path"], "exactly one input image"),
])
def test_layered_refusals(extra, message, tiny_sets, input_image, tmp_path, capsys):
    assert message in _error(_argv(tiny_sets("qwen_image_layered"), tmp_path, input_image, *extra), capsys)


def test_latent_files_roundtrip(plain, tiny_sets, input_image, tmp_path):
    from safetensors import safe_open

    files = tiny_sets("qwen_image_layered")
    written = _run(files, tmp_path / "both", input_image, "--output_type", "both")
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(written), _pixels(plain)))
    (latent,) = (tmp_path / "both").glob("*.safetensors")
    with safe_open(str(latent), framework="pt") as f:
        assert tuple(f.get_tensor("latent").shape) == (1, LAYERS + 1, 16, 8, 8)  # Musubi's layout
        assert f.metadata()["output_layers"] == str(LAYERS) and f.metadata()["prompt"] == PROMPT
    argv = [*_models(files), "--model_version", "layered", "--latent_path", str(latent),
            "--save_path", str(tmp_path / "decoded"), "--device", "cpu"]
    assert qwen_main(argv) == 0
    decoded = sorted((tmp_path / "decoded").glob("*.png"))
    assert [p.stem.rsplit("_", 1)[-1] for p in decoded] == [f"layer{i}" for i in range(LAYERS + 1)]
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(decoded), _pixels(plain)))


def test_from_file_lines_set_layers_input_and_size(tiny_sets, input_image, tmp_path):
    odd = tmp_path / "odd.png"
    Image.open(input_image).resize((50, 40)).save(odd)
    lines = tmp_path / "p.txt"
    lines.write_text(f"first --f 1 --d 1\nsecond --ci {odd} --w 32 --h 48 --d 2\n")
    argv = [*_models(tiny_sets("qwen_image_layered")), "--model_version", "layered", "--from_file", str(lines),
            "--control_image_path", str(input_image), "--resize_control_to_image_size", "--infer_steps", "1",
            "--device", "cpu", "--save_path", str(tmp_path / "o")]
    assert qwen_main(argv) == 0
    first = sorted((tmp_path / "o").glob("*_1_layer*.png"))
    second = sorted((tmp_path / "o").glob("*_2_layer*.png"))
    assert len(first) == 2 and len(second) == 5  # --f 1; default --output_layers 4; + the composite
    assert {Image.open(p).size for p in first} == {(64, 64)} and {Image.open(p).size for p in second} == {(32, 48)}
    assert json.loads(Image.open(second[0]).text["tsumugi_parameters"])["control_paths"] == ["odd.png"]


def test_automatic_prompt_captions_the_input(tiny_sets, input_image, tmp_path, monkeypatch):
    """No prompt + ``--automatic_prompt_lang_for_layered``: the prompt is the text encoder's greedy caption of
    the input image under the chosen language's instruction; a given prompt is kept. (Captions are cut to 16
    tokens here: the tiny model never stops on its own and 512 tokens take minutes on a CPU.)"""
    from tsumugi.sample import layered
    from tsumugi.sample.layered import CAPTION_INSTRUCTION_CN
    from tsumugi.text import captioning

    monkeypatch.setattr(layered, "CAPTION_MAX_NEW_TOKENS", 16)
    from tsumugi.text.tokenizers import load_tokenizer

    files = tiny_sets("qwen_image_layered")
    model = captioning.load_captioner(str(files["text_encoder"]), device="cpu", dtype=torch.float32)
    tokenizer = load_tokenizer("qwen_image")
    image = Image.open(input_image).convert("RGB")
    expected = {lang: captioning.decode_caption(tokenizer, captioning.caption_token_ids(
        model, tokenizer, image, instruction, max_new_tokens=16))
        for lang, instruction in (("en", captioning.DEFAULT_PROMPT), ("cn", CAPTION_INSTRUCTION_CN))}
    assert expected["en"] and expected["en"] != expected["cn"]
    for lang in ("en", "cn"):
        argv = [*_models(files), "--model_version", "layered", "--control_image_path", str(input_image),
                "--automatic_prompt_lang_for_layered", lang, "--output_layers", "1", "--infer_steps", "1",
                "--seed", "1", "--device", "cpu", "--save_path", str(tmp_path / lang)]
        assert qwen_main(argv) == 0
        (first, *_) = sorted((tmp_path / lang).glob("*.png"))
        assert json.loads(Image.open(first).text["tsumugi_parameters"])["prompt"] == expected[lang]
    kept = _run(files, tmp_path / "kept", input_image, "--automatic_prompt_lang_for_layered", "en")
    assert json.loads(Image.open(kept[0]).text["tsumugi_parameters"])["prompt"] == PROMPT
