"""Adafactor stepped inside the backward pass (``--fused_backward_pass``, full fine-tuning).

Each trainable parameter gets a ``Tensor.register_post_accumulate_grad_hook``: as soon as its gradient
is complete, the hook applies the Adafactor update to that one parameter and frees the gradient, so the
whole set of gradients never exists at once (the point of the flag: a full fine-tune's gradients are as
large as the model).

:func:`adafactor_step_parameter` is ``transformers.optimization.Adafactor.step()`` for one parameter, with
the same operations in the same order (an fp32 run is bit-identical to ``Adafactor.step()``) and the same
state keys in ``optimizer.state[p]``, so ``state_dict()``/``load_state_dict()`` and a later plain
``optimizer.step()`` interoperate. bf16 parameters (``--full_bf16``) get the fp32 result written back with
stochastic rounding (:func:`copy_stochastic_`), which keeps updates smaller than half a bf16 ulp from
being rounded away every step.

:class:`FusedBackwardStep` holds the hooks. Unlike Musubi Tuner it supports gradient accumulation (hooks on
non-last micro-batches do nothing, gradients accumulate in ``p.grad`` as usual), it never touches the LR
scheduler (the loop steps it once per optimizer step) and it states plainly that ``max_grad_norm`` can only
clip per tensor. Usage::

    fused = FusedBackwardStep.attach(optimizer, max_grad_norm=0.0, reduce_grad=None, accumulation_steps=2)
    for micro in range(2):
        fused.begin_micro_batch(is_last=micro == 1)   # before every backward
        (loss(micro) / 2).backward()                   # the last one steps every parameter
    assert fused.num_stepped == fused.num_params
    lr_scheduler.step()

Block swap re-points ``param.data`` between a CPU master and a device copy: everything here reads
``p``/``p.grad`` at hook time and updates ``p`` in place (the Parameter itself, so its autograd version
counter moves and the swapper writes the device copy back), and the optimizer state is moved to the
gradient's device/dtype at hook time (as ``Adafactor.step()`` itself does).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from tsumugi.errors import UserError

logger = logging.getLogger(__name__)

ADAFACTOR_GROUP_KEYS = ("lr", "eps", "clip_threshold", "decay_rate", "beta1", "weight_decay", "scale_parameter",
                        "relative_step", "warmup_init")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------- rounding


def copy_stochastic_(target: torch.Tensor, source: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Write fp32 ``source`` into bf16 ``target`` with stochastic rounding; returns ``target``.

    Round-to-nearest loses any update below half a bf16 ulp (``1.0 + 1e-4`` stays ``1.0`` forever);
    stochastic rounding rounds up with probability equal to the distance to the lower neighbour, so the
    expected value is the fp32 value and small updates accumulate. Implementation: add a uniform random
    integer in ``[0, 2**16)`` to the fp32 bit pattern (as int32), clear the low 16 bits and keep the upper
    16 bits (bf16 is the upper half of fp32). Values exactly representable in bf16 are unchanged. NaN
    payloads living only in the low 16 bits could turn into inf (PyTorch's own NaN does not).
    ``generator`` (on ``source``'s device) makes the draws reproducible.
    """
    if target.dtype != torch.bfloat16:
        raise TypeError(f"copy_stochastic_: target must be bfloat16, got {target.dtype}")
    if source.dtype != torch.float32:
        raise TypeError(f"copy_stochastic_: source must be float32, got {source.dtype}")
    bits = torch.randint(0, 1 << 16, source.shape, dtype=torch.int32, device=source.device, generator=generator)
    bits.add_(source.view(torch.int32))
    bits.bitwise_and_(-65536)  # 0xFFFF0000: an exact bf16 value stored as fp32
    target.copy_(bits.view(torch.float32))  # exact: no rounding left to do
    return target


