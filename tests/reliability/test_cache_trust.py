"""Caches and files we write: never delete what is not ours, never train on stale caches, ordinary modes."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
import torch

from tsumugi.testing.tiny_dataset import write_tiny_dataset
from tsumugi.zimage_cache_latents import main as zimage_latents
from tsumugi.zimage_cache_text_encoder_outputs import main as zimage_text
from tsumugi.zimage_train_network import main as zimage_train


def _cache_zimage(toml: Path, files: dict[str, Path], *extra: str) -> None:
    common = ["--dataset_config", str(toml), "--device", "cpu", *extra]
    assert zimage_latents([*common, "--vae", str(files["vae"])]) == 0
    assert zimage_text([*common, "--text_encoder", str(files["text_encoder"])]) == 0


def age_files(root: Path, seconds: int = 3600) -> None:
    """Give every file under ``root`` an mtime in the past, as a dataset older than its caches has."""
    ns = time.time_ns() - seconds * 10**9
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(ns, ns))


def _without_cache_directory(toml: Path) -> Path:
    """The dataset TOML with ``cache_directory`` removed: caches go beside the images."""
    lines = [line for line in toml.read_text().splitlines() if not line.startswith("cache_directory")]
    toml.write_text("\n".join(lines) + "\n")
    return toml


def write_real_lora(path: Path) -> Path:
    """A Z-Image LoRA as the trainer saves it (tiny DiT, real network, real metadata)."""
    from diffusers import ZImageTransformer2DModel

    from tsumugi.networks.lora_save import save_lora
    from tsumugi.networks.lora_zimage import create_network
    from tsumugi.testing.tiny_configs import tiny_zimage_dit_config

    torch.manual_seed(0)
    dit = ZImageTransformer2DModel(**tiny_zimage_dit_config())
    network = create_network(dit, 4, 1.0, None, None)
    network.apply_to()
    return save_lora(network, path, None, {"ss_network_module": "networks.lora_zimage", "ss_network_dim": "4"})


def test_orphan_removal_keeps_a_lora_named_like_a_cache(tiny_sets, tmp_path, caplog):
    """cache_directory omitted: caches live beside the images, and so may the user's LoRAs."""
    files = tiny_sets("zimage")
    toml = _without_cache_directory(write_tiny_dataset(tmp_path / "ds", 3))
    images = tmp_path / "ds/images"
    lora = write_real_lora(images / "style_zi.safetensors")
    te_lookalike = write_real_lora(images / "other_zi_te.safetensors")
    lora_bytes = lora.read_bytes()
    _cache_zimage(toml, files)
    orphan_latent = next(images.glob("img002_*_zi.safetensors"))
    orphan_text = images / "img002_zi_te.safetensors"
    assert orphan_latent.is_file() and orphan_text.is_file()
    for suffix in ("png", "txt"):
        (images / f"img002.{suffix}").unlink()
    with caplog.at_level("WARNING"):
        _cache_zimage(toml, files, "--skip_existing")
    assert not orphan_latent.exists() and not orphan_text.exists(), "real orphan caches are removed"
    assert lora.read_bytes() == lora_bytes and te_lookalike.is_file(), "a user's LoRA must survive"
    assert "style_zi.safetensors" in caplog.text and "not caches" in caplog.text


def test_is_our_cache_needs_architecture_metadata_and_cache_keys(tmp_path):
    from tsumugi.caching.cache_files import is_our_cache, latent_key, write_cache_file
    from tsumugi.caching.metadata import latent_metadata

    latent = torch.zeros(16, 8, 8)
    meta = latent_metadata("zi", (64, 64), (64, 64), "original", "vae", "fp", [])
    ours = tmp_path / "a_0064x0064_zi.safetensors"
    write_cache_file(ours, {latent_key(latent): latent}, meta)
    assert is_our_cache(ours, "zi", "latent")
    assert not is_our_cache(ours, "qi", "latent"), "another architecture is not a cache of this one"
    musubi_like = tmp_path / "b_0064x0064_zi.safetensors"  # Musubi's metadata only
    write_cache_file(musubi_like, {latent_key(latent): latent},
                     {"architecture": "z_image", "width": "64", "height": "64", "format_version": "1.0.1"})
    assert is_our_cache(musubi_like, "zi", "latent")
    foreign_keys = tmp_path / "c_0064x0064_zi.safetensors"
    write_cache_file(foreign_keys, {"lora_down.weight": latent}, meta)
    assert not is_our_cache(foreign_keys, "zi", "latent")
    not_safetensors = tmp_path / "d_0064x0064_zi.safetensors"
    not_safetensors.write_bytes(b"user data")
    assert not is_our_cache(not_safetensors, "zi", "latent")


