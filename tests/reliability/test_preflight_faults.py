"""Faults injected before a run: each is refused (exit 2, one line naming the flag/file and what was
expected) before any model is loaded or any step runs; FIFOs are refused without hanging.

"No model loaded" is observed by counting calls of the loader's tensor-reading function
(``tsumugi.models.loader._load``, which every DiT, VAE and text encoder load goes through); "no step"
by the absence of any output file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tsumugi import (
    convert_lora,
    merge_lora,
    qwen_image_cache_latents,
    qwen_image_cache_text_encoder_outputs,
    qwen_image_generate_image,
    qwen_image_train_network,
)
from tsumugi.models import loader
from tsumugi.preflight import estimates, paths
from tsumugi.testing.tiny_dataset import write_tiny_dataset

REPO = Path(__file__).resolve().parents[2]


# ---- helpers -------------------------------------------------------------------------------------
@pytest.fixture
def loads(monkeypatch):
    """Names of the model files whose tensors were read (every DiT/VAE/text-encoder load)."""
    seen: list[str] = []
    real = loader._load

    def spy(det, kind, **kwargs):
        seen.append(kind)
        return real(det, kind, **kwargs)

    monkeypatch.setattr(loader, "_load", spy)
    monkeypatch.delenv(estimates.MEMORY_LIMIT_ENV, raising=False)
    return seen


def _mount(target: Path, options: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    return done.returncode == 0


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """An existing folder nobody can write in: a read-only tmpfs (root), else mode 0500 (non-root), else
    (root without mount) the write probe sees the EROFS a read-only mount gives."""
    target = tmp_path / "ro"
    if _mount(target, "ro,size=64k"):
        yield target
        _umount(target)
        return
    if os.geteuid() != 0:
        target.chmod(0o500)
        yield target
        target.chmod(0o700)
        return

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(paths, "tempfile", types.SimpleNamespace(mkstemp=refuse))
    yield target


@pytest.fixture
def full_dir(tmp_path, monkeypatch):
    """A folder on a tiny tmpfs filled until about 8 KiB are left (root), else a free-space reading of 8 KiB."""
    target = tmp_path / "full"
    if _mount(target, "size=256k"):
        filler = target / "filler"
        with open(filler, "wb") as f:
            with contextlib.suppress(OSError):
                while shutil.disk_usage(target).free > 8192:
                    f.write(b"\0" * 4096)
                    f.flush()
        yield target, True
        _umount(target)
        return
    monkeypatch.setattr(paths, "free_bytes", lambda folder: 8192)
    yield target, False


def _error_line(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    line = err[-1]
    assert line.startswith("error: ") and not any("Traceback" in e for e in err), err
    for needle in needles:
        assert needle in line, line
    return line


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _run_script(module: str, *argv: str) -> subprocess.CompletedProcess:
    """A console script in a child process: a hang is a failed test after 120 s, not a stuck suite."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", f"tsumugi.{module}", *map(str, argv)], capture_output=True,
                          text=True, timeout=120, env=env, cwd=REPO)


def _guarded(call, fifo: Path, timeout: float = 60):
    """``call()`` in this process, failing (not hanging) if it blocks on ``fifo``: after ``timeout`` a writer
    opens the FIFO, which releases a blocked reader."""
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("rc", call()), daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
        pytest.fail(f"blocked on the FIFO {fifo}")
    return result["rc"]