# ---------------------------------------------------------------------------------------------- Adafactor math
# Same expressions as transformers.optimization.Adafactor (its _get_lr/_rms/_approx_sq_grad/step), kept
# operation for operation so fp32 results are bit-identical.


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.norm(2) / (tensor.numel() ** 0.5)


def _get_lr(group: dict[str, Any], state: dict[str, Any]) -> Any:
    rel_step_sz = group["lr"]
    if group["relative_step"]:
        min_step = 1e-6 * state["step"] if group["warmup_init"] else 1e-2
        rel_step_sz = min(min_step, 1.0 / math.sqrt(state["step"]))
    param_scale = 1.0
    if group["scale_parameter"]:
        param_scale = max(group["eps"][1], state["RMS"])
    return param_scale * rel_step_sz


def _approx_sq_grad(exp_avg_sq_row: torch.Tensor, exp_avg_sq_col: torch.Tensor) -> torch.Tensor:
    r_factor = (exp_avg_sq_row / exp_avg_sq_row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    c_factor = exp_avg_sq_col.unsqueeze(-2).rsqrt()
    return torch.mul(r_factor, c_factor)


@torch.no_grad()
def adafactor_step_parameter(optimizer: torch.optim.Optimizer, p: torch.nn.Parameter, group: dict[str, Any],
                             generator: torch.Generator | None = None, *,
                             stochastic_rounding: bool = True) -> None:
    """``transformers`` ``Adafactor.step()`` restricted to parameter ``p`` of param group ``group``.

    Needed because the fused backward pass steps one parameter at a time from its gradient hook. Reads
    ``p.grad`` (skips ``p`` when it is None, as ``step()`` does) and keeps the state in
    ``optimizer.state[p]`` under ``step``/``RMS``/``exp_avg``/``exp_avg_sq_row``/``exp_avg_sq_col``/
    ``exp_avg_sq``. fp16/bf16 parameters are computed in fp32; bf16 ones are written back with
    :func:`copy_stochastic_` (``generator`` seeds it) unless ``stochastic_rounding=False`` (then
    round-to-nearest, like transformers); fp32 parameters are updated in place, bit-identical to
    ``step()``. The gradient is not freed here.
    """
    if p.grad is None:
        return
    grad = p.grad
    if grad.dtype in _LOW_PRECISION:
        grad = grad.float()
    if grad.is_sparse:
        raise RuntimeError("Adafactor does not support sparse gradients.")

    state = optimizer.state[p]
    grad_shape = grad.shape
    factored = len(grad_shape) >= 2
    use_first_moment = group["beta1"] is not None

    if len(state) == 0:
        state["step"] = 0
        if use_first_moment:
            state["exp_avg"] = torch.zeros_like(grad)
        if factored:
            state["exp_avg_sq_row"] = torch.zeros(grad_shape[:-1]).to(grad)
            state["exp_avg_sq_col"] = torch.zeros(grad_shape[:-2] + grad_shape[-1:]).to(grad)
        else:
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["RMS"] = 0
    else:
        # also brings state loaded on another device (or cast to bf16 by load_state_dict) to the grad's
        # device and fp32; a no-op when it is already there
        if use_first_moment:
            state["exp_avg"] = state["exp_avg"].to(grad)
        if factored:
            state["exp_avg_sq_row"] = state["exp_avg_sq_row"].to(grad)
            state["exp_avg_sq_col"] = state["exp_avg_sq_col"].to(grad)
        else:
            state["exp_avg_sq"] = state["exp_avg_sq"].to(grad)

    low_precision = p.dtype in _LOW_PRECISION
    p_data_fp32 = p.float() if low_precision else p  # fp32: update the Parameter itself (version counter moves)

    state["step"] += 1
    state["RMS"] = _rms(p_data_fp32)
    lr = _get_lr(group, state)

    beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
    update = (grad**2) + group["eps"][0]
    if factored:
        exp_avg_sq_row = state["exp_avg_sq_row"]
        exp_avg_sq_col = state["exp_avg_sq_col"]
        exp_avg_sq_row.mul_(beta2t).add_(update.mean(dim=-1), alpha=(1.0 - beta2t))
        exp_avg_sq_col.mul_(beta2t).add_(update.mean(dim=-2), alpha=(1.0 - beta2t))
        update = _approx_sq_grad(exp_avg_sq_row, exp_avg_sq_col)
        update.mul_(grad)
    else:
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2t).add_(update, alpha=(1.0 - beta2t))
        update = exp_avg_sq.rsqrt().mul_(grad)

    update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
    update.mul_(lr)

    if use_first_moment:
        exp_avg = state["exp_avg"]
        exp_avg.mul_(group["beta1"]).add_(update, alpha=(1 - group["beta1"]))
        update = exp_avg

    if group["weight_decay"] != 0:
        p_data_fp32.add_(p_data_fp32, alpha=(-group["weight_decay"] * lr))

    p_data_fp32.add_(-update)

    if low_precision:
        if p.dtype == torch.bfloat16 and stochastic_rounding:
            copy_stochastic_(p, p_data_fp32, generator)
        else:
            p.copy_(p_data_fp32)


