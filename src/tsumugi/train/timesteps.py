"""Training timestep (noise level) sampling for flow matching.

Every function here is pure: randomness comes only from the ``torch.Generator`` passed in, so the same
generator state gives the same draws. Noise levels are ``sigma`` in [0, 1] (0 = clean latent, 1 = pure
noise); the noisy input is ``x_t = (1 - sigma) * x0 + sigma * noise`` (see
:mod:`tsumugi.train.loss_weighting`).

Modes of ``--timestep_sampling`` (``u ~ U(0,1)``, ``n ~ N(0,1)``, ``k = --sigmoid_scale``,
``S(t, s) = s*t / (1 + (s-1)*t)``, ``n_tok`` = number of latent tokens of one sample):

* ``sigma``: discrete schedule of 1000 levels ``t/1000``, ``t = 1..1000``; ``u`` is drawn from the
  ``--weighting_scheme`` density (``none``/``sigma_sqrt``/``cosmap``: uniform; ``logit_normal``:
  ``sig(N(logit_mean, logit_std))``; ``mode``: ``1 - u - mode_scale*(cos^2(pi*u/2) - 1 + u)``) and
  picks an entry, large ``u`` -> small ``t`` as in Musubi.
* ``uniform``: ``u``; ``sigmoid``: ``sig(k*n)``; ``shift``: ``S(sig(k*n), --discrete_flow_shift)``.
* ``flux_shift`` / ``qwen_shift``: ``S(sig(k*n), e^mu)`` with ``mu`` linear in ``n_tok`` through
  (256, 0.5)-(4096, 1.15), resp. (256, 0.5)-(8192, 0.9) (the Qwen-Image dynamic inference shift).
* ``logsnr``: ``lambda ~ N(logit_mean, logit_std)``, ``sigma = sig(-lambda/2)``.
* ``qinglong_flux``: per sample ``d ~ U``: ``d < 0.79`` flux_shift, ``< 0.90`` logsnr, else logsnr with
  mean 5.36, std 1.0. ``qinglong_qwen``: ``d < 0.95`` qwen_shift, else logsnr(5.36, 1.0).

Range restriction (``--min_timestep a``, ``--max_timestep b``; defaults 0 and 1000): by default the
distribution is squeezed into the range (``sigma*(b-a)/1000 + a/1000``; in ``sigma`` mode ``u`` indexes
only the schedule entries inside the range); with ``--preserve_distribution_shape`` draws outside
``[a/1000, b/1000]`` are rejected and redrawn (at most 1000 rounds, then the rest is filled uniformly
inside the range with a warning).

Timestep buckets (``--num_timestep_buckets K``): :class:`TimestepBuckets` supplies stratified uniforms
that replace ``u`` (normal draws become ``ndtri(u)``, the inverse normal CDF). Per epoch a pool with
``ceil(total/K)`` draws per stratum ``[i/K, (i+1)/K)`` is shuffled and dealt out; when the pool is empty
(or was never filled, as with ``--preserve_distribution_shape``, where the number of draws is unknown)
it is refilled on demand one round at a time, a round holding exactly one draw per stratum.

Deliberate differences from Musubi Tuner (intended behaviour instead of observed bugs):

1. ``sigma`` mode honours ``--discrete_flow_shift``: the schedule is ``S(t/1000, s)``, ``t = 1..1000``
   (identical to Musubi for ``s = 1``, where Musubi ignores the flag for these models).
2. ``sigma`` mode: ``--min_timestep/--max_timestep`` keep the schedule entries whose model timestep
   ``1000*sigma`` lies in ``[min, max]`` (Musubi indexes its descending schedule with them and so
   selects ``1000-max .. 1000-min``). With the default range the draws equal Musubi's (for ``s = 1``).
   ``--preserve_distribution_shape`` also works in ``sigma`` mode (rejection over the full schedule).
3. No ``+1`` timestep offset: the model's timestep is exactly ``1000*sigma`` (:func:`model_timesteps`)
   in every mode, matching the noise level of the input (Musubi feeds ``1000*sigma + 1`` in non-``sigma``
   modes).
4. Buckets also apply in ``sigma`` mode (they stratify ``u`` before the weighting density).

No Musubi-compatibility switch is offered: its RNG stream cannot be reproduced anyway.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from tsumugi.errors import UserError
from tsumugi.train.loss_weighting import WEIGHTING_SCHEMES

logger = logging.getLogger(__name__)

TIMESTEP_SAMPLING_MODES = (
    "sigma",
    "uniform",
    "sigmoid",
    "shift",
    "flux_shift",
    "qwen_shift",
    "logsnr",
    "qinglong_flux",
    "qinglong_qwen",
)
OTHER_ARCH_MODES = ("flux2_shift", "ideogram4_shift", "krea2_shift")

NUM_TRAIN_TIMESTEPS = 1000
MAX_REJECTION_ROUNDS = 1000
QINGLONG_LOGSNR_MEAN = 5.36
QINGLONG_LOGSNR_STD = 1.0
_NDTRI_EPS = 1e-12


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TimestepConfig:
    """The timestep-sampling flags (``docs/design.md``, "Training timestep sampling").

    Validated on construction (raises :class:`UserError`)."""

    timestep_sampling: str = "sigma"
    discrete_flow_shift: float = 1.0
    sigmoid_scale: float = 1.0
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    min_timestep: int | None = None
    max_timestep: int | None = None
    preserve_distribution_shape: bool = False
    num_timestep_buckets: int | None = None

    def __post_init__(self) -> None:
        mode = self.timestep_sampling
        if mode in OTHER_ARCH_MODES:
            raise UserError(
                f"--timestep_sampling {mode}: this mode belongs to another architecture; "
                f"expected one of {', '.join(TIMESTEP_SAMPLING_MODES)}"
            )
        if mode not in TIMESTEP_SAMPLING_MODES:
            raise UserError(
                f"--timestep_sampling: unknown mode {mode!r}; expected one of {', '.join(TIMESTEP_SAMPLING_MODES)}"
            )
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise UserError(
                f"--weighting_scheme: unknown scheme {self.weighting_scheme!r}; "
                f"expected one of {', '.join(WEIGHTING_SCHEMES)}"
            )
        for name in ("discrete_flow_shift", "sigmoid_scale", "logit_mean", "logit_std", "mode_scale"):
            if not _is_number(getattr(self, name)):
                raise UserError(f"--{name}: expected a finite number, got {getattr(self, name)!r}")
        if self.discrete_flow_shift <= 0:
            raise UserError(f"--discrete_flow_shift: must be > 0, got {self.discrete_flow_shift}")
        if self.logit_std < 0:
            raise UserError(f"--logit_std: must be >= 0, got {self.logit_std}")
        for name in ("min_timestep", "max_timestep"):
            value = getattr(self, name)
            if value is None:
                continue
            if not _is_number(value):
                raise UserError(f"--{name}: expected a number in 0..{NUM_TRAIN_TIMESTEPS}, got {value!r}")
            if not 0 <= value <= NUM_TRAIN_TIMESTEPS:
                raise UserError(f"--{name}: {value} is out of range; expected 0..{NUM_TRAIN_TIMESTEPS}")
        if self.t_min >= self.t_max:
            raise UserError(
                f"--min_timestep ({self.t_min}) must be smaller than --max_timestep ({self.t_max})"
            )
        buckets = self.num_timestep_buckets
        if buckets is not None and (isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 2):
            raise UserError(f"--num_timestep_buckets: expected an integer >= 2, got {buckets!r}")
        if mode == "sigma" and discrete_schedule(self).numel() == 0:
            raise UserError(
                f"--min_timestep/--max_timestep: no timestep of the sigma schedule "
                f"(--discrete_flow_shift {self.discrete_flow_shift}) lies in [{self.t_min}, {self.t_max}]"
            )

    @property
    def t_min(self) -> float:
        """Lower end of the timestep range (``--min_timestep``, default 0)."""
        return 0 if self.min_timestep is None else self.min_timestep

    @property
    def t_max(self) -> float:
        """Upper end of the timestep range (``--max_timestep``, default 1000)."""
        return NUM_TRAIN_TIMESTEPS if self.max_timestep is None else self.max_timestep

    @property
    def restricts_range(self) -> bool:
        return self.t_min > 0 or self.t_max < NUM_TRAIN_TIMESTEPS

    @classmethod
    def from_args(cls, args: Any) -> TimestepConfig:
        """Build from an argparse namespace (or any object); missing or ``None`` attributes keep defaults
        (``min_timestep``/``max_timestep``/``num_timestep_buckets`` keep ``None``)."""
        kwargs = {}
        for f in fields(cls):
            value = getattr(args, f.name, None)
            if value is not None:
                kwargs[f.name] = value
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# closed-form helpers


def time_shift(t: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """``S(t, s) = s*t / (1 + (s-1)*t)`` (identity for ``s = 1``)."""
    return shift * t / (1 + (shift - 1) * t)


def _linear(x: float, x1: float, y1: float, x2: float, y2: float) -> float:
    return y1 + (x - x1) * (y2 - y1) / (x2 - x1)


def flux_shift_mu(num_tokens: int) -> float:
    """``mu`` of ``flux_shift``: linear through (256, 0.5) and (4096, 1.15)."""
    return _linear(float(num_tokens), 256.0, 0.5, 4096.0, 1.15)


def qwen_shift_mu(num_tokens: int) -> float:
    """``mu`` of ``qwen_shift`` (= Qwen-Image dynamic inference shift): through (256, 0.5) and (8192, 0.9)."""
    return _linear(float(num_tokens), 256.0, 0.5, 8192.0, 0.9)


def model_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """Timestep tensor for the DiT: exactly ``1000 * sigma`` (no ``+1`` offset, unlike Musubi).

    Qwen-Image feeds ``timestep/1000 = sigma``; Z-Image's adapter turns it into ``1 - sigma``.
    """
    return sigmas * NUM_TRAIN_TIMESTEPS


def discrete_schedule(config: TimestepConfig, restrict: bool = True) -> torch.Tensor:
    """The ``sigma``-mode levels, descending, float64: ``S(t/1000, --discrete_flow_shift)`` for
    ``t = 1000, 999, ..., 1``; with ``restrict`` only those inside ``[min_timestep, max_timestep]/1000``.
    """
    levels = torch.arange(NUM_TRAIN_TIMESTEPS, 0, -1, dtype=torch.float64) / NUM_TRAIN_TIMESTEPS
    if config.discrete_flow_shift != 1.0:
        levels = time_shift(levels, float(config.discrete_flow_shift))
    return levels[_in_range(levels, config)] if restrict else levels


def _in_range(sigmas: torch.Tensor, config: TimestepConfig) -> torch.Tensor:
    tol = 1e-9
    lo = config.t_min / NUM_TRAIN_TIMESTEPS
    hi = config.t_max / NUM_TRAIN_TIMESTEPS
    return (sigmas >= lo - tol) & (sigmas <= hi + tol)


# --------------------------------------------------------------------------------------------------
# buckets


class TimestepBuckets:
    """Stratified uniforms for ``--num_timestep_buckets K``.

    :meth:`new_epoch` fills a shuffled pool with ``ceil(total/K)`` draws in each stratum ``[i/K, (i+1)/K)``;
    :meth:`draw` deals from it and, once it is empty, refills it one round (one draw per stratum,
    shuffled) at a time. Values are float64 on the CPU (drawn with the given generator on its device).
    """

    def __init__(self, num_buckets: int):
        if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 2:
            raise UserError(f"--num_timestep_buckets: expected an integer >= 2, got {num_buckets!r}")
        self.num_buckets = num_buckets
        self.edges = torch.arange(num_buckets + 1, dtype=torch.float64) / num_buckets
        self._pool = torch.empty(0, dtype=torch.float64)

    @property
    def remaining(self) -> int:
        return int(self._pool.numel())

    def _stratified(self, per_bucket: int, generator: torch.Generator | None) -> torch.Tensor:
        k = self.num_buckets
        device = generator.device if generator is not None else torch.device("cpu")
        index = torch.arange(k, dtype=torch.int64).repeat(per_bucket)
        v = torch.rand(index.numel(), generator=generator, device=device, dtype=torch.float64).cpu()
        u = (index.to(torch.float64) + v) / k
        upper = torch.nextafter(self.edges[index + 1], torch.zeros((), dtype=torch.float64))
        u = torch.minimum(u, upper)
        return u[torch.randperm(u.numel(), generator=generator, device=device).cpu()]

    def new_epoch(self, total_samples: int, generator: torch.Generator | None = None) -> None:
        """Replace the pool with ``ceil(total_samples / K)`` shuffled draws per stratum."""
        per_bucket = max(1, math.ceil(total_samples / self.num_buckets))
        self._pool = self._stratified(per_bucket, generator)

    def draw(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Take ``n`` uniforms from the pool, refilling it by rounds when it runs out."""
        parts = []
        need = n
        while need > 0:
            if self._pool.numel() == 0:
                self._pool = self._stratified(1, generator)
            take = min(need, self._pool.numel())
            parts.append(self._pool[:take])
            self._pool = self._pool[take:]
            need -= take
        if not parts:
            return torch.empty(0, dtype=torch.float64)
        return torch.cat(parts)


