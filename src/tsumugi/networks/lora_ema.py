"""Post-hoc EMA of saved LoRA checkpoints (``lora_post_hoc_ema``).

Files ``x_0 .. x_{n-1}`` (oldest first) are folded like an EMA: ``e_0 = x_0``, ``e_k = b_k e_{k-1} +
(1 - b_k) x_k``. Decays:

- constant / linear: ``b_k = beta + (beta2 - beta) (k - 1) / (n - 2)`` (``b_1 = beta``, ``b_{n-1} = beta2``;
  with two files just ``beta``);
- power function (``sigma_rel``, Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
  Diffusion Models"): ``b_k = (1 - 1/k)^(gamma + 1)`` with ``gamma`` the non-negative root of
  ``gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0``. ``b_1 = 0``: the oldest
  file drops out.

The result is ``sum_k w_k x_k`` with ``w_k = (1 - b_k) prod_{j > k} b_j`` (``b_0 = 0``): computed in fp64 once,
then applied tensor by tensor in fp32 (only one tensor of each file is read at a time) and cast back to the
dtype of the newest file. ``.alpha`` tensors must agree across files and are copied; integer tensors come
from the newest file. Metadata is the newest file's, with the sd-webui hashes recomputed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from tsumugi.errors import UserError

logger = logging.getLogger(__name__)

SORT_KEYS = ("mtime", "step")


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-function exponent ``gamma`` of a relative EMA width ``sigma_rel``."""
    import numpy as np

    if not (math.isfinite(sigma_rel) and sigma_rel > 0):
        raise UserError(f"--sigma_rel: expected a positive number, got {sigma_rel}")
    t = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    real = [float(r.real) for r in roots if abs(r.imag) < 1e-9 and r.real >= 0]
    if not real:
        raise UserError(
            f"--sigma_rel: {sigma_rel} is too wide; the power-function EMA needs sigma_rel <= {12 ** -0.5:.4f}"
        )
    return max(real)


def ema_decays(n: int, beta: float = 0.95, beta2: float | None = None, sigma_rel: float | None = None) -> list[float]:
    """Decays ``b_1 .. b_{n-1}`` of folding ``n`` files (see the module docstring)."""
    if sigma_rel is not None:
        gamma = sigma_rel_to_gamma(sigma_rel)
        return [(1 - 1 / k) ** (gamma + 1) for k in range(1, n)]
    for flag, value in (("--beta", beta), ("--beta2", beta2)):
        if value is not None and not (0 <= value <= 1):
            raise UserError(f"{flag}: expected a number in [0, 1], got {value}")
    beta2 = beta if beta2 is None else beta2
    steps = n - 1
    if steps <= 1:
        return [beta] * steps
    return [beta + (beta2 - beta) * i / (steps - 1) for i in range(steps)]


def ema_weights(decays: Sequence[float]) -> list[float]:
    """Weight of each file in the folded result (they sum to 1)."""
    weights = [1.0]
    for b in decays:
        weights = [w * b for w in weights] + [1 - b]
    return weights


def _step_of(path: Path) -> int:
    from tsumugi.models.safetensors_io import read_header

    _, metadata = read_header(path)
    value = metadata.get("ss_steps")
    if value is not None and value.strip().isdigit():
        return int(value)
    numbers = re.findall(r"\d+", path.name.removesuffix(".safetensors"))
    if not numbers:
        raise UserError(f"--sort_by step: {path} has no ss_steps metadata and no number in its name")
    return int(numbers[-1])


def order_files(paths: Sequence[str | Path], sort_by: str | None = "mtime") -> list[Path]:
    """``paths`` oldest first: by modification time, by training step, or as given (``None``)."""
    files = [Path(p) for p in paths]
    for f in files:
        if not f.is_file():
            raise UserError(f"path: {f} does not exist or is not a file")
    if sort_by is None:
        return files
    if sort_by == "mtime":
        return sorted(files, key=lambda f: os.stat(f).st_mtime_ns)
    if sort_by == "step":
        return sorted(files, key=_step_of)
    raise UserError(f"--sort_by: expected one of {', '.join(SORT_KEYS)}, got {sort_by!r}")


def post_hoc_ema(
    paths: Sequence[str | Path],
    output_file: str | Path,
    *,
    beta: float = 0.95,
    beta2: float | None = None,
    sigma_rel: float | None = None,
    sort_by: str | None = "mtime",
) -> Path:
    """Write the EMA of the LoRA files ``paths`` to ``output_file``; returns its path."""
    from tsumugi.models.safetensors_io import SafetensorsSource
    from tsumugi.models.safetensors_write import save_file_atomic
    from tsumugi.networks.lora_save import model_hashes

    output = Path(output_file)
    if not paths:
        raise UserError("path: give at least one LoRA file")
    if output.is_dir():
        raise UserError(f"--output_file: {output} is a folder; give the file name to write")
    files = order_files(paths, sort_by)
    if output.resolve() in {f.resolve() for f in files}:
        raise UserError(f"--output_file: {output} is one of the input files; write the result elsewhere")
    weights = ema_weights(ema_decays(len(files), beta, beta2, sigma_rel))
    sources = []
    try:
        for f in files:
            try:
                sources.append(SafetensorsSource([f]))
            except UserError as e:
                raise UserError(f"path: {e}") from None
            except Exception as e:
                raise UserError(f"path: {f} is not a readable safetensors file ({e})") from None
        newest = sources[-1]
        keys = sorted(newest.keys())
        if not keys:
            raise UserError(f"path: {files[-1]} holds no tensors")
        for f, src in zip(files, sources):
            if set(src.keys()) != set(keys):
                diff = sorted(set(src.keys()) ^ set(keys))
                raise UserError(
                    f"path: {f} and {files[-1]} hold different tensors ({len(diff)} keys differ, e.g. {diff[0]})"
                )
            for key in keys:
                if src.info(key).shape != newest.info(key).shape:
                    raise UserError(
                        f"path: {f}: {key} has shape {src.info(key).shape}, {files[-1]} has "
                        f"{newest.info(key).shape}"
                    )
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            dtype = newest.info(key).dtype
            if dtype is None or not dtype.is_floating_point:
                out[key] = newest.get(key)
                continue
            if key.endswith(".alpha"):
                value = newest.get(key, torch.float32)
                for f, src in zip(files, sources):
                    if not torch.allclose(src.get(key, torch.float32), value):
                        raise UserError(f"path: {f}: {key} differs from {files[-1]}; alphas must match")
                out[key] = newest.get(key)
                continue
            acc = torch.zeros(newest.info(key).shape, dtype=torch.float32)
            for w, src in zip(weights, sources):
                if w != 0:
                    acc += src.get(key, torch.float32) * w
            out[key] = acc.to(dtype)
        metadata = dict(newest.metadata)
    finally:
        for src in sources:
            src.close()
    metadata["tsumugi.post_hoc_ema"] = json.dumps(
        {"files": [f.name for f in files], "weights": [round(w, 8) for w in weights]}
    )
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = model_hashes(out, metadata)
    save_file_atomic(out, output, metadata)
    logger.info("wrote %s: EMA of %d files (weights %s)", output, len(files),
                ", ".join(f"{w:.4g}" for w in weights))
    return output
