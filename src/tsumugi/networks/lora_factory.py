"""``--network_args`` parsing and the ``create_network`` factories of the LoRA network modules.

``networks.lora_qwen_image`` / ``networks.lora_zimage`` (what ``--network_module`` names) build their
``create_network`` with :func:`network_factory`; it turns Musubi's network flags (``--network_dim``,
``--network_alpha``, ``--network_dropout``, ``--network_args``, ``--dim_from_weights``) into a
:class:`~tsumugi.networks.lora.LoRANetwork`. The network itself is in :mod:`tsumugi.networks.lora`.
"""

from __future__ import annotations

import ast
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tsumugi.errors import UserError
from tsumugi.networks.lora import LoRANetwork, TargetSpec, compile_patterns, file_name_to_lora_name

logger = logging.getLogger(__name__)


def module_dims_from_file(path: str | Path, flag: str = "--network_weights") -> dict[str, tuple[int, float]]:
    """``{lora_name: (rank, alpha)}`` of every LoRA module in a file (``--dim_from_weights``).

    A module without an alpha (diffusers/PEFT files fold it into the factors) gets alpha = rank, so
    its update is reproduced exactly.
    """
    from tsumugi.networks.lora_files import read_lora_file

    return {
        file_name_to_lora_name(m.name): (m.rank, float(m.rank) if m.alpha is None else m.alpha)
        for m in read_lora_file(path, flag=flag)
    }


# ---------------------------------------------------------------------------------------------------
# --network_args


@dataclass
class NetworkArgs:
    exclude_patterns: list[str] = field(default_factory=list)
    include_patterns: list[str] = field(default_factory=list)
    rank_dropout: float | None = None
    module_dropout: float | None = None
    loraplus_lr_ratio: float | None = None
    verbose: bool = False


_KNOWN_ARGS = (
    "exclude_patterns",
    "include_patterns",
    "rank_dropout",
    "module_dropout",
    "loraplus_lr_ratio",
    "verbose",
    "conv_dim",
    "conv_alpha",
)


def _parse_float(label: str, value: str, *, lo: float, hi: float | None) -> float:
    """A float in ``[lo, hi)`` (or ``>= lo``); ``label`` names the flag/arg in the error."""
    try:
        v = float(value)
    except ValueError:
        raise UserError(f"{label}: expected a number, got {value!r}") from None
    if not math.isfinite(v) or v < lo or (hi is not None and v >= hi):
        bound = f"in [{lo}, {hi})" if hi is not None else f">= {lo}"
        raise UserError(f"{label}: expected a number {bound}, got {value!r}")
    return v


def _parse_patterns(key: str, value: str) -> list[str]:
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise UserError(
            f"--network_args {key}: expected a Python list of regex strings such as "
            f"\"{key}=[r'.*txt_mlp.*']\", got {value!r}"
        ) from None
    if isinstance(parsed, str):
        parsed = [parsed]
    if not isinstance(parsed, (list, tuple)) or not all(isinstance(p, str) for p in parsed):
        raise UserError(f"--network_args {key}: expected a list of strings, got {value!r}")
    compile_patterns(parsed, key)
    return list(parsed)


def _parse_bool(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off", "none", ""):
        return False
    raise UserError(f"--network_args {key}: expected True or False, got {value!r}")


def parse_network_args(network_args: Sequence[str] | None) -> NetworkArgs:
    """Parse ``--network_args`` items (``key=value``; the value may itself contain ``=``)."""
    out = NetworkArgs()
    seen: set[str] = set()
    for item in network_args or ():
        if not isinstance(item, str) or "=" not in item:
            raise UserError(f"--network_args: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        key, value = key.strip(), value.strip()
        if key not in _KNOWN_ARGS:
            raise UserError(
                f"--network_args {key}: unknown argument for LoRA (accepted: {', '.join(_KNOWN_ARGS)})"
            )
        if key in seen:
            raise UserError(f"--network_args {key}: given twice")
        seen.add(key)
        if key in ("exclude_patterns", "include_patterns"):
            setattr(out, key, _parse_patterns(key, value))
        elif key in ("rank_dropout", "module_dropout"):
            setattr(out, key, _parse_float(f"--network_args {key}", value, lo=0.0, hi=1.0) or None)
        elif key == "loraplus_lr_ratio":
            ratio = _parse_float(f"--network_args {key}", value, lo=0.0, hi=None)
            if ratio == 0:
                raise UserError(f"--network_args {key}: expected a positive number, got {value!r}")
            out.loraplus_lr_ratio = ratio
        elif key == "verbose":
            out.verbose = _parse_bool(key, value)
        else:  # conv_dim / conv_alpha
            _parse_float(f"--network_args {key}", value, lo=0.0, hi=None)
            logger.warning(
                "--network_args %s ignored: the Qwen-Image and Z-Image DiTs have no conv layers", key
            )
    return out


def network_factory(spec: TargetSpec):
    """The module-level ``create_network`` of an architecture's network module (``--network_module``)."""

    def create_network(
        dit: nn.Module,
        network_dim: int | None,
        network_alpha: float | None,
        network_dropout: float | None,
        network_args: Sequence[str] | None,
        *,
        multiplier: float = 1.0,
        dim_from_weights: str | Path | None = None,
        device: torch.device | str | None = None,
    ) -> LoRANetwork:
        return create_network_for_spec(
            spec, dit, network_dim, network_alpha, network_dropout, network_args,
            multiplier=multiplier, dim_from_weights=dim_from_weights, device=device,
        )

    create_network.__doc__ = f"{spec.name} LoRA network from Musubi's flags (see create_network_for_spec)."
    return create_network


def create_network_for_spec(
    spec: TargetSpec,
    dit: nn.Module,
    network_dim: int | None,
    network_alpha: float | None,
    network_dropout: float | None,
    network_args: Sequence[str] | None,
    *,
    multiplier: float = 1.0,
    dim_from_weights: str | Path | None = None,
    device: torch.device | str | None = None,
) -> LoRANetwork:
    """Shared body of the architecture ``create_network`` functions.

    ``dim_from_weights``: path of a LoRA file (normally the ``--network_weights`` file) whose modules,
    ranks and alphas define the network; ``network_dim``/``network_alpha`` are then ignored. The
    architecture's default excludes are not applied in that case (the file decides), user patterns are.
    The weights themselves are loaded by :meth:`LoRANetwork.load_weights`.
    """
    args = parse_network_args(network_args)
    if network_dropout is not None:
        network_dropout = _parse_float("--network_dropout", str(network_dropout), lo=0.0, hi=1.0) or None
    rank = 4 if network_dim is None else int(network_dim)
    if rank < 1:
        raise UserError(f"--network_dim: expected a positive rank, got {network_dim}")
    module_dims = None
    exclude = list(args.exclude_patterns)
    if dim_from_weights is not None:
        module_dims = module_dims_from_file(dim_from_weights, flag="--dim_from_weights")
        if network_dim is not None or network_alpha not in (None, 1, 1.0):
            logger.info("--dim_from_weights: rank and alpha taken from %s", dim_from_weights)
    else:
        exclude += list(spec.default_exclude)
    return LoRANetwork(
        dit,
        spec,
        rank=rank,
        alpha=network_alpha,
        dropout=network_dropout,
        rank_dropout=args.rank_dropout,
        module_dropout=args.module_dropout,
        multiplier=multiplier,
        include_patterns=args.include_patterns,
        exclude_patterns=exclude,
        module_dims=module_dims,
        loraplus_lr_ratio=args.loraplus_lr_ratio,
        verbose=args.verbose,
        device=device,
    )