# ---- files we write are ordinary files ----------------------------------------------------------------


def _modes(paths) -> dict[str, str]:
    return {str(p): oct(p.stat().st_mode & 0o777) for p in paths}


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_output_respects_the_umask(mask, tiny_sets, tmp_path):
    """LoRA, converted LoRA, merged model, caches, PNG, latent, state, checkpoint: 0666 & ~umask each."""
    from diffusers import ZImageTransformer2DModel
    from PIL import Image

    from tsumugi import convert_lora, merge_lora
    from tsumugi.cli.train_config_file import parse_train_args
    from tsumugi.cli.train_parser import build_train_parser
    from tsumugi.cli.train_validation import validate_train_args
    from tsumugi.models.dit_checkpoint import save_dit_checkpoint
    from tsumugi.sample.png_output import save_latent, save_png
    from tsumugi.testing.tiny_configs import tiny_zimage_dit_config
    from tsumugi.train.network_training import train_network

    files = tiny_sets("zimage")
    old = os.umask(mask)
    try:
        toml = write_tiny_dataset(tmp_path / "ds", 2, sizes=[(64, 64)])
        _cache_zimage(toml, files)
        out = tmp_path / "out"
        argv = ["--dit", str(files["dit"]), "--dataset_config", str(toml), "--network_module",
                "networks.lora_zimage", "--network_dim", "4", "--max_train_steps", "1", "--output_dir", str(out),
                "--output_name", "lora", "--mixed_precision", "no", "--save_state"]
        args = validate_train_args(parse_train_args(build_train_parser("zimage", network=True), argv), environ={})
        lora = train_network("zimage", args).path
        converted, merged = tmp_path / "conv.safetensors", tmp_path / "merged.safetensors"
        assert convert_lora.main(["--input", str(lora), "--output", str(converted), "--target", "other"]) == 0
        assert merge_lora.main(["--dit", str(files["dit"]), "--lora_weight", str(lora), "--save_merged_model",
                                str(merged), "--device", "cpu"]) == 0
        torch.manual_seed(0)
        checkpoint = save_dit_checkpoint(ZImageTransformer2DModel(**tiny_zimage_dit_config()),
                                         tmp_path / "ckpt.safetensors", dtype=None)
        png = save_png(Image.new("RGB", (16, 16)), tmp_path / "png", "image", {"seed": 1})
        latent = save_latent(torch.zeros(16, 2, 2), tmp_path / "png", "image", {"seed": "1"})
    finally:
        os.umask(old)
    caches = sorted((tmp_path / "ds/cache").glob("*.safetensors"))
    state = sorted(p for p in (out / "lora-state").rglob("*") if p.is_file())
    assert len(caches) == 4 and len(state) >= 4
    written = [lora, converted, merged, checkpoint, png, latent, *caches, *state]
    expected = oct(0o666 & ~mask)
    assert _modes(written) == {str(p): expected for p in written}


# ---- the stale-cache check covers everything that goes into an item ------------------------------------


