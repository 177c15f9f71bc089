"""caption_images_by_qwen_vl: greedy tokens equal transformers' processor + generate; outputs, skipping, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tsumugi import caption_images_by_qwen_vl
from tsumugi.models.loader import load_text_encoder
from tsumugi.models.safetensors_write import save_file_atomic
from tsumugi.testing.tiny_models import build_tiny, save_component
from tsumugi.text import captioning
from tsumugi.text.tokenizers import load_tokenizer

MAX_SIZE = 300
NEW_TOKENS = 6


def _image(seed: int, size=(150, 100)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def vl_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl")
    return save_component(build_tiny("qwen2_5_vl", 0), "qwen2_5_vl", "comfy", root / "qwen_2.5_vl.safetensors")


def _reference_ids(model, image, prompt, max_size):
    """transformers' own processor (PIL image processor + our tokenizer) and ``generate``."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyProcessor(Qwen2VLProcessor):  # no video processor: that one needs torchvision
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    tokenizer = load_tokenizer("qwen_image")
    processor = ImageOnlyProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=256 * 28 * 28, max_pixels=max_size * 28 * 28),
        tokenizer=tokenizer, chat_template=tokenizer.chat_template,
    )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    stop = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stop,
                             pad_token_id=stop[-1])
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_tokens_equal_transformers_generate(vl_file):
    model = load_text_encoder(vl_file, "qwen_image", dtype=torch.float32)
    tokenizer = load_tokenizer("qwen_image")
    for seed, size, prompt in ((0, (150, 100), "Describe the image."), (1, (700, 420), captioning.DEFAULT_PROMPT)):
        image = _image(seed, size)
        want = _reference_ids(model, image, prompt, MAX_SIZE)
        got = captioning.caption_token_ids(model, tokenizer, image, prompt, max_new_tokens=NEW_TOKENS,
                                           max_size=MAX_SIZE)
        assert got == want and len(got) > 0


def run(*args) -> int:
    return caption_images_by_qwen_vl.main([str(a) for a in args])


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _image(0).save(folder / "a.png")
    _image(1, (90, 160)).save(folder / "b.jpg", quality=95)
    (folder / "notes.md").write_text("not an image")
    return folder


def _expected(vl_file, image_path, prompt=captioning.DEFAULT_PROMPT):
    """What the tool should write: the library's caption with the same model load as the script (bf16, CPU)."""
    from tsumugi.data.images import load_image

    model = captioning.load_captioner(vl_file, device="cpu")
    tokenizer = load_tokenizer("qwen_image")
    ids = captioning.caption_token_ids(model, tokenizer, load_image(image_path), prompt,
                                       max_new_tokens=NEW_TOKENS, max_size=MAX_SIZE)
    return captioning.decode_caption(tokenizer, ids)


def test_text_output_beside_images_skips_existing(vl_file, images):
    (images / "a.txt").write_text("kept")
    assert run("--image_dir", images, "--model_path", vl_file, "--output_format", "text", "--max_new_tokens",
               NEW_TOKENS, "--max_size", MAX_SIZE, "--device", "cpu") == 0
    assert (images / "a.txt").read_text() == "kept"
    assert (images / "b.txt").read_text() == _expected(vl_file, images / "b.jpg")
    assert not (images / "notes.txt").exists()
    out = images.parent / "caps"
    assert run("--image_dir", images, "--model_path", vl_file, "--output_format", "text", "--output_dir", out,
               "--max_new_tokens", NEW_TOKENS, "--max_size", MAX_SIZE, "--device", "cpu", "--overwrite",
               "--prompt", "Say\\nwhat you see.") == 0
    assert (out / "a.txt").read_text() == _expected(vl_file, images / "a.png", "Say\nwhat you see.")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"]


def test_jsonl_output_appends_and_loads_as_dataset(vl_file, images, tmp_path):
    out = tmp_path / "captions.jsonl"
    a = str((images / "a.png").resolve())
    out.write_text(json.dumps({"image_path": a, "caption": "kept"}) + "\n")
    assert run("--image_dir", images, "--model_path", vl_file, "--output_file", out, "--max_new_tokens",
               NEW_TOKENS, "--max_size", MAX_SIZE, "--device", "cpu", "--fp8_vl") == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["image_path"] for e in lines] == [a, str((images / "b.jpg").resolve())]
    assert lines[0]["caption"] == "kept" and isinstance(lines[1]["caption"], str)
    assert not list(tmp_path.glob(".*tmp"))

    from tsumugi.data.config import load_dataset_config
    from tsumugi.data.items import list_items

    config = tmp_path / "dataset.toml"
    config.write_text(f'[general]\nresolution = [64, 64]\n\n[[datasets]]\nimage_jsonl_file = "{out}"\n'
                      f'cache_directory = "{tmp_path / "cache"}"\n')
    [dataset] = load_dataset_config(config, architecture="qi")
    items = list_items(dataset)
    assert [(str(i.image_path), i.caption) for i in items] == [(e["image_path"], e["caption"]) for e in lines]


def test_bad_input_is_refused_by_name(vl_file, images, tmp_path, capsys):
    def error(rc):
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err and err[-1].startswith("error: "), err
        return err[-1]

    with safe_open(str(vl_file), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    no_head = save_file_atomic({k: v for k, v in sd.items() if k != "lm_head.weight"},
                               tmp_path / "no_head.safetensors", meta)
    no_visual = save_file_atomic({k: v for k, v in sd.items() if not k.startswith("visual.")},
                                 tmp_path / "no_visual.safetensors", meta)
    base = ["--image_dir", images, "--output_format", "text", "--device", "cpu"]
    line = error(run(*base, "--model_path", no_head))
    assert "--model_path" in line and "no_head.safetensors" in line and "lm_head" in line
    line = error(run(*base, "--model_path", no_visual))
    assert "no_visual.safetensors" in line and "vision tower" in line
    assert "--output_file" in error(run("--image_dir", images, "--model_path", vl_file))
    assert "--image_dir" in error(run("--image_dir", tmp_path / "nope", "--model_path", vl_file, "--output_format",
                                      "text"))
    (images / "c.png").write_bytes(b"")
    assert "c.png" in error(run(*base, "--model_path", vl_file))
    (images / "c.png").unlink()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    line = error(run("--image_dir", images, "--model_path", vl_file, "--output_file", bad))
    assert "bad.jsonl line 1" in line
    assert "--max_new_tokens" in error(run(*base, "--model_path", vl_file, "--max_new_tokens", 0))
    assert not list(images.glob("*.txt"))
