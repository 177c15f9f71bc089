"""float8 DiT weights for ``--fp8_base`` / ``--fp8_scaled`` (training) and ``--fp8`` (generation).

Facts: ``docs/design.md``, "Memory: block swap and fp8". :func:`quantize_dit_fp8` turns the selected
``nn.Linear`` layers of a Qwen-Image or Z-Image DiT into :class:`Fp8DitLinear` in place (same module
object, class swapped, so it stays an ``nn.Linear``: LoRA target selection, block swap and the merge
code keep recognising it):

- ``weight`` becomes a frozen ``float8_e4m3fn`` Parameter of the same shape;
- ``scaled=False`` (``--fp8_base`` alone): a plain saturating cast, no scale; ``scale_weight`` is None;
- ``scaled=True`` (``--fp8_scaled``): block-wise scales, one per (output row, ``block_size`` input
  columns), buffer ``scale_weight`` of shape ``[out, in / block_size, 1]``; a layer
  whose ``in`` is not a multiple of ``block_size`` (or ``block_size=None``) gets one scale per output
  row, ``[out, 1]``. Scale = ``absmax / 448`` (fp32 math), rounded to and stored in the weight's source
  dtype; the weight is divided by that rounded scale, so storage adds no error beyond the fp8 rounding.
  Block-wise is the default because it bounds the damage an outlier does to 64 weights instead of a
  whole row (measured on the tiny DiTs: about 2x lower output error than plain fp8, see the tests);

- ``forward`` dequantizes to the compute dtype (the autocast dtype under autocast, else the input's)
  and calls ``F.linear``; activations stay in high precision. Bias keeps its precision.

What is quantized (the same set for plain and scaled):

- Qwen-Image: every Linear inside ``transformer_blocks`` -- attention, MLPs and the modulation
  Linears ``img_mod.1``/``txt_mod.1`` (a third of the blocks' parameters; ``keep_modulation=True``
  keeps them in source precision instead). ``img_in``, ``txt_in``, ``time_text_embed``, ``norm_out``,
  ``proj_out`` and every norm stay in source precision.
- Z-Image: the attention/FFN Linears of ``layers``, ``noise_refiner`` and ``context_refiner``.
  ``adaLN_modulation`` (always), ``all_x_embedder``, ``cap_embedder``, ``t_embedder``,
  ``all_final_layer`` and every norm stay in source precision.

Unlike Musubi's plain ``--fp8_base`` (which casts every DiT tensor, norms and biases included) the plain
mode here casts only the target Linear weights: the rest is < 2 % of the parameters and is where a
plain e4m3 cast hurts most (embedders see raw inputs, modulation sets scales of the whole stream).

Order of operations: merge inference LoRAs into the full-precision weights first
(``lora_merge``), quantize second; for training quantize first, apply the LoRA network second -- its
wrapper calls this class's ``forward`` and adds the low-rank term in the LoRA's own dtype. Both can happen while the DiT streams in
(:class:`Fp8DitStep`, after :class:`~tsumugi.networks.lora_merge.LoraMergeStep`), with the same result
and without a full-precision copy of the model. A scaled
weight cannot take a merge afterwards (``LoRANetwork.merge_into_base`` refuses because of
``scale_weight``).

``torch._scaled_mm`` (fp8 tensor cores, activations quantized per row at run time) is used only when
all of these hold: CUDA device of compute capability >= 8.9, bf16 compute, per-row or no weight scales
(``cuBLAS`` cannot apply per-block weight scales, so the default block-wise mode always dequantizes),
in/out features multiples of 16, frozen weight and bias, and a per-layer self-check on the first such
call -- relative error of the ``_scaled_mm`` output against the dequantized matmul on the same input at
most :data:`SCALED_MM_MAX_REL_ERROR`. A layer failing the check uses the dequantize path from then on.
On CPU the dequantize path is always used.

Without gradient checkpointing autograd keeps each dequantized weight of the dequantize path until
backward (as with any ``F.linear``), which gives back most of the saving during training; the fp8
trainers run with ``--gradient_checkpointing``, which recomputes them one block at a time.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tsumugi.errors import UserError
from tsumugi.memory.fp8_linear import FP8_MAX
from tsumugi.models.stream import LoadStep

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
_FP8_DTYPES = tuple(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
)

SCALED_MM_MAX_REL_ERROR = 0.05
"""Bound of the ``_scaled_mm`` self-check: ``||y_fast - y_dequant|| / ||y_dequant||`` on the layer's first
input. Per-row e4m3 rounding of the activations alone gives about 0.026 on Gaussian inputs (less when a
few channels dominate a row); twice that accepts healthy layers and rejects a kernel that misapplies
scales or layouts, or activations whose rounding error is unusually large."""

_SCALE_MIN = 1e-8

Arch = Literal["qwen_image", "zimage"]

# Module-path rules: (prefixes of quantized containers, substrings that exclude a Linear).
_RULES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "qwen_image": (("transformer_blocks.",), ("norm", "time_text_embed")),
    "zimage": (("layers.", "noise_refiner.", "context_refiner."), ("_modulation", "norm")),
}
_ARCH_ALIASES = {
    "qwen_image": "qwen_image",
    "qwen-image": "qwen_image",
    "zimage": "zimage",
    "z_image": "zimage",
    "z-image": "zimage",
}
_QWEN_MODULATION = (".img_mod.", ".txt_mod.")


def _resolve_arch(arch: str) -> str:
    try:
        return _ARCH_ALIASES[arch.lower()]
    except KeyError:
        raise ValueError(
            f"fp8 DiT quantization: unknown architecture {arch!r} (qwen_image or zimage)"
        ) from None


def fp8_target_names(dit: nn.Module, arch: Arch | str, *, keep_modulation: bool = False) -> list[str]:
    """Dotted paths of the Linears :func:`quantize_dit_fp8` quantizes, in model order."""
    prefixes, excludes = _RULES[_resolve_arch(arch)]
    if keep_modulation and _resolve_arch(arch) == "qwen_image":
        excludes = excludes + _QWEN_MODULATION
    return [
        name
        for name, module in dit.named_modules()
        if isinstance(module, nn.Linear)
        and name.startswith(prefixes)
        and not any(e in name for e in excludes)
    ]


# ---------------------------------------------------------------------------------------------------
# Quantization math


def quantize_weight_fp8(
    weight: torch.Tensor, *, scaled: bool, block_size: int | None = 64
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(w_fp8, scale)`` of a 2-D weight; ``scale`` None (plain), ``[out, 1]`` or ``[out, in/bs, 1]``.

    Dequantized weight: ``w_fp8 * scale`` (broadcast over the block view ``[out, in/bs, bs]``). Every
    scale covers part of one row, so the rows are quantized a chunk at a time: the float32 scratch is
    that of :data:`_CHUNK_ELEMENTS` elements, not of the whole weight (a 3840 x 10240 Linear would need
    over 0.5 GB of it at once while the model streams in), and the result is the same bit for bit.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D Linear weight, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    rows = max(1, _CHUNK_ELEMENTS // max(1, in_f))
    q = torch.empty(out_f, in_f, dtype=FP8_DTYPE, device=weight.device)
    scale = None
    for start in range(0, out_f, rows):
        part_q, part_scale = _quantize_rows(weight[start : start + rows], scaled, block_size)
        q[start : start + rows] = part_q
        if part_scale is not None:
            if scale is None:
                scale = torch.empty((out_f, *part_scale.shape[1:]), dtype=part_scale.dtype, device=weight.device)
            scale[start : start + rows] = part_scale
    return q, scale


_CHUNK_ELEMENTS = 1 << 22
"""weight elements quantized at once by :func:`quantize_weight_fp8` (16 MiB of float32 scratch)"""


def _quantize_rows(
    weight: torch.Tensor, scaled: bool, block_size: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = weight.detach().float()
    if not scaled:
        return w.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), None
    out_f, in_f = w.shape
    if block_size and in_f % block_size == 0:
        w = w.view(out_f, in_f // block_size, block_size)
        amax = w.abs().amax(dim=2, keepdim=True)
    else:
        amax = w.abs().amax(dim=1, keepdim=True)
    store = weight.dtype
    floor = max(_SCALE_MIN, torch.finfo(store).tiny)
    scale = (amax / FP8_MAX).clamp(min=floor).to(store)
    q = (w / scale.float()).nan_to_num(0.0).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(out_f, in_f), scale


def dequantize_weight_fp8(
    w_fp8: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`quantize_weight_fp8` in ``dtype`` (fp8 -> bf16/fp16/fp32 is exact)."""
    w = w_fp8.to(dtype)
    if scale is None:
        return w
    scale = scale.to(dtype)
    if scale.dim() == 3:
        out_f, in_f = w.shape
        return (w.view(out_f, scale.shape[1], -1) * scale).view(out_f, in_f)
    return w * scale


