"""One sampling path: training samples and the generate scripts read the same prompt files with the same
meaning and defaults, and the same prompt line gives the same image in both places."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_train_network import cached, run  # noqa: F401  (cached is a fixture)

from tsumugi.arch import get_architecture
from tsumugi.cli.generate_args import build_generate_parser
from tsumugi.demo import PROMPTS
from tsumugi.sample.config import GenerateConfig
from tsumugi.sample.generate import generation_jobs
from tsumugi.sample.prompt_lines import read_prompt_file
from tsumugi.train.config import TrainConfig
from tsumugi.train.sample_prompts import sample_jobs

SETTINGS = ("prompt", "negative_prompt", "width", "height", "seed", "steps", "guidance_scale", "flow_shift")


def _settings(job) -> tuple:
    return tuple(getattr(job, name) for name in SETTINGS)


def _write_forms(tmp_path, entries: list[dict]) -> dict[str, str]:
    """The same prompts as a .txt (Musubi line options), a .toml and a .json file (Musubi key names)."""
    options = {"width": "w", "height": "h", "seed": "d", "sample_steps": "s", "guidance_scale": "g",
               "cfg_scale": "l", "discrete_flow_shift": "fs", "negative_prompt": "n"}
    lines = [e["prompt"] + "".join(f" --{options[k]} {v}" for k, v in e.items() if k != "prompt") for e in entries]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    subsets = "".join("[[prompt.subset]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in e.items())
                      for e in entries)
    (tmp_path / "p.toml").write_text("[prompt]\n" + subsets, encoding="utf-8")
    (tmp_path / "p.json").write_text(json.dumps(entries), encoding="utf-8")
    return {suffix: str(tmp_path / f"p.{suffix}") for suffix in ("txt", "toml", "json")}


def test_g_and_l_set_the_cfg_scale_in_every_form_and_l_wins(tmp_path, caplog):
    files = _write_forms(tmp_path, [
        {"prompt": "a fox", "seed": 1, "guidance_scale": 3.0},
        {"prompt": "a cup", "seed": 2, "cfg_scale": 2.5},
        {"prompt": "a car", "seed": 3, "guidance_scale": 6.0, "cfg_scale": 1.5},
    ])
    for suffix, path in files.items():
        for flag in ("--from_file", "--sample_prompts"):
            caplog.clear()
            with caplog.at_level("WARNING"):
                lines = read_prompt_file(path, flag)
            assert [line.guidance_scale for line in lines] == [3.0, 2.5, 1.5], (suffix, flag)
            assert "both set the CFG scale" in caplog.text, (suffix, flag)
            assert any(source in caplog.text for source in ("p.txt:3", "p.toml:subset 2", "p.json[2]")), caplog.text


@pytest.mark.parametrize("arch_name", ["qwen_image", "zimage"])
def test_training_samples_take_the_generate_defaults(arch_name, tmp_path):
    """A bare prompt line means the same job in a training sample and in ``generate --from_file``: the
    generate script's defaults (25 steps, 256x256, the family's guidance, shift and negative prompt)."""
    arch = get_architecture(arch_name)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox --d 7\n", encoding="utf-8")
    args = build_generate_parser(arch).parse_args(["--from_file", str(prompts)])
    (generated,) = generation_jobs(arch, GenerateConfig.from_args(args))
    (sampled,) = sample_jobs(arch, read_prompt_file(str(prompts), "--sample_prompts"))
    assert _settings(sampled) == _settings(generated)
    assert (sampled.steps, sampled.width, sampled.height) == (args.infer_steps, 256, 256) == (25, 256, 256)
    assert sampled.guidance_scale == args.guidance_scale == arch.default_guidance_scale
    assert sampled.flow_shift is None and args.flow_shift is None  # the family's own shift in both


@pytest.mark.parametrize("suffix", ["toml", "json"])
def test_generate_from_file_reads_the_toml_and_json_forms(suffix, tmp_path):
    arch = get_architecture("qwen_image")
    entries = [{"prompt": "a fox", "width": 64, "height": 32, "seed": 1, "sample_steps": 3, "guidance_scale": 2.0,
                "negative_prompt": "blurry"}, {"prompt": "a cup", "seed": 2, "discrete_flow_shift": 2.0}]
    files = _write_forms(tmp_path, entries)
    parser = build_generate_parser(arch)
    jobs = generation_jobs(arch, GenerateConfig.from_args(parser.parse_args(["--from_file", files[suffix]])))
    reference = generation_jobs(arch, GenerateConfig.from_args(parser.parse_args(["--from_file", files["txt"]])))
    assert [_settings(j) for j in jobs] == [_settings(j) for j in reference]
    assert _settings(jobs[0]) == ("a fox", "blurry", 64, 32, 1, 3, 2.0, None)
    assert (jobs[1].flow_shift, jobs[1].steps) == (2.0, 25)


@pytest.mark.parametrize("arch_name", ["zimage", "qwen_image"])
def test_the_demo_prompt_file_gives_the_same_images_in_training_and_generation(arch_name, cached, tmp_path):  # noqa: F811
    """Each line of the demo's prompt file (plus one with --l and --fs): the training sample at step 2 equals,
    within 1/255, what the generate script makes from the same line with the step-2 LoRA."""
    from tsumugi.qwen_image_generate_image import main as qwen_generate
    from tsumugi.zimage_generate_image import main as zimage_generate

    toml, files = cached(arch_name)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS.replace("--s 6", "--s 3") + "a paper crane --w 64 --h 48 --d 5 --s 2 --l 2.5 --fs 2.0\n",
                       encoding="utf-8")
    models = ["--vae", str(files["vae"]), "--text_encoder", str(files["text_encoder"])]
    run(arch_name, toml, files, tmp_path / "o", "--max_train_steps", "3", "--sample_prompts", str(prompts),
        "--sample_every_n_steps", "2", "--save_every_n_steps", "2", *models)
    generate = {"qwen_image": qwen_generate, "zimage": zimage_generate}[arch_name]
    assert generate(["--dit", str(files["dit"]), *models, "--from_file", str(prompts), "--lora_weight",
                     str(tmp_path / "o/lora-step00000002.safetensors"), "--save_path", str(tmp_path / "g"),
                     "--device", "cpu"]) == 0
    generated = {Image.open(p).text["seed"]: p for p in (tmp_path / "g").glob("*.png")}
    samples = sorted((tmp_path / "o/sample").glob("lora_000002_*.png"))
    assert len(samples) == len(generated) == 3
    for sample in samples:
        ours = Image.open(sample)
        theirs = Image.open(generated[ours.text["seed"]])
        for key in SETTINGS:
            assert ours.text[key] == theirs.text[key], (sample.name, key)
        difference = np.abs(np.asarray(ours.convert("RGB")).astype(int) - np.asarray(theirs.convert("RGB")).astype(int))
        assert difference.max() <= 1, (sample.name, difference.max())
    guidance = {Image.open(p).text["seed"]: Image.open(p).text["guidance_scale"] for p in samples}
    assert guidance["2"] == "3.0" and guidance["5"] == "2.5"  # --g and --l: the CFG scale


def test_an_edit_sample_line_with_a_mask_gives_the_generate_image(tiny_sets, tmp_path):
    """Mask lines (``--ci`` + ``--m``) in a sample file: accepted when training an edit version, sized by the
    official-size rule, and the sample equals ``--from_file`` with ``--resize_control_to_official_size``."""

    import torch

    from tsumugi.qwen_image_generate_image import main as qwen_generate
    from tsumugi.train.sample_prompts import TrainingSampler

    files = tiny_sets("qwen_image")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64)).save(tmp_path / "c.png")
    mask = np.zeros((1024, 1024), dtype=np.uint8)
    mask[:, 512:] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    prompts = tmp_path / "p.txt"
    line = f"make it red --ci {tmp_path / 'c.png'} --m {tmp_path / 'm.png'} --d 3 --s 2 --l 1.0"  # --l 1: no CFG
    prompts.write_text(line + "\n", encoding="utf-8")
    args = TrainConfig(sample_prompts=str(prompts), vae=str(files["vae"]), output_dir=str(tmp_path / "t"),
                       text_encoder=str(files["text_encoder"]), output_name="run", model_version="edit-2511")
    arch = get_architecture("qwen_image")
    sampler = TrainingSampler(arch, args, torch.device("cpu"), torch.float32)
    dit = arch.load_dit(str(files["dit"]), dtype=torch.float32, device="cpu", model_version="edit-2511")
    (sample,) = sampler.render(dit, "000001")
    assert qwen_generate(["--dit", str(files["dit"]), "--vae", str(files["vae"]), "--text_encoder",
                          str(files["text_encoder"]), "--from_file", str(prompts), "--model_version", "edit-2511",
                          "--resize_control_to_official_size", "--save_path", str(tmp_path / "g"),
                          "--device", "cpu"]) == 0
    (generated,) = (tmp_path / "g").glob("*.png")
    ours, theirs = Image.open(sample), Image.open(generated)
    assert ours.size == theirs.size == (1024, 1024) and ours.text["mask_path"] == theirs.text["mask_path"] == "m.png"
    difference = np.abs(np.asarray(ours.convert("RGB")).astype(int) - np.asarray(theirs.convert("RGB")).astype(int))
    assert difference.max() <= 1
