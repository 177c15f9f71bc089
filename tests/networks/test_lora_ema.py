"""lora_post_hoc_ema: the result is the closed-form weighted average of the checkpoints."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tsumugi import lora_post_hoc_ema
from tsumugi.networks.lora_ema import ema_weights, sigma_rel_to_gamma

N = 5
SRC = Path(__file__).resolve().parents[2] / "src"


def run(*args) -> int:
    return lora_post_hoc_ema.main([str(a) for a in args])


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


@pytest.fixture
def checkpoints(tmp_path):
    """N LoRA checkpoints (step 100..500) written newest name first, with mtimes in step order."""
    g = torch.Generator().manual_seed(0)
    files = []
    for i in range(N):
        sd = {
            "lora_unet_a.lora_down.weight": torch.randn(4, 8, generator=g),
            "lora_unet_a.lora_up.weight": torch.randn(8, 4, generator=g).to(torch.bfloat16),
            "lora_unet_a.alpha": torch.tensor(2.0),
        }
        # names sort against the step order; mtime and ss_steps follow it
        path = tmp_path / f"ckpt-{chr(ord('z') - i)}.safetensors"
        save_file(sd, str(path), {"ss_steps": str(100 * (i + 1)), "ss_network_dim": "4"})
        os.utime(path, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
        files.append((path, sd))
    return files


def _expect(files, weights):
    out = {}
    for key in ("lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight"):
        acc = sum(w * sd[key].double() for w, (_, sd) in zip(weights, files))
        out[key] = acc
    return out


def _check(path, files, weights, atol=1e-6):
    got, meta = read(path)
    want = _expect(files, weights)
    torch.testing.assert_close(got["lora_unet_a.lora_down.weight"].double(), want["lora_unet_a.lora_down.weight"],
                               rtol=0, atol=atol)
    assert got["lora_unet_a.lora_up.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(got["lora_unet_a.lora_up.weight"].double(), want["lora_unet_a.lora_up.weight"],
                               rtol=1e-2, atol=1e-2)
    assert float(got["lora_unet_a.alpha"]) == 2.0
    assert meta["ss_steps"] == str(100 * N)  # newest file's metadata
    assert "sshs_model_hash" in meta
    return meta


def test_constant_beta_closed_form(checkpoints, tmp_path):
    beta = 0.8
    out = tmp_path / "out" / "ema.safetensors"
    # given newest first: sorted by mtime
    assert run(*[p for p, _ in reversed(checkpoints)], "--beta", beta, "--output_file", out) == 0
    weights = [beta ** (N - 1)] + [(1 - beta) * beta ** (N - 1 - k) for k in range(1, N)]
    meta = _check(out, checkpoints, weights)
    assert json.loads(meta["tsumugi.post_hoc_ema"])["files"] == [p.name for p, _ in checkpoints]


def test_linear_beta_schedule(checkpoints, tmp_path):
    out = tmp_path / "ema.safetensors"
    assert run(*[p for p, _ in checkpoints], "--beta", 0.9, "--beta2", 0.5, "--sort_by", "step",
               "--output_file", out) == 0
    decays = [0.9 + (0.5 - 0.9) * i / (N - 2) for i in range(N - 1)]  # b_1 .. b_{N-1}
    weights = [math.prod(decays)] + [(1 - decays[k - 1]) * math.prod(decays[k:]) for k in range(1, N)]
    _check(out, checkpoints, weights)


def test_power_function_ema_closed_form(checkpoints, tmp_path):
    sigma_rel = 0.1
    gamma = sigma_rel_to_gamma(sigma_rel)
    # Karras et al.: sigma_rel = sqrt((g + 1) / ((g + 2)^2 (g + 3)))
    assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(sigma_rel, rel=1e-9)
    out = tmp_path / "ema.safetensors"
    shuffled = [checkpoints[i][0] for i in (2, 0, 4, 1, 3)]
    assert run(*shuffled, "--sigma_rel", sigma_rel, "--output_file", out) == 0
    p = gamma + 1  # telescoped product: w_k = (k^p - (k-1)^p) / (N-1)^p, the oldest file drops out
    weights = [0.0] + [(k**p - (k - 1) ** p) / (N - 1) ** p for k in range(1, N)]
    _check(out, checkpoints, weights)
    assert ema_weights([0.5]) == [0.5, 0.5]


def test_no_sort_keeps_the_given_order(checkpoints, tmp_path):
    out = tmp_path / "ema.safetensors"
    given = [checkpoints[i] for i in (1, 0)]
    assert run(*[p for p, _ in given], "--no_sort", "--beta", 0.25, "--output_file", out) == 0
    got, _ = read(out)
    want = 0.25 * given[0][1]["lora_unet_a.lora_down.weight"] + 0.75 * given[1][1]["lora_unet_a.lora_down.weight"]
    torch.testing.assert_close(got["lora_unet_a.lora_down.weight"], want)


def _error(capsys, rc):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err and err[-1].startswith("error: "), err
    return err[-1]


def test_bad_input_is_refused_by_name(checkpoints, tmp_path, capsys):
    a, b = checkpoints[0][0], checkpoints[1][0]
    out = tmp_path / "ema.safetensors"
    bad_alpha = tmp_path / "alpha.safetensors"
    sd = dict(checkpoints[2][1], **{"lora_unet_a.alpha": torch.tensor(3.0)})
    save_file(sd, str(bad_alpha))
    line = _error(capsys, run(a, bad_alpha, "--output_file", out))
    assert "alpha" in line and "alpha.safetensors" in line
    other = tmp_path / "other.safetensors"
    save_file({"lora_unet_b.lora_down.weight": torch.zeros(4, 8)}, str(other))
    assert "other.safetensors" in _error(capsys, run(a, other, "--output_file", out))
    assert "--beta" in _error(capsys, run(a, b, "--beta", 1.5, "--output_file", out))
    assert "--sigma_rel" in _error(capsys, run(a, b, "--sigma_rel", 0.5, "--output_file", out))
    assert "missing" in _error(capsys, run(a, tmp_path / "missing.safetensors", "--output_file", out))
    assert "--output_file" in _error(capsys, run(a, b, "--output_file", a))
    nostep = tmp_path / "final.safetensors"
    save_file(checkpoints[0][1], str(nostep))
    assert "--sort_by" in _error(capsys, run(a, nostep, "--sort_by", "step", "--output_file", out))
    assert not out.exists()


def test_entry_scripts_run_as_files(checkpoints, tmp_path):
    """``python src/tsumugi/<tool>.py`` works like the console scripts."""
    out = tmp_path / "ema.safetensors"
    files = [str(p) for p, _ in checkpoints]
    done = subprocess.run([sys.executable, str(SRC / "tsumugi" / "lora_post_hoc_ema.py"), *files, "--beta", "0.5",
                           "--output_file", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    weights = [0.5 ** (N - 1)] + [0.5 * 0.5 ** (N - 1 - k) for k in range(1, N)]
    _check(out, checkpoints, weights)
    for tool, needle in (("qwen_extract_lora", "--clamp_quantile"), ("caption_images_by_qwen_vl", "--fp8_vl")):
        done = subprocess.run([sys.executable, str(SRC / "tsumugi" / f"{tool}.py"), "--help"], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0 and needle in done.stdout, done.stderr
