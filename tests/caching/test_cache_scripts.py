"""The caching scripts end to end on tiny models and generated images."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tsumugi.arch import get_architecture
from tsumugi.caching.cache_files import read_cache_file
from tsumugi.caching.pixels import to_model_pixels
from tsumugi.data.buckets import resize_to_bucket
from tsumugi.data.images import load_image
from tsumugi.qwen_image_cache_latents import main as qwen_latents
from tsumugi.qwen_image_cache_text_encoder_outputs import main as qwen_text
from tsumugi.testing.tiny_dataset import write_tiny_dataset
from tsumugi.zimage_cache_latents import main as zimage_latents
from tsumugi.zimage_cache_text_encoder_outputs import main as zimage_text

SCRIPTS = {"qwen_image": (qwen_latents, qwen_text, "qi"), "zimage": (zimage_latents, zimage_text, "zi")}


def _cache(arch: str, toml: Path, files: dict[str, Path], *extra: str) -> None:
    latents, text, _ = SCRIPTS[arch]
    common = ["--dataset_config", str(toml), "--device", "cpu", *extra]
    assert latents([*common, "--vae", str(files["vae"])]) == 0
    assert text([*common, "--text_encoder", str(files["text_encoder"])]) == 0


def _tensors(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: read_cache_file(p)[0] for p in sorted(directory.glob("*.safetensors"))}


@pytest.mark.parametrize("arch", ["qwen_image", "zimage"])
def test_cached_latents_equal_direct_vae_encode(arch, tiny_sets, tmp_path):
    files = tiny_sets(arch)
    toml = write_tiny_dataset(tmp_path / "ds", 3, sizes=[(64, 48), (48, 80), (72, 64)])
    _cache(arch, toml, files, "--cache_dtype", "float32")
    code = SCRIPTS[arch][2]
    architecture = get_architecture(arch)
    vae = architecture.load_vae(str(files["vae"]), device="cpu")
    for image in sorted((tmp_path / "ds/images").glob("*.png")):
        (cache,) = (tmp_path / "ds/cache").glob(f"{image.stem}_*_{code}.safetensors")
        width, height = load_image(image).size
        assert cache.name == f"{image.stem}_{width:04d}x{height:04d}_{code}.safetensors"
        tensors, meta = read_cache_file(cache)
        bucket = tuple(int(v) for v in meta["tsumugi.bucket"].split("x"))
        pixels = to_model_pixels(resize_to_bucket(load_image(image), bucket)).unsqueeze(0)
        with torch.no_grad():
            direct = architecture.encode_images_for_cache(vae, pixels)[0]
        assert torch.equal(tensors["latents"], direct)
        expected_shape = (16, 1, bucket[1] // 8, bucket[0] // 8) if arch == "qwen_image" else (16, bucket[1] // 8,
                                                                                              bucket[0] // 8)
        assert tuple(direct.shape) == expected_shape
        assert meta["architecture"] == ("qwen_image" if arch == "qwen_image" else "z_image")
        assert (meta["width"], meta["height"]) == (str(width), str(height))


def _reference_embeddings(arch: str, files: dict[str, Path], captions: list[str]) -> list[torch.Tensor]:
    """diffusers' own encode_prompt on the same encoder and tokenizer."""
    from diffusers import QwenImagePipeline, ZImagePipeline

    architecture = get_architecture(arch)
    encoder = architecture.load_text_encoder(str(files["text_encoder"]), dtype=torch.float32, device="cpu")
    tokenizer = architecture.load_tokenizer()
    if arch == "qwen_image":
        pipe = QwenImagePipeline(None, None, encoder, tokenizer, None)
        out = []
        for caption in captions:
            embeds, mask = pipe.encode_prompt(caption, device="cpu")
            out.append(embeds[0] if mask is None else embeds[0][mask[0].bool()])
        return out
    pipe = ZImagePipeline(None, None, encoder, tokenizer, None)
    return [pipe.encode_prompt(c, device="cpu", do_classifier_free_guidance=False)[0][0] for c in captions]


