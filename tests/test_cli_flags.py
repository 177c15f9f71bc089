"""Every flag of every script works, warns that it has no effect, or is refused; ``--help`` says which.

Structural checks over the parsers of all scripts (both families, LoRA and full training, generation,
both caching scripts, merge_lora, convert_lora, qwen_extract_lora,
lora_post_hoc_ema, caption_images_by_qwen_vl): a flag's value must be read somewhere in ``src/`` or be
a documented no-op (:data:`tsumugi.cli.flag_notes.NO_OP_FLAGS`) that warns when given.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from pathlib import Path

import pytest

from script_parsers import script_parsers
from tsumugi.cli.flag_notes import NO_OP_FLAGS, help_text
from tsumugi.cli.train_config_file import parse_train_args
from tsumugi.cli.train_parser import ATTENTION_FLAGS, build_train_parser
from tsumugi.data.config import ALL_DATASET_KEYS
from tsumugi.errors import UserError
from tsumugi.train.run_setup import REFUSED_FLAGS, refuse_unsupported
from tsumugi.train.timesteps import TimestepConfig

SRC = Path(__file__).resolve().parents[1] / "src" / "tsumugi"


PARSERS = script_parsers()
OPTIONS = [(prog, action.dest) for prog, parser in PARSERS.items() for action in parser._actions
           if action.option_strings and action.dest != "help"]
_SOURCE = "\n".join(p.read_text(encoding="utf-8") for p in SRC.rglob("*.py"))
# Read by field or key name rather than as args.<dest>: dataclass fields filled from the namespace, dataset
# keys the dataset config takes from the command line, the attention flags' table, the refused flags' table.
_READ_BY_NAME = ({f.name for f in dataclasses.fields(TimestepConfig)} | set(ALL_DATASET_KEYS)
                 | {dest for dest, _ in ATTENTION_FLAGS} | set(REFUSED_FLAGS))


def _is_read(dest: str) -> bool:
    return bool(dest in _READ_BY_NAME or re.search(rf"\bargs\.{dest}\b", _SOURCE)
                or re.search(rf"getattr\(\s*[\w.]*args\s*,\s*[\"']{dest}[\"']", _SOURCE))


def _action(prog: str, dest: str) -> argparse.Action:
    return next(a for a in PARSERS[prog]._actions if a.dest == dest and a.option_strings)


def test_the_scan_sees_every_script():
    assert len(PARSERS) == 15 and len(OPTIONS) > 400


@pytest.mark.parametrize("prog,dest", OPTIONS)
def test_every_flag_is_read_or_a_documented_no_op(prog, dest):
    if dest in NO_OP_FLAGS:
        assert not _is_read(dest), f"--{dest} is read in src/: remove it from NO_OP_FLAGS"
    else:
        assert _is_read(dest), (f"{prog}: --{dest} is parsed but never read in src/: make it work, refuse it "
                                "(REFUSED_FLAGS) or list it in NO_OP_FLAGS with the reason")


def test_no_op_table_has_no_stale_entries():
    assert set(NO_OP_FLAGS) <= {dest for _, dest in OPTIONS}


def _required_argv(parser: argparse.ArgumentParser) -> list[str]:
    return [arg for a in parser._actions if a.required for arg in (a.option_strings[0], "x")]


def _non_default_argv(action: argparse.Action) -> list[str]:
    if action.nargs == 0:
        return [action.option_strings[0]]
    if action.choices:
        return [action.option_strings[0], next(str(c) for c in action.choices if c != action.default)]
    return [action.option_strings[0], "3" if action.type in (int, float) else "x"]


NO_OPS = [(prog, dest) for prog, dest in OPTIONS if dest in NO_OP_FLAGS]


@pytest.mark.parametrize("prog,dest", NO_OPS)
def test_each_no_op_flag_warns_once_when_given(prog, dest, caplog):
    parser = PARSERS[prog]
    action = _action(prog, dest)
    argv = _required_argv(parser) + _non_default_argv(action)
    with caplog.at_level(logging.WARNING, logger="tsumugi.flags"):
        parser.parse_args(argv)
        parser.parse_args(argv)  # --config_file parses twice: still one warning
    warnings = [r.getMessage() for r in caplog.records if "has no effect" in r.getMessage()]
    assert len(warnings) == 1 and NO_OP_FLAGS[dest] in warnings[0], warnings
    caplog.clear()
    parser._warned_no_ops.clear()  # without the flag: no warning
    with caplog.at_level(logging.WARNING, logger="tsumugi.flags"):
        parser.parse_args(_required_argv(parser))
    assert not [r for r in caplog.records if "has no effect" in r.getMessage()]


def test_no_op_flag_from_a_config_file_warns(tmp_path, caplog):
    config = tmp_path / "c.toml"
    config.write_text("[memory]\nddp_static_graph = true\n")
    with caplog.at_level(logging.WARNING, logger="tsumugi.flags"):
        args = parse_train_args(build_train_parser("zimage", network=True), ["--config_file", str(config)])
    assert args.ddp_static_graph is True
    assert [r.getMessage() for r in caplog.records].count(
        f"--ddp_static_graph has no effect: {NO_OP_FLAGS['ddp_static_graph']}") == 1


REFUSED = [(prog, dest) for prog, dest in OPTIONS if dest in REFUSED_FLAGS]


@pytest.mark.parametrize("prog,dest", REFUSED)
def test_each_refused_flag_is_refused_by_name(prog, dest):
    args = PARSERS[prog].parse_args(_non_default_argv(_action(prog, dest)))
    with pytest.raises(UserError, match=f"--{dest} "):
        refuse_unsupported(args)


@pytest.mark.parametrize("prog,dest", OPTIONS)
def test_help_line_states_default_required_no_op_or_refused(prog, dest):
    action = _action(prog, dest)
    assert action.help, f"{prog}: --{dest} has no help line"
    text = PARSERS[prog]._get_formatter()._expand_help(action)
    if dest in NO_OP_FLAGS:
        assert text.startswith("no effect: ")
        return
    if dest in REFUSED_FLAGS:
        assert text.endswith("not supported yet; refused")
        return
    if action.required:
        assert "required" in text
    shown = action.default not in (None, False, [], "", argparse.SUPPRESS)
    if shown:
        assert "default" in text.lower(), f"{prog} --{dest}: {text!r} does not state its default {action.default!r}"


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_help_names_only_flags_the_script_has(prog):
    parser = PARSERS[prog]
    options = {s for a in parser._actions for s in a.option_strings}
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help and action.option_strings:
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", formatter._expand_help(action)):
                assert flag in options, f"{prog} {action.option_strings[0]}: help names {flag}, which {prog} lacks"
    assert parser.format_help()


def test_help_texts_examples():
    """Pinned wording of a few lines as ``--help`` prints them (regression guard)."""
    text = " ".join(build_train_parser("zimage", network=True).format_help().split())
    assert "--ddp_static_graph no effect: tsumugi does not wrap the model in DistributedDataParallel" in text
    assert "default casts to 16-bit; not supported yet; refused --disable_numpy_memmap no effect" in text
    assert help_text(_action("zimage_train_network", "huggingface_token"), REFUSED_FLAGS).endswith("refused")
    assert "(default: 25)" in help_text(_action("zimage_generate_image", "infer_steps"), {})


def test_demo_help_is_plain_text(capsys):
    from tsumugi.demo import main as demo_main

    with pytest.raises(SystemExit) as done:
        demo_main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "End-to-end demo" in text and "(default: 30)" in text
    assert not re.search(r"`|\*\*|^#|\[[^\]]*\]\(", text, re.MULTILINE), text
