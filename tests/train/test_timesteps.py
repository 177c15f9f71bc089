"""Timestep sampling, loss weights and flow-matching targets (docs/design.md, "Training loss")."""

from __future__ import annotations

import argparse
import logging
import math

import pytest
import torch

from tsumugi.arch.base import ImageGeometry
from tsumugi.errors import UserError
from tsumugi.train.loss_weighting import (
    flow_matching_target,
    loss_weights,
    noisy_input,
    schedule_sigmas,
    weighted_mse,
)
from tsumugi.train.timesteps import (
    TimestepBuckets,
    TimestepConfig,
    discrete_schedule,
    flux_shift_mu,
    model_timesteps,
    qwen_shift_mu,
    sample_sigmas,
    time_shift,
)

N = 100_000
QS = torch.tensor([0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95], dtype=torch.float64)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draw(n: int = N, num_tokens: int | None = 4096, seed: int = 0, **kwargs) -> torch.Tensor:
    return sample_sigmas(TimestepConfig(**kwargs), n, num_tokens, gen(seed)).double()


def quantiles(x: torch.Tensor) -> torch.Tensor:
    return torch.quantile(x.double(), QS)


def normal_q(q: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtri(q)


def shifted_sigmoid_quantiles(shift: float, scale: float = 1.0) -> torch.Tensor:
    """Closed-form quantiles of ``S(sig(scale*n), shift)`` (monotone in ``n``)."""
    return time_shift(torch.sigmoid(scale * normal_q(QS)), shift)


def is_multiple_of_milli(x: torch.Tensor) -> bool:
    return bool(((x * 1000) - torch.round(x * 1000)).abs().max() < 1e-3)


def logit(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x) - torch.log1p(-x)


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(x)


# ------------------------------------------------------------------------------------------ modes


def test_uniform_moments():
    s = draw(timestep_sampling="uniform")
    assert s.shape == (N,)
    assert abs(s.mean().item() - 0.5) < 0.01
    assert abs(s.std().item() - math.sqrt(1 / 12)) < 0.01
    assert s.min() >= 0 and s.max() < 1


def test_output_is_float32_of_batch_size():
    s = sample_sigmas(TimestepConfig(timestep_sampling="shift"), 7, None, gen())
    assert s.shape == (7,) and s.dtype == torch.float32


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_sigmoid_quantiles(scale):
    s = draw(timestep_sampling="sigmoid", sigmoid_scale=scale)
    assert torch.allclose(quantiles(s), shifted_sigmoid_quantiles(1.0, scale), atol=0.01)


def test_shift_median_and_quantiles():
    s = draw(timestep_sampling="shift", discrete_flow_shift=3.0)
    assert abs(s.median().item() - 0.75) < 0.01  # S(0.5, 3) = 0.75
    assert torch.allclose(quantiles(s), shifted_sigmoid_quantiles(3.0), atol=0.01)


def test_shift_mus_match_inference_table():
    # docs/design.md, Qwen-Image dynamic shift table: (tokens, mu)
    for tokens, mu in [(1024, 0.5387), (4096, 0.6935), (6889, 0.8343), (6032, 0.7911), (16384, 1.3129)]:
        assert abs(qwen_shift_mu(tokens) - mu) < 5e-4
    assert abs(math.exp(qwen_shift_mu(4096)) - 2.001) < 1e-3
    assert flux_shift_mu(256) == pytest.approx(0.5)
    assert flux_shift_mu(4096) == pytest.approx(1.15)


def test_qwen_shift_at_1024_equals_static_shift():
    tokens = ImageGeometry(height=1024, width=1024).num_tokens
    s = draw(timestep_sampling="qwen_shift", num_tokens=tokens)
    expected = shifted_sigmoid_quantiles(math.exp(0.6935))
    assert torch.allclose(quantiles(s), expected, atol=0.01)
    # a larger image shifts towards more noise
    s_big = draw(timestep_sampling="qwen_shift", num_tokens=16384)
    assert s_big.median() > s.median() + 0.1


def test_flux_shift_quantiles():
    s = draw(timestep_sampling="flux_shift", num_tokens=1024, sigmoid_scale=1.5)
    expected = shifted_sigmoid_quantiles(math.exp(flux_shift_mu(1024)), 1.5)
    assert torch.allclose(quantiles(s), expected, atol=0.01)


def test_logsnr_logit_moments():
    s = draw(timestep_sampling="logsnr", logit_mean=-6.0, logit_std=2.0)
    lg = logit(s)  # sigma = sig(-lambda/2) -> logit(sigma) = -lambda/2 ~ N(3, 1)
    assert abs(lg.mean().item() - 3.0) < 0.02
    assert abs(lg.std().item() - 1.0) < 0.02


def _shift_cdf(x: torch.Tensor, shift: float) -> torch.Tensor:
    t = x / (shift - (shift - 1) * x)  # inverse of S(., shift)
    return normal_cdf(logit(t))


def _logsnr_cdf(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return 1 - normal_cdf((-2 * logit(x) - mean) / std)


def _ecdf(s: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    return (s[None, :] <= xs[:, None]).double().mean(dim=1)


XS = torch.tensor([0.02, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)


def test_qinglong_qwen_mixture_cdf():
    s = draw(timestep_sampling="qinglong_qwen", num_tokens=4096)
    shift = math.exp(qwen_shift_mu(4096))
    expected = 0.95 * _shift_cdf(XS, shift) + 0.05 * _logsnr_cdf(XS, 5.36, 1.0)
    assert torch.allclose(_ecdf(s, XS), expected, atol=0.01)


def test_qinglong_flux_mixture_cdf():
    s = draw(timestep_sampling="qinglong_flux", num_tokens=1024, logit_mean=-2.0, logit_std=1.5)
    shift = math.exp(flux_shift_mu(1024))
    expected = (
        0.79 * _shift_cdf(XS, shift) + 0.11 * _logsnr_cdf(XS, -2.0, 1.5) + 0.10 * _logsnr_cdf(XS, 5.36, 1.0)
    )
    assert torch.allclose(_ecdf(s, XS), expected, atol=0.01)


def test_token_dependent_modes_need_num_tokens():
    with pytest.raises(ValueError, match="num_tokens"):
        sample_sigmas(TimestepConfig(timestep_sampling="qwen_shift"), 4, None, gen())


# ------------------------------------------------------------------------------------ sigma mode


def test_sigma_mode_default_matches_discrete_uniform():
    s = draw()
    assert is_multiple_of_milli(s)
    assert s.min() >= 0.001 - 1e-7 and s.max() <= 1.0 + 1e-7
    assert abs(s.mean().item() - 0.5005) < 0.01
    assert len(torch.unique(torch.round(s * 1000))) == 1000


def test_sigma_mode_range_is_not_inverted():
    s = draw(min_timestep=200, max_timestep=800)
    assert is_multiple_of_milli(s)
    assert s.min() >= 0.2 - 1e-6 and s.max() <= 0.8 + 1e-6
    ts = torch.round(s * 1000)
    assert ts.min() == 200 and ts.max() == 800
    assert abs(s.mean().item() - 0.5) < 0.01
    low = draw(min_timestep=0, max_timestep=300)
    assert low.max() <= 0.3 + 1e-6  # Musubi would select 700..1000 here


def test_sigma_mode_honours_discrete_flow_shift():
    s = draw(discrete_flow_shift=3.0)
    t = s / (3.0 - 2.0 * s) * 1000  # invert the shift: back on the integer grid
    assert ((t - torch.round(t)).abs() < 1e-2).all()
    assert abs(s.median().item() - 0.75) < 0.01
    sched = discrete_schedule(TimestepConfig(discrete_flow_shift=3.0))
    assert sched.numel() == 1000 and sched[0] == 1.0 and bool((sched[:-1] > sched[1:]).all())


def test_sigma_mode_shift_with_range_stays_in_range():
    s = draw(discrete_flow_shift=3.0, min_timestep=100, max_timestep=500)
    assert s.min() >= 0.1 - 1e-6 and s.max() <= 0.5 + 1e-6


def test_sigma_mode_weighting_densities():
    # logit_normal: u = sig(N(m, std)) picks schedule[floor(1000 u)] of the descending schedule -> sigma ~ 1 - u
    s = draw(weighting_scheme="logit_normal", logit_mean=1.0, logit_std=1.0)
    assert is_multiple_of_milli(s)
    assert abs(s.median().item() - (1 - torch.sigmoid(torch.tensor(1.0)).item())) < 0.01
    # mode: sigma ~ 1 - f(u), f decreasing -> P(sigma <= 1 - f(0.25)) = 0.25
    scale = 1.29
    f = 0.75 - scale * (math.cos(math.pi * 0.125) ** 2 - 0.75)
    s = draw(weighting_scheme="mode", mode_scale=scale)
    assert abs(torch.quantile(s, 0.25).item() - (1 - f)) < 0.01
    # sigma_sqrt / cosmap sample uniformly
    s = draw(weighting_scheme="cosmap")
    assert abs(s.mean().item() - 0.5) < 0.01


def test_sigma_mode_extreme_mode_scale_stays_on_grid():
    s = draw(weighting_scheme="mode", mode_scale=3.0)
    assert is_multiple_of_milli(s) and s.min() >= 0.001 - 1e-7 and s.max() <= 1 + 1e-7


# --------------------------------------------------------------------------------- range handling


def test_rescale_squeezes_distribution():
    s = draw(timestep_sampling="uniform", min_timestep=200, max_timestep=800)
    assert s.min() >= 0.2 and s.max() <= 0.8
    assert torch.allclose(quantiles(s), 0.2 + 0.6 * QS, atol=0.01)
    s = draw(timestep_sampling="shift", discrete_flow_shift=3.0, min_timestep=100, max_timestep=500)
    assert torch.allclose(quantiles(s), 0.1 + 0.4 * shifted_sigmoid_quantiles(3.0), atol=0.01)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(timestep_sampling="shift", discrete_flow_shift=3.0),
        dict(timestep_sampling="logsnr", logit_mean=-1.0, logit_std=2.0),
        dict(timestep_sampling="sigma", weighting_scheme="logit_normal"),
    ],
)
def test_rejection_preserves_shape(kwargs):
    lo, hi = 100, 400
    s = draw(n=20_000, min_timestep=lo, max_timestep=hi, preserve_distribution_shape=True, **kwargs)
    assert s.shape == (20_000,)
    assert s.min() >= lo / 1000 - 1e-6 and s.max() <= hi / 1000 + 1e-6
    full = draw(n=200_000, seed=1, **kwargs)
    truncated = full[(full >= lo / 1000) & (full <= hi / 1000)]
    assert torch.allclose(quantiles(s), quantiles(truncated), atol=0.01)


def test_rejection_gives_up_after_1000_rounds(caplog):
    cfg = TimestepConfig(
        timestep_sampling="logsnr",
        logit_mean=-6.0,
        logit_std=0.01,
        min_timestep=0,
        max_timestep=100,
        preserve_distribution_shape=True,
    )
    with caplog.at_level(logging.WARNING, logger="tsumugi.train.timesteps"):
        s = sample_sigmas(cfg, 4, None, gen())
    assert s.shape == (4,) and (s >= 0).all() and (s <= 0.1).all()
    assert "preserve_distribution_shape" in caplog.text


# ---------------------------------------------------------------------------------------- buckets


def _strata(buckets: TimestepBuckets, u: torch.Tensor) -> torch.Tensor:
    return torch.searchsorted(buckets.edges, u, right=True) - 1


def test_buckets_one_draw_per_stratum_per_round():
    b = TimestepBuckets(7)
    g = gen(3)
    u = torch.cat([b.draw(3, g) for _ in range(70)])  # 210 = 30 rounds, dealt in uneven chunks
    assert u.dtype == torch.float64 and (u >= 0).all() and (u < 1).all()
    rounds = _strata(b, u).view(30, 7)
    assert (rounds.sort(dim=1).values == torch.arange(7)).all()


def test_buckets_epoch_pool_counts_then_rounds():
    b = TimestepBuckets(4)
    g = gen(5)
    b.new_epoch(10, g)  # ceil(10/4) = 3 per stratum
    assert b.remaining == 12
    pool = b.draw(12, g)
    assert torch.bincount(_strata(b, pool), minlength=4).tolist() == [3, 3, 3, 3]
    assert b.remaining == 0
    more = _strata(b, b.draw(8, g)).view(2, 4)  # refilled on demand, one round at a time
    assert (more.sort(dim=1).values == torch.arange(4)).all()
    b.new_epoch(100, g)
    counts = torch.bincount(_strata(b, b.draw(100, g)), minlength=4)
    assert counts.tolist() == [25, 25, 25, 25]


def test_uniform_override_replaces_base_draws():
    b = TimestepBuckets(8)
    u = b.draw(8, gen(1))
    s = sample_sigmas(TimestepConfig(timestep_sampling="uniform"), 8, None, gen(), uniform_override=u)
    assert torch.equal(s, u.float())
    s = sample_sigmas(
        TimestepConfig(timestep_sampling="sigmoid", sigmoid_scale=2.0), 8, None, gen(), uniform_override=u
    )
    assert torch.allclose(s.double(), torch.sigmoid(2.0 * torch.special.ndtri(u)), atol=1e-6)
    # sigma mode: u indexes the descending schedule
    s = sample_sigmas(TimestepConfig(), 8, None, gen(), uniform_override=u)
    assert torch.allclose(s.double(), (1000 - torch.floor(u * 1000)) / 1000, atol=1e-6)
    with pytest.raises(ValueError):
        sample_sigmas(TimestepConfig(timestep_sampling="uniform"), 4, None, gen(), uniform_override=u)


def test_buckets_stratify_sampled_sigmas():
    b = TimestepBuckets(10)
    cfg = TimestepConfig(timestep_sampling="uniform")
    s = torch.cat([sample_sigmas(cfg, 5, None, gen(i), buckets=b) for i in range(20)])
    counts = torch.bincount((s.double() * 10).floor().long(), minlength=10)
    assert counts.tolist() == [10] * 10


def test_buckets_on_demand_with_rejection():
    b = TimestepBuckets(4)
    cfg = TimestepConfig(
        timestep_sampling="uniform", min_timestep=0, max_timestep=500, preserve_distribution_shape=True
    )
    s = sample_sigmas(cfg, 16, None, gen(), buckets=b)
    assert s.shape == (16,) and (s <= 0.5).all()
    # accepted draws come only from the two lower strata, equally often
    counts = torch.bincount((s.double() * 4).floor().long(), minlength=4)
    assert counts.tolist() == [8, 8, 0, 0]


# ------------------------------------------------------------------------------ config validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(timestep_sampling="bogus"), "--timestep_sampling.*unknown"),
        (
            dict(timestep_sampling="flux2_shift"),
            "--timestep_sampling flux2_shift.*belongs to another architecture",
        ),
        (dict(timestep_sampling="ideogram4_shift"), "belongs to another architecture"),
        (dict(timestep_sampling="krea2_shift"), "belongs to another architecture"),
        (dict(weighting_scheme="bogus"), "--weighting_scheme"),
        (dict(min_timestep=500, max_timestep=500), "--min_timestep.*--max_timestep"),
        (dict(min_timestep=800, max_timestep=200), "--min_timestep"),
        (dict(min_timestep=-1), "--min_timestep.*out of range"),
        (dict(max_timestep=1001), "--max_timestep.*out of range"),
        (dict(min_timestep=1000), "--min_timestep"),
        (dict(num_timestep_buckets=1), "--num_timestep_buckets"),
        (dict(num_timestep_buckets=2.5), "--num_timestep_buckets"),
        (dict(discrete_flow_shift=0.0), "--discrete_flow_shift"),
        (dict(logit_std=-1.0), "--logit_std"),
        (dict(sigmoid_scale=float("nan")), "--sigmoid_scale"),
        (dict(discrete_flow_shift=100.0, min_timestep=0, max_timestep=5), "--min_timestep/--max_timestep"),
    ],
)
def test_validation_names_the_flag(kwargs, match):
    with pytest.raises(UserError, match=match):
        TimestepConfig(**kwargs)