# --------------------------------------------------------------------------------------------------
# sampling


class _Draws:
    """Source of the base random numbers: the override first, then buckets, else the generator."""

    def __init__(
        self,
        generator: torch.Generator | None,
        uniform_override: torch.Tensor | None,
        buckets: TimestepBuckets | None,
    ):
        self.generator = generator
        self.device = generator.device if generator is not None else torch.device("cpu")
        self.override = uniform_override
        self.buckets = buckets

    @property
    def stratified(self) -> bool:
        return self.override is not None or self.buckets is not None

    def uniform(self, n: int) -> torch.Tensor:
        if self.override is not None:
            u = self.override.detach().to(device=self.device, dtype=torch.float64).reshape(-1)
            self.override = None
            if u.numel() != n:
                raise ValueError(f"uniform_override has {u.numel()} values, expected {n}")
            return u
        if self.buckets is not None:
            return self.buckets.draw(n, self.generator).to(self.device)
        return self.rand(n)

    def rand(self, n: int) -> torch.Tensor:
        """Plain uniforms from the generator (never stratified)."""
        return torch.rand(n, generator=self.generator, device=self.device, dtype=torch.float64)

    def normal(self, n: int) -> torch.Tensor:
        if self.stratified:
            u = self.uniform(n).clamp(_NDTRI_EPS, 1 - _NDTRI_EPS)
            return torch.special.ndtri(u)
        return torch.randn(n, generator=self.generator, device=self.device, dtype=torch.float64)


