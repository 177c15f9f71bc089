"""fp8 DiT weights (``--fp8_base`` / ``--fp8_scaled``): accuracy, kept modules, memory, LoRA composition.

Tiny DiTs get a deterministic init of the magnitude of large released DiT weights (std 0.01 on Linear
weights, where a plain e4m3 cast falls into subnormals and block scales pay off) and biases of std 0.5
(modulation gates of order one, so the transformer blocks visibly shape the output).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from tsumugi.errors import UserError
from tsumugi.memory import fp8_dit
from tsumugi.memory.fp8_dit import (
    FP8_DTYPE,
    Fp8DitLinear,
    dequantize_weight_fp8,
    fp8_memory_report,
    quantize_dit_fp8,
    quantize_weight_fp8,
)
from tsumugi.testing.tiny_configs import tiny_qwen_image_dit_config, tiny_zimage_dit_config

# Relative output error ||y_fp8 - y|| / ||y||, fp32 compute. Measured (torch 2.13 CPU):
#   qwen_image plain 6.23e-4, scaled 2.82e-4; zimage plain 1.87e-2, scaled 5.30e-3. Pinned ~1.5x above.
ERROR_BOUNDS = {
    "qwen_image": {"plain": 9.5e-4, "scaled": 4.3e-4},
    "zimage": {"plain": 2.8e-2, "scaled": 8.0e-3},
}

KEPT = {
    "qwen_image": [
        "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.timestep_embedder.linear_2",
        "img_in",
        "txt_in",
        "norm_out.linear",
        "proj_out",
    ],
    "zimage": [
        "all_x_embedder.2-1",
        "all_final_layer.2-1.linear",
        "all_final_layer.2-1.adaLN_modulation.1",
        "noise_refiner.0.adaLN_modulation.0",
        "t_embedder.mlp.0",
        "t_embedder.mlp.2",
        "cap_embedder.1",
        "layers.0.adaLN_modulation.0",
        "layers.1.adaLN_modulation.0",
    ],
}
QUANTIZED_COUNT = {
    "qwen_image": 28,
    "zimage": 28,
}  # 14 per Qwen block x 2; 7 per Z-Image block x (2 + 2 refiners)


def _init(dit: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in dit.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 0.01)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.5)
    return dit.to(dtype).eval()


def make_dit(arch: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from diffusers import QwenImageTransformer2DModel, ZImageTransformer2DModel

    if arch == "qwen_image":
        return _init(QwenImageTransformer2DModel(**tiny_qwen_image_dit_config()), dtype)
    return _init(ZImageTransformer2DModel(**tiny_zimage_dit_config()), dtype)


def make_inputs(arch: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    if arch == "qwen_image":
        return {
            "hidden_states": torch.randn(1, 16, 64, generator=g).to(dtype),
            "encoder_hidden_states": torch.randn(1, 5, 64, generator=g).to(dtype),
            "timestep": torch.full((1,), 0.4),
            "img_shapes": [[(1, 4, 4)]],
        }
    return {
        "x": [torch.randn(16, 1, 8, 8, generator=g).to(dtype)],
        "t": torch.full((1,), 0.6),
        "cap_feats": [torch.randn(5, 64, generator=g).to(dtype)],
    }


def run(arch: str, dit: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    if arch == "qwen_image":
        return dit(**inputs, return_dict=False)[0]
    return torch.stack(list(dit(inputs["x"], inputs["t"], inputs["cap_feats"], return_dict=False)[0]))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().float(), ref.detach().float()
    return float((y - ref).norm() / ref.norm())


def fp8_layers(dit: torch.nn.Module) -> dict[str, Fp8DitLinear]:
    return {n: m for n, m in dit.named_modules() if isinstance(m, Fp8DitLinear)}


def kept_linears(dit: torch.nn.Module) -> list[str]:
    return [
        n
        for n, m in dit.named_modules()
        if isinstance(m, torch.nn.Linear) and not isinstance(m, Fp8DitLinear)
    ]


ARCHS = ["qwen_image", "zimage"]


# ---------------------------------------------------------------------------------------------------
# Weight math


def test_weight_roundtrip_block_scales_beat_plain_cast() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 192, generator=g) * 0.01
    w[5, 7] = 0.5  # an outlier costs its own 64-block only
    q, scale = quantize_weight_fp8(w, scaled=True, block_size=64)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape and scale.shape == (96, 3, 1)
    scaled_err = rel_err(dequantize_weight_fp8(q, scale, torch.float32), w)
    q_row, s_row = quantize_weight_fp8(w, scaled=True, block_size=None)
    assert s_row.shape == (96, 1)
    q_plain, none = quantize_weight_fp8(w, scaled=False)
    assert none is None
    plain_err = rel_err(q_plain.float(), w)
    assert scaled_err < 0.03 < plain_err
    # in % block_size != 0 falls back to per-row scales; scales take the source dtype
    q2, s2 = quantize_weight_fp8(w[:, :100].to(torch.bfloat16), scaled=True, block_size=64)
    assert s2.shape == (96, 1) and s2.dtype == torch.bfloat16
    assert rel_err(dequantize_weight_fp8(q2, s2, torch.float32), w[:, :100]) < 0.04


# ---------------------------------------------------------------------------------------------------
# Whole DiT


@pytest.mark.parametrize("arch", ARCHS)
def test_kept_modules_are_exactly_the_listed_ones(arch: str) -> None:
    dit = make_dit(arch)
    norm_dtypes = {n: p.dtype for n, p in dit.named_parameters() if "norm" in n}
    names = quantize_dit_fp8(dit, arch, scaled=True)
    assert len(names) == QUANTIZED_COUNT[arch]
    assert kept_linears(dit) == KEPT[arch]
    for name, layer in fp8_layers(dit).items():
        assert layer.weight.dtype == FP8_DTYPE, name
        assert not layer.weight.requires_grad and (layer.bias is None or not layer.bias.requires_grad)
        assert layer.scale_weight is not None and layer.orig_dtype == torch.float32
        assert layer.bias is None or layer.bias.dtype == torch.float32
    assert {n: p.dtype for n, p in dit.named_parameters() if "norm" in n} == norm_dtypes
    assert all(
        p.dtype == torch.float32 for n, p in dit.named_parameters() if n.rpartition(".")[0] in KEPT[arch]
    )


def test_keep_modulation_option_qwen() -> None:
    dit = make_dit("qwen_image")
    names = quantize_dit_fp8(dit, "qwen_image", scaled=True, keep_modulation=True)
    assert len(names) == 24
    mods = [f"transformer_blocks.{i}.{m}_mod.1" for i in range(2) for m in ("img", "txt")]
    assert sorted(kept_linears(dit)) == sorted(KEPT["qwen_image"] + mods)


@pytest.mark.parametrize("arch", ARCHS)
def test_output_error_plain_and_scaled(arch: str) -> None:
    ref = make_dit(arch)
    inputs = make_inputs(arch)
    with torch.no_grad():
        y = run(arch, ref, inputs)
    errors = {}
    for mode in ("plain", "scaled"):
        dit = copy.deepcopy(ref)
        quantize_dit_fp8(dit, arch, scaled=mode == "scaled")
        with torch.no_grad():
            errors[mode] = rel_err(run(arch, dit, inputs), y)
    assert 0 < errors["plain"] < ERROR_BOUNDS[arch]["plain"], errors
    assert 0 < errors["scaled"] < ERROR_BOUNDS[arch]["scaled"], errors
    assert errors["scaled"] < errors["plain"]


@pytest.mark.parametrize("scaled", [False, True])
def test_linear_weight_memory_halves_vs_bf16(scaled: bool) -> None:
    dit = make_dit("qwen_image", torch.bfloat16)
    inputs = make_inputs("qwen_image", torch.bfloat16)
    quantize_dit_fp8(dit, "qwen_image", scaled=scaled)
    r = fp8_memory_report(dit)
    before = sum(m.weight.numel() * 2 for m in fp8_layers(dit).values())
    assert r["quantized_linears"] == 28 and r["linear_weight_bytes_before"] == before
    assert r["linear_weight_bytes_after"] - r["scale_bytes"] == before // 2
    if scaled:
        # one bf16 scale per 64 weights (per row where in % 64 != 0): < 3.2 % on top of the half
        assert 0 < r["scale_bytes"] <= before // 64
    else:
        assert r["scale_bytes"] == 0
    assert r["total_bytes_before"] - r["total_bytes_after"] == before - r["linear_weight_bytes_after"]
    # a later dit.to(dtype) must not upcast the fp8 weights (nor change the result)
    with torch.no_grad():
        y = run("qwen_image", dit, inputs)
        dit.to(torch.bfloat16)
        assert all(m.weight.dtype == FP8_DTYPE for m in fp8_layers(dit).values())
        assert torch.equal(run("qwen_image", dit, inputs), y)


def test_autocast_compute_dtype() -> None:
    dit = make_dit("zimage")
    quantize_dit_fp8(dit, "zimage", scaled=True)
    inputs = make_inputs("zimage")
    layer = dit.get_submodule("layers.0.attention.to_q")
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
        out = run("zimage", dit, inputs)
    assert torch.isfinite(out).all()


def test_rejects_prequantized_and_double_quantization() -> None:
    dit = make_dit("qwen_image")
    with torch.no_grad():
        layer = dit.get_submodule("transformer_blocks.0.attn.to_q")
        layer.weight.data = layer.weight.data.to(FP8_DTYPE)
    with pytest.raises(UserError, match="pre-quantized"):
        quantize_dit_fp8(dit, "qwen_image", scaled=True)
    dit = make_dit("zimage")
    quantize_dit_fp8(dit, "zimage", scaled=False)
    with pytest.raises(UserError, match="already quantized"):
        quantize_dit_fp8(dit, "zimage", scaled=True)
    with pytest.raises(ValueError, match="unknown architecture"):
        quantize_dit_fp8(dit, "flux", scaled=True)


def test_rejects_quantization_after_lora_is_applied() -> None:
    from tsumugi.networks.lora_qwen_image import create_network

    dit = make_dit("qwen_image")
    create_network(dit, 4, 4.0, None, None).apply_to()
    with pytest.raises(UserError, match="before applying a LoRA network"):
        quantize_dit_fp8(dit, "qwen_image", scaled=True)


# ---------------------------------------------------------------------------------------------------
# LoRA composition


def test_lora_merged_before_quantization() -> None:
    from tsumugi.networks.lora_files import LoraModule
    from tsumugi.networks.lora_merge import merge_lora_modules

    arch = "qwen_image"
    base = make_dit(arch)
    inputs = make_inputs(arch)
    g = torch.Generator().manual_seed(5)
    modules = [
        LoraModule(
            f"lora_unet_transformer_blocks_{i}_{n}",
            torch.randn(4, 64, generator=g),
            torch.randn(out, 4, generator=g) * 0.005,
            4.0,
        )
        for i in range(2)
        for n, out in (("attn_to_q", 64), ("img_mlp_net_0_proj", 256), ("img_mod_1", 384))
    ]
    merged = copy.deepcopy(base)
    assert merge_lora_modules(merged, modules, 1.0) == 6
    with torch.no_grad():
        y_merged = run(arch, merged, inputs)
        quantize_dit_fp8(merged, arch, scaled=True)
        y_merged_fp8 = run(arch, merged, inputs)
        quantize_dit_fp8(base, arch, scaled=True)
        y_base_fp8 = run(arch, base, inputs)
    err = rel_err(y_merged_fp8, y_merged)
    assert err < 5e-4  # measured 3.23e-4 (the merged weights are larger than the base ones)
    assert rel_err(y_base_fp8, y_merged) > 10 * err  # the merged update survives quantization


# Qwen-Image's last block writes a text stream nobody reads: the LoRAs that only feed it (text queries,
# text output projection, text MLP) get no gradient or a zero one.
DISCARDED_LORAS = {
    "qwen_image": {
        "lora_unet_transformer_blocks_1_attn_add_q_proj",
        "lora_unet_transformer_blocks_1_attn_to_add_out",
        "lora_unet_transformer_blocks_1_txt_mlp_net_0_proj",
        "lora_unet_transformer_blocks_1_txt_mlp_net_2",
    },
    "zimage": set(),
}


def _fp8_dit_with_lora(arch: str) -> tuple[torch.nn.Module, Any, dict[str, Any], torch.Tensor]:
    if arch == "qwen_image":
        from tsumugi.networks.lora_qwen_image import create_network
    else:
        from tsumugi.networks.lora_zimage import create_network

    torch.manual_seed(0)
    dit = make_dit(arch, torch.bfloat16)
    dit.requires_grad_(False)  # as the trainer does; the fp8 layers are frozen by quantization anyway
    inputs = make_inputs(arch, torch.bfloat16)
    quantize_dit_fp8(dit, arch, scaled=True)
    with torch.no_grad():
        y_fp8 = run(arch, dit, inputs)
    network = create_network(dit, 4, 4.0, None, None)
    network.apply_to()
    assert all(isinstance(m.base, Fp8DitLinear) for m in network.modules_list())
    assert all(m._org_forward.__func__ is Fp8DitLinear.forward for m in network.modules_list())
    return dit, network, inputs, y_fp8


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_gradients_reach_only_lora_params(arch: str) -> None:
    dit, network, inputs, y_fp8 = _fp8_dit_with_lora(arch)
    with torch.no_grad():
        for m in network.modules_list():
            m.lora_up.weight.normal_(0, 0.01)
    out = run(arch, dit, inputs)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    no_grad = {n.split(".")[1] for n, p in network.named_parameters() if p.grad is None or not p.grad.any()}
    assert no_grad == DISCARDED_LORAS[arch]
    assert all(p.grad is None for p in dit.parameters())


def test_lora_training_on_fp8_dit() -> None:
    arch = "qwen_image"
    dit, network, inputs, y_fp8 = _fp8_dit_with_lora(arch)
    target = torch.randn(y_fp8.shape, generator=torch.Generator().manual_seed(7))
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    network.train()
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(run(arch, dit, inputs).float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    # measured: 1.218 -> 1.137 (x 0.933); the output of the tiny DiT is mostly the unadapted embed/head path
    assert losses[-1] < 0.96 * losses[0], losses
    assert all(p.grad is None for p in dit.parameters())
    assert all(m.weight.dtype == FP8_DTYPE for m in fp8_layers(dit).values())

    # unwrapping restores the plain fp8 forward
    network.remove()
    assert all("forward" not in m.base.__dict__ for m in network.modules_list())
    with torch.no_grad():
        assert torch.equal(run(arch, dit, inputs), y_fp8)
    # a scaled fp8 weight cannot take a merge afterwards
    with pytest.raises(NotImplementedError):
        network.merge_into_base()


# ---------------------------------------------------------------------------------------------------
# _scaled_mm path (the real kernel runs on CPU in recent torch; the device gate is faked)


def _scaled_mm_available() -> bool:
    try:
        a = torch.ones(16, 16).to(FP8_DTYPE)
        torch._scaled_mm(
            a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16
        )
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


def _layer(block_size: int | None) -> Fp8DitLinear:
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
    return Fp8DitLinear.convert(linear, scaled=True, block_size=block_size, scaled_mm=True)


def test_cpu_never_uses_scaled_mm() -> None:
    layer = _layer(None)
    layer(torch.randn(2, 8, 128, dtype=torch.bfloat16))
    assert layer.scaled_mm_state is None


@pytest.mark.skipif(
    not _scaled_mm_available(), reason="torch._scaled_mm with row-wise scales not available on CPU"
)
def test_scaled_mm_path_self_check_and_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8_dit, "scaled_mm_device_ok", lambda device: True)
    x = torch.randn(2, 8, 128, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))

    layer = _layer(None)
    ref_x = x.clone().requires_grad_(True)
    ref = layer._forward_dequant(ref_x, torch.bfloat16)
    ref.float().square().sum().backward()
    fast_x = x.clone().requires_grad_(True)
    y = layer(fast_x)  # first call: self-check
    assert layer.scaled_mm_state is True
    y = layer(fast_x)
    assert y.shape == ref.shape and y.dtype == torch.bfloat16
    assert 0 < rel_err(y, ref) < fp8_dit.SCALED_MM_MAX_REL_ERROR
    y.float().square().sum().backward()
    assert rel_err(fast_x.grad, ref_x.grad) < 2 * fp8_dit.SCALED_MM_MAX_REL_ERROR

    # block-wise scales never take the path; a failed self-check falls back for good
    blockwise = _layer(64)
    blockwise(x)
    assert blockwise.scaled_mm_state is None
    monkeypatch.setattr(fp8_dit, "SCALED_MM_MAX_REL_ERROR", 0.0)
    failing = _layer(None)
    assert torch.equal(failing(x), failing._forward_dequant(x, torch.bfloat16))
    assert failing.scaled_mm_state is False


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("shape", [(300, 256), (37, 100)])
def test_quantizing_in_row_chunks_equals_the_whole_weight(monkeypatch, scaled, shape):
    """Scales are row-local, so quantizing a few rows at a time (to bound the float32 scratch while a
    model streams in) gives the bits of quantizing the whole weight at once."""
    from tsumugi.memory import fp8_dit

    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 5).to(torch.bfloat16)
    monkeypatch.setattr(fp8_dit, "_CHUNK_ELEMENTS", 1 << 40)
    whole_q, whole_scale = fp8_dit.quantize_weight_fp8(weight, scaled=scaled)
    monkeypatch.setattr(fp8_dit, "_CHUNK_ELEMENTS", 3 * shape[1] + 5)  # 3 rows a chunk, a short last one
    q, scale = fp8_dit.quantize_weight_fp8(weight, scaled=scaled)
    assert torch.equal(q.view(torch.uint8), whole_q.view(torch.uint8))
    assert (scale is None and whole_scale is None) or torch.equal(scale, whole_scale)