def test_buckets_validation():
    with pytest.raises(UserError, match="--num_timestep_buckets"):
        TimestepBuckets(1)


def test_from_args_keeps_defaults_for_none():
    ns = argparse.Namespace(
        timestep_sampling="shift",
        discrete_flow_shift=2.2,
        min_timestep=None,
        max_timestep=900,
        num_timestep_buckets=None,
        unrelated="x",
    )
    cfg = TimestepConfig.from_args(ns)
    assert cfg.timestep_sampling == "shift" and cfg.discrete_flow_shift == 2.2
    assert cfg.t_min == 0 and cfg.t_max == 900 and cfg.num_timestep_buckets is None
    assert cfg.weighting_scheme == "none" and cfg.mode_scale == 1.29
    assert TimestepConfig().timestep_sampling == "sigma"


# ---------------------------------------------------------------------------------- determinism

ALL_MODES = [
    "sigma",
    "uniform",
    "sigmoid",
    "shift",
    "flux_shift",
    "qwen_shift",
    "logsnr",
    "qinglong_flux",
    "qinglong_qwen",
]


@pytest.mark.parametrize("mode", ALL_MODES)
def test_deterministic_given_generator(mode):
    cfg = TimestepConfig(timestep_sampling=mode, discrete_flow_shift=2.0, min_timestep=50, max_timestep=950)
    a = sample_sigmas(cfg, 64, 4096, gen(42))
    b = sample_sigmas(cfg, 64, 4096, gen(42))
    c = sample_sigmas(cfg, 64, 4096, gen(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    cfg_rej = TimestepConfig(
        timestep_sampling=mode, min_timestep=50, max_timestep=950, preserve_distribution_shape=True
    )
    assert torch.equal(sample_sigmas(cfg_rej, 64, 4096, gen(7)), sample_sigmas(cfg_rej, 64, 4096, gen(7)))


def test_buckets_deterministic():
    def run(seed):
        b = TimestepBuckets(5)
        b.new_epoch(23, gen(seed))
        return b.draw(30, gen(seed + 1))

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


# ------------------------------------------------------------------------- model timestep, weights


def test_model_timesteps_has_no_offset():
    s = torch.tensor([0.0, 0.001, 0.25, 0.5, 1.0])
    assert torch.equal(model_timesteps(s), s * 1000)
    assert model_timesteps(torch.tensor([0.5])).item() == 500.0


def test_loss_weights_exact_formulas():
    s = torch.tensor([0.001, 0.1, 0.25, 0.5, 0.75, 1.0])
    for scheme in ("none", "logit_normal", "mode"):
        assert torch.equal(loss_weights(scheme, s), torch.ones(6))
    expected_sqrt = torch.tensor([1e6, 100.0, 16.0, 4.0, 1 / 0.5625, 1.0])
    assert torch.allclose(loss_weights("sigma_sqrt", s), expected_sqrt, rtol=1e-6)
    sd = s.double()
    expected_cos = 2 / (math.pi * (1 - 2 * sd + 2 * sd**2))
    assert torch.allclose(loss_weights("cosmap", s).double(), expected_cos, rtol=1e-6)
    assert loss_weights("cosmap", torch.tensor([0.5])).item() == pytest.approx(4 / math.pi, rel=1e-6)
    assert loss_weights("cosmap", s).dtype == torch.float32


def test_loss_weights_use_nearest_schedule_sigma():
    s = torch.tensor([0.2504, 0.2506, 0.0, 0.0002, 1.2])
    snapped = schedule_sigmas(s)
    assert torch.allclose(snapped, torch.tensor([0.25, 0.251, 0.001, 0.001, 1.0], dtype=torch.float64))
    w = loss_weights("sigma_sqrt", s)
    assert torch.allclose(w.double(), snapped**-2, rtol=1e-6)
    assert w[0].item() == pytest.approx(16.0)
    assert torch.isfinite(w).all()


def test_loss_weights_unknown_scheme():
    with pytest.raises(UserError, match="--weighting_scheme"):
        loss_weights("bogus", torch.ones(2))


# ------------------------------------------------------------------------- noisy input and target


def test_noisy_input_and_targets():
    g = gen(0)
    x0 = torch.randn(3, 16, 4, 4, generator=g)
    noise = torch.randn(3, 16, 4, 4, generator=g)
    sig = torch.tensor([0.0, 0.3, 1.0])
    xt = noisy_input(x0, noise, sig)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], noise[2])
    assert torch.allclose(xt[1], 0.7 * x0[1] + 0.3 * noise[1], atol=1e-6)
    assert torch.equal(flow_matching_target(x0, noise), noise - x0)
    # the target is the velocity d x_t / d sigma
    h = 1e-2
    dx = (noisy_input(x0, noise, sig + h) - noisy_input(x0, noise, sig)) / h
    assert torch.allclose(dx, flow_matching_target(x0, noise), atol=1e-3)
    # 5-D latents (Qwen layered / video-style) broadcast per sample, dtype kept
    x5 = torch.randn(2, 16, 3, 2, 2, generator=g).bfloat16()
    assert noisy_input(x5, torch.zeros_like(x5), torch.tensor([0.5, 1.0])).dtype == torch.bfloat16


def test_weighted_mse():
    pred = torch.ones(2, 3, 2, 2)
    target = torch.zeros(2, 3, 2, 2)
    assert weighted_mse(pred, target).item() == 1.0
    assert weighted_mse(pred, target, torch.tensor([1.0, 3.0])).item() == pytest.approx(2.0)
