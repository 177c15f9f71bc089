"""qwen_extract_lora: SVD extraction recovers a known low-rank fine-tune, loads in diffusers, bad input refused."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from lora_helpers import QWEN, ZIMAGE

from tsumugi import qwen_extract_lora
from tsumugi.models.components import kind_for
from tsumugi.networks.lora import select_targets
from tsumugi.networks.lora_extract import clamp_threshold
from tsumugi.networks.lora_files import read_lora_file
from tsumugi.networks.lora_qwen_image import QWEN_IMAGE_TARGET
from tsumugi.networks.lora_zimage import ZIMAGE_TARGET
from tsumugi.testing.tiny_models import build_tiny, save_component

ARCHS = ("qwen_image", "zimage")
TRUE_RANK = 2


def _targets(arch: str, model: torch.nn.Module) -> list[str]:
    spec = QWEN_IMAGE_TARGET if arch == "qwen_image" else ZIMAGE_TARGET
    return [path for path, _ in select_targets(model, spec, exclude_patterns=spec.default_exclude)]


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    """(arch, base file (ComfyUI layout), tuned folder (diffusers layout), base model, tuned model, deltas).

    The tuned model is the base plus a known rank-2 delta on every LoRA target Linear.
    """
    arch = request.param
    kind = kind_for("dit", arch).name
    root = tmp_path_factory.mktemp(f"extract_{arch}")
    base = build_tiny(kind, 0)
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(5)
    known = {}
    with torch.no_grad():
        for path in _targets(arch, tuned):
            linear = tuned.get_submodule(path)
            up = torch.randn(linear.out_features, TRUE_RANK, generator=g) * 0.1
            down = torch.randn(TRUE_RANK, linear.in_features, generator=g) * 0.1
            known[path] = up @ down
            linear.weight += known[path]
    base_file = save_component(base, kind, "comfy", root / "base.safetensors")
    tuned_dir = save_component(tuned, kind, "diffusers", root / "tuned")
    return arch, base_file, tuned_dir, base, tuned, known


def run(*args) -> int:
    return qwen_extract_lora.main([str(a) for a in args])


def test_recovers_known_low_rank_delta(pair, tmp_path):
    arch, base_file, tuned_dir, _, _, known = pair
    out = tmp_path / "extracted.safetensors"
    assert run("--model_org", base_file, "--model_tuned", tuned_dir, "--save_to", out, "--dim", 4,
               "--clamp_quantile", 1) == 0
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["title"] == "extracted" and "sshs_model_hash" in meta
    modules = read_lora_file(out)
    names = {m.name.removeprefix("diffusion_model.") for m in modules}
    if arch == "qwen_image":  # Musubi layout by default
        assert names == {"lora_unet_" + p.replace(".", "_") for p in known}
    else:  # diffusion_model layout by default
        assert names == set(known)
    by_name = {m.name: m for m in modules}
    for path, delta in known.items():
        m = by_name[path] if arch == "zimage" else by_name["lora_unet_" + path.replace(".", "_")]
        assert m.rank == 4 and m.alpha == 4.0
        torch.testing.assert_close(m.delta(), delta, rtol=0, atol=2e-6)


def test_extracted_lora_loads_in_diffusers(pair, tmp_path):
    pytest.importorskip("peft")
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, ZImagePipeline
    from peft.tuners.lora import LoraLayer

    arch, base_file, tuned_dir, base, tuned, known = pair
    out = tmp_path / "extracted.safetensors"
    assert run("--model_org", base_file, "--model_tuned", tuned_dir, "--save_to", out, "--dim", 3,
               "--clamp_quantile", 1, "--save_precision", "fp32") == 0
    cls = QwenImagePipeline if arch == "qwen_image" else ZImagePipeline
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
               transformer=copy.deepcopy(base))
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("diffusers").addHandler(handler)
    try:
        pipe.load_lora_weights(str(out), adapter_name="extracted")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [m for m in messages if "unexpected" in m.lower() or "missing" in m.lower()], messages
    injected = {n for n, mod in pipe.transformer.named_modules() if isinstance(mod, LoraLayer)}
    assert injected == set(known)
    case = QWEN if arch == "qwen_image" else ZIMAGE
    inputs = case.inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(case.run(pipe.transformer, inputs), case.run(tuned, inputs),
                                   rtol=1e-4, atol=1e-4)


def test_clamp_quantile_and_formats(pair, tmp_path):
    arch, base_file, tuned_dir, _, _, known = pair
    out = tmp_path / "clamped.safetensors"
    assert run("--model_org", base_file, "--model_tuned", tuned_dir, "--save_to", out, "--dim", 2,
               "--clamp_quantile", 0.9, "--lora_format", "diffusers", "--save_precision", "bf16",
               "--no_metadata") == 0
    modules = read_lora_file(out)
    assert {m.name for m in modules} == set(known)  # diffusers layout: transformer.<path>
    clamped_any = False
    for m in modules:
        assert m.down.dtype == torch.bfloat16 and m.alpha is None
        # Recompute the unclamped factors independently and check the clamp (alpha folded: sqrt(1) = 1).
        u, s, vh = torch.linalg.svd(known[m.name], full_matrices=False)
        up, down = u[:, :2] * s[:2], vh[:2]
        flat = torch.cat([up.abs().flatten(), down.abs().flatten()])
        h = float(torch.quantile(flat, 0.9))
        assert clamp_threshold([up, down], 0.9) == pytest.approx(h, rel=1e-6)
        torch.testing.assert_close(m.up.float(), up.clamp(-h, h), rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(m.down.float(), down.clamp(-h, h), rtol=1e-2, atol=1e-3)
        clamped_any = clamped_any or bool((flat > h).any())
    assert clamped_any


def _error(capsys, rc: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err and err[-1].startswith("error: "), err
    return err[-1]


def test_bad_input_is_refused_by_name(pair, tmp_path, capsys):
    arch, base_file, tuned_dir, *_ = pair
    other = "zimage" if arch == "qwen_image" else "qwen_image"
    other_kind = kind_for("dit", other).name
    other_file = save_component(build_tiny(other_kind, 0), other_kind, "comfy", tmp_path / "other.safetensors")
    out = tmp_path / "x.safetensors"

    line = _error(capsys, run("--model_org", base_file, "--model_tuned", other_file, "--save_to", out))
    assert "--model_tuned" in line and str(other_file) in line
    line = _error(capsys, run("--model_org", tmp_path / "missing.safetensors", "--model_tuned", tuned_dir,
                              "--save_to", out))
    assert "--model_org" in line and "missing.safetensors" in line
    line = _error(capsys, run("--model_org", base_file, "--model_tuned", tuned_dir, "--save_to", tmp_path))
    assert "--save_to" in line
    line = _error(capsys, run("--model_org", base_file, "--model_tuned", tuned_dir, "--save_to", out,
                              "--clamp_quantile", 1.5))
    assert "--clamp_quantile" in line
    line = _error(capsys, run("--model_org", base_file, "--model_tuned", tuned_dir, "--save_to", out, "--dim", 0))
    assert "--dim" in line
    line = _error(capsys, run("--model_org", base_file, "--model_tuned", tuned_dir, "--save_to", out,
                              "--device", "gpu0"))
    assert "--device" in line and "gpu0" in line
    line = _error(capsys, run("--model_org", base_file, "--model_tuned", tuned_dir, "--save_to", base_file))
    assert "--save_to" in line and "input" in line
    assert not out.exists() and not list(Path(tmp_path).glob(".*tmp*"))


def test_reads_one_weight_per_file_at_a_time(pair, tmp_path, monkeypatch):
    """Streaming: tensors read from the checkpoints do not accumulate (at most the current and the previous
    weight of each file are alive when a new one is read), whatever the number of modules."""
    import weakref

    from tsumugi.models.safetensors_io import SafetensorsSource

    arch, base_file, tuned_dir, _, _, known = pair
    alive: list[weakref.ref] = []
    peak = 0
    reads = 0
    original = SafetensorsSource.get

    def tracking_get(self, key, dtype=None, device="cpu"):
        nonlocal peak, reads
        peak = max(peak, sum(r() is not None for r in alive))
        tensor = original(self, key, dtype, device)
        alive.append(weakref.ref(tensor))
        reads += 1
        return tensor

    monkeypatch.setattr(SafetensorsSource, "get", tracking_get)
    out = tmp_path / "streamed.safetensors"
    assert run("--model_org", base_file, "--model_tuned", tuned_dir, "--save_to", out, "--dim", 2) == 0
    assert reads >= len(known) >= 14  # (fused Z-Image q/k/v weights are read once for three modules)
    assert peak <= 4, peak
