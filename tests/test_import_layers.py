"""The layering of ``src/tsumugi``: the library packages never import the command line or the script bodies.

``commands/`` (script bodies) sits above ``cli/`` (parsers and flag validation) and the library; ``cli/``
may call library functions to check values the library defines; nothing in the library may import
``cli/`` or ``commands/``. Checked by parsing every module's imports (top level and inside functions).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tsumugi"
LIBRARY = ("train", "caching", "sample", "data", "models", "memory", "networks", "arch", "text", "preflight")
UPPER = ("tsumugi.cli", "tsumugi.commands")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every absolute import in ``path``; ``from tsumugi import cli`` counts as tsumugi.cli."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def upward_imports(path: Path) -> list[str]:
    rel = path.relative_to(SRC.parent).as_posix()
    return [f"{rel}:{line}: {name}" for line, name in imported_modules(path)
            if name == "tsumugi.cli" or name == "tsumugi.commands" or name.startswith(tuple(u + "." for u in UPPER))
            or name.startswith(".")]  # a relative import could reach cli/ unseen: the package uses none


@pytest.mark.parametrize("package", LIBRARY)
def test_library_never_imports_cli_or_commands(package: str) -> None:
    modules = sorted((SRC / package).rglob("*.py"))
    assert modules, f"no modules found under {SRC / package}"
    bad = [hit for path in modules for hit in upward_imports(path)]
    assert not bad, "library modules import the command line:\n" + "\n".join(bad)


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The parser of imports finds each spelling of an import of cli/ (top level, in a function, from-package)."""
    probe = tmp_path / "probe.py"
    probe.write_text("import tsumugi.cli.entry\n"
                     "def f():\n    from tsumugi.cli.train_parser import build_train_parser\n"
                     "from tsumugi import commands\n"
                     "from tsumugi.train import trainer\n", encoding="utf-8")
    names = [name for _, name in imported_modules(probe)]
    assert "tsumugi.cli.entry" in names and "tsumugi.cli.train_parser" in names and "tsumugi.commands" in names
    assert "tsumugi.train" in names and not any(n.startswith(UPPER) for n in names if n.startswith("tsumugi.train"))
