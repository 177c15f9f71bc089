"""LoRANetwork: target sets, forward math, gradients, optimizer groups, weights loading, max-norm, merge."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from lora_helpers import QWEN, ZIMAGE, merged_copy, randomize_up

from tsumugi.errors import UserError
from tsumugi.networks.lora import LoRANetwork
from tsumugi.networks.lora_factory import module_dims_from_file
from tsumugi.networks.lora_save import save_lora

QWEN_BLOCK_MODULES = {
    "img_mod.1",
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_out.0",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mod.1",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
}
ZIMAGE_LAYER_MODULES = {
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
}


def make(arch, *args, **kwargs):
    dit = arch.make_dit()
    dit.requires_grad_(False)
    module = importlib.import_module(arch.network_module)
    if not args:
        args = (4, 2.0, None, None)
    network = module.create_network(dit, *args, **kwargs)
    return dit, network


def test_qwen_targets_match_musubi():
    _, net = make(QWEN)
    paths = [m.path for m in net.modules_list()]
    assert len(paths) == 14 * QWEN.n_blocks
    for b in range(QWEN.n_blocks):
        assert {
            p.removeprefix(f"transformer_blocks.{b}.")
            for p in paths
            if p.startswith(f"transformer_blocks.{b}.")
        } == (QWEN_BLOCK_MODULES)
    assert all(p.startswith("transformer_blocks.") for p in paths)
    assert "lora_unet_transformer_blocks_0_img_mod_1" in net.loras


def test_zimage_targets_main_layers_only():
    dit, net = make(ZIMAGE)
    paths = [m.path for m in net.modules_list()]
    assert len(paths) == 7 * ZIMAGE.n_blocks
    for b in range(ZIMAGE.n_blocks):
        assert {
            p.removeprefix(f"layers.{b}.") for p in paths if p.startswith(f"layers.{b}.")
        } == ZIMAGE_LAYER_MODULES
    assert not any("refiner" in p or "adaLN" in p for p in paths)
    # the refiners are the same block class, so they were candidates
    assert type(dit.noise_refiner[0]).__name__ == "ZImageTransformerBlock"


def test_exclude_and_include_patterns():
    _, net = make(QWEN, 4, 1.0, None, ["exclude_patterns=[r'.*_mod\\.1', r'.*txt_mlp.*']"])
    names = {m.path.split(".", 2)[2] for m in net.modules_list()}
    assert names == QWEN_BLOCK_MODULES - {"img_mod.1", "txt_mod.1", "txt_mlp.net.0.proj", "txt_mlp.net.2"}
    # include re-admits excluded modules only
    _, net = make(QWEN, 4, 1.0, None, ["exclude_patterns=[r'.*']", "include_patterns=[r'.*\\.attn\\.to_q']"])
    assert [m.path for m in net.modules_list()] == [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.1.attn.to_q",
    ]
    _, net = make(ZIMAGE, 4, 1.0, None, ["include_patterns=[r'.*noise_refiner.*to_q']"])
    assert "noise_refiner.0.attention.to_q" in [m.path for m in net.modules_list()]
    with pytest.raises(UserError, match="no modules"):
        make(ZIMAGE, 4, 1.0, None, ["exclude_patterns=['.*']"])


def test_lora_params_outside_dit_and_init(arch):
    dit, net = make(arch)
    dit_params = {id(p) for p in dit.parameters()}
    assert not any(id(p) in dit_params for p in net.parameters())
    n_dit = len(dit.state_dict())
    net.apply_to()
    assert len(dict(dit.named_modules())) == len(dict(arch.make_dit().named_modules()))
    assert len(dit.state_dict()) == n_dit
    for m in net.modules_list():
        assert m.lora_down.weight.dtype == torch.float32
        assert torch.count_nonzero(m.lora_up.weight) == 0
        bound = 1 / math.sqrt(m.base.in_features)  # kaiming_uniform(a=sqrt(5)) bound
        assert m.lora_down.weight.abs().max() <= bound + 1e-7
        assert m.lora_down.weight.abs().max() > bound * 0.5
        assert float(m.alpha) == 2.0 and m.scale == 0.5


def test_zero_up_is_exact_and_apply_remove(arch):
    dit, net = make(arch)
    inputs = arch.inputs(1)
    with torch.no_grad():
        base = arch.run(dit, inputs)
        net.apply_to()
        net.apply_to()  # idempotent
        assert torch.equal(arch.run(dit, inputs), base)
        randomize_up(net)
        changed = arch.run(dit, inputs)
        assert not torch.allclose(changed, base)
        net.remove()
        assert all("forward" not in m.base.__dict__ for m in net.modules_list())
        assert torch.equal(arch.run(dit, inputs), base)


def test_forward_equals_merged_weights(arch):
    dit, net = make(arch)
    randomize_up(net)
    net.set_multiplier(0.7)
    ref = merged_copy(dit, net)
    net.apply_to()
    inputs = arch.inputs(2)
    with torch.no_grad():
        got = arch.run(dit, inputs)
        want = arch.run(ref, inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # merge_into_base gives the same model and unwraps it
    assert net.merge_into_base() == len(net.loras)
    assert not net.applied
    for m in net.modules_list():
        torch.testing.assert_close(m.base.weight, ref.get_submodule(m.path).weight, rtol=0, atol=1e-6)


def test_bf16_base_output_dtype():
    dit, net = make(ZIMAGE)
    dit.to(torch.bfloat16)
    randomize_up(net)
    net.apply_to()
    lin = dit.get_submodule("layers.0.attention.to_q")
    x = torch.randn(3, lin.in_features, dtype=torch.bfloat16)
    y = lin(x)
    assert y.dtype == torch.bfloat16
    m = net.loras["lora_unet_layers_0_attention_to_q"]
    want = (torch.nn.functional.linear(x, lin.weight).float() + m.lora_output(x)).to(torch.bfloat16)
    assert torch.equal(y, want)


def test_gradients_only_into_lora(arch):
    dit, net = make(arch)
    randomize_up(net)
    net.apply_to()
    net.train()
    out = arch.run(dit, arch.inputs(1))
    out.square().mean().backward()
    assert all(p.grad is None for p in dit.parameters())
    # the text stream (queries and outputs) of the last Qwen block does not reach the output
    last = f"transformer_blocks.{QWEN.n_blocks - 1}."
    dead_names = ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")
    dead = {last + s for s in dead_names} if arch is QWEN else set()
    for m in net.modules_list():
        if m.path in dead:
            for p in (m.lora_down.weight, m.lora_up.weight):
                assert p.grad is None or not p.grad.any()
        else:
            assert m.lora_down.weight.grad.abs().sum() > 0 and m.lora_up.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_same_grads(arch):
    grads = []
    for checkpointing in (False, True):
        dit, net = make(arch)
        randomize_up(net)
        if checkpointing:
            dit.enable_gradient_checkpointing()
        dit.train()
        net.apply_to()
        net.train()
        arch.run(dit, arch.inputs(1)).square().mean().backward()
        grads.append([p.grad for p in net.parameters()])
    assert sum(g is not None for g in grads[1]) == sum(g is not None for g in grads[0]) > 0
    for a, b in zip(*grads):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_dropouts_training_only():
    dit, net = make(ZIMAGE, 4, 4.0, 0.5, ["rank_dropout=0.5", "module_dropout=0.5"])
    randomize_up(net)
    m = net.loras["lora_unet_layers_0_feed_forward_w1"]
    assert (m.dropout, m.rank_dropout, m.module_dropout) == (0.5, 0.5, 0.5)
    net.apply_to()
    lin = m.base
    x = torch.randn(2, 7, lin.in_features)
    x[1] = x[0]
    with torch.no_grad():
        net.eval()
        y_eval = lin(x)
        torch.testing.assert_close(y_eval[0], y_eval[1])
        net.train()
        torch.manual_seed(0)
        outs = [lin(x) for _ in range(20)]
    base = torch.nn.functional.linear(x, lin.weight, lin.bias)
    skipped = sum(torch.equal(o, base) for o in outs)
    assert 0 < skipped < 20  # module dropout skips some forwards, not all
    used = [o for o in outs if not torch.equal(o, base)]
    assert any(not torch.allclose(o[0], o[1]) for o in used)  # per-sample rank/neuron dropout


def test_rank_dropout_scaling():
    _, net = make(ZIMAGE, 8, 8.0, None, ["rank_dropout=0.25"])
    randomize_up(net)
    net.apply_to()
    m = net.loras["lora_unet_layers_1_feed_forward_w2"]
    x = torch.randn(4000, 1, m.base.in_features)
    net.train()
    torch.manual_seed(0)
    with torch.no_grad():
        h = torch.nn.functional.linear(x, m.lora_down.weight)
        out = m.lora_output(x)
        # each sample keeps a subset of ranks, rescaled by 1 / (1 - p)
        per_rank = torch.linalg.lstsq(m.lora_up.weight, out[0, 0].unsqueeze(1)).solution.squeeze(1)
        ratio = per_rank / (h[0, 0] * m.scale)
        kept = ratio.abs() > 0.5
        torch.testing.assert_close(ratio[kept], torch.full_like(ratio[kept], 1 / 0.75), rtol=1e-3, atol=1e-3)
        net.eval()
        torch.testing.assert_close(
            m.lora_output(x), torch.nn.functional.linear(h * m.scale, m.lora_up.weight)
        )


def test_loraplus_param_groups():
    _, net = make(QWEN, 4, 1.0, None, ["loraplus_lr_ratio=16"])
    groups = net.prepare_optimizer_params(1e-4)
    assert [g["name"] for g in groups] == ["unet", "unet plus"]
    assert groups[0]["lr"] == 1e-4 and groups[1]["lr"] == pytest.approx(1.6e-3)
    ups = {id(m.lora_up.weight) for m in net.modules_list()}
    assert {id(p) for p in groups[1]["params"]} == ups
    assert not any(id(p) in ups for p in groups[0]["params"])
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == 2 * len(net.loras)
    torch.optim.AdamW(groups)  # extra keys are accepted by torch optimizers
    plain = net.prepare_optimizer_params(1e-4, loraplus_lr_ratio=0)
    assert len(plain) == 1 and len(plain[0]["params"]) == 2 * len(net.loras)
    _, net = make(QWEN)
    assert len(net.prepare_optimizer_params(1e-3)) == 1
    assert [g["lr"] for g in net.prepare_optimizer_params(1e-3, loraplus_lr_ratio=4)] == [1e-3, 4e-3]


def test_max_norm():
    _, net = make(QWEN, 4, 2.0, None, None)
    randomize_up(net, std=1.0)
    with torch.no_grad():
        norms = {n: float(torch.linalg.matrix_norm(m.delta_weight())) for n, m in net.loras.items()}
    cap = sorted(norms.values())[len(norms) // 2]
    scaled, mean_norm, max_norm = net.apply_max_norm(cap)
    assert scaled == sum(v > cap for v in norms.values())
    assert max_norm == pytest.approx(cap)
    for n, m in net.loras.items():
        after = float(torch.linalg.matrix_norm(m.delta_weight().detach()))
        assert after == pytest.approx(min(norms[n], cap), rel=1e-4)
    assert mean_norm == pytest.approx(sum(min(v, cap) for v in norms.values()) / len(norms), rel=1e-4)


def test_load_weights_roundtrip_and_alpha_rescale(tmp_path):
    dit, net = make(ZIMAGE, 4, 2.0, None, None)
    randomize_up(net)
    deltas = {n: m.delta_weight() for n, m in net.loras.items()}
    for layout in ("musubi", "diffusion_model", "diffusers"):
        path = save_lora(net, tmp_path / f"{layout}.safetensors", layout)
        _, other = make(ZIMAGE, 4, 1.0, None, None)  # different alpha
        report = other.load_weights(path)
        assert sorted(report.loaded) == sorted(net.loras) and not report.unmatched_in_file
        assert not report.missing_from_file
        assert len(report.rescaled) == len(net.loras)
        for n, m in other.loras.items():
            torch.testing.assert_close(m.delta_weight(), deltas[n], rtol=1e-5, atol=1e-7)
    # same alpha: factors are loaded exactly
    _, same = make(ZIMAGE, 4, 2.0, None, None)
    report = same.load_weights(tmp_path / "musubi.safetensors")
    assert not report.rescaled
    for n, m in same.loras.items():
        assert torch.equal(m.lora_up.weight, net.loras[n].lora_up.weight)


def test_load_weights_partial_and_rank_mismatch(tmp_path):
    _, small = make(ZIMAGE, 4, 1.0, None, ["exclude_patterns=[r'.*feed_forward.*']"])
    path = save_lora(small, tmp_path / "attn.safetensors", "musubi")
    _, full = make(ZIMAGE, 4, 1.0, None, None)
    report = full.load_weights(path)
    assert len(report.loaded) == 8 and len(report.missing_from_file) == 6
    _, tiny = make(ZIMAGE, 4, 1.0, None, ["exclude_patterns=[r'.*(feed_forward|to_[kv]|to_out).*']"])
    report = tiny.load_weights(path)
    assert len(report.loaded) == 2 and len(report.unmatched_in_file) == 6
    _, wrong_rank = make(ZIMAGE, 8, 1.0, None, None)
    with pytest.raises(UserError, match="--dim_from_weights"):
        wrong_rank.load_weights(path)
    with pytest.raises(UserError, match="--network_weights"):
        full.load_weights(tmp_path / "missing.safetensors")


def test_dim_from_weights(tmp_path):
    _, src = make(QWEN, 6, 3.0, None, ["exclude_patterns=[r'.*txt_.*']"])
    randomize_up(src)
    path = save_lora(src, tmp_path / "src.safetensors")
    assert module_dims_from_file(path) == {n: (6, 3.0) for n in src.loras}
    from tsumugi.networks.lora_qwen_image import create_network

    dit = QWEN.make_dit()
    net = create_network(dit, None, None, None, None, dim_from_weights=path)
    assert set(net.loras) == set(src.loras)
    assert all(m.rank == 6 and float(m.alpha) == 3.0 for m in net.modules_list())
    net.load_weights(path)
    for n, m in net.loras.items():
        torch.testing.assert_close(m.delta_weight(), src.loras[n].delta_weight())
    # a diffusers file (alpha folded) gives alpha = rank
    diff = save_lora(src, tmp_path / "src_diffusers.safetensors", "diffusers")
    net2 = create_network(QWEN.make_dit(), 4, 1.0, None, None, dim_from_weights=diff)
    assert all(m.rank == 6 and float(m.alpha) == 6.0 for m in net2.modules_list())
    report = net2.load_weights(diff)
    assert not report.rescaled
    for n, m in net2.loras.items():
        torch.testing.assert_close(m.delta_weight(), src.loras[n].delta_weight(), rtol=1e-5, atol=1e-7)


def test_network_class_direct_use():
    from tsumugi.networks.lora_zimage import ZIMAGE_TARGET

    dit = ZIMAGE.make_dit()
    net = LoRANetwork(dit, ZIMAGE_TARGET, rank=2, alpha=None, exclude_patterns=ZIMAGE_TARGET.default_exclude)
    assert len(net.loras) == 14
    assert all(m.scale == 1.0 for m in net.modules_list())  # alpha None -> alpha = rank