def _weighting_density(config: TimestepConfig, draws: _Draws, n: int) -> torch.Tensor:
    """``u`` in [0, 1) from the ``--weighting_scheme`` density (``sigma`` mode)."""
    scheme = config.weighting_scheme
    if scheme == "logit_normal":
        u = torch.sigmoid(config.logit_mean + config.logit_std * draws.normal(n))
    elif scheme == "mode":
        u = draws.uniform(n)
        u = 1 - u - config.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        u = draws.uniform(n)
    return u.clamp(0.0, 1.0)


def _pick_discrete(levels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    levels = levels.to(u.device)
    index = torch.floor(u * levels.numel()).long().clamp(0, levels.numel() - 1)
    return levels[index]


def _logsnr(normal: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return torch.sigmoid(-(mean + std * normal) / 2)


def _draw_round(config: TimestepConfig, n: int, num_tokens: int | None, draws: _Draws, full_range: bool):
    """One batch of ``n`` raw draws (float64), before range rescaling / rejection."""
    mode = config.timestep_sampling
    k = config.sigmoid_scale
    if mode == "sigma":
        levels = discrete_schedule(config, restrict=not full_range)
        return _pick_discrete(levels, _weighting_density(config, draws, n))
    if mode == "uniform":
        return draws.uniform(n)
    if mode in ("flux_shift", "qwen_shift", "qinglong_flux", "qinglong_qwen"):
        if num_tokens is None or num_tokens < 1:
            raise ValueError(f"--timestep_sampling {mode} needs num_tokens >= 1, got {num_tokens!r}")
    if mode == "logsnr":
        return _logsnr(draws.normal(n), config.logit_mean, config.logit_std)
    if mode in ("qinglong_flux", "qinglong_qwen"):
        d = draws.rand(n)  # branch choice is never stratified
        normal = draws.normal(n)
        resolution = torch.sigmoid(k * normal)
        if mode == "qinglong_flux":
            main = time_shift(resolution, math.exp(flux_shift_mu(num_tokens)))
            mid = _logsnr(normal, config.logit_mean, config.logit_std)
            high = _logsnr(normal, QINGLONG_LOGSNR_MEAN, QINGLONG_LOGSNR_STD)
            return torch.where(d < 0.79, main, torch.where(d < 0.90, mid, high))
        main = time_shift(resolution, math.exp(qwen_shift_mu(num_tokens)))
        high = _logsnr(normal, QINGLONG_LOGSNR_MEAN, QINGLONG_LOGSNR_STD)
        return torch.where(d < 0.95, main, high)
    t = torch.sigmoid(k * draws.normal(n))
    if mode == "sigmoid":
        return t
    if mode == "shift":
        return time_shift(t, float(config.discrete_flow_shift))
    if mode == "flux_shift":
        return time_shift(t, math.exp(flux_shift_mu(num_tokens)))
    if mode == "qwen_shift":
        return time_shift(t, math.exp(qwen_shift_mu(num_tokens)))
    raise AssertionError(mode)  # validated in TimestepConfig


def sample_sigmas(
    config: TimestepConfig,
    batch_size: int,
    num_tokens: int | None,
    generator: torch.Generator | None,
    uniform_override: torch.Tensor | None = None,
    buckets: TimestepBuckets | None = None,
) -> torch.Tensor:
    """Draw ``batch_size`` noise levels (float32, shape (B,), on the generator's device).

    ``num_tokens``: latent tokens per sample (``ImageGeometry.num_tokens``), needed by the ``*_shift`` and
    ``qinglong_*`` modes. ``uniform_override``: (B,) uniforms (e.g. from :class:`TimestepBuckets`) used
    instead of the first batch of base draws. ``buckets``: source of all further base draws (needed for
    ``--preserve_distribution_shape`` with buckets, where the number of draws is not known in advance).
    """
    draws = _Draws(generator, uniform_override, buckets)
    if batch_size == 0:
        return torch.empty(0, dtype=torch.float32, device=draws.device)
    if not config.restricts_range:
        return _draw_round(config, batch_size, num_tokens, draws, full_range=True).float()

    lo = config.t_min / NUM_TRAIN_TIMESTEPS
    hi = config.t_max / NUM_TRAIN_TIMESTEPS
    if not config.preserve_distribution_shape:
        if config.timestep_sampling == "sigma":
            return _draw_round(config, batch_size, num_tokens, draws, full_range=False).float()
        sigmas = _draw_round(config, batch_size, num_tokens, draws, full_range=True)
        return (sigmas * (hi - lo) + lo).float()

    kept: list[torch.Tensor] = []
    have = 0
    for _ in range(MAX_REJECTION_ROUNDS):
        candidates = _draw_round(config, batch_size, num_tokens, draws, full_range=True)
        accepted = candidates[_in_range(candidates, config)]
        kept.append(accepted[: batch_size - have])
        have += kept[-1].numel()
        if have == batch_size:
            break
    if have < batch_size:
        missing = batch_size - have
        logger.warning(
            "--preserve_distribution_shape: only %d of %d timesteps fell in [%s, %s] after %d rounds; "
            "filling the rest uniformly",
            have,
            batch_size,
            config.t_min,
            config.t_max,
            MAX_REJECTION_ROUNDS,
        )
        if config.timestep_sampling == "sigma":
            kept.append(_pick_discrete(discrete_schedule(config), draws.rand(missing)))
        else:
            kept.append(draws.rand(missing) * (hi - lo) + lo)
    return torch.cat(kept).float()
