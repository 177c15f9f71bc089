"""Every command written in README.md and docs/*.md runs as written: the script exists, every flag exists,
every value parses, and the training commands pass the same validation a real run does.

Commands that need the released weights cannot run here, so each script invocation is parsed by the
script's own parser (and, for training, :func:`validate_train_args`, which also resolves the optimizer:
a documented optimizer whose package the README's install lacks fails here). Of the README's two
fresh-machine commands, CI runs the test command itself and :func:`test_readme_demo_runs` runs the demo
as written. Python snippets in the docs are compiled and every name they import must exist.
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from script_parsers import script_parsers
from tsumugi.cli.train_config_file import parse_train_args
from tsumugi.cli.train_validation import validate_train_args

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PARSERS = script_parsers()
# Programs a documented command may start that are not ours: the install and environment steps.
OTHER_PROGRAMS = {"python3", "pip", ".", "source", "tensorboard", "cd", "export", "mkdir"}


def _blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, body, line) of every fenced block."""
    text = path.read_text(encoding="utf-8")
    return [(m.group(1), m.group(2), text[: m.start()].count("\n") + 1)
            for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S)]


def _commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        for lang, body, line in _blocks(path):
            if lang not in ("bash", "sh", "") or body.lstrip().startswith("--"):  # "" blocks: commands or messages
                continue
            joined = re.sub(r"\\\n\s*", " ", body)
            for row in joined.splitlines():
                for part in row.split("&&"):
                    if part.strip() and not part.strip().startswith("#"):
                        found.append((f"{path.name}:{line}", shlex.split(part.strip())))
    return found


COMMANDS = _commands()


def _script_and_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """The script a command runs (``None`` when it is not one of ours) and its arguments."""
    if argv[0] == "accelerate" and argv[1] == "launch":
        rest = argv[2:]
        i = 0
        while i < len(rest) and rest[i].startswith("--"):  # accelerate's own options, then the script
            i += 1 if rest[i] in ("--quiet", "--cpu", "--multi_gpu") else 2
        argv = ["python", *rest[i:]]
    if argv[0] in ("python", "python3") and len(argv) > 1:
        if argv[1] == "-m" and argv[2].startswith("tsumugi."):
            return argv[2].removeprefix("tsumugi."), argv[3:]
        if argv[1] == "-m":
            return None, argv
        if argv[1].startswith("src/tsumugi/"):
            return Path(argv[1]).stem, argv[2:]
        if argv[1].startswith("benchmarks/"):
            return argv[1], argv[2:]
    return argv[0], argv[1:]


def test_the_docs_hold_commands():
    scripts = {_script_and_args(argv)[0] for _, argv in COMMANDS}
    assert len(COMMANDS) > 20 and {"qwen_image_train_network", "zimage_generate_image", "merge_lora"} <= scripts


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[f"{w}:{' '.join(a)[:50]}" for w, a in COMMANDS])
def test_documented_command_parses(where, argv, tmp_path):
    script, args = _script_and_args(argv)
    if script is None or script in OTHER_PROGRAMS:
        return
    if script.startswith("benchmarks/"):
        # a benchmark's own options, or the script flags it passes on (train_step --extra, generate_step)
        source = (ROOT / script).read_text(encoding="utf-8")
        ours = {o for parser in PARSERS.values() for a in parser._actions for o in a.option_strings}
        for flag in (a for a in args if a.startswith("--")):
            assert f'"{flag}"' in source or flag in ours, f"{where}: {script} has no option {flag}"
        return
    if script == "demo":
        importlib.import_module("tsumugi.demo")
        return
    if script == "pytest":
        return
    assert script in PARSERS, f"{where}: {script} is not a tsumugi script (known: {sorted(PARSERS)})"
    parser = PARSERS[script]
    if script.endswith(("_train_network", "_train")):
        # validation checks inputs only where a run would (files are opened later, after preflight)
        validate_train_args(parse_train_args(parser, args), environ={})
    else:
        try:
            parser.parse_args(args)
        except SystemExit as e:  # argparse's own exit on an unknown flag or a bad value
            raise AssertionError(f"{where}: {script} {' '.join(args)} does not parse") from e


def _python_snippets() -> list[tuple[str, str]]:
    return [(f"{p.name}:{line}", body) for p in DOCS for lang, body, line in _blocks(p) if lang == "python"]


@pytest.mark.parametrize("where,code", _python_snippets())
def test_documented_python_imports_exist(where, code):
    tree = ast.parse(code, filename=where)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{where}: {node.module} has no {alias.name}"


def test_readme_demo_runs(tmp_path):
    """The README's demo command (its last step, after the install) runs and leaves what the README lists."""
    demo = next(argv for _, argv in COMMANDS if argv[:3] == ["python", "-m", "tsumugi.demo"])
    out = tmp_path / demo[demo.index("--output") + 1]
    result = subprocess.run([sys.executable, *demo[1:demo.index("--output")], "--output", str(out)],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for model in ("qwen_image", "zimage"):
        root = out / model
        assert list((root / "images").rglob("*.png")), f"{model}: no generated images"
        assert list((root / "lora").glob("*.safetensors")), f"{model}: no LoRA"
        assert list((root / "lora" / "sample").glob("*.png")), f"{model}: no training samples"
        assert list((root / "logs").rglob("events.out.tfevents.*")), f"{model}: no TensorBoard log"