def adafactor_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The step size each param group used last (from its first stepped parameter), for logging.

    ``AdafactorSchedule.get_lr()`` only reports it while ``params[0].grad`` is set, which the fused pass
    never leaves behind; this reads the optimizer state instead. A group with no state yet gives its
    ``lr`` (``0.0`` when None).
    """
    lrs = []
    for group in optimizer.param_groups:
        state = next((optimizer.state[p] for p in group["params"] if len(optimizer.state.get(p, {})) > 0), None)
        lrs.append(float(_get_lr(group, state)) if state is not None else float(group["lr"] or 0.0))
    return lrs


# ---------------------------------------------------------------------------------------------- hooks


def _check_adafactor_groups(optimizer: torch.optim.Optimizer) -> None:
    for i, group in enumerate(optimizer.param_groups):
        missing = [k for k in ADAFACTOR_GROUP_KEYS if k not in group]
        if missing:
            raise UserError(
                f"--fused_backward_pass needs --optimizer_type AdaFactor (param group {i} of "
                f"{type(optimizer).__name__} lacks {', '.join(missing)})"
            )


class FusedBackwardStep:
    """Post-accumulate-grad hooks that run the Adafactor step of each parameter during backward.

    Create with :meth:`attach`. Before every backward the loop calls :meth:`begin_micro_batch` (or sets
    :attr:`last_micro_batch`): on a non-last micro-batch of an accumulation the hooks do nothing and
    gradients accumulate in ``p.grad``; on the last one each hook runs ``reduce_grad`` (multi-process
    averaging), the per-tensor clip, :func:`adafactor_step_parameter`, then ``p.grad = None``.
    :attr:`num_stepped` counts the parameters stepped since the last :meth:`begin_micro_batch`; a
    parameter whose hook fires twice in one optimizer step (e.g. shared weights under reentrant gradient
    checkpointing, where partial gradients are accumulated in separate inner backward passes) is an error
    rather than a silent double step. The LR scheduler is not stepped here.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, max_grad_norm: float = 0.0,
                 reduce_grad: Callable[[torch.Tensor], torch.Tensor] | None = None, accumulation_steps: int = 1,
                 generator: torch.Generator | None = None, stochastic_rounding: bool = True) -> None:
        _check_adafactor_groups(optimizer)
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        self.optimizer = optimizer
        self.max_grad_norm = float(max_grad_norm or 0.0)
        self.reduce_grad = reduce_grad
        self.accumulation_steps = accumulation_steps
        self.generator = generator
        self.stochastic_rounding = stochastic_rounding
        # param -> group index; the group dict itself is looked up at hook time because
        # optimizer.load_state_dict() replaces the param_groups dicts
        self._group_index: dict[torch.nn.Parameter, int] = {}
        self._handles: list[Any] = []
        self._micro = 0  # micro-batches begun in the current accumulation (automatic mode)
        self._last = False
        self._begun = False
        self._stepped: set[int] = set()

    @classmethod
    def attach(cls, optimizer: torch.optim.Optimizer, *, max_grad_norm: float = 0.0,
               reduce_grad: Callable[[torch.Tensor], torch.Tensor] | None = None, accumulation_steps: int = 1,
               generator: torch.Generator | None = None, stochastic_rounding: bool = True) -> FusedBackwardStep:
        """Register a hook on every trainable parameter of ``optimizer`` (an Adafactor) and return the holder.

        ``max_grad_norm > 0`` clips each tensor's gradient to that norm on its own: global-norm clipping
        needs every gradient before the first step, which is exactly what the fused pass avoids, so a
        one-time warning says so. ``reduce_grad(grad) -> grad`` runs first (e.g. all-reduce average; every
        process fires the hooks in the same autograd order). ``accumulation_steps`` drives
        ``begin_micro_batch()`` without an explicit ``is_last``. ``generator`` seeds the bf16 stochastic
        rounding.
        """
        self = cls(optimizer, max_grad_norm=max_grad_norm, reduce_grad=reduce_grad,
                   accumulation_steps=accumulation_steps, generator=generator,
                   stochastic_rounding=stochastic_rounding)
        if self.max_grad_norm > 0:
            logger.warning(
                "--fused_backward_pass: --max_grad_norm %s clips each tensor's gradient separately (the global "
                "norm is unknown when a tensor steps as soon as its gradient is ready); use --max_grad_norm 0 "
                "to turn clipping off", self.max_grad_norm)
        for index, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if not p.requires_grad or p in self._group_index:
                    continue
                self._group_index[p] = index
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
        return self

    # -- loop interface ------------------------------------------------------------------------------

    @property
    def num_params(self) -> int:
        """How many parameters carry a hook (what :attr:`num_stepped` should reach on a last micro-batch)."""
        return len(self._group_index)

    @property
    def num_stepped(self) -> int:
        """Parameters stepped since the last :meth:`begin_micro_batch` (0 after a non-last micro-batch)."""
        return len(self._stepped)

    @property
    def last_micro_batch(self) -> bool:
        return self._last

    @last_micro_batch.setter
    def last_micro_batch(self, is_last: bool) -> None:
        self.begin_micro_batch(bool(is_last))

    def begin_micro_batch(self, is_last: bool | None = None) -> None:
        """Call before each backward. ``is_last`` says whether this backward completes the optimizer step;
        ``None`` counts micro-batches and makes every ``accumulation_steps``-th one the last."""
        if is_last is None:
            is_last = self._micro + 1 >= self.accumulation_steps
        self._micro = 0 if is_last else self._micro + 1
        self._last = is_last
        self._begun = True
        self._stepped = set()

    def remove(self) -> None:
        """Drop every hook (the parameters then need a normal ``optimizer.step()`` again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._group_index.clear()

    detach = remove

    # -- the hook ------------------------------------------------------------------------------------

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        if not self._begun:
            raise RuntimeError("--fused_backward_pass: call begin_micro_batch() before each backward")
        if not self._last or p.grad is None:
            return  # accumulating: leave p.grad for the next micro-batch
        key = id(p)
        if key in self._stepped:
            raise RuntimeError(
                "--fused_backward_pass: a parameter's gradient hook fired twice in one optimizer step (a weight "
                "used in several reentrant checkpoint segments?); call begin_micro_batch() before each backward "
                "and use non-reentrant gradient checkpointing")
        if self.reduce_grad is not None:
            p.grad = self.reduce_grad(p.grad)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        group = self.optimizer.param_groups[self._group_index[p]]
        adafactor_step_parameter(self.optimizer, p, group, self.generator,  # type: ignore[arg-type]
                                 stochastic_rounding=self.stochastic_rounding)
        p.grad = None
        self._stepped.add(key)

