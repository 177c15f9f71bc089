"""Optimizers of --optimizer_type/--optimizer_args and LR curves of --lr_scheduler*.

See docs/design.md, "Learning-rate schedulers".
"""

from __future__ import annotations

import argparse
import importlib.util
import math

import pytest
import torch

from tsumugi.cli.train_config_file import parse_train_args
from tsumugi.cli.train_parser import build_train_parser
from tsumugi.errors import UserError
from tsumugi.train.lr_schedulers import create_lr_scheduler, resolve_steps
from tsumugi.train.optimizers import (
    create_optimizer,
    optimizer_eval,
    optimizer_train,
    parse_optimizer_args,
)


def _args(*argv: str) -> argparse.Namespace:
    return parse_train_args(build_train_parser("zimage", network=True), list(argv))


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]


# ---------------------------------------------------------------------------------------------- optimizer_args


def test_parse_optimizer_args_literals():
    parsed = parse_optimizer_args([
        "weight_decay=0.01", "betas=(0.9,0.99)", "eps = 1e-8", "relative_step=False", "warmup_init=True",
        "decouple=None", "mode='fast'", "sizes=[1, 2]", "pair=0.9,0.999",
    ])
    assert parsed == {"weight_decay": 0.01, "betas": (0.9, 0.99), "eps": 1e-8, "relative_step": False,
                      "warmup_init": True, "decouple": None, "mode": "fast", "sizes": [1, 2], "pair": (0.9, 0.999)}
    assert parse_optimizer_args(None) == {} and parse_optimizer_args([]) == {}


@pytest.mark.parametrize("item", ["weight_decay", "a=b=c", "d=x==1", "lr=fast", "betas=(0.9,", "2x=1", "=1", "k="])
def test_parse_optimizer_args_rejects_item(item):
    with pytest.raises(UserError) as exc:
        parse_optimizer_args(["eps=1e-8", item])
    assert "--optimizer_args" in str(exc.value) and repr(item) in str(exc.value)


def test_parse_optimizer_args_duplicate_key():
    with pytest.raises(UserError, match="'eps' is given twice"):
        parse_optimizer_args(["eps=1e-8", "eps=1e-6"])


# ---------------------------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("name,cls", [
    ("", torch.optim.AdamW), ("AdamW", torch.optim.AdamW), ("adamw", torch.optim.AdamW), ("SGD", torch.optim.SGD),
    ("sgd", torch.optim.SGD), ("Adam", torch.optim.Adam), ("rmsprop", torch.optim.RMSprop),
    ("torch.optim.RAdam", torch.optim.RAdam), ("torch.optim.Adafactor", torch.optim.Adafactor),
])
def test_torch_optimizers(name, cls):
    optimizer, info = create_optimizer(_args("--optimizer_type", name, "--learning_rate", "1e-3"), _params())
    assert type(optimizer) is cls and optimizer.defaults["lr"] == pytest.approx(1e-3)
    assert info.name == f"{cls.__module__}.{cls.__name__}" and info.lr_scheduler is None and not info.schedule_free
    assert str(info) == info.name


def test_optimizer_args_reach_the_constructor_and_metadata():
    args = _args("--optimizer_args", "weight_decay=0.05", "betas=(0.8,0.9)", "--learning_rate", "2e-4")
    optimizer, info = create_optimizer(args, _params())
    assert optimizer.defaults["weight_decay"] == 0.05 and optimizer.defaults["betas"] == (0.8, 0.9)
    assert info.metadata == "torch.optim.adamw.AdamW(weight_decay=0.05,betas=(0.8, 0.9))"
    optimizer, _ = create_optimizer(_args("--optimizer_type", "SGD", "--optimizer_args", "momentum=0.9"), _params())
    assert optimizer.defaults["momentum"] == 0.9


def test_param_groups_keep_their_lr():
    a, b = _params()
    optimizer, _ = create_optimizer(_args("--learning_rate", "1e-4"), [{"params": [a]}, {"params": [b], "lr": 5e-4}])
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(1e-4), pytest.approx(5e-4)]


def test_bad_optimizer_args_and_names():
    with pytest.raises(UserError, match="--optimizer_args.*nonsense"):
        create_optimizer(_args("--optimizer_args", "nonsense=1"), _params())
    with pytest.raises(UserError, match="did you mean Adamax"):
        create_optimizer(_args("--optimizer_type", "adamx"), _params())
    with pytest.raises(UserError, match="unknown optimizer 'Shampoo42'"):
        create_optimizer(_args("--optimizer_type", "Shampoo42"), _params())
    with pytest.raises(UserError, match="no optimizer 'AdamWW' in torch.optim"):
        create_optimizer(_args("--optimizer_type", "torch.optim.AdamWW"), _params())
    with pytest.raises(UserError, match="'no_such_pkg' is not installed"):
        create_optimizer(_args("--optimizer_type", "no_such_pkg.optim.Fast"), _params())