@pytest.mark.parametrize("arch", ["qwen_image", "zimage"])
def test_cached_text_embeddings_equal_diffusers_encode_prompt(arch, tiny_sets, tmp_path):
    files = tiny_sets(arch)
    toml = write_tiny_dataset(tmp_path / "ds", 3, batch_size=3)
    (tmp_path / "ds/images/img001.txt").write_text("a much longer caption " * 8)
    _cache(arch, toml, files, "--cache_dtype", "float32")
    code = SCRIPTS[arch][2]
    captions = [p.read_text().strip() for p in sorted((tmp_path / "ds/images").glob("*.txt"))]
    reference = _reference_embeddings(arch, files, captions)
    for i, expected in enumerate(reference):
        tensors, meta = read_cache_file(tmp_path / f"ds/cache/img{i:03d}_{code}_te.safetensors")
        name = "vl_embed" if arch == "qwen_image" else "llm_embed"
        assert meta["caption1"] == captions[i]
        torch.testing.assert_close(tensors[name], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen_image", "zimage"])
def test_batch_of_n_equals_n_batches_of_one(arch, tiny_sets, tmp_path):
    files = tiny_sets(arch)
    sizes = [(64, 64)]
    one = write_tiny_dataset(tmp_path / "one", 4, sizes=sizes, batch_size=1)
    four = write_tiny_dataset(tmp_path / "four", 4, sizes=sizes, batch_size=4)
    (tmp_path / "one/images/img002.txt").write_text("short")
    (tmp_path / "four/images/img002.txt").write_text("short")
    _cache(arch, one, files, "--cache_dtype", "float32")  # the computation, before rounding to bf16
    _cache(arch, four, files, "--cache_dtype", "float32")
    a, b = _tensors(tmp_path / "one/cache"), _tensors(tmp_path / "four/cache")
    assert a.keys() == b.keys() and len(a) == 8
    for name in a:
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], rtol=1e-5, atol=1e-5)


# Musubi's cache dtypes (its cache writers store what its encoders output): the Qwen-Image VAE runs in the
# dtype of the released VAE file (bf16), the Z-Image VAE in float32, both text encoders in bf16.
MUSUBI_DTYPES = {("qwen_image", "latents"): "bfloat16", ("qwen_image", "vl_embed"): "bfloat16",
                 ("zimage", "latents"): "float32", ("zimage", "llm_embed"): "bfloat16"}


@pytest.mark.parametrize("arch", ["qwen_image", "zimage"])
def test_default_cache_dtypes_are_musubis_and_float32_stays_available(arch, tiny_sets, tmp_path):
    files = tiny_sets(arch)
    toml = write_tiny_dataset(tmp_path / "ds", 2, sizes=[(64, 48)])
    cache = tmp_path / "ds/cache"
    _cache(arch, toml, files, "--cache_dtype", "float32")
    full = {p.name: (read_cache_file(p), p.stat().st_size) for p in sorted(cache.glob("*.safetensors"))}
    _cache(arch, toml, files)
    default = {p.name: (read_cache_file(p), p.stat().st_size) for p in sorted(cache.glob("*.safetensors"))}
    assert full.keys() == default.keys() and len(full) == 4
    for name, ((tensors, meta), size) in default.items():
        (full_tensors, full_meta), full_size = full[name]
        with safe_open(str(cache / name), framework="pt") as f:
            (stored_key,) = f.keys()
        (batch_name,) = tensors
        expected = MUSUBI_DTYPES[(arch, batch_name)]
        assert stored_key.endswith("_" + expected), stored_key  # Musubi reads the dtype from the key
        assert tensors[batch_name].dtype == getattr(torch, expected)
        assert full_tensors[batch_name].dtype == torch.float32
        assert torch.equal(tensors[batch_name], full_tensors[batch_name].to(getattr(torch, expected)))
        if expected == "bfloat16":
            assert size < full_size * 0.75, (name, size, full_size)
        # the dtype is not part of the staleness metadata (stat tokens differ: the images were new the first time)
        assert {k: v for k, v in meta.items() if k != "tsumugi.stats"} == {
            k: v for k, v in full_meta.items() if k != "tsumugi.stats"}


