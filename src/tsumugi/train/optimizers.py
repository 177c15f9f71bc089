"""Optimizer from ``--optimizer_type``/``--optimizer_args``/``--learning_rate`` (``docs/training.md``).

``--optimizer_type`` (case-insensitive unless a dotted path):

* ``""`` or ``AdamW``: ``torch.optim.AdamW`` (Musubi documents AdamW as the default but its empty
  string fails; here it works).
* ``AdamW8bit`` and other names ending in ``8bit`` or starting with ``Paged`` (``Lion8bit``,
  ``PagedAdamW8bit``, ``AdEMAMix8bit``...): ``bitsandbytes.optim.<name>``.
* ``AdaFactor``: ``transformers.optimization.Adafactor``. ``relative_step`` defaults to True;
  ``warmup_init=True`` forces it on. With ``relative_step`` the optimizer computes its own step size,
  ``--learning_rate`` only seeds the ``adafactor`` LR scheduler (``info.lr_scheduler == "adafactor:<lr>"``,
  which :func:`tsumugi.train.lr_schedulers.create_lr_scheduler` uses in place of ``--lr_scheduler``).
* ``Lion``: ``lion_pytorch.Lion``; ``Prodigy``: ``prodigyopt.Prodigy``; ``AdamWScheduleFree``,
  ``SGDScheduleFree``, ``RAdamScheduleFree``: ``schedulefree``; ``DAdaptAdam`` etc.: ``dadaptation``.
  A missing package is a :class:`UserError` naming what to ``pip install``.
* Any ``torch.optim`` class name (``SGD``, ``adam``, ``RMSprop``...; case-insensitive).
* A dotted path ``pkg.module.Class`` (exact case), e.g. ``bitsandbytes.optim.AdEMAMix8bit``.

Schedule-free optimizers (name ending in ``schedulefree``): ``info.schedule_free`` is True; the LR
scheduler is then constant, and :func:`optimizer_train`/:func:`optimizer_eval` must bracket training
and sampling/saving (they are no-ops for optimizers without ``train()``/``eval()``).

``--optimizer_args``: ``key=value`` items, values are Python literals (:func:`parse_optimizer_args`).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from tsumugi.errors import UserError

logger = logging.getLogger(__name__)

# lower-case short name -> (module, class, pip package)
KNOWN_OPTIMIZERS: dict[str, tuple[str, str, str]] = {
    "lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "adamwschedulefree": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "sgdschedulefree": ("schedulefree", "SGDScheduleFree", "schedulefree"),
    "radamschedulefree": ("schedulefree", "RAdamScheduleFree", "schedulefree"),
    "dadaptadam": ("dadaptation", "DAdaptAdam", "dadaptation"),
    "dadaptadagrad": ("dadaptation", "DAdaptAdaGrad", "dadaptation"),
    "dadaptadan": ("dadaptation", "DAdaptAdan", "dadaptation"),
    "dadaptadanip": ("dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
    "dadaptlion": ("dadaptation", "DAdaptLion", "dadaptation"),
    "dadaptsgd": ("dadaptation", "DAdaptSGD", "dadaptation"),
}
# import name -> pip package, for messages about dotted paths
PIP_NAMES = {
    "bitsandbytes": "bitsandbytes",
    "lion_pytorch": "lion-pytorch",
    "prodigyopt": "prodigyopt",
    "schedulefree": "schedulefree",
    "dadaptation": "dadaptation",
    "transformers": "transformers",
    "came_pytorch": "came-pytorch",
    "pytorch_optimizer": "pytorch-optimizer",
    "torchao": "torchao",
}


@dataclass
class OptimizerInfo:
    """What the trainer needs besides the optimizer itself."""

    name: str
    """``module.Class`` of the optimizer (Musubi's ``ss_optimizer`` before the arguments)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments passed to the constructor (besides ``lr``), after the Adafactor rules."""
    lr_scheduler: str | None = None
    """``adafactor:<lr>`` when the scheduler must be Adafactor's own; else ``None``."""
    schedule_free: bool = False
    """True for schedule-free optimizers: constant LR scheduler, ``train()``/``eval()`` switching."""

    @property
    def args_text(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.kwargs.items())

    @property
    def metadata(self) -> str:
        """``ss_optimizer`` value: ``module.Class`` or ``module.Class(k=v,...)``."""
        return self.name + (f"({self.args_text})" if self.kwargs else "")

    def __str__(self) -> str:
        return self.metadata


# ---------------------------------------------------------------------------------------------- key=value


def parse_literal_args(items: list[str] | None, flag: str) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{k: ast.literal_eval(v)}``; a bad item is a :class:`UserError` naming it."""
    result: dict[str, Any] = {}
    for item in items or []:
        if not isinstance(item, str) or "=" not in item:
            raise UserError(f"{flag}: {item!r} is not key=value")
        key, value = item.split("=", 1)
        key, value = key.strip(), value.strip()
        if "=" in value:
            raise UserError(f"{flag}: {item!r}: the value must not contain '='")
        if not key.isidentifier():
            raise UserError(f"{flag}: {item!r}: {key!r} is not a valid argument name")
        if not value:
            raise UserError(f"{flag}: {item!r} has no value")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise UserError(
                f"{flag}: {item!r}: {value!r} is not a Python literal (numbers, True/False/None, tuples "
                "like (0.9,0.99), quoted strings like 'text')"
            ) from None
        if key in result:
            raise UserError(f"{flag}: {key!r} is given twice")
        result[key] = parsed
    return result


def parse_optimizer_args(items: list[str] | None) -> dict[str, Any]:
    """``--optimizer_args`` -> keyword arguments (``betas=(0.9,0.99)``, ``betas=0.9,0.99``,
    ``weight_decay=0.01``, ``relative_step=False``)."""
    return parse_literal_args(items, "--optimizer_args")


# ---------------------------------------------------------------------------------------------- classes


def _import(module_name: str, what: str, pip_name: str | None = None) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = (exc.name or module_name).split(".")[0]
        pip_name = pip_name or PIP_NAMES.get(top)
        hint = f"pip install {pip_name}" if pip_name else f"install the package that provides '{top}'"
        raise UserError(f"--optimizer_type {what}: module '{exc.name or module_name}' is not installed ({hint})") from None
    except ImportError as exc:
        raise UserError(f"--optimizer_type {what}: cannot import '{module_name}' ({exc})") from None


def _class_in(module: Any, name: str, what: str, exact: bool) -> type:
    candidates = {n: getattr(module, n) for n in dir(module) if not n.startswith("_")}
    classes = {n: c for n, c in candidates.items() if inspect.isclass(c) and issubclass(c, torch.optim.Optimizer)}
    if exact:
        found = candidates.get(name)
        if found is not None and callable(found):
            return found
    else:
        for n, c in classes.items():
            if n.lower() == name.lower():
                return c
    close = difflib.get_close_matches(name, list(classes), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UserError(f"--optimizer_type {what}: no optimizer '{name}' in {module.__name__}{hint}")


def resolve_optimizer_class(optimizer_type: str | None) -> type:
    """The optimizer class of ``--optimizer_type`` (no construction)."""
    text = (optimizer_type or "").strip()
    key = text.lower()
    if key in ("", "adamw"):
        return torch.optim.AdamW
    if key == "adafactor":
        return _class_in(_import("transformers.optimization", text, "transformers"), "Adafactor", text, exact=True)
    if key in KNOWN_OPTIMIZERS:
        module_name, class_name, pip_name = KNOWN_OPTIMIZERS[key]
        return _class_in(_import(module_name, text, pip_name), class_name, text, exact=True)
    if "." in text:
        module_name, _, class_name = text.rpartition(".")
        return _class_in(_import(module_name, text), class_name, text, exact=True)
    if key.endswith("8bit") or key.startswith("paged"):
        return _class_in(_import("bitsandbytes.optim", text, "bitsandbytes"), text, text, exact=False)
    try:
        return _class_in(torch.optim, text, text, exact=False)
    except UserError:
        names = ["AdamW", "AdamW8bit", "AdaFactor", "Lion", "Prodigy", *(c for c, _ in _torch_optimizers())]
        close = difflib.get_close_matches(key, [n.lower() for n in names], n=1, cutoff=0.6)
        hint = f"did you mean {next(n for n in names if n.lower() == close[0])}? " if close else ""
        raise UserError(
            f"--optimizer_type: unknown optimizer {text!r}; {hint}use AdamW, AdamW8bit, AdaFactor, Lion, Prodigy, "
            "a torch.optim class name or a dotted path such as bitsandbytes.optim.AdEMAMix8bit"
        ) from None


def _torch_optimizers() -> list[tuple[str, type]]:
    return [(n, c) for n, c in vars(torch.optim).items()
            if inspect.isclass(c) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer]


def is_schedule_free(optimizer_type: str | None) -> bool:
    return (optimizer_type or "").strip().lower().endswith("schedulefree")


# ---------------------------------------------------------------------------------------------- creation


def create_optimizer(args: Any, param_groups: Any) -> tuple[torch.optim.Optimizer, OptimizerInfo]:
    """Build the optimizer of ``args.optimizer_type`` over ``param_groups`` (parameters or group dicts).

    Returns ``(optimizer, info)``; ``str(info)`` / ``info.metadata`` is the ``ss_optimizer`` text. ``args``
    is not modified (Musubi rewrites ``args.lr_scheduler``/``args.learning_rate`` for Adafactor; here
    ``info.lr_scheduler`` carries that instead).
    """
    optimizer_type = getattr(args, "optimizer_type", "") or ""
    kwargs = parse_optimizer_args(getattr(args, "optimizer_args", None))
    lr: float | None = args.learning_rate
    cls = resolve_optimizer_class(optimizer_type)
    info = OptimizerInfo(name=f"{cls.__module__}.{cls.__name__}", schedule_free=is_schedule_free(optimizer_type))

    if optimizer_type.strip().lower() == "adafactor":
        if "relative_step" not in kwargs:
            kwargs["relative_step"] = True
        if kwargs.get("warmup_init", False) and not kwargs["relative_step"]:
            logger.info("Adafactor: warmup_init=True turns relative_step on")
            kwargs["relative_step"] = True
        if kwargs["relative_step"]:
            if lr:
                logger.info("Adafactor with relative_step: --learning_rate %s is only the scheduler's initial LR", lr)
            info.lr_scheduler = f"adafactor:{lr}"
            scheduler = getattr(args, "lr_scheduler", "constant") or "constant"
            if not scheduler.startswith("adafactor"):
                logger.info("Adafactor with relative_step: --lr_scheduler %s replaced by adafactor", scheduler)
            lr = None
        else:
            if getattr(args, "max_grad_norm", 0.0):
                logger.warning("Adafactor: --max_grad_norm clips gradients too; consider --max_grad_norm 0")
            if getattr(args, "lr_scheduler", None) != "constant_with_warmup":
                logger.warning("Adafactor without relative_step: --lr_scheduler constant_with_warmup is suggested")
            if kwargs.get("clip_threshold", 1.0) != 1.0:
                logger.warning("Adafactor: clip_threshold=1.0 is suggested")

    logger.info("optimizer %s | %s", info.name, kwargs)
    call_kwargs = dict(kwargs)
    call_kwargs["lr"] = lr
    try:
        optimizer = cls(param_groups, **call_kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"--optimizer_type {optimizer_type or 'AdamW'} / --optimizer_args: {info.name} rejected {kwargs}: {exc}"
        ) from None
    info.kwargs = kwargs
    return optimizer, info


def optimizer_train(optimizer: Any) -> None:
    """Put a schedule-free optimizer in training mode (no-op for others)."""
    fn = getattr(optimizer, "train", None)
    if callable(fn):
        fn()


def optimizer_eval(optimizer: Any) -> None:
    """Put a schedule-free optimizer in evaluation mode before sampling/saving (no-op for others)."""
    fn = getattr(optimizer, "eval", None)
    if callable(fn):
        fn()
