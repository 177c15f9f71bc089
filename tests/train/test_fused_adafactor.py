"""Adafactor stepped inside the backward pass (--fused_backward_pass) and bf16 stochastic rounding."""

from __future__ import annotations

import copy
import io
import logging
import math

import pytest
import torch
from torch import nn
from transformers.optimization import Adafactor

from tsumugi.errors import UserError
from tsumugi.train.fused_adafactor import (
    FusedBackwardStep,
    adafactor_lrs,
    adafactor_step_parameter,
    copy_stochastic_,
)

CONFIGS = {
    "default": {},
    "manual_lr": {"lr": 1e-3, "relative_step": False, "scale_parameter": False, "warmup_init": False},
    "beta1_wd": {"beta1": 0.9, "weight_decay": 0.01},
    "warmup_init": {"warmup_init": True, "clip_threshold": 0.5},
}


def _model(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))
    with torch.no_grad():  # LayerNorm starts at ones/zeros: make it move in a non-trivial way
        model[1].weight.add_(torch.randn(8) * 0.1)
    return model.to(dtype)


def _batches(n: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 4, generator=g).to(dtype), torch.randn(5, 3, generator=g).to(dtype)) for _ in range(n)]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x).float(), y.float())


def _lr_for(step: int, kwargs: dict) -> float | None:
    """A changing external LR (what a scheduler does between steps) when the group has one."""
    return None if kwargs.get("lr") is None else kwargs["lr"] * (step + 1)


def _train(kwargs: dict, *, fused: bool, steps: int = 3, accumulation: int = 1, model: nn.Module | None = None,
           optimizer: Adafactor | None = None, **fused_kwargs) -> tuple[nn.Module, Adafactor, list[float]]:
    model = model if model is not None else _model()
    optimizer = optimizer if optimizer is not None else Adafactor(model.parameters(), **kwargs)
    holder = FusedBackwardStep.attach(optimizer, accumulation_steps=accumulation, **fused_kwargs) if fused else None
    batches = _batches(steps * accumulation)
    losses = []
    for step in range(steps):
        if _lr_for(step, kwargs) is not None:
            for group in optimizer.param_groups:
                group["lr"] = _lr_for(step, kwargs)
        for micro in range(accumulation):
            loss = _loss(model, batches[step * accumulation + micro]) / accumulation
            losses.append(loss.item())
            if holder is not None:
                holder.begin_micro_batch(micro == accumulation - 1)
            loss.backward()
        if holder is None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            assert holder.num_stepped == holder.num_params == len(list(model.parameters()))
    if holder is not None:
        holder.remove()
    return model, optimizer, losses


def _assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def _assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].keys() == sb[key].keys(), key
        for name, value in sa[key].items():
            other = sb[key][name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), (key, name)
            else:
                assert value == other, (key, name)


# ---------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fused_matches_adafactor_step(config):
    kwargs = CONFIGS[config]
    ref_model, ref_opt, ref_losses = _train(kwargs, fused=False)
    model, opt, losses = _train(kwargs, fused=True)
    assert losses == ref_losses
    _assert_same_params(model, ref_model)
    _assert_same_state(opt, ref_opt)
    assert {len(s) for s in opt.state.values()} and all(s["step"] == 3 for s in opt.state.values())
    # both kinds of second moment are covered
    keys = {k for s in opt.state.values() for k in s}
    assert {"exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"} <= keys


def test_accumulation_matches_unfused():
    kwargs = CONFIGS["beta1_wd"]
    ref_model, ref_opt, ref_losses = _train(kwargs, fused=False, accumulation=2)
    model, opt, losses = _train(kwargs, fused=True, accumulation=2)
    assert losses == ref_losses
    _assert_same_params(model, ref_model)
    _assert_same_state(opt, ref_opt)