def _train_argv(arch: str, toml: Path, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    module = {"qwen_image": "networks.lora_qwen_image", "zimage": "networks.lora_zimage"}[arch]
    return ["--dit", str(files["dit"]), "--dataset_config", str(toml), "--network_module", module,
            "--output_dir", str(out), "--output_name", "x", "--max_train_steps", "1", "--mixed_precision", "no",
            *extra]


def test_changed_control_image_refuses_training_until_recached(tiny_sets, tmp_path, capsys):
    """Edit: the latent cache holds control latents and the text cache VL embeddings of the controls."""
    from tsumugi.data.images import load_image
    from tsumugi.qwen_image_cache_latents import main as qwen_latents
    from tsumugi.qwen_image_cache_text_encoder_outputs import main as qwen_text
    from tsumugi.qwen_image_train_network import main as qwen_train

    files = tiny_sets("qwen_image")
    toml = write_tiny_dataset(tmp_path / "ds", 2, sizes=[(64, 48)], controls_per_item=2)
    age_files(tmp_path / "ds")  # else --skip_existing records the images' times in every cache (a rewrite)
    common = ["--dataset_config", str(toml), "--device", "cpu", "--model_version", "edit-2509"]
    assert qwen_latents([*common, "--vae", str(files["vae"])]) == 0
    assert qwen_text([*common, "--text_encoder", str(files["text_encoder"])]) == 0
    control = tmp_path / "ds/controls/img001_1.png"
    load_image(control).transpose(0).save(control)  # same size, new content
    argv = _train_argv("qwen_image", toml, files, tmp_path / "out", "--model_version", "edit-2509")
    assert qwen_train(argv) == 2
    err = capsys.readouterr().err
    assert "2 cache problem(s)" in err and "img000" not in err
    assert "latent cache img001_0064x0048_qie.safetensors is stale (controls was" in err
    assert "text-encoder cache img001_qie_te.safetensors is stale (controls was" in err
    assert "run qwen_image_cache_latents and qwen_image_cache_text_encoder_outputs" in err
    cache = tmp_path / "ds/cache"
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    assert qwen_latents([*common, "--vae", str(files["vae"]), "--skip_existing"]) == 0
    assert qwen_text([*common, "--text_encoder", str(files["text_encoder"]), "--skip_existing"]) == 0
    changed = sorted(p.name for p in cache.glob("*.safetensors") if p.stat().st_mtime_ns != before[p.name])
    assert changed == ["img001_0064x0048_qie.safetensors", "img001_qie_te.safetensors"]
    from tsumugi.caching.validate import check_caches
    from tsumugi.data.config import load_dataset_config

    assert len(check_caches(load_dataset_config(toml, architecture="qie"), "qie", "edit-2509", "qwen_image")[0]) == 2


@pytest.mark.parametrize(
    ("which", "key", "value", "expected"),
    [("latent", "format_version", "999", "'1.0.1'"), ("text", "architecture", "qwen_image", "'z_image'")],
)
def test_cache_of_another_format_or_architecture_is_refused(which, key, value, expected, tiny_sets, tmp_path,
                                                            capsys):
    from tsumugi.caching.cache_files import latent_key, read_cache_file, varlen_key, write_cache_file

    files = tiny_sets("zimage")
    toml = write_tiny_dataset(tmp_path / "ds", 1, sizes=[(64, 64)])
    _cache_zimage(toml, files)
    cache = tmp_path / "ds/cache"
    path = next(cache.glob("*_zi_te.safetensors" if which == "text" else "*_0064x0064_zi.safetensors"))
    tensors, meta = read_cache_file(path)
    stored = {latent_key(t) if name == "latents" else varlen_key(name, t): t for name, t in tensors.items()}
    write_cache_file(path, stored, {**meta, key: value})
    assert zimage_train(_train_argv("zimage", toml, files, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert str(path) in err and f"{key} is '{value}', expected {expected}" in err
    assert "run zimage_cache_latents and zimage_cache_text_encoder_outputs" in err
    _cache_zimage(toml, files, "--skip_existing")  # re-encodes the refused file
    assert read_cache_file(path)[1][key] != value


# ---- start-up cost ------------------------------------------------------------------------------------


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, whole chunk bytes) of a PNG, in order."""
    chunks, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunks.append((data[pos + 4 : pos + 8], data[pos : pos + 12 + length]))
        pos += 12 + length
    return chunks


@pytest.mark.parametrize("late", [False, True])
def test_header_probe_sees_png_exif_orientation_without_decoding(late, tmp_path):
    """Training start reads headers only; the size must still be the one after EXIF rotation, also when
    the eXIf chunk follows the pixel data (Pillow would decode the whole image to find it)."""
    from PIL import Image

    from tsumugi.data.images import load_image, probe_image

    path = tmp_path / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: width and height swap
    Image.new("RGB", (64, 32), (10, 20, 30)).save(path, exif=exif)
    data = path.read_bytes()
    chunks = _png_chunks(data)
    assert b"eXIf" in [kind for kind, _ in chunks]
    if late:
        ordered = [c for k, c in chunks if k not in (b"eXIf", b"IEND")]
        ordered += [c for k, c in chunks if k == b"eXIf"] + [c for k, c in chunks if k == b"IEND"]
        path.write_bytes(data[:8] + b"".join(ordered))
        assert "exif" not in Image.open(path).info  # Pillow does not see it from the header
    assert load_image(path).size == (32, 64)
    assert probe_image(path, decode=False).size == probe_image(path, decode=True).size == (32, 64)


# ---- captions: empty and too long ---------------------------------------------------------------------


def test_empty_captions_are_counted_at_caching_and_at_training_start(tiny_sets, tmp_path, caplog):
    files = tiny_sets("zimage")
    toml = write_tiny_dataset(tmp_path / "ds", 4, sizes=[(64, 64)])
    (tmp_path / "ds/images/img001.txt").write_text("")
    (tmp_path / "ds/images/img003.txt").write_text("  \n")
    with caplog.at_level("WARNING"):
        assert zimage_latents(["--dataset_config", str(toml), "--device", "cpu", "--vae", str(files["vae"])]) == 0
    message = "2 of 4 item(s) have an empty caption"
    assert message in caplog.text and "img001.png" in caplog.text and "img003.png" in caplog.text
    assert "img000.png" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert zimage_train(_train_argv("zimage", toml, files, tmp_path / "out")) == 2  # no text caches yet
    assert message in caplog.text


def test_captions_over_the_token_limit_are_counted_at_text_caching(tiny_sets, tmp_path, caplog):
    """The warning counts exactly the captions whose cached embedding was cut at the 512-token limit."""
    from tsumugi.caching.cache_files import read_cache_file

    files = tiny_sets("zimage")
    toml = write_tiny_dataset(tmp_path / "ds", 3, sizes=[(64, 64)])
    (tmp_path / "ds/images/img002.txt").write_text("a long caption " * 300)
    with caplog.at_level("WARNING"):
        assert zimage_text(["--dataset_config", str(toml), "--device", "cpu",
                            "--text_encoder", str(files["text_encoder"])]) == 0
    assert "1 caption(s) exceed the text encoder's limit of 512 tokens" in caplog.text
    assert "img002.png" in caplog.text and "img001.png" not in caplog.text
    lengths = {p.name: read_cache_file(p)[0]["llm_embed"].shape[0] for p in (tmp_path / "ds/cache").glob("*_te.*")}
    assert lengths["img002_zi_te.safetensors"] == 512 and max(lengths.values()) == 512
    assert sorted(lengths.values())[1] < 512


def test_qwen_image_token_limit_boundary():
    """Qwen-Image keeps 1024 tokens after its 34-token template prefix: 1024 prompt tokens fit, 1025 do not."""
    from tsumugi.arch import get_architecture
    from tsumugi.caching.text_cache import warn_truncated_captions
    from tsumugi.data.items import ImageItem
    from tsumugi.text.qwen_image_prompt import TEXT_TO_IMAGE_TEMPLATE

    arch = get_architecture("qwen_image")
    tokenizer = arch.load_tokenizer()
    overhead = len(tokenizer(TEXT_TO_IMAGE_TEMPLATE.template.format(""))["input_ids"])
    assert len(tokenizer(TEXT_TO_IMAGE_TEMPLATE.template.format(" a" * 10))["input_ids"]) == overhead + 10
    items = [ImageItem(Path(f"{n}.png"), " a" * n, (64, 64)) for n in (1024 - overhead + 34, 1024 - overhead + 35)]
    assert [i.image_path.name for i in warn_truncated_captions(arch, tokenizer, items, "original")] == [
        f"{1024 - overhead + 35}.png"]
    # Edit: items without control images are encoded with the same text-only template; with one, no limit
    assert [i.image_path.name for i in warn_truncated_captions(arch, tokenizer, items, "edit-2509")] == [
        f"{1024 - overhead + 35}.png"]
    with_control = [dataclasses.replace(i, control_paths=(Path("c.png"),)) for i in items]
    assert warn_truncated_captions(arch, tokenizer, with_control, "edit-2509") == []


def test_cache_check_runs_once_under_accelerate_launch(tiny_sets, tmp_path):
    """Two processes: the main one checks (one log line), the other waits for its verdict."""
    import socket
    import subprocess
    import sys

    files = tiny_sets("zimage")
    toml = write_tiny_dataset(tmp_path / "ds", 2, sizes=[(64, 64)])
    _cache_zimage(toml, files)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).resolve().parents[2] / "src/tsumugi/zimage_train_network.py"
    # torchrun sets WORLD_SIZE/RANK as accelerate launch does on GPUs; ACCELERATE_USE_CPU selects gloo
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(script), *_train_argv("zimage", toml, files, tmp_path / "out")]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("no attention flag given") == 2, "two processes log"
    assert (result.stdout + result.stderr).count("checked the caches of 2 item(s)") == 1
    (tmp_path / "ds/images/img001.txt").write_text("edited after caching")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count("checked the caches of 2 item(s)") == 1, output
    assert "img001" in output and "stale" in output
