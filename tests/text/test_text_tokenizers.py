"""Bundled tokenizers: asset layout, ids equal to the Qwen release files, chat template, --tokenizer override."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path

import pytest

from tsumugi.errors import UserError
from tsumugi.text.tokenizers import (
    ASSET_DIR,
    BPE_DIR,
    clear_tokenizer_cache,
    load_tokenizer,
    parse_hub_id,
)

# Prompts the two tokenizers agree on (no Qwen3-only tokens).
COMMON_PROMPTS = [
    "A red fox jumping over a lazy dog, 35mm photo, f/1.8 -- it's golden hour.",
    "一只橘猫坐在窗台上，窗外下着小雨，水彩画风格。",
    "emoji test 🐱🎉👩‍👩‍👧 café naïve Ω≈ç√",
    "<|vision_start|><|image_pad|><|vision_end|>Picture 1: <|im_start|>x<|im_end|> <|endoftext|>",
    "  leading spaces\n\nnew lines\ttabs   and trailing  ",
    "<tool_call> <|fim_prefix|> <|file_sep|>",
    "",
]
QWEN3_ONLY_PROMPTS = ["<think>\nreasoning\n</think>\n\nanswer", "<tool_response>ok</tool_response>"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_assets_share_one_bpe_and_ship_no_tokenizer_json(reference_tokenizer_dir):
    for name in ("vocab.json", "merges.txt"):
        assert _sha256(BPE_DIR / name) == _sha256(reference_tokenizer_dir / name)
    assert not list(ASSET_DIR.rglob("tokenizer.json"))
    assert sorted(p.name for p in ASSET_DIR.rglob("vocab.json")) == ["vocab.json"]
    for folder in ("qwen2_5_vl", "qwen3"):
        assert (ASSET_DIR / folder / "tokenizer_config.json").is_file()
        assert not (ASSET_DIR / folder / "vocab.json").exists()


@pytest.mark.parametrize(("folder", "count"), [("qwen2_5_vl", 22), ("qwen3", 26)])
def test_added_tokens_in_configs(folder, count):
    config = json.loads((ASSET_DIR / folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    ids = sorted(int(i) for i in config["added_tokens_decoder"])
    assert ids == list(range(151643, 151643 + count))
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["model_max_length"] == 131072
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"


def test_tokenizer_properties(qwen_image_tokenizer, zimage_tokenizer):
    from transformers import Qwen2Tokenizer

    for tok, size in ((qwen_image_tokenizer, 151665), (zimage_tokenizer, 151669)):
        assert isinstance(tok, Qwen2Tokenizer)
        assert len(tok) == size
        assert tok.model_max_length == 131072
        assert tok.eos_token == "<|im_end|>"
        assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
        assert tok.padding_side == "right"
    assert zimage_tokenizer.convert_tokens_to_ids("</think>") == 151668


@pytest.mark.parametrize("prompt", COMMON_PROMPTS + QWEN3_ONLY_PROMPTS)
def test_zimage_ids_match_reference(zimage_tokenizer, reference_tokenizer, prompt):
    assert zimage_tokenizer(prompt).input_ids == reference_tokenizer(prompt).input_ids
    assert zimage_tokenizer.decode(zimage_tokenizer(prompt).input_ids) == prompt


@pytest.mark.parametrize("prompt", COMMON_PROMPTS)
def test_qwen_image_ids_match_reference(qwen_image_tokenizer, reference_tokenizer, prompt):
    assert qwen_image_tokenizer(prompt).input_ids == reference_tokenizer(prompt).input_ids


def test_qwen_image_has_no_qwen3_tokens(qwen_image_tokenizer):
    ids = qwen_image_tokenizer("<think>").input_ids
    assert len(ids) > 1 and max(ids) < 151643


@pytest.mark.parametrize("content", ["a cat", "一只猫 🐱", "", "line 1\nline 2 <think>"])
def test_zimage_chat_template(zimage_tokenizer, content):
    rendered = zimage_tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
    )
    assert rendered == f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def test_bundled_load_is_offline_fast_and_cached(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the bundled tokenizers must not use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    clear_tokenizer_cache()
    try:
        for arch in ("qwen_image", "zimage"):
            start = time.perf_counter()
            tokenizer = load_tokenizer(arch)
            assert time.perf_counter() - start < 3.0
            assert load_tokenizer(arch) is tokenizer
            assert load_tokenizer(arch, None) is tokenizer
    finally:
        clear_tokenizer_cache()


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown architecture"):
        load_tokenizer("flux")


def test_override_local_folder(reference_tokenizer_dir, reference_tokenizer, tmp_path):
    tokenizer = load_tokenizer("zimage", str(reference_tokenizer_dir))
    assert tokenizer("你好 <think>").input_ids == reference_tokenizer("你好 <think>").input_ids
    # a model folder with a tokenizer/ sub-folder is accepted too
    (tmp_path / "tokenizer").symlink_to(reference_tokenizer_dir, target_is_directory=True)
    assert load_tokenizer("zimage", str(tmp_path))("a").input_ids == [64]


def test_override_missing_files(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(UserError) as info:
        load_tokenizer("qwen_image", str(tmp_path))
    message = str(info.value)
    assert "--tokenizer" in message and str(tmp_path) in message
    assert "tokenizer_config.json" in message and "merges.txt" in message


@pytest.mark.parametrize("value", ["./no/such/dir", "/no/such/dir", "~/no-such-tokenizer-dir", "nope"])
def test_override_missing_dir_is_not_a_hub_id(value):
    with pytest.raises(UserError, match="--tokenizer"):
        load_tokenizer("zimage", value)


def test_override_mistyped_local_path_is_not_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="--tokenizer models/tokenizr: no such directory"):
        load_tokenizer("qwen_image", "models/tokenizr")


def test_override_checks_the_chat_template(tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).symlink_to(BPE_DIR / name)
    (tmp_path / "tokenizer_config.json").write_bytes(
        (ASSET_DIR / "qwen2_5_vl" / "tokenizer_config.json").read_bytes()
    )
    assert len(load_tokenizer("qwen_image", str(tmp_path))) == 151665
    with pytest.raises(UserError, match="chat template"):
        load_tokenizer("zimage", str(tmp_path))


def test_parse_hub_id():
    assert parse_hub_id("Qwen/Qwen-Image") == ("Qwen/Qwen-Image", None)
    assert parse_hub_id("Qwen/Qwen-Image/tokenizer") == ("Qwen/Qwen-Image", "tokenizer")
    assert parse_hub_id("Tongyi-MAI/Z-Image-Turbo/tokenizer") == ("Tongyi-MAI/Z-Image-Turbo", "tokenizer")
    for bad in ("Qwen", "./Qwen/Qwen-Image", "/abs/path", "~/x/y", "a/../b", "a//b", "C:\\x\\y", "a/b c"):
        assert parse_hub_id(bad) is None, bad
