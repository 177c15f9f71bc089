"""Flow-matching noisy input, regression target and per-sample loss weights (``docs/design.md``,
"Training loss").

* noisy input: ``x_t = (1 - sigma) * x0 + sigma * noise`` for every sampling mode;
* target: the velocity ``noise - x0`` (``d x_t / d sigma``). Both families are trained in this
  convention because :meth:`tsumugi.arch.base.Architecture.predict_velocity` returns velocities: Qwen-Image
  predicts it directly, Z-Image predicts ``x0 - noise`` and its adapter negates the output;
* loss: ``mean(w(sigma) * (pred - target)^2)`` over every element, with ``w`` from :func:`loss_weights`.

Weights look ``sigma`` up at the nearest level of the unshifted 1000-step schedule (``t/1000``,
``t = 1..1000``), so ``sigma_sqrt`` is bounded by ``1000^2``. Unlike Musubi no ``+1`` timestep offset is
involved in the lookup (see :mod:`tsumugi.train.timesteps`).
"""

from __future__ import annotations

import math

import torch

from tsumugi.errors import UserError

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
NUM_TRAIN_TIMESTEPS = 1000


def schedule_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """``sigmas`` snapped to the nearest level ``t/1000`` (``t = 1..1000``) of the 1000-step schedule."""
    t = torch.round(sigmas.double() * NUM_TRAIN_TIMESTEPS).clamp(1, NUM_TRAIN_TIMESTEPS)
    return t / NUM_TRAIN_TIMESTEPS


def loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight ``w(sigma)``, float32, same shape and device as ``sigmas``.

    ``none``/``logit_normal``/``mode``: 1; ``sigma_sqrt``: ``sigma^-2``; ``cosmap``:
    ``2 / (pi * (1 - 2*sigma + 2*sigma^2))``.
    """
    if scheme not in WEIGHTING_SCHEMES:
        raise UserError(
            f"--weighting_scheme: unknown scheme {scheme!r}; expected one of {', '.join(WEIGHTING_SCHEMES)}"
        )
    if scheme in ("none", "logit_normal", "mode"):
        return torch.ones_like(sigmas, dtype=torch.float32)
    s = schedule_sigmas(sigmas)
    if scheme == "sigma_sqrt":
        w = s**-2
    else:  # cosmap
        w = 2.0 / (math.pi * (1 - 2 * s + 2 * s**2))
    return w.float()


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    sigmas = sigmas.to(device=like.device, dtype=torch.float32).reshape(-1)
    if sigmas.numel() != like.shape[0]:
        raise ValueError(f"{sigmas.numel()} sigmas for a batch of {like.shape[0]}")
    return sigmas.view(-1, *([1] * (like.ndim - 1)))


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) * x0 + sigma * noise`` per sample (sigma of shape (B,)), computed in fp32 and
    returned in ``x0``'s dtype."""
    s = _per_sample(sigmas, x0)
    return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)


def flow_matching_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Regression target of the velocity prediction: ``noise - x0``, in fp32."""
    return noise.float() - x0.float()


def weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``mean(w(sigma) * (pred - target)^2)`` over every element (fp32); ``weights`` of shape (B,)."""
    err = (pred.float() - target.float()) ** 2
    if weights is not None:
        err = err * _per_sample(weights, err)
    return err.mean()