def test_adafactor_relative_step_rules():
    pytest.importorskip("transformers")
    from transformers.optimization import Adafactor, AdafactorSchedule

    args = _args("--optimizer_type", "AdaFactor", "--learning_rate", "1e-3", "--lr_scheduler", "cosine")
    optimizer, info = create_optimizer(args, _params())
    assert isinstance(optimizer, Adafactor)
    assert optimizer.defaults["relative_step"] is True and optimizer.defaults["lr"] is None
    assert info.lr_scheduler == "adafactor:0.001" and info.kwargs == {"relative_step": True}
    assert info.metadata == "transformers.optimization.Adafactor(relative_step=True)"
    assert args.lr_scheduler == "cosine" and args.learning_rate == 1e-3  # args are not rewritten
    scheduler = create_lr_scheduler(args, optimizer, 100, optimizer_info=info)
    assert isinstance(scheduler, AdafactorSchedule) and scheduler.get_last_lr() == [pytest.approx(1e-3)]
    # recognised from the optimizer alone too
    assert isinstance(create_lr_scheduler(args, optimizer, 100), AdafactorSchedule)
    with pytest.raises(UserError, match="--lr_warmup_steps"):
        create_lr_scheduler(_args("--optimizer_type", "adafactor", "--lr_warmup_steps", "5"), optimizer, 100,
                            optimizer_info=info)

    # warmup_init forces relative_step
    optimizer, info = create_optimizer(
        _args("--optimizer_type", "adafactor", "--optimizer_args", "relative_step=False", "warmup_init=True"), _params())
    assert optimizer.defaults["relative_step"] is True and optimizer.defaults["warmup_init"] is True
    assert info.lr_scheduler is not None

    # relative_step=False: a plain LR and any scheduler
    args = _args("--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "--learning_rate", "1e-4",
                 "--lr_scheduler", "linear")
    optimizer, info = create_optimizer(args, _params())
    assert optimizer.defaults["lr"] == pytest.approx(1e-4) and info.lr_scheduler is None
    scheduler = create_lr_scheduler(args, optimizer, 10, optimizer_info=info)
    assert not isinstance(scheduler, AdafactorSchedule)


def test_adafactor_scheduler_needs_adafactor():
    optimizer, info = create_optimizer(_args(), _params())
    with pytest.raises(UserError, match="--lr_scheduler adafactor needs --optimizer_type AdaFactor"):
        create_lr_scheduler(_args("--lr_scheduler", "adafactor"), optimizer, 10, optimizer_info=info)


@pytest.mark.parametrize("name,module,package", [
    ("AdamW8bit", "bitsandbytes", "bitsandbytes"),
    ("Lion8bit", "bitsandbytes", "bitsandbytes"),
    ("PagedAdamW8bit", "bitsandbytes", "bitsandbytes"),
    ("bitsandbytes.optim.AdEMAMix8bit", "bitsandbytes", "bitsandbytes"),
    ("Lion", "lion_pytorch", "lion-pytorch"),
    ("Prodigy", "prodigyopt", "prodigyopt"),
    ("AdamWScheduleFree", "schedulefree", "schedulefree"),
    ("DAdaptAdam", "dadaptation", "dadaptation"),
])
def test_optional_packages(name, module, package):
    args = _args("--optimizer_type", name, "--learning_rate", "1e-4")
    if importlib.util.find_spec(module) is None:
        with pytest.raises(UserError, match=f"pip install {package}"):
            create_optimizer(args, _params())
    else:  # pragma: no cover - only where the package is installed
        if module == "bitsandbytes" and not torch.cuda.is_available():
            pytest.skip("bitsandbytes optimizers need a GPU")
        optimizer, info = create_optimizer(args, _params())
        assert info.name.startswith(module)


def test_schedule_free_marks_constant_scheduler_and_train_eval():
    """The real ``schedulefree`` package: constant LR, and eval()/train() switch its mode."""
    import schedulefree

    for name in ("AdamWScheduleFree", "adamwschedulefree", "schedulefree.AdamWScheduleFree"):
        args = _args("--optimizer_type", name, "--learning_rate", "0.5", "--lr_scheduler", "cosine")
        optimizer, info = create_optimizer(args, _params())
        assert isinstance(optimizer, schedulefree.AdamWScheduleFree) and info.schedule_free
        optimizer_train(optimizer)  # schedulefree starts in eval mode and refuses to step there
        scheduler = create_lr_scheduler(args, optimizer, 10, optimizer_info=info)
        lrs = _curve(optimizer, scheduler, 5)
        assert lrs == [pytest.approx(0.5)] * 5
        optimizer_eval(optimizer)
        assert not optimizer.param_groups[0]["train_mode"]
        optimizer_train(optimizer)
        assert optimizer.param_groups[0]["train_mode"]
    plain, _ = create_optimizer(_args(), _params())
    optimizer_eval(plain)  # no-op for optimizers without train()/eval()
    optimizer_train(plain)


