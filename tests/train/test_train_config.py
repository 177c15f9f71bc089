"""The run configuration: every training flag is a typed field of a frozen TrainConfig that validation builds."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

import pytest

from tsumugi.cli.train_config_file import parse_train_args
from tsumugi.cli.train_parser import build_train_parser
from tsumugi.cli.train_validation import validate_train_args
from tsumugi.train.config import FIELD_NAMES, TrainConfig

SCRIPTS = [("qwen_image", True), ("qwen_image", False), ("zimage", True), ("zimage", False)]
HINTS = typing.get_type_hints(TrainConfig)


def _dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}


def _fits(value: object, hint: object) -> bool:
    """``value`` is an instance of the annotation ``hint`` (unions, ``list[X]``; an int is a float)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _validated(arch: str, network: bool, *extra: str) -> tuple[argparse.Namespace, TrainConfig]:
    argv = ["--dit", "dit.safetensors", "--dataset_config", "data.toml", "--output_dir", "out", "--output_name", "x",
            *extra]
    if network:
        argv += ["--network_module", f"networks.lora_{arch}"]
    args = parse_train_args(build_train_parser(arch, network=network), argv)
    return args, validate_train_args(args, environ={})


@pytest.mark.parametrize("arch,network", SCRIPTS)
def test_every_training_flag_is_a_typed_field(arch: str, network: bool) -> None:
    parser = build_train_parser(arch, network=network)
    missing = _dests(parser) - FIELD_NAMES
    assert not missing, f"flags of {parser.prog} without a TrainConfig field: {sorted(missing)}"
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert _fits(action.default, HINTS[action.dest]), (action.dest, action.default, HINTS[action.dest])
            # a field of every script has the parsers' default; one of a single family or kind its own script's
            assert fields[action.dest].default == action.default, action.dest


@pytest.mark.parametrize("arch,network", SCRIPTS)
def test_validation_builds_a_frozen_config_and_leaves_the_flags_alone(arch: str, network: bool) -> None:
    args, config = _validated(arch, network, "--flash_attn", "--xformers", "--mixed_precision", "bf16")
    before = dict(vars(args))
    assert isinstance(config, TrainConfig)
    assert vars(args) == before  # the parsed namespace is not changed
    assert (config.attn_mode, config.flash_attn, config.xformers, config.sdpa) == ("flash", True, False, False)
    assert args.xformers is True and not hasattr(args, "attn_mode")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.learning_rate = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.attn_mode = "torch"  # type: ignore[misc]
    for name, value in dataclasses.asdict(config).items():
        assert _fits(value, HINTS[name]), (name, value, HINTS[name])


@pytest.mark.parametrize("arch,network", SCRIPTS)
def test_script_fields_are_the_flags_of_that_script(arch: str, network: bool) -> None:
    """What states and trackers record: the script's own flags and derived values, not the other kinds'."""
    args, config = _validated(arch, network)
    expected = _dests(build_train_parser(arch, network=network)) | {"arch_name", "network_training", "attn_mode"}
    expected |= {"lora_layout"} if network else set()
    expected |= {"is_edit", "is_layered"} if arch == "qwen_image" else set()
    assert set(config.script_fields()) == expected
    assert config.script_fields()["arch_name"] == arch and config.network_training is network


def test_derived_values() -> None:
    _, config = _validated("qwen_image", True, "--edit_plus")
    assert (config.model_version, config.is_edit, config.is_layered, config.lora_layout) == ("edit-2509", True,
                                                                                           False, "musubi")
    _, config = _validated("zimage", False, "--fp8_base", "--fp8_scaled")
    assert not config.fp8_base and not config.fp8_scaled and config.mixed_precision == "no"


def test_unknown_names_are_refused() -> None:
    with pytest.raises(TypeError, match="no_such_flag"):
        TrainConfig.from_flags({"learning_rate": 1e-4, "no_such_flag": 1})
