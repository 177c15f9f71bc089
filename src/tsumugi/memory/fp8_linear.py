"""float8 storage for Linear weights, computed in a higher precision (``--fp8_vl``, ``--fp8_llm``).

Each Linear keeps its weight as ``float8_e4m3fn`` with one fp32 scale per output channel and
dequantizes it to the input's dtype in ``forward``. Embeddings, norms and biases keep their precision.
Memory for the Linear weights halves against bf16; the compute is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tsumugi.models.stream import LoadStep

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def quantize_per_row(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight_fp8, scale)``: one fp32 scale per output row, ``weight ~ weight_fp8 * scale``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (w / scale).to(torch.float8_e4m3fn), scale


class Fp8Linear(torch.nn.Module):
    """Drop-in for a frozen ``nn.Linear``: fp8 weight + per-row scale, dequantized on the fly."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight_fp8, scale = quantize_per_row(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight_fp8.to(torch.float32) * self.scale).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


def _fp8_targets(model: torch.nn.Module, skip: tuple[str, ...]) -> list[tuple[str, torch.nn.Linear]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not any(s in name for s in skip)
    ]


def quantize_linears_fp8(model: torch.nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every ``nn.Linear`` of ``model`` (names containing a ``skip`` part excepted); returns the count."""
    targets = _fp8_targets(model, skip)
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear(module))
    return len(targets)


class Fp8LinearStep(LoadStep):
    """:func:`quantize_linears_fp8` while a text encoder streams in (``load_text_encoder(..., steps=[...])``).

    ``prepare`` swaps the meta-device Linears for :class:`Fp8Linear` stand-ins; ``apply`` quantizes each
    target weight as it arrives (same :func:`quantize_per_row` as the module constructor, so the result
    is bit-identical to quantize-after-load) and returns ``weight_fp8`` and ``scale`` in its place.
    """

    def __init__(self, skip: tuple[str, ...] = ("lm_head",)) -> None:
        self.skip = skip
        self.targets: frozenset[str] = frozenset()
        self.count = 0

    def prepare(self, model: torch.nn.Module) -> None:
        self.targets = frozenset(f"{name}.weight" for name, _ in _fp8_targets(model, self.skip))
        self.count = quantize_linears_fp8(model, self.skip)

    def apply(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if key not in self.targets:
            return {key: tensor}
        weight_fp8, scale = quantize_per_row(tensor)
        prefix = key[: -len("weight")]
        return {prefix + "weight_fp8": weight_fp8, prefix + "scale": scale}
