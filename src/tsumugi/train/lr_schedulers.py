"""Learning-rate scheduler from the ``--lr_scheduler*`` flags.

Facts: ``docs/design.md``, "Learning-rate schedulers".

Every scheduler is a ``torch.optim.lr_scheduler.LRScheduler``; the LR used for the ``k``-th scheduler
step (``k = 0`` before the first ``step()``) is ``base_lr * f(k)`` with, for ``W`` warmup steps, ``N``
total steps, ``D`` decay steps, ``m = --lr_scheduler_min_lr_ratio``, ``c = --lr_scheduler_num_cycles``,
``p = (k - W) / (N - W)``:

==========================  =====================================================================
``constant``                ``1`` (diffusers)
``constant_with_warmup``    ``k/W`` then ``1`` (diffusers)
``linear``                  ``k/W`` then ``(N - k)/(N - W)`` (diffusers)
``cosine``                  ``k/W`` then ``(1 + cos(pi p))/2`` (diffusers)
``cosine_with_restarts``    ``k/W`` then ``(1 + cos(pi ((c p) mod 1)))/2``, 0 from ``p >= 1`` (diffusers)
``polynomial``              ``k/W`` then ``(1 - lr_end/lr)(1 - p)^power + lr_end/lr`` (diffusers; ``lr_end`` 1e-7)
``piecewise_constant``      ``--lr_scheduler_args step_rules='1:10,0.1:20,0.01'`` (diffusers)
``inverse_sqrt``            ``k/W`` then ``1/sqrt((k - W + T)/T)``, ``T`` = timescale (default ``W``, or 10000)
``cosine_with_min_lr``      ``k/W`` then ``m + (1 - m)(1 + cos(2 pi (c/2) min(p, 1)))/2`` (``m`` required)
``warmup_stable_decay``     ``m + (1-m) k/W``; ``1`` until ``N - D``; then decay over ``D`` steps to ``m``
                            (``decay_type`` cosine (default, ``c/2`` cycles), linear or 1-sqrt;
                            ``warmup_type`` linear (default), cosine or 1-sqrt; ``m`` default 0)
``rex``                     ``m + (1-m) k/W``; then with ``z = 1 - (k - W)/(N - W)``:
                            ``m + (1 - m) z/(alpha + beta z)`` (``rex_alpha`` 0.1, ``rex_beta`` 0.9; ``m`` 0.01)
``adafactor``               transformers ``AdafactorSchedule`` (Adafactor computes its own step size)
==========================  =====================================================================

The last four are ours (diffusers has none of them); the formulas are those of transformers'
``inverse_sqrt``, ``cosine_with_min_lr``, ``warmup_stable_decay`` and Musubi's ``RexLR``, except that rex
starts its warmup at ``m`` on step 0 and scales each parameter group's own LR (Musubi's RexLR uses
``--learning_rate`` for every group during warmup and an odd value on step 0).

Step counts: ``N = num_training_steps * num_processes``, because accelerate's prepared scheduler is
stepped once per process for each optimizer step. ``--lr_warmup_steps``/``--lr_decay_steps`` given as a
ratio (float < 1 or ``N%``) are ``int(ratio * N)``; given as a step count they are optimizer steps and are
multiplied by ``num_processes`` too (Musubi leaves step counts unscaled, so on 2 GPUs its warmup ends
after half the optimizer steps asked for). ``--lr_scheduler_timescale`` is scaled the same way;
``piecewise_constant`` rules and ``--lr_scheduler_type`` arguments are passed through unchanged.

``--lr_scheduler_type`` (a ``torch.optim.lr_scheduler`` class name, case-insensitive, or a dotted
path) overrides ``--lr_scheduler`` and receives only ``--lr_scheduler_args``. Schedule-free optimizers
get a constant scheduler.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import logging
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from tsumugi.errors import UserError
from tsumugi.train.optimizers import OptimizerInfo, is_schedule_free, parse_literal_args

logger = logging.getLogger(__name__)

DIFFUSERS_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                        "polynomial", "piecewise_constant")
OWN_SCHEDULERS = ("inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "rex")
LR_SCHEDULERS = (*DIFFUSERS_SCHEDULERS, *OWN_SCHEDULERS, "adafactor")
WSD_SHAPES = ("linear", "cosine", "1-sqrt")
REX_ALPHA = 0.1
REX_BETA = 0.9
REX_MIN_LR_RATIO = 0.01


def steps_or_ratio(value: str | int | float) -> int | float:
    """``--lr_warmup_steps``/``--lr_decay_steps`` type: an int >= 0 (steps), a float in [0, 1) (ratio of
    the training steps) or ``N%`` (0 <= N <= 100, ratio N/100). ``"5.0"`` is the int 5, as in Musubi."""
    if isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"{value!r} is not a step count")
    text = str(value).strip()
    try:
        if text.endswith("%"):
            ratio = float(text[:-1]) / 100.0
            if not 0.0 <= ratio <= 1.0:
                raise argparse.ArgumentTypeError(f"percentage {text!r} is not in 0%..100%")
            return ratio
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a step count, a ratio < 1 or a percentage") from None
    if not number >= 0:  # negative or NaN
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    if number >= 1:
        if not number.is_integer():
            raise argparse.ArgumentTypeError(f"{text!r}: a ratio must be < 1 and a step count must be whole")
        return int(number)
    return 0 if number == 0 else number


def resolve_steps(value: Any, total_steps: int, flag: str, num_processes: int = 1) -> int:
    """Scheduler steps of ``value``: a ratio (float) of ``total_steps``, or optimizer steps (int) times
    ``num_processes``; strings such as ``"10%"`` are accepted too."""
    if value is None:
        return 0
    try:
        value = steps_or_ratio(value)
    except argparse.ArgumentTypeError as exc:
        raise UserError(f"{flag}: {exc}") from None
    if isinstance(value, float):
        return int(value * total_steps)
    return value * num_processes


# ---------------------------------------------------------------------------------------------- curves


def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def inverse_sqrt_lambda(warmup: int, timescale: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return _warmup(step, warmup)
        return 1.0 / math.sqrt((step - warmup + timescale) / timescale)

    return f


def cosine_with_min_lr_lambda(warmup: int, total: int, num_cycles: float, min_lr_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return _warmup(step, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        cosine = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
        return max(0.0, min_lr_ratio + (1.0 - min_lr_ratio) * cosine)

    return f


def _shape(kind: str, progress: float, num_cycles: float, rising: bool) -> float:
    """0..1 factor of a WSD phase (rising for warmup, falling for decay)."""
    if kind == "linear":
        return progress if rising else 1.0 - progress
    if kind == "cosine":
        if rising:
            return 0.5 * (1.0 - math.cos(math.pi * progress))
        return 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    # 1-sqrt
    return 1.0 - math.sqrt(1.0 - progress) if rising else 1.0 - math.sqrt(progress)


def warmup_stable_decay_lambda(warmup: int, stable: int, decay: int, num_cycles: float, min_lr_ratio: float,
                               warmup_type: str = "linear", decay_type: str = "cosine") -> Callable[[int], float]:
    def f(step: int) -> float:
        m = min_lr_ratio
        if step < warmup:
            return max(0.0, m + (1.0 - m) * _shape(warmup_type, step / max(1, warmup), num_cycles, True))
        if step < warmup + stable:
            return 1.0
        if step < warmup + stable + decay:
            progress = (step - warmup - stable) / max(1, decay)
            return max(0.0, m + (1.0 - m) * _shape(decay_type, progress, num_cycles, False))
        return m

    return f


def rex_lambda(warmup: int, total: int, min_lr_ratio: float, alpha: float = REX_ALPHA,
               beta: float = REX_BETA) -> Callable[[int], float]:
    def f(step: int) -> float:
        m = min_lr_ratio
        if step < warmup:
            return m + (1.0 - m) * step / warmup
        remaining = total - warmup
        after = step - warmup
        if remaining <= 0 or after >= remaining:
            return m
        z = (remaining - after) / remaining
        return m + (1.0 - m) * z / (alpha + beta * z)

    return f


def constant_scheduler(optimizer: torch.optim.Optimizer) -> LambdaLR:
    return LambdaLR(optimizer, lambda _: 1.0)


# ---------------------------------------------------------------------------------------------- creation


def _own_kwargs(kwargs: dict[str, Any], allowed: tuple[str, ...], name: str) -> dict[str, Any]:
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise UserError(f"--lr_scheduler_args: {name} does not take {', '.join(unknown)} (accepted: {accepted})")
    return kwargs


def _call(func: Callable[..., Any], what: str, *args: Any, **kwargs: Any) -> Any:
    try:
        return func(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{what} / --lr_scheduler_args: {exc}") from None


def _scheduler_class(name: str) -> Any:
    if "." in name:
        module_name, _, class_name = name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UserError(f"--lr_scheduler_type {name}: cannot import '{module_name}' ({exc})") from None
        found = getattr(module, class_name, None)
        if found is None:
            raise UserError(f"--lr_scheduler_type {name}: no '{class_name}' in {module_name}")
        return found
    module = torch.optim.lr_scheduler
    classes = {n: c for n, c in vars(module).items()
               if inspect.isclass(c) and issubclass(c, LRScheduler) and not n.startswith("_")}
    for n, c in classes.items():
        if n.lower() == name.lower():
            return c
    close = difflib.get_close_matches(name, list(classes), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UserError(f"--lr_scheduler_type: no scheduler '{name}' in torch.optim.lr_scheduler{hint}")


def _is_relative_step_adafactor(optimizer: torch.optim.Optimizer) -> bool:
    module = sys.modules.get("transformers.optimization")  # an Adafactor instance means it is imported
    if module is None:
        return False
    return isinstance(optimizer, module.Adafactor) and bool(optimizer.defaults.get("relative_step"))


def create_lr_scheduler(args: Any, optimizer: torch.optim.Optimizer, num_training_steps: int,
                        num_processes: int = 1, *, optimizer_info: OptimizerInfo | None = None) -> LRScheduler:
    """Scheduler of the ``--lr_scheduler*`` flags for ``num_training_steps`` optimizer steps.

    ``num_processes``: times the scheduler is stepped per optimizer step (accelerate's prepared
    scheduler: the number of processes; 1 when the trainer steps it itself once per optimizer step).
    ``optimizer_info``: from :func:`~tsumugi.train.optimizers.create_optimizer` (Adafactor's relative
    step and schedule-free optimizers are also recognised without it).
    """
    if num_training_steps < 1 or num_processes < 1:
        raise UserError(f"--max_train_steps: must be >= 1, got {num_training_steps}")
    total = num_training_steps * num_processes
    name = (getattr(args, "lr_scheduler", None) or "constant").strip()
    scheduler_type = (getattr(args, "lr_scheduler_type", None) or "").strip()
    kwargs = parse_literal_args(getattr(args, "lr_scheduler_args", None), "--lr_scheduler_args")
    warmup = resolve_steps(getattr(args, "lr_warmup_steps", 0), total, "--lr_warmup_steps", num_processes)
    decay = resolve_steps(getattr(args, "lr_decay_steps", 0), total, "--lr_decay_steps", num_processes)
    num_cycles = getattr(args, "lr_scheduler_num_cycles", 1)
    power = getattr(args, "lr_scheduler_power", 1.0)
    timescale = getattr(args, "lr_scheduler_timescale", None)
    min_lr_ratio = getattr(args, "lr_scheduler_min_lr_ratio", None)
    if min_lr_ratio is not None and not 0.0 <= min_lr_ratio <= 1.0:
        raise UserError(f"--lr_scheduler_min_lr_ratio: must be in 0..1, got {min_lr_ratio}")

    optimizer_type = getattr(args, "optimizer_type", "")
    if (optimizer_info is not None and optimizer_info.schedule_free) or is_schedule_free(optimizer_type):
        if name != "constant" or scheduler_type or warmup:
            logger.warning("schedule-free optimizer: --lr_scheduler/--lr_warmup_steps ignored (constant LR)")
        return constant_scheduler(optimizer)

    if scheduler_type:
        cls = _scheduler_class(scheduler_type)
        logger.info("lr scheduler %s | %s", scheduler_type, kwargs)
        return _call(cls, f"--lr_scheduler_type {scheduler_type}", optimizer, **kwargs)

    override = optimizer_info.lr_scheduler if optimizer_info is not None else None
    if override or name.lower().startswith("adafactor") or _is_relative_step_adafactor(optimizer):
        return _adafactor_scheduler(args, optimizer, name, override, warmup)

    key = name.lower()
    if key not in LR_SCHEDULERS:
        close = difflib.get_close_matches(key, LR_SCHEDULERS, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"--lr_scheduler: unknown scheduler {name!r}{hint}; expected one of {', '.join(LR_SCHEDULERS)}")
    if key in ("constant", "piecewise_constant") and warmup:
        raise UserError(f"--lr_warmup_steps has no effect with --lr_scheduler {key}; drop it or use constant_with_warmup")
    if warmup > total:
        raise UserError(f"--lr_warmup_steps ({warmup} scheduler steps) is longer than the training ({total} steps)")
    if key == "warmup_stable_decay" and warmup + decay > total:
        raise UserError(
            f"--lr_warmup_steps + --lr_decay_steps ({warmup} + {decay} scheduler steps) exceed the training ({total} steps)"
        )
    what = f"--lr_scheduler {key}"
    logger.info("lr scheduler %s: %d steps, %d warmup | %s", key, total, warmup, kwargs)

    if key in DIFFUSERS_SCHEDULERS:
        from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

        func = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(key)]
        if key == "constant":
            return _call(func, what, optimizer, **kwargs)
        if key == "piecewise_constant":
            if "step_rules" not in kwargs:
                raise UserError("--lr_scheduler piecewise_constant needs --lr_scheduler_args step_rules='1:10,0.1:20,0.01'")
            return _call(func, what, optimizer, **kwargs)
        if key == "constant_with_warmup":
            return _call(func, what, optimizer, num_warmup_steps=warmup, **kwargs)
        extra: dict[str, Any] = {}
        if key == "cosine_with_restarts":
            extra["num_cycles"] = num_cycles
        elif key == "polynomial":
            extra["power"] = power
        return _call(func, what, optimizer, num_warmup_steps=warmup, num_training_steps=total, **extra, **kwargs)

    if key == "inverse_sqrt":
        _own_kwargs(kwargs, (), key)
        scale = timescale * num_processes if timescale else (warmup or 10_000)
        return LambdaLR(optimizer, inverse_sqrt_lambda(warmup, scale))
    if key == "cosine_with_min_lr":
        _own_kwargs(kwargs, (), key)
        if min_lr_ratio is None:
            raise UserError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (e.g. 0.1)")
        return LambdaLR(optimizer, cosine_with_min_lr_lambda(warmup, total, num_cycles / 2, min_lr_ratio))
    if key == "warmup_stable_decay":
        _own_kwargs(kwargs, ("warmup_type", "decay_type"), key)
        shapes = {k: kwargs.get(k, default) for k, default in (("warmup_type", "linear"), ("decay_type", "cosine"))}
        for k, v in shapes.items():
            if v not in WSD_SHAPES:
                raise UserError(f"--lr_scheduler_args {k}={v!r}: expected one of {', '.join(WSD_SHAPES)}")
        return LambdaLR(optimizer, warmup_stable_decay_lambda(
            warmup, total - warmup - decay, decay, num_cycles / 2, min_lr_ratio or 0.0, **shapes))
    # rex
    _own_kwargs(kwargs, ("rex_alpha", "rex_beta"), key)
    alpha = kwargs.get("rex_alpha", REX_ALPHA)
    beta = kwargs.get("rex_beta", REX_BETA)
    if alpha + beta <= 0 or alpha < 0 or beta < 0:
        raise UserError(f"--lr_scheduler_args: rex_alpha ({alpha}) and rex_beta ({beta}) must be >= 0 with a positive sum")
    ratio = REX_MIN_LR_RATIO if min_lr_ratio is None else min_lr_ratio
    return LambdaLR(optimizer, rex_lambda(warmup, total, ratio, float(alpha), float(beta)))


def _adafactor_scheduler(args: Any, optimizer: torch.optim.Optimizer, name: str, override: str | None,
                         warmup: int) -> LRScheduler:
    from transformers.optimization import Adafactor, AdafactorSchedule

    if not isinstance(optimizer, Adafactor):
        raise UserError(
            f"--lr_scheduler {name} needs --optimizer_type AdaFactor (got {type(optimizer).__name__})"
        )
    if warmup:
        raise UserError(
            "--lr_warmup_steps has no effect with the adafactor scheduler (Adafactor with relative_step=True "
            "warms up by itself; use --optimizer_args warmup_init=True); drop --lr_warmup_steps"
        )
    spec = override or name
    initial_lr: float | None = None
    if ":" in spec:
        try:
            initial_lr = float(spec.split(":", 1)[1])
        except ValueError:
            raise UserError(f"--lr_scheduler {spec}: expected adafactor or adafactor:<initial lr>") from None
    if initial_lr is None:
        initial_lr = float(getattr(args, "learning_rate", 0.0) or 0.0)
    if name and not name.lower().startswith("adafactor") and name != "constant":
        logger.info("Adafactor with relative_step: --lr_scheduler %s replaced by adafactor", name)
    return AdafactorSchedule(optimizer, initial_lr)