def test_every_param_steps_once_and_grads_are_freed():
    model = _model()
    opt = Adafactor(model.parameters())
    fused = FusedBackwardStep.attach(opt, accumulation_steps=2)
    params = list(model.parameters())
    batches = _batches(4)
    for step in range(2):
        fused.begin_micro_batch()  # automatic: first of 2
        assert not fused.last_micro_batch
        _loss(model, batches[2 * step]).backward()
        assert fused.num_stepped == 0
        assert all(p.grad is not None for p in params)  # accumulating
        assert all(len(opt.state[p]) == 0 or opt.state[p]["step"] == step for p in params)
        fused.last_micro_batch = True
        _loss(model, batches[2 * step + 1]).backward()
        assert fused.num_stepped == fused.num_params == len(params)
        assert all(p.grad is None for p in params)
        assert all(opt.state[p]["step"] == step + 1 for p in params)
    # what AdafactorSchedule.get_lr() would report if params[0].grad were still there
    assert adafactor_lrs(opt) == [float(Adafactor._get_lr(opt.param_groups[0], opt.state[params[0]]))]
    assert 0 < adafactor_lrs(opt)[0] < 1e-2
    assert adafactor_lrs(Adafactor(_model().parameters(), lr=3e-4, relative_step=False)) == [3e-4]
    fused.remove()
    before = [p.detach().clone() for p in params]
    _loss(model, batches[0]).backward()  # no hooks any more: plain gradients, no step
    assert all(p.grad is not None for p in params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_frozen_params_are_not_hooked():
    model = _model()
    model[0].weight.requires_grad_(False)
    opt = Adafactor(model.parameters())
    fused = FusedBackwardStep.attach(opt)
    fused.begin_micro_batch(True)
    _loss(model, _batches(1)[0]).backward()
    assert fused.num_params == fused.num_stepped == len(list(model.parameters())) - 1
    assert model[0].weight not in opt.state


def test_hook_misuse_is_loud():
    model = _model()
    fused = FusedBackwardStep.attach(Adafactor(model.parameters()))
    with pytest.raises(RuntimeError, match="begin_micro_batch"):
        _loss(model, _batches(1)[0]).backward()
    model.zero_grad(set_to_none=True)
    fused.begin_micro_batch(True)
    _loss(model, _batches(1)[0]).backward()
    with pytest.raises(RuntimeError, match="twice"):  # second backward without begin_micro_batch
        _loss(model, _batches(1)[0]).backward()


def test_attach_needs_adafactor():
    model = _model()
    with pytest.raises(UserError, match="AdaFactor"):
        FusedBackwardStep.attach(torch.optim.AdamW(model.parameters()))


def test_reduce_grad_and_per_tensor_clip(caplog):
    kwargs = CONFIGS["manual_lr"]
    max_norm = 0.05
    calls = []

    def reduce_grad(grad: torch.Tensor) -> torch.Tensor:
        calls.append(grad.shape)
        return grad * 0.5  # stands in for an all-reduce average

    # reference: reduce and clip each tensor on its own, then the normal step
    ref_model = _model()
    ref_opt = Adafactor(ref_model.parameters(), **kwargs)
    batches = _batches(4)
    for step in range(2):
        for micro in range(2):
            (_loss(ref_model, batches[2 * step + micro]) / 2).backward()
        for p in ref_model.parameters():
            p.grad = p.grad * 0.5
            torch.nn.utils.clip_grad_norm_([p], max_norm)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    model = _model()
    opt = Adafactor(model.parameters(), **kwargs)
    with caplog.at_level(logging.WARNING, logger="tsumugi.train.fused_adafactor"):
        fused = FusedBackwardStep.attach(opt, max_grad_norm=max_norm, reduce_grad=reduce_grad, accumulation_steps=2)
    assert sum("separately" in r.getMessage() for r in caplog.records) == 1
    for step in range(2):
        for micro in range(2):
            fused.begin_micro_batch()
            (_loss(model, batches[2 * step + micro]) / 2).backward()
    assert len(calls) == 2 * fused.num_params  # only on last micro-batches
    _assert_same_params(model, ref_model)
    _assert_same_state(opt, ref_opt)


# ---------------------------------------------------------------------------------------------- state / swap


def test_state_dict_round_trip_and_plain_step_interop():
    kwargs = CONFIGS["beta1_wd"]
    batches = _batches(4)
    full_model, full_opt, _ = _train(kwargs, fused=True, steps=4)

    model, opt, _ = _train(kwargs, fused=True, steps=2)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed = _model()
    resumed.load_state_dict(saved["model"])
    resumed_opt = Adafactor(resumed.parameters(), **kwargs)
    fused = FusedBackwardStep.attach(resumed_opt)  # attach before load: groups are looked up at hook time
    resumed_opt.load_state_dict(saved["opt"])
    for batch in batches[2:]:
        fused.begin_micro_batch(True)
        _loss(resumed, batch).backward()
    _assert_same_params(resumed, full_model)
    _assert_same_state(resumed_opt, full_opt)

    # fused steps, then a normal optimizer.step(): same as normal steps throughout
    plain_model, plain_opt, _ = _train(kwargs, fused=False, steps=4)
    mixed_model, mixed_opt, _ = _train(kwargs, fused=True, steps=3)
    _loss(mixed_model, batches[3]).backward()
    mixed_opt.step()
    _assert_same_params(mixed_model, plain_model)
    _assert_same_state(mixed_opt, plain_opt)


def test_swapped_param_data_and_state_dtype():
    """Block swap re-points ``param.data``: the step must land on the current data and move its version."""
    kwargs = CONFIGS["default"]
    ref_model, ref_opt, _ = _train(kwargs, fused=False)
    model = _model()
    opt = Adafactor(model.parameters(), **kwargs)
    fused = FusedBackwardStep.attach(opt)
    params = list(model.parameters())
    masters = [p.data for p in params]
    for step, batch in enumerate(_batches(3)):
        copies = [m.clone() for m in masters]
        for p, c in zip(params, copies):
            p.data = c
        versions = [p._version for p in params]
        fused.begin_micro_batch(True)
        _loss(model, batch).backward()
        assert all(p._version != v for p, v in zip(params, versions))  # the swapper sees the change
        assert all(p.data_ptr() == c.data_ptr() for p, c in zip(params, copies))
        assert not any(torch.equal(c, m) for c, m in zip(copies, masters))  # the update went to the copy
        for p, m in zip(params, masters):
            m.copy_(p.data)
            p.data = m
        if step == 0:  # state cast elsewhere (as load_state_dict does for bf16 params) comes back as fp32
            for s in opt.state.values():
                for k, v in s.items():
                    if k.startswith("exp_avg"):
                        s[k] = v.double()
    _assert_same_params(model, ref_model)  # double state rounds back to the same fp32 values
    assert all(v.dtype == torch.float32 for s in opt.state.values() for k, v in s.items() if k.startswith("exp"))


# ---------------------------------------------------------------------------------------------- bf16


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 values just below and just above |x| (truncation and truncation + 1 ulp), as fp32."""
    bits = x.view(torch.int32)
    lo = (bits & -65536).view(torch.float32)
    hi = ((bits & -65536) + 65536).view(torch.float32)
    return lo, hi


def test_copy_stochastic_rounds_to_a_neighbour_without_bias():
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.rand(8, generator=g) + 1.0, -(torch.rand(8, generator=g) * 100 + 3),
                        torch.rand(8, generator=g) * 1e-3])
    draws = 4096
    source = values[:, None].expand(-1, draws).contiguous()
    target = torch.empty_like(source, dtype=torch.bfloat16)
    copy_stochastic_(target, source, torch.Generator().manual_seed(1))
    out = target.float()
    lo, hi = _neighbours(source)  # magnitude neighbours: lo is toward zero
    assert bool(((out == lo) | (out == hi)).all())
    p_up = (values.view(torch.int32) & 0xFFFF).double() / 65536  # exact probability of rounding away from 0
    frac_up = (out == hi).double().mean(dim=1)
    # binomial: |p_hat - p| <= 6 sigma (sigma = sqrt(p(1-p)/n)), +1/n slack for p near 0 or 1
    bound = 6 * torch.sqrt(p_up * (1 - p_up) / draws) + 1.0 / draws
    assert bool(((frac_up - p_up).abs() <= bound).all())
    # the mean approximates the fp32 value within the same bound expressed in ulps
    ulp = (hi - lo)[:, 0].double().abs()
    assert bool(((out.double().mean(dim=1) - values.double()).abs() <= bound * ulp).all())


def test_copy_stochastic_keeps_exact_values_and_is_seeded():
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 0.0078125, 3.0e38, -1.5e-38, float("inf"), -float("inf")])
    exact = exact.to(torch.bfloat16).float()
    source = exact[:, None].expand(-1, 256).contiguous()
    target = torch.empty_like(source, dtype=torch.bfloat16)
    copy_stochastic_(target, source)
    assert torch.equal(target.float(), source)
    assert torch.equal(target.float().view(torch.int32), source.view(torch.int32))  # -0.0 keeps its sign

    x = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    a, b = torch.empty_like(x, dtype=torch.bfloat16), torch.empty_like(x, dtype=torch.bfloat16)
    copy_stochastic_(a, x, torch.Generator().manual_seed(3))
    copy_stochastic_(b, x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    copy_stochastic_(b, x, torch.Generator().manual_seed(4))
    assert not torch.equal(a, b)
    with pytest.raises(TypeError):
        copy_stochastic_(torch.empty(3), x[:3])


def test_stochastic_rounding_accumulates_small_updates():
    n, steps, delta = 4096, 100, 1e-4
    nearest = torch.ones(n, dtype=torch.bfloat16)
    stochastic = torch.ones(n, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        nearest.copy_(nearest.float() + delta)
        copy_stochastic_(stochastic, stochastic.float() + delta, g)
    assert bool((nearest == 1.0).all())  # 1e-4 is below half a bf16 ulp (2**-8) at 1.0: always lost
    # per element: 100 Bernoulli(delta / ulp) steps of one ulp; std of the mean over n is ~1.4e-4
    assert stochastic.float().mean().item() == pytest.approx(1.0 + steps * delta, abs=1e-3)


def test_bf16_round_to_nearest_matches_transformers():
    kwargs = CONFIGS["beta1_wd"]
    ref = _model(torch.bfloat16)
    ref_opt = Adafactor(ref.parameters(), **kwargs)
    model = _model(torch.bfloat16)
    opt = Adafactor(model.parameters(), **kwargs)
    for batch in _batches(3, torch.bfloat16):
        _loss(ref, batch).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        _loss(model, batch).backward()
        for group in opt.param_groups:
            for p in group["params"]:
                adafactor_step_parameter(opt, p, group, stochastic_rounding=False)
                p.grad = None
    _assert_same_params(model, ref)
    _assert_same_state(opt, ref_opt)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_bf16_training_with_stochastic_rounding_learns_where_nearest_stalls():
    """Updates of ~lr = 1e-3 on weights near 1.0 are below half a bf16 ulp: round-to-nearest never moves."""
    g = torch.Generator().manual_seed(0)
    w0 = 1.0 + torch.rand(4, 8, generator=g) * 0.5
    target_w = w0 + 0.04 * torch.randn(4, 8, generator=g).sign()
    x = torch.randn(64, 8, generator=g)
    y = x @ target_w.T

    def run(stochastic: bool) -> tuple[float, float]:
        layer = nn.Linear(8, 4, bias=False).to(torch.bfloat16)
        with torch.no_grad():
            layer.weight.copy_(w0)
        opt = Adafactor(layer.parameters(), lr=1e-3, relative_step=False, scale_parameter=False)
        fused = FusedBackwardStep.attach(opt, generator=torch.Generator().manual_seed(1),
                                         stochastic_rounding=stochastic)

        def loss() -> torch.Tensor:
            return nn.functional.mse_loss(layer(x.to(torch.bfloat16)).float(), y)

        first = loss().item()
        for _ in range(50):
            fused.begin_micro_batch(True)
            loss().backward()
        return first, loss().item()

    first, nearest = run(stochastic=False)
    assert nearest == first
    first_sr, stochastic = run(stochastic=True)
    assert first_sr == first
    assert stochastic < 0.5 * first


def test_bf16_fused_state_is_fp32_and_deterministic():
    kwargs = CONFIGS["default"]
    results = []
    for _ in range(2):
        model = _model(torch.bfloat16)
        opt = Adafactor(model.parameters(), **kwargs)
        fused = FusedBackwardStep.attach(opt, generator=torch.Generator().manual_seed(5))
        for batch in _batches(2, torch.bfloat16):
            fused.begin_micro_batch(True)
            _loss(model, batch).backward()
        results.append(copy.deepcopy(model))
        assert all(v.dtype == torch.float32 for s in opt.state.values() for k, v in s.items() if k.startswith("exp"))
        assert all(math.isfinite(float(s["RMS"])) for s in opt.state.values())
    _assert_same_params(results[0], results[1])