def _zimage_lora(path: Path) -> Path:
    """A small Z-Image LoRA in the diffusers/ComfyUI key layout."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module in ("layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.feed_forward.w1"):
        tensors[f"diffusion_model.{module}.lora_A.weight"] = torch.randn(4, 32, generator=g)
        tensors[f"diffusion_model.{module}.lora_B.weight"] = torch.randn(32, 4, generator=g)
    save_file(tensors, str(path))
    return path


def _truncated(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


# ---- generation ----------------------------------------------------------------------------------
def _gen_argv(files, out: Path, *extra) -> list[str]:
    return ["--dit", str(files["dit"]), "--vae", str(files["vae"]), "--text_encoder", str(files["text_encoder"]),
            "--device", "cpu", "--save_path", str(out), "--infer_steps", "1", "--seed", "3", *map(str, extra)]


def _generate(*argv) -> int:
    return qwen_image_generate_image.main([str(a) for a in argv])


def test_generate_read_only_save_path(tiny_sets, read_only_dir, loads, capsys):
    rc = _generate(*_gen_argv(tiny_sets("qwen_image"), read_only_dir, "--prompt", "a cat", "--image_size", 64, 64))
    _error_line(capsys, rc, "--save_path", str(read_only_dir), "expected a writable folder")
    assert loads == []


def test_generate_file_as_save_path(tiny_sets, tmp_path, loads, capsys):
    target = tmp_path / "out.png"
    target.write_bytes(b"not a folder")
    rc = _generate(*_gen_argv(tiny_sets("qwen_image"), target, "--prompt", "a cat", "--image_size", 64, 64))
    _error_line(capsys, rc, "--save_path", str(target), "is a regular file", "expected a folder")
    assert loads == []


def test_generate_warns_about_free_space_first(tiny_sets, full_dir, monkeypatch, caplog):
    """Warned before the text encoder loads; on the real full tmpfs the save then fails as warned."""
    target, real_filesystem = full_dir
    events: list[str] = []
    real = loader._load

    def spy(det, kind, **kwargs):
        events.append(f"load {kind}")
        return real(det, kind, **kwargs)

    class Recorder(logging.Handler):
        def emit(self, record):
            if record.levelno == logging.WARNING and "--save_path" in record.getMessage():
                events.append("warning: " + record.getMessage())

    monkeypatch.setattr(loader, "_load", spy)
    handler = Recorder()
    logging.getLogger("tsumugi").addHandler(handler)
    argv = _gen_argv(tiny_sets("qwen_image"), target, "--prompt", "a cat", "--image_size", 256, 256)
    try:
        if real_filesystem:
            with pytest.raises(OSError) as failure:
                _generate(*argv)
            assert failure.value.errno == errno.ENOSPC
        else:
            assert _generate(*argv) == 0
    finally:
        logging.getLogger("tsumugi").removeHandler(handler)
    assert events[0].startswith("warning: "), events
    assert str(target) in events[0] and "free, less than" in events[0] and "one image" in events[0]
    assert "load qwen2_5_vl" in events[1:]


def test_generate_wrong_family_lora(tiny_sets, tmp_path, loads, capsys):
    lora = _zimage_lora(tmp_path / "z_lora.safetensors")
    rc = _generate(*_gen_argv(tiny_sets("qwen_image"), tmp_path / "out", "--prompt", "a cat", "--image_size", 64, 64,
                              "--lora_weight", lora))
    _error_line(capsys, rc, "--lora_weight", str(lora), "Z-Image LoRA", "expected a Qwen-Image LoRA")
    assert loads == []


def test_generate_truncated_vae(tiny_sets, tmp_path, loads, capsys):
    files = dict(tiny_sets("qwen_image"))
    files["vae"] = _truncated(files["vae"], tmp_path / "vae.safetensors")
    rc = _generate(*_gen_argv(files, tmp_path / "out", "--prompt", "a cat", "--image_size", 64, 64))
    _error_line(capsys, rc, "--vae", str(files["vae"]), "truncated")
    assert loads == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("line", "needles"),
    [
        ("a cat --s 0", ["--s", "steps", ">= 1", "0"]),
        ("a cat --g nan", ["--g/--l", "finite", "nan"]),
        ("a cat --l inf", ["--g/--l", "finite", "inf"]),
        ("a cat --w -16 --h 64", ["--w", "> 0", "-16"]),
        ("a cat --fs 0", ["--fs", "> 0"]),
        ("--w 64 --h 64 --s 1", ["no prompt text"]),
        ("a cat --w 100000 --h 100000", ["100000x100000", "needs at least", estimates.MEMORY_LIMIT_ENV]),
    ],
)
def test_generate_bad_prompt_line(tiny_sets, tmp_path, loads, capsys, line, needles):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# first line is a comment\n{line}\n", encoding="utf-8")
    rc = _generate(*_gen_argv(tiny_sets("qwen_image"), tmp_path / "out", "--from_file", prompts))
    _error_line(capsys, rc, f"{prompts}:2", *needles)
    assert loads == []


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--guidance_scale", "nan"], ["--guidance_scale", "nan", ">= 0"]),
        (["--infer_steps", "0"], ["--infer_steps", ">= 1"]),
        (["--flow_shift", "-1"], ["--flow_shift", "> 0"]),
        (["--image_size", "65536", "65536"], ["--prompt", "65536x65536", "needs at least", "GiB"]),
    ],
)
def test_generate_bad_numeric_flag(tiny_sets, tmp_path, loads, capsys, extra, needles):
    argv = _gen_argv(tiny_sets("qwen_image"), tmp_path / "out", "--prompt", "a cat")
    if "--image_size" not in extra:
        argv += ["--image_size", "64", "64"]
    rc = _generate(*argv, *extra)
    _error_line(capsys, rc, *needles)
    assert loads == []


def test_generate_size_limit_override(tiny_sets, tmp_path, loads, capsys, monkeypatch):
    """The memory limit comes from the environment variable the message names."""
    monkeypatch.setenv(estimates.MEMORY_LIMIT_ENV, "0.001")
    rc = _generate(*_gen_argv(tiny_sets("qwen_image"), tmp_path / "out", "--prompt", "a cat", "--image_size", 64, 64))
    _error_line(capsys, rc, "64x64", f"{estimates.MEMORY_LIMIT_ENV}=0.001")
    assert loads == []


def test_generate_utf16_prompt_file_with_bom(tiny_sets, tmp_path, loads):
    """A UTF-16 file with a BOM (as Windows editors save "Unicode") is decoded: the image carries the text."""
    prompts = tmp_path / "prompts.txt"
    text = "# comment\r\nun café 猫 --w 64 --h 64 --d 5\r\n"
    prompts.write_bytes(text.encode("utf-16"))  # BOM + UTF-16-LE on this platform
    assert prompts.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff")
    out = tmp_path / "out"
    assert _generate(*_gen_argv(tiny_sets("qwen_image"), out, "--from_file", prompts)) == 0
    (png,) = out.glob("*.png")
    with Image.open(png) as image:
        assert image.text["prompt"] == "un café 猫"
        assert image.size == (64, 64)
    assert sorted(loads) == sorted(["qwen2_5_vl", "qwen_image_dit", "qwen_image_vae"])


def test_generate_invalid_utf8_names_offset(tiny_sets, tmp_path, loads, capsys):
    prompts = tmp_path / "prompts.txt"
    data = b"a cat\n" + b"a d\xe9g --w 64\n"
    prompts.write_bytes(data)
    offset = data.index(b"\xe9")
    rc = _generate(*_gen_argv(tiny_sets("qwen_image"), tmp_path / "out", "--from_file", prompts))
    _error_line(capsys, rc, "--from_file", str(prompts), f"offset {offset}", "0xe9", "UTF-8")
    assert loads == []


def test_generate_fifo_model_file_does_not_hang(tiny_sets, tmp_path):
    files = tiny_sets("qwen_image")
    fifo = _fifo(tmp_path / "dit.safetensors")
    done = _run_script("qwen_image_generate_image", "--dit", fifo, "--vae", files["vae"], "--text_encoder",
                       files["text_encoder"], "--prompt", "a cat", "--image_size", 64, 64, "--save_path",
                       tmp_path / "out", "--device", "cpu")
    assert done.returncode == 2, done.stderr
    assert f"error: --dit: {fifo} is a FIFO (named pipe); expected a regular safetensors file" in done.stderr


def test_generate_fifo_prompt_file_does_not_hang(tiny_sets, tmp_path):
    files = tiny_sets("qwen_image")
    fifo = _fifo(tmp_path / "prompts.txt")
    done = _run_script("qwen_image_generate_image", "--dit", files["dit"], "--vae", files["vae"], "--text_encoder",
                       files["text_encoder"], "--from_file", fifo, "--save_path", tmp_path / "out", "--device", "cpu")
    assert done.returncode == 2, done.stderr
    assert f"error: --from_file: {fifo} is a FIFO (named pipe); expected a regular prompt file (.txt, .toml or .json)" in done.stderr


# ---- training ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cached_qwen(tiny_sets, tmp_path_factory):
    """A cached 2-image Qwen-Image dataset and the tiny model files."""
    files = tiny_sets("qwen_image")
    toml = write_tiny_dataset(tmp_path_factory.mktemp("preflight_data"), count=2, sizes=[(64, 64)])
    common = ["--dataset_config", str(toml), "--device", "cpu"]
    assert qwen_image_cache_latents.main([*common, "--vae", str(files["vae"])]) == 0
    assert qwen_image_cache_text_encoder_outputs.main([*common, "--text_encoder", str(files["text_encoder"])]) == 0
    return toml, files


def _train_argv(cached, out: Path, *extra) -> list[str]:
    toml, files = cached
    return ["--dit", str(files["dit"]), "--dataset_config", str(toml), "--network_module", "networks.lora_qwen_image",
            "--network_dim", "4", "--learning_rate", "1e-3", "--max_train_steps", "2", "--output_dir", str(out),
            "--output_name", "lora", "--mixed_precision", "no", "--seed", "1", *map(str, extra)]


def _train(*argv) -> int:
    return qwen_image_train_network.main([str(a) for a in argv])


def _sample_args(cached, prompts: Path, vae: Path | None = None) -> list[str]:
    _, files = cached
    return ["--sample_prompts", str(prompts), "--sample_every_n_steps", "1", "--vae", str(vae or files["vae"]),
            "--text_encoder", str(files["text_encoder"])]


def test_train_with_utf16_sample_prompts_runs(cached_qwen, tmp_path, loads):
    """The control run: the same command as the fault tests below trains, samples and saves."""
    prompts = tmp_path / "samples.txt"
    prompts.write_bytes("une tâche --w 64 --h 64 --s 1 --d 2\n".encode("utf-16"))
    out = tmp_path / "out"
    assert _train(*_train_argv(cached_qwen, out), *_sample_args(cached_qwen, prompts)) == 0
    assert (out / "lora.safetensors").is_file()
    from tsumugi.preflight.models import check_model

    dit = check_model(cached_qwen[1]["dit"], "qwen_image", "dit", "--dit")
    written = (out / "lora.safetensors").stat().st_size
    assert written <= estimates.lora_save_bytes(dit, 4, torch.float32) <= 3 * written  # an upper bound, not wild
    samples = sorted((out / "sample").glob("*.png"))
    assert samples
    with Image.open(samples[0]) as image:
        assert image.text["prompt"] == "une tâche"
    assert "qwen_image_dit" in loads and "qwen_image_vae" in loads


def test_train_read_only_output_dir(cached_qwen, read_only_dir, loads, capsys):
    rc = _train(*_train_argv(cached_qwen, read_only_dir))
    _error_line(capsys, rc, "--output_dir", str(read_only_dir), "expected a writable folder")
    assert loads == []


def test_train_output_dir_below_read_only_mount(cached_qwen, read_only_dir, loads, capsys):
    target = read_only_dir / "run1"
    rc = _train(*_train_argv(cached_qwen, target))
    _error_line(capsys, rc, "--output_dir", str(target))
    assert loads == []


def test_train_file_as_output_dir(cached_qwen, tmp_path, loads, capsys):
    target = tmp_path / "output"
    target.write_text("a file")
    rc = _train(*_train_argv(cached_qwen, target))
    _error_line(capsys, rc, "--output_dir", str(target), "is a regular file", "expected a folder")
    assert loads == []


def test_train_file_as_logging_dir(cached_qwen, tmp_path, loads, capsys):
    target = tmp_path / "logs"
    target.write_text("a file")
    rc = _train(*_train_argv(cached_qwen, tmp_path / "out"), "--logging_dir", target)
    _error_line(capsys, rc, "--logging_dir", str(target), "expected a folder")
    assert loads == [] and not (tmp_path / "out" / "lora.safetensors").exists()


def test_train_truncated_sample_vae(cached_qwen, tmp_path, loads, capsys):
    _, files = cached_qwen
    vae = _truncated(files["vae"], tmp_path / "vae_cut.safetensors")
    prompts = tmp_path / "samples.txt"
    prompts.write_text("a cat --w 64 --h 64 --s 1\n", encoding="utf-8")
    out = tmp_path / "out"
    rc = _train(*_train_argv(cached_qwen, out), *_sample_args(cached_qwen, prompts, vae))
    _error_line(capsys, rc, "--vae", str(vae), "truncated")
    assert loads == [] and not (out / "sample").exists() and not (out / "lora.safetensors").exists()


def test_train_dit_given_as_sample_vae(cached_qwen, tmp_path, loads, capsys):
    _, files = cached_qwen
    prompts = tmp_path / "samples.txt"
    prompts.write_text("a cat --w 64 --h 64 --s 1\n", encoding="utf-8")
    rc = _train(*_train_argv(cached_qwen, tmp_path / "out"), *_sample_args(cached_qwen, prompts, files["dit"]))
    _error_line(capsys, rc, "--vae", str(files["dit"]), "Qwen-Image DiT", "expected a Qwen-Image VAE")
    assert loads == []


def test_train_wrong_family_network_weights(cached_qwen, tmp_path, loads, capsys):
    lora = _zimage_lora(tmp_path / "z.safetensors")
    rc = _train(*_train_argv(cached_qwen, tmp_path / "out"), "--network_weights", lora)
    _error_line(capsys, rc, "--network_weights", str(lora), "Z-Image LoRA", "expected a Qwen-Image LoRA")
    assert loads == []


def test_train_wrong_family_base_weights(cached_qwen, tmp_path, loads, capsys):
    lora = _zimage_lora(tmp_path / "z.safetensors")
    rc = _train(*_train_argv(cached_qwen, tmp_path / "out"), "--base_weights", lora)
    _error_line(capsys, rc, "--base_weights", str(lora), "Z-Image LoRA")
    assert loads == []


@pytest.mark.parametrize(
    ("line", "needles"),
    [
        ("a cat --s 0", ["--s", ">= 1"]),
        ("a cat --l nan", ["--g/--l", "finite"]),
        ("--w 64 --h 64", ["no prompt text"]),
        ("a cat --w 65536 --h 65536", ["65536x65536", "needs at least"]),
    ],
)
def test_train_bad_sample_prompt_line(cached_qwen, tmp_path, loads, capsys, line, needles):
    prompts = tmp_path / "samples.txt"
    prompts.write_text(f"a dog --w 64 --h 64\n{line}\n", encoding="utf-8")
    out = tmp_path / "out"
    rc = _train(*_train_argv(cached_qwen, out), *_sample_args(cached_qwen, prompts))
    _error_line(capsys, rc, f"{prompts}:2", *needles)
    assert loads == [] and not (out / "lora.safetensors").exists()


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--learning_rate", "nan", ">= 0"), ("--max_grad_norm", "inf", ">= 0"), ("--discrete_flow_shift", "0", "> 0"),
    ("--network_alpha", "nan", "a finite number"),
])
def test_train_bad_numeric_flag(cached_qwen, tmp_path, loads, capsys, flag, value, expected):
    out = tmp_path / "out"
    rc = _train(*_train_argv(cached_qwen, out), flag, value)
    _error_line(capsys, rc, flag, value, expected)
    assert loads == [] and not out.exists()


def test_train_fifo_dataset_config_does_not_hang(cached_qwen, tmp_path):
    fifo = _fifo(tmp_path / "dataset.toml")
    argv = _train_argv(cached_qwen, tmp_path / "out")
    argv[argv.index("--dataset_config") + 1] = str(fifo)
    done = _run_script("qwen_image_train_network", *argv)
    assert done.returncode == 2, done.stderr
    assert f"error: --dataset_config: {fifo} is a FIFO (named pipe)" in done.stderr


@pytest.mark.parametrize("flag", ["--config_file", "--sample_prompts", "--network_weights", "--base_weights"])
def test_train_fifo_inputs_refused_in_process(cached_qwen, tmp_path, loads, capsys, flag):
    fifo = _fifo(tmp_path / ("in.toml" if flag == "--config_file" else "in.safetensors"))
    argv = _train_argv(cached_qwen, tmp_path / "out", flag, fifo)
    if flag == "--sample_prompts":
        argv += ["--vae", str(cached_qwen[1]["vae"])]
    rc = _guarded(lambda: _train(*argv), fifo)
    _error_line(capsys, rc, flag, str(fifo), "is a FIFO (named pipe); expected a regular")
    assert loads == []


def test_generate_fifo_lora_refused_in_process(tiny_sets, tmp_path, loads, capsys):
    fifo = _fifo(tmp_path / "lora.safetensors")
    argv = _gen_argv(tiny_sets("qwen_image"), tmp_path / "out", "--prompt", "a cat", "--image_size", 64, 64,
                     "--lora_weight", fifo)
    rc = _guarded(lambda: _generate(*argv), fifo)
    _error_line(capsys, rc, "--lora_weight", str(fifo), "is a FIFO (named pipe); expected a regular LoRA")
    assert loads == []


# ---- caching -------------------------------------------------------------------------------------
def test_cache_fifo_caption_and_image_do_not_hang(tiny_sets, tmp_path):
    files = tiny_sets("qwen_image")
    toml = write_tiny_dataset(tmp_path / "data", count=2, sizes=[(64, 64)])
    images = tmp_path / "data" / "images"
    caption = images / "img001.txt"
    caption.unlink()
    _fifo(caption)
    image = _fifo(images / "img009.png")
    (images / "img009.txt").write_text("a caption", encoding="utf-8")
    done = _run_script("qwen_image_cache_latents", "--dataset_config", toml, "--vae", files["vae"], "--device", "cpu")
    assert done.returncode == 2, done.stderr
    assert f"{caption}: caption is a FIFO (named pipe); expected a regular text file" in done.stderr
    assert f"{image}: image is a FIFO (named pipe); expected a regular image file" in done.stderr
    assert not (tmp_path / "data" / "cache").exists() or not any((tmp_path / "data" / "cache").iterdir())


def test_cache_read_only_cache_directory(tiny_sets, tmp_path, read_only_dir, loads, capsys):
    files = tiny_sets("qwen_image")
    toml = write_tiny_dataset(tmp_path / "data", count=2, sizes=[(64, 64)])
    toml.write_text(toml.read_text().replace(str(tmp_path / "data" / "cache"), str(read_only_dir)))
    rc = qwen_image_cache_latents.main(["--dataset_config", str(toml), "--vae", str(files["vae"]), "--device", "cpu"])
    _error_line(capsys, rc, "cache_directory", str(read_only_dir), "expected a writable folder")
    assert loads == []


def test_cache_text_encoder_wrong_file(tiny_sets, tmp_path, loads, capsys):
    files = tiny_sets("qwen_image")
    toml = write_tiny_dataset(tmp_path / "data", count=2, sizes=[(64, 64)])
    rc = qwen_image_cache_text_encoder_outputs.main(["--dataset_config", str(toml), "--text_encoder",
                                                     str(files["vae"]), "--device", "cpu"])
    _error_line(capsys, rc, "--text_encoder", str(files["vae"]), "expected a Qwen2.5-VL text encoder")
    assert loads == []


# ---- LoRA tools ----------------------------------------------------------------------------------
def test_merge_read_only_output(tiny_sets, read_only_dir, loads, capsys):
    files = tiny_sets("qwen_image")
    target = read_only_dir / "merged.safetensors"
    rc = merge_lora.main(["--dit", str(files["dit"]), "--save_merged_model", str(target)])
    _error_line(capsys, rc, "--save_merged_model", str(read_only_dir), "expected a writable folder")
    assert loads == []


def test_merge_wrong_family_lora(tiny_sets, tmp_path, loads, capsys):
    files = tiny_sets("qwen_image")
    lora = _zimage_lora(tmp_path / "z.safetensors")
    rc = merge_lora.main(["--dit", str(files["dit"]), "--lora_weight", str(lora), "--save_merged_model",
                          str(tmp_path / "m.safetensors")])
    _error_line(capsys, rc, "--lora_weight", str(lora), "Z-Image")
    assert loads == []


def test_convert_read_only_output(tmp_path, read_only_dir, capsys):
    lora = _zimage_lora(tmp_path / "z.safetensors")
    rc = convert_lora.main(["--input", str(lora), "--output", str(read_only_dir / "c.safetensors"),
                            "--target", "default"])
    _error_line(capsys, rc, "--output", str(read_only_dir), "expected a writable folder")


def test_estimates_against_written_files(tiny_sets, tmp_path):
    """Save-size estimates bound what is really written: a PNG of noise; the DiT file itself."""
    from tsumugi.preflight.models import check_model

    rng = np.random.default_rng(0)
    png = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(png)
    assert png.stat().st_size <= estimates.png_bytes(128, 96)
    path = Path(tiny_sets("qwen_image")["dit"])
    dit = check_model(path, "qwen_image", "dit", "--dit")
    assert path.stat().st_size <= estimates.dit_save_bytes(dit, None) <= 1.5 * path.stat().st_size


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be", "utf-8"])
def test_prompt_file_encodings_by_bom(tmp_path, encoding):
    """Each byte-order mark selects its codec (Python's codecs write the reference bytes)."""
    from tsumugi.sample.prompt_lines import read_prompt_file

    bom = {"utf-16-le": "\ufeff", "utf-16-be": "\ufeff", "utf-32-le": "\ufeff", "utf-32-be": "\ufeff"}.get(encoding, "")
    prompts = tmp_path / "p.txt"
    prompts.write_bytes((bom + "# note\nein Hund 犬 --w 64 --h 48 --s 2\n\nzweite Zeile\n").encode(encoding))
    lines = read_prompt_file(str(prompts))
    assert [(line.prompt, line.source) for line in lines] == [("ein Hund 犬", f"{prompts}:2"),
                                                               ("zweite Zeile", f"{prompts}:4")]
    assert (lines[0].width, lines[0].height, lines[0].steps) == (64, 48, 2)


def test_released_sizes_pass_the_memory_check(monkeypatch):
    """No false alarm at the families' native sizes on the CPU of this machine (or any with 8 GiB)."""
    monkeypatch.setenv(estimates.MEMORY_LIMIT_ENV, "8")
    estimates.check_image_memory("qwen_image", 1328, 1328, "cpu", "--image_size")
    estimates.check_image_memory("zimage", 1024, 1024, "cpu", "--image_size")
    estimates.check_image_memory("zimage", 2048, 2048, "cpu", "--image_size")
