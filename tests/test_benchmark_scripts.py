"""Smoke tests of the benchmark scripts: they run end to end at small size and print a result row.

The scripts are run as users run them (a subprocess per command) so that their argument handling,
imports from ``benchmarks/common.py`` and table output are covered, not only the library code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str) -> str:
    """Run ``benchmarks/<script>`` with ``args``; returns its stdout after checking the exit code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    )
    return proc.stdout


def table_rows(stdout: str) -> list[dict[str, str]]:
    """The rows of the markdown table printed last, keyed by header."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, f"no result table in:\n{stdout}"
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
            for line in lines[2:]]


def assert_positive_step(rows: list[dict[str, str]]) -> None:
    for row in rows:
        assert float(row["s/step"]) > 0, row


@pytest.mark.parametrize("arch", ["qwen_image", "zimage"])
def test_generate_step_runs(arch: str, tmp_path: Path) -> None:
    out = run_script("generate_step.py", "--arch", arch, "--size", "small", "--resolution", "128",
                     "--steps", "3", "--device", "cpu", "--workdir", str(tmp_path))
    rows = table_rows(out)
    assert [(r["arch"], r["resolution"], r["options"]) for r in rows] == [(arch, "128x128", "none")]
    assert rows[0]["CFG"] == ("on" if arch == "qwen_image" else "off")  # the families' defaults
    assert_positive_step(rows)


def test_generate_step_block_swap_inplace_weights(tmp_path: Path) -> None:
    """Block swap through the generate flag, with the random weights made in place (the release-size path)."""
    out = run_script("generate_step.py", "--arch", "zimage", "--size", "small", "--resolution", "128",
                     "--steps", "2", "--device", "cpu", "--blocks_to_swap", "1", "--weights", "inplace",
                     "--cfg", "on", "--workdir", str(tmp_path))
    rows = table_rows(out)
    assert [(r["options"], r["CFG"]) for r in rows] == [("--blocks_to_swap 1", "on")]
    assert_positive_step(rows)
    assert not list(tmp_path.iterdir())  # no DiT file written


def test_train_step_runs(tmp_path: Path) -> None:
    out = run_script("train_step.py", "--arch", "zimage", "--size", "small", "--resolution", "128",
                     "--steps", "2", "--workdir", str(tmp_path))
    rows = table_rows(out)
    assert [(r["arch"], r["resolution"]) for r in rows] == [("zimage", "128")]
    assert_positive_step(rows)


def test_startup_check_runs(tmp_path: Path) -> None:
    rows = table_rows(run_script("startup_check.py", "--images", "12", "--size", "32", "--repeats", "1",
                                 "--workdir", str(tmp_path)))
    assert [r["check"] for r in rows] == ["old", "new, cold", "new, warm"]
    assert all(float(r["wall s"]) > 0 for r in rows)


def test_release_memory_runs_and_reuses_its_file(tmp_path: Path) -> None:
    """The host-memory benchmark: the streamed write, then each mode in its own process; a second run
    reuses the file (no ``write`` row)."""
    args = ["--arch", "zimage", "--size", "small", "--blocks_to_swap", "1", "--resolution", "64",
            "--workdir", str(tmp_path)]
    rows = table_rows(run_script("release_memory.py", *args, "--modes", "bf16", "fp8_scaled+swap+step"))
    assert [r["mode"] for r in rows] == ["write", "bf16", "fp8_scaled+swap+step"]
    for row in rows:
        assert 0 < float(row["peak anon GiB"]) <= float(row["peak RSS GiB"]), row
        assert float(row["RSS / file"]) > 1  # at small size the interpreter and torch dwarf the file
    assert rows[1]["step s"] == "-" and float(rows[2]["step s"]) > 0
    assert rows[1]["target RSS / file"] == "<= 1.050" and rows[2]["target RSS / file"] == "<= 0.600"
    assert (tmp_path / "zimage_small" / "dit.safetensors").is_file()

    rows = table_rows(run_script("release_memory.py", *args, "--modes", "swap"))
    assert [r["mode"] for r in rows] == ["swap"]


@pytest.mark.parametrize("arch", ["qwen_image", "zimage"])
def test_streamed_random_dit_file_has_the_comfy_layout(arch: str, tmp_path: Path) -> None:
    """The benchmarks' streamed writer (no model held) writes the same keys, shapes and config as
    ``save_component`` of a built model (the layout comes from the real converter there, on the real
    tensors), and the real loader loads it."""
    from safetensors import safe_open

    from tsumugi.models.loader import load_dit
    from tsumugi.testing.tiny_models import build_random, save_component

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from common import dit_config, write_random_dit_file
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    component = {"qwen_image": "qwen_image_dit", "zimage": "zimage_dit"}[arch]
    config = dit_config(component, "tiny")
    streamed = write_random_dit_file(component, config, tmp_path / "streamed.safetensors")
    built = save_component(build_random(component, config), component, "comfy", tmp_path / "built.safetensors")

    def layout(path: Path) -> tuple[dict, dict]:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()

    (streamed_shapes, streamed_meta), (built_shapes, built_meta) = layout(streamed), layout(built)
    assert streamed_shapes == built_shapes
    assert streamed_meta.keys() == built_meta.keys()
    streamed_config, built_config = (json.loads(m["tsumugi.config"]) for m in (streamed_meta, built_meta))
    assert streamed_config.items() <= built_config.items()  # the built one adds the class defaults
    model = load_dit(streamed, arch, dtype=torch.float32)
    assert all(torch.isfinite(p).all() for p in model.parameters())