# ---------------------------------------------------------------------------------------------------
# The layer


@functools.cache
def _cuda_supports_fp8_mm(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


def scaled_mm_device_ok(device: torch.device) -> bool:
    """True on CUDA GPUs of compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    if device.type != "cuda":
        return False
    return _cuda_supports_fp8_mm(device.index if device.index is not None else torch.cuda.current_device())


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((y.float() - ref).norm() / ref.norm().clamp(min=1e-30))


def _scaled_mm_matmul(x2d: torch.Tensor, layer: Fp8DitLinear) -> torch.Tensor:
    """``x2d @ W^T`` on fp8 tensor cores: activations quantized per row, weight scaled per output row."""
    x_scale = (x2d.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    xq = (x2d.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    w = layer.weight
    if layer.scale_weight is None:
        w_scale = torch.ones(1, w.shape[0], device=w.device, dtype=torch.float32)
    else:
        w_scale = layer.scale_weight.float().view(1, -1)
    y = torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x2d.dtype)
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y


class _ScaledMMLinear(torch.autograd.Function):
    """``_scaled_mm`` forward; backward gives the input gradient through the dequantized weight.

    The layer (not its tensors) is kept for backward, so block swap may move or re-point the weight in
    between: backward reads whatever the layer holds when the block is resident again.
    """

    @staticmethod
    def forward(ctx: Any, x2d: torch.Tensor, layer: Fp8DitLinear) -> torch.Tensor:
        ctx.layer = layer
        return _scaled_mm_matmul(x2d, layer)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        weight = ctx.layer.dequantized_weight(grad_out.dtype)
        return grad_out @ weight, None


class Fp8DitLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is stored as ``float8_e4m3fn`` (with optional ``scale_weight``).

    Only made by :func:`quantize_dit_fp8` (class swap of an existing Linear). ``orig_dtype`` is the
    weight's dtype before quantization; ``block_size`` the scale block width (None: per-row scales or
    no scales).
    """

    scale_weight: torch.Tensor | None
    orig_dtype: torch.dtype
    block_size: int | None
    scaled_mm_allowed: bool
    scaled_mm_state: bool | None  # None: not checked yet; True/False: self-check outcome

    @classmethod
    def convert(
        cls, linear: nn.Linear, *, scaled: bool, block_size: int | None, scaled_mm: bool
    ) -> Fp8DitLinear:
        if isinstance(linear, Fp8DitLinear):
            raise UserError("the DiT is already quantized to fp8; quantize_dit_fp8 must run once")
        if type(linear) is not nn.Linear:
            raise TypeError(f"fp8: expected a plain nn.Linear, got {type(linear).__name__}")
        if "forward" in linear.__dict__:
            raise UserError(
                "fp8: quantize the DiT before applying a LoRA network (a Linear's forward is wrapped)"
            )
        if linear.weight.dtype in _FP8_DTYPES:
            raise UserError(
                f"--fp8_base/--fp8_scaled need fp16/bf16/fp32 DiT weights, but a Linear weight is already "
                f"{linear.weight.dtype}: load the bf16 checkpoint instead of a pre-quantized one"
            )
        with torch.no_grad():
            q, scale = quantize_weight_fp8(linear.weight, scaled=scaled, block_size=block_size)
        orig_dtype = linear.weight.dtype
        linear.__class__ = cls
        layer: Fp8DitLinear = linear  # type: ignore[assignment]
        layer.weight = nn.Parameter(q, requires_grad=False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)  # fp8 layers are frozen as a whole (LoRA training only)
        layer.register_buffer("scale_weight", scale)
        layer.orig_dtype = orig_dtype
        layer.block_size = (
            layer.in_features // scale.shape[1] if scale is not None and scale.dim() == 3 else None
        )
        layer.scaled_mm_allowed = bool(scaled_mm) and layer.block_size is None
        layer.scaled_mm_state = None
        return layer

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_weight_fp8(self.weight, self.scale_weight, dtype)

    def _use_scaled_mm(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        return (
            self.scaled_mm_allowed
            and self.scaled_mm_state is not False
            and dtype == torch.bfloat16
            and x.numel() > 0
            and self.in_features % 16 == 0
            and self.out_features % 16 == 0
            and not self.weight.requires_grad
            and (self.bias is None or not self.bias.requires_grad)
            and scaled_mm_device_ok(x.device)
        )

    def _forward_scaled_mm(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        x2d = x.reshape(-1, self.in_features).to(dtype)
        y2d = _ScaledMMLinear.apply(x2d, self)
        if self.scaled_mm_state is None:
            with torch.no_grad():
                ref = self._forward_dequant(x2d, dtype)
            err = _relative_error(y2d.detach(), ref)
            self.scaled_mm_state = err <= SCALED_MM_MAX_REL_ERROR
            logger.debug(
                "fp8 _scaled_mm self-check %s: rel. error %.4f -> %s",
                self.extra_repr(),
                err,
                self.scaled_mm_state,
            )
            if not self.scaled_mm_state:
                return None
        return y2d.view(*x.shape[:-1], self.out_features)

    def _forward_dequant(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x, self.dequantized_weight(dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        if self._use_scaled_mm(x, dtype):
            y = self._forward_scaled_mm(x, dtype)
            if y is not None:
                return y
        return self._forward_dequant(x, dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> Fp8DitLinear:
        # ``module.to(dtype)`` converts every floating tensor, fp8 included; keep the weight fp8 (the
        # round trip through a wider float is exact) so a later ``dit.to(device, dtype)`` cannot silently
        # double its memory. Scales and bias follow the conversion like any buffer/parameter.
        super()._apply(fn, recurse)
        if self.weight.dtype != FP8_DTYPE:
            self.weight.data = self.weight.data.to(FP8_DTYPE)
        return self

    def extra_repr(self) -> str:
        if self.scale_weight is None:
            mode = "plain"
        elif self.block_size is not None:
            mode = f"block={self.block_size}"
        else:
            mode = "per-row"
        return (
            f"{super().extra_repr()}, fp8_e4m3fn {mode}, from {str(self.orig_dtype).removeprefix('torch.')}"
        )


# ---------------------------------------------------------------------------------------------------
# Whole DiT


def quantize_dit_fp8(
    dit: nn.Module,
    arch: Arch | str,
    *,
    scaled: bool,
    block_size: int | None = 64,
    keep_modulation: bool = False,
    scaled_mm: bool = True,
) -> list[str]:
    """Quantize the target Linears of ``dit`` in place (see the module docstring); returns their paths.

    ``scaled``: ``--fp8_scaled`` (block-wise scales) or plain ``--fp8_base`` cast. ``block_size``: width
    of the scale blocks along the input dimension; None selects one scale per output row.
    ``keep_modulation``: leave Qwen-Image's ``img_mod.1``/``txt_mod.1`` in source precision (Z-Image's
    ``adaLN_modulation`` always is). ``scaled_mm``: allow the ``_scaled_mm`` path where it applies.
    Quantization runs on each weight's current device; merge inference LoRAs before, apply a training
    LoRA network after.
    """
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be a positive integer or None, got {block_size}")
    names = fp8_target_names(dit, arch, keep_modulation=keep_modulation)
    if not names:
        raise UserError(
            f"fp8: no {arch} transformer-block Linears found in {type(dit).__name__}; wrong --model?"
        )
    for name in names:
        Fp8DitLinear.convert(
            dit.get_submodule(name), scaled=scaled, block_size=block_size, scaled_mm=scaled_mm
        )
    report = fp8_memory_report(dit)
    logger.info(
        "fp8 %s: %d Linears quantized, weights %.1f -> %.1f MiB",
        "scaled" if scaled else "plain cast",
        len(names),
        report["linear_weight_bytes_before"] / 2**20,
        report["linear_weight_bytes_after"] / 2**20,
    )
    return names


class Fp8DitStep(LoadStep):
    """:func:`quantize_dit_fp8` while the DiT streams in (``load_dit(..., steps=[...])``).

    ``prepare`` runs :func:`quantize_dit_fp8` on the meta-device DiT (class swap, fp8 and scale
    stand-ins); ``apply`` quantizes each target weight as it arrives, with the same
    :func:`quantize_weight_fp8` call as quantize-after-load, so the result is bit-identical to it
    without the full-precision model ever existing. Arguments as :func:`quantize_dit_fp8`.
    """

    def __init__(
        self,
        arch: Arch | str,
        *,
        scaled: bool,
        block_size: int | None = 64,
        keep_modulation: bool = False,
        scaled_mm: bool = True,
    ) -> None:
        self.arch, self.scaled, self.block_size = arch, scaled, block_size
        self.keep_modulation, self.scaled_mm = keep_modulation, scaled_mm
        self.targets: frozenset[str] = frozenset()

    def prepare(self, model: nn.Module) -> None:
        names = quantize_dit_fp8(model, self.arch, scaled=self.scaled, block_size=self.block_size,
                                 keep_modulation=self.keep_modulation, scaled_mm=self.scaled_mm)
        self.targets = frozenset(f"{n}.weight" for n in names)

    def apply(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if key not in self.targets:
            return {key: tensor}
        if tensor.dtype in _FP8_DTYPES:
            raise UserError(
                f"--fp8_base/--fp8_scaled need fp16/bf16/fp32 DiT weights, but {key} is {tensor.dtype}"
            )
        q, scale = quantize_weight_fp8(tensor, scaled=self.scaled, block_size=self.block_size)
        out = {key: q}
        if scale is not None:
            out[key[: -len("weight")] + "scale_weight"] = scale
        return out


def fp8_memory_report(dit: nn.Module) -> dict[str, int]:
    """Byte counts of ``dit`` before and after :func:`quantize_dit_fp8` (before: weights in ``orig_dtype``).

    Keys: ``quantized_linears``; ``linear_weight_bytes_before``/``_after`` (weights of the quantized
    Linears; after = fp8 weights + scales); ``scale_bytes``; ``total_bytes_before``/``_after`` (every
    parameter and buffer of the DiT, shared tensors counted once).
    """
    n = weight_before = weight_after = scale_bytes = 0
    for module in dit.modules():
        if isinstance(module, Fp8DitLinear):
            n += 1
            weight_before += module.weight.numel() * module.orig_dtype.itemsize
            weight_after += module.weight.numel() * module.weight.element_size()
            if module.scale_weight is not None:
                scale_bytes += module.scale_weight.numel() * module.scale_weight.element_size()
    seen: set[int] = set()
    total = 0
    for t in list(dit.parameters()) + list(dit.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    after = weight_after + scale_bytes
    return {
        "quantized_linears": n,
        "linear_weight_bytes_before": weight_before,
        "linear_weight_bytes_after": after,
        "scale_bytes": scale_bytes,
        "total_bytes_before": total - after + weight_before,
        "total_bytes_after": total,
    }