def test_skip_existing_redoes_only_stale_items(tiny_sets, tmp_path, caplog):
    files = tiny_sets("zimage")
    toml = write_tiny_dataset(tmp_path / "ds", 3)
    ns = time.time_ns() - 3600 * 10**9  # images older than their caches: their times are recorded at once
    for path in (tmp_path / "ds/images").iterdir():
        os.utime(path, ns=(ns, ns))
    _cache("zimage", toml, files)
    cache = tmp_path / "ds/cache"
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    time.sleep(0.01)
    (tmp_path / "ds/images/img001.txt").write_text("a new caption")
    shutil.copy(tmp_path / "ds/images/img002.png", tmp_path / "ds/images/img000.png.tmpcopy")
    # same size, new content for img000: replace it by a flipped copy of itself
    image = load_image(tmp_path / "ds/images/img000.png").transpose(0)
    image.save(tmp_path / "ds/images/img000.png")
    (tmp_path / "ds/images/img000.png.tmpcopy").unlink()
    _cache("zimage", toml, files, "--skip_existing")
    after = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    changed = sorted(name for name in after if after[name] != before[name])
    assert changed == ["img000_0064x0048_zi.safetensors", "img001_zi_te.safetensors"]
    assert read_cache_file(cache / "img001_zi_te.safetensors")[1]["caption1"] == "a new caption"


def test_orphans_removed_unless_keep_cache(tiny_sets, tmp_path):
    files = tiny_sets("zimage")
    toml = write_tiny_dataset(tmp_path / "ds", 3)
    _cache("zimage", toml, files)
    for suffix in ("png", "txt"):
        (tmp_path / f"ds/images/img002.{suffix}").unlink()
    _cache("zimage", toml, files, "--skip_existing", "--keep_cache")
    assert len(list((tmp_path / "ds/cache").glob("img002*"))) == 2
    _cache("zimage", toml, files, "--skip_existing")
    assert list((tmp_path / "ds/cache").glob("img002*")) == []
    assert len(list((tmp_path / "ds/cache").glob("*.safetensors"))) == 4