# ---------------------------------------------------------------------------------------------- LR curves


def _curve(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _lrs(steps: int, *argv: str, num_training_steps: int | None = None, num_processes: int = 1,
         lr: float = 1.0) -> list[float]:
    args = _args("--learning_rate", str(lr), *argv)
    optimizer = torch.optim.SGD(_params(), lr=lr)
    scheduler = create_lr_scheduler(args, optimizer, num_training_steps or steps, num_processes)
    return _curve(optimizer, scheduler, steps)


def _check(lrs: list[float], expected: dict[int, float]) -> None:
    for step, value in expected.items():
        assert lrs[step] == pytest.approx(value, abs=1e-9), (step, lrs[step], value)


def _cos_decay(p: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * p))


def test_constant_and_warmup_curves():
    assert _lrs(5, "--lr_scheduler", "constant", lr=0.3) == [pytest.approx(0.3)] * 5
    _check(_lrs(10, "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "4"),
           {0: 0.0, 1: 0.25, 3: 0.75, 4: 1.0, 9: 1.0})


def test_linear_cosine_polynomial_curves():
    n, w = 20, 4
    _check(_lrs(n, "--lr_scheduler", "linear", "--lr_warmup_steps", str(w)),
           {0: 0.0, 2: 0.5, 4: 1.0, 12: (n - 12) / (n - w), 19: 1 / (n - w)})
    _check(_lrs(n, "--lr_scheduler", "cosine", "--lr_warmup_steps", "0.2"),
           {0: 0.0, 2: 0.5, 4: 1.0, 12: _cos_decay(8 / 16), 16: _cos_decay(12 / 16)})
    _check(_lrs(n, "--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "2", "--lr_warmup_steps", "20%"),
           {4: 1.0, 8: _cos_decay(2 * 4 / 16 % 1), 12: 1.0, 14: _cos_decay(2 * 10 / 16 % 1)})
    end = 1e-7
    _check(_lrs(n, "--lr_scheduler", "polynomial", "--lr_scheduler_power", "2"),
           {0: 1.0, 5: (1 - end) * (1 - 5 / n) ** 2 + end, 15: (1 - end) * (1 - 15 / n) ** 2 + end})


def test_piecewise_constant_curve():
    _check(_lrs(8, "--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules='1:3,0.1:6,0.01'"),
           {0: 1.0, 2: 1.0, 3: 0.1, 5: 0.1, 6: 0.01, 7: 0.01})
    with pytest.raises(UserError, match="step_rules"):
        _lrs(8, "--lr_scheduler", "piecewise_constant")


def test_inverse_sqrt_curve():
    _check(_lrs(20, "--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "4"),
           {0: 0.0, 2: 0.5, 4: 1.0, 8: 1 / math.sqrt(8 / 4), 16: 1 / math.sqrt(16 / 4)})
    _check(_lrs(20, "--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "4", "--lr_scheduler_timescale", "10"),
           {4: 1.0, 10: 1 / math.sqrt((10 - 4 + 10) / 10), 19: 1 / math.sqrt((19 - 4 + 10) / 10)})


def test_cosine_with_min_lr_curve():
    n, w, m = 20, 4, 0.1
    lrs = _lrs(n + 2, "--lr_scheduler", "cosine_with_min_lr", "--lr_warmup_steps", str(w),
               "--lr_scheduler_min_lr_ratio", str(m), num_training_steps=n)
    _check(lrs, {0: 0.0, 2: 0.5, 4: 1.0, 12: m + (1 - m) * _cos_decay(0.5), 20: m, 21: m})
    with pytest.raises(UserError, match="--lr_scheduler_min_lr_ratio"):
        _lrs(5, "--lr_scheduler", "cosine_with_min_lr")


def test_warmup_stable_decay_curve():
    n, w, d, m = 20, 4, 8, 0.2
    lrs = _lrs(n + 1, "--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", str(w), "--lr_decay_steps",
               "40%", "--lr_scheduler_min_lr_ratio", str(m), num_training_steps=n)
    _check(lrs, {0: m, 2: m + (1 - m) * 0.5, 4: 1.0, 11: 1.0, 12: 1.0, 14: m + (1 - m) * _cos_decay(2 / d),
                 16: m + (1 - m) * _cos_decay(4 / d), 20: m})
    lrs = _lrs(n, "--lr_scheduler", "warmup_stable_decay", "--lr_decay_steps", "10",
               "--lr_scheduler_args", "decay_type='linear'")
    _check(lrs, {0: 1.0, 9: 1.0, 10: 1.0, 15: 0.5, 19: 0.1})
    with pytest.raises(UserError, match="--lr_warmup_steps.*--lr_decay_steps"):
        _lrs(10, "--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "6", "--lr_decay_steps", "6")
    with pytest.raises(UserError, match="decay_type"):
        _lrs(10, "--lr_scheduler", "warmup_stable_decay", "--lr_scheduler_args", "decay_type='exp'")


def _rex(z: float, m: float, alpha: float = 0.1, beta: float = 0.9) -> float:
    return m + (1 - m) * z / (alpha + beta * z)


def test_rex_curve():
    n, w = 20, 4
    lrs = _lrs(n + 1, "--lr_scheduler", "rex", "--lr_warmup_steps", str(w), num_training_steps=n)
    m = 0.01
    _check(lrs, {0: m, 2: m + (1 - m) * 0.5, 4: 1.0, 8: _rex(12 / 16, m), 12: _rex(8 / 16, m), 19: _rex(1 / 16, m), 20: m})
    lrs = _lrs(n, "--lr_scheduler", "rex", "--lr_scheduler_min_lr_ratio", "0", "--lr_scheduler_args", "rex_alpha=0.2",
               "rex_beta=0.8")
    _check(lrs, {0: 1.0, 5: _rex(15 / 20, 0, 0.2, 0.8), 15: _rex(5 / 20, 0, 0.2, 0.8)})
    with pytest.raises(UserError, match="rex does not take gamma"):
        _lrs(5, "--lr_scheduler", "rex", "--lr_scheduler_args", "gamma=0.5")


def test_rex_scales_each_param_group():
    a, b = _params()
    optimizer = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}])
    scheduler = create_lr_scheduler(_args("--lr_scheduler", "rex", "--lr_warmup_steps", "2"), optimizer, 10)
    for _ in range(6):
        first, second = (g["lr"] for g in optimizer.param_groups)
        assert second == pytest.approx(first * 0.1)
        optimizer.step()
        scheduler.step()


def test_lr_scheduler_type_and_args():
    _check(_lrs(6, "--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=2", "gamma=0.5"),
           {0: 1.0, 1: 1.0, 2: 0.5, 4: 0.25})
    _check(_lrs(4, "--lr_scheduler_type", "torch.optim.lr_scheduler.ExponentialLR", "--lr_scheduler_args", "gamma=0.5"),
           {0: 1.0, 1: 0.5, 3: 0.125})
    with pytest.raises(UserError, match="did you mean StepLR"):
        _lrs(4, "--lr_scheduler_type", "SteppLR")
    with pytest.raises(UserError, match="--lr_scheduler_type StepLR"):
        _lrs(4, "--lr_scheduler_type", "StepLR")  # step_size missing


def test_warmup_step_resolution():
    assert resolve_steps(10, 100, "--lr_warmup_steps") == 10
    assert resolve_steps(10, 200, "--lr_warmup_steps", num_processes=2) == 20
    assert resolve_steps(0.25, 200, "--lr_warmup_steps", num_processes=2) == 50
    assert resolve_steps("10%", 200, "--lr_warmup_steps") == 20
    assert resolve_steps(None, 200, "--lr_warmup_steps") == 0
    with pytest.raises(UserError, match="--lr_decay_steps"):
        resolve_steps("-3", 200, "--lr_decay_steps")
    # two processes: the scheduler is stepped twice per optimizer step, warmup counts optimizer steps
    lrs = _lrs(12, "--lr_scheduler", "linear", "--lr_warmup_steps", "3", num_training_steps=6, num_processes=2)
    _check(lrs, {0: 0.0, 3: 0.5, 6: 1.0, 9: 0.5})


def test_scheduler_errors():
    with pytest.raises(UserError, match="did you mean cosine"):
        _lrs(5, "--lr_scheduler", "cosin")
    with pytest.raises(UserError, match="--lr_warmup_steps.*constant"):
        _lrs(5, "--lr_scheduler", "constant", "--lr_warmup_steps", "2")
    with pytest.raises(UserError, match="longer than the training"):
        _lrs(5, "--lr_scheduler", "linear", "--lr_warmup_steps", "6")
    with pytest.raises(UserError, match="--lr_scheduler_args"):
        _lrs(5, "--lr_scheduler", "linear", "--lr_scheduler_args", "bogus=1")
    with pytest.raises(UserError, match="--lr_scheduler_min_lr_ratio"):
        _lrs(5, "--lr_scheduler", "rex", "--lr_scheduler_min_lr_ratio", "2")