def test_killed_run_resumes_with_skip_existing(tiny_sets, tmp_path):
    """SIGKILL mid-run leaves only complete files; --skip_existing then completes the cache exactly."""
    files = tiny_sets("qwen_image")
    sizes = [(64, 64), (64, 48)]
    killed = write_tiny_dataset(tmp_path / "killed", 12, sizes=sizes)
    clean = write_tiny_dataset(tmp_path / "clean", 12, sizes=sizes)
    cache = tmp_path / "killed/cache"
    command = [sys.executable, "-m", "tsumugi.qwen_image_cache_latents", "--dataset_config", str(killed),
               "--vae", str(files["vae"]), "--device", "cpu", "--num_workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(cache.glob("*_qi.safetensors"))) < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.005)
    process.kill()
    process.wait()
    done = sorted(cache.glob("*_qi.safetensors"))
    assert 3 <= len(done) < 12, "the run was not interrupted midway; the test proves nothing"
    for path in done:  # every file present is complete
        with safe_open(str(path), framework="pt") as f:
            assert len(list(f.keys())) == 1
    assert qwen_latents(command[3:] + ["--skip_existing"]) == 0
    assert qwen_latents(["--dataset_config", str(clean), "--vae", str(files["vae"]), "--device", "cpu"]) == 0
    assert list(cache.glob(".*")) == [], "temporary files must not survive"
    a, b = _tensors(cache), _tensors(tmp_path / "clean/cache")
    assert a.keys() == b.keys() and len(a) == 12
    for name in a:
        assert torch.equal(a[name]["latents"], b[name]["latents"])


def test_debug_mode_previews_without_caching(tmp_path, capsys):
    toml = write_tiny_dataset(tmp_path / "ds", 4)
    assert zimage_latents(["--dataset_config", str(toml), "--debug_mode", "image"]) == 0
    out = capsys.readouterr().out
    assert "datasets[0]" in out and "contact sheet" in out
    assert (tmp_path / "ds/cache/tsumugi_buckets_preview.png").is_file()
    assert list((tmp_path / "ds/cache").glob("*.safetensors")) == []


def test_qwen_vae_dtype_flag_is_refused(tiny_sets, tmp_path, capsys):
    toml = write_tiny_dataset(tmp_path / "ds", 1)
    files = tiny_sets("qwen_image")
    argv = ["--dataset_config", str(toml), "--vae", str(files["vae"]), "--vae_dtype", "bfloat16", "--device", "cpu"]
    assert qwen_latents(argv) == 2
    assert "--vae_dtype" in capsys.readouterr().err


@pytest.mark.parametrize("version", ["edit", "edit-2509"])
def test_edit_caches_controls_and_feeds_them_to_the_vl_encoder(version, tiny_sets, tmp_path):
    """Control latents = direct encode of the resized control; text = our edit encoder (itself equal to
    diffusers' edit pipelines, tests/text) on the VL-resized controls, in control order."""
    from tsumugi.caching.pixels import load_control
    from tsumugi.caching.validate import check_caches
    from tsumugi.data.buckets import vl_input_size
    from tsumugi.data.config import load_dataset_config
    from tsumugi.errors import UserError
    from tsumugi.text.qwen_image_edit_prompt import encode_qwen_image_edit_prompts

    files = tiny_sets("qwen_image")
    toml = write_tiny_dataset(tmp_path / "ds", 2, sizes=[(64, 48)], controls_per_item=2)
    _cache("qwen_image", toml, files, "--model_version", version, "--cache_dtype", "float32")
    arch = get_architecture("qwen_image")
    (dataset,) = load_dataset_config(toml, architecture="qie")
    vae = arch.load_vae(str(files["vae"]), device="cpu")
    encoder = arch.load_text_encoder(str(files["text_encoder"]), dtype=torch.float32, device="cpu")
    for item in dataset.items:
        (latent_file,) = (tmp_path / "ds/cache").glob(f"{item.cache_stem}_*_qie.safetensors")
        tensors, meta = read_cache_file(latent_file)
        bucket = tuple(int(v) for v in meta["tsumugi.bucket"].split("x"))
        controls = [load_control(p, bucket, dataset) for p in item.control_paths]
        assert len(controls) == 2 and sorted(k for k in tensors) == ["latents", "latents_control_0", "latents_control_1"]
        for j, control in enumerate(controls):
            with torch.no_grad():
                direct = arch.encode_images_for_cache(vae, to_model_pixels(control).unsqueeze(0))[0]
            assert torch.equal(tensors[f"latents_control_{j}"], direct)
        vl_images = [resize_to_bucket(c, vl_input_size(c.size)) for c in controls]
        expected = encode_qwen_image_edit_prompts(encoder, arch.load_tokenizer(), [item.caption], [vl_images],
                                                  version, "cpu", torch.float32)[0]
        text, text_meta = read_cache_file(tmp_path / f"ds/cache/{item.cache_stem}_qie_te.safetensors")
        torch.testing.assert_close(text["vl_embed"], expected, rtol=1e-5, atol=1e-5)
        assert text_meta["tsumugi.model_version"] == version
    other = "edit-2511" if version == "edit-2509" else "edit-2509"
    with pytest.raises(UserError, match=f"model_version was '{version}', now '{other}'"):
        check_caches([dataset], "qie", other, "qwen_image")
    assert len(check_caches([dataset], "qie", version, "qwen_image")[0]) == 2


def test_fp8_text_encoder_cache_is_close_to_full_precision(tiny_sets, tmp_path):
    files = tiny_sets("zimage")
    full = write_tiny_dataset(tmp_path / "full", 2)
    fp8 = write_tiny_dataset(tmp_path / "fp8", 2)
    common = ["--text_encoder", str(files["text_encoder"]), "--device", "cpu"]
    assert zimage_text(["--dataset_config", str(full), *common]) == 0
    assert zimage_text(["--dataset_config", str(fp8), *common, "--fp8_llm"]) == 0
    for name in ("img000_zi_te.safetensors", "img001_zi_te.safetensors"):
        a = read_cache_file(tmp_path / "full/cache" / name)[0]["llm_embed"]
        b, meta = read_cache_file(tmp_path / "fp8/cache" / name)
        relative = (b["llm_embed"] - a).norm() / a.norm()
        assert 0 < relative < 0.05, relative
        assert meta["tsumugi.text_encoder"].endswith(":fp8")
