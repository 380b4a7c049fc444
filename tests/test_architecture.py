"""The architecture is a test: layers that only point down (import-linter's contracts in
pyproject.toml), nothing importing the package root, no module taking another module's
``_private`` names, and files and functions short enough to read at once."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "dgmr"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
# the blocked lazy greedy kernel reads best in one piece (its module docstring says why)
LONG_FUNCTION_ALLOWED = {("prune/pivot.py", "_lazy_pivot_order")}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def test_lint_imports_contracts_are_kept():
    """import-linter (the layers, forbidden, independence and acyclic-siblings contracts)."""
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_nothing_imports_the_package_root():
    """``dgmr/__init__.py`` is the public API on top of everything: a module importing it
    (``from .. import __version__``) would close a cycle through every layer."""
    graph = grimp.build_graph("dgmr", cache_dir=None)
    assert graph.find_modules_that_directly_import("dgmr") == set()


def _private_imports(module: str, path: Path, modules: dict[str, Path]) -> list[str]:
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rsplit(".", 1)[0]
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if not target.startswith("dgmr") or target == module:
            continue
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                bad.append(f"{module}:{node.lineno} imports {target}.{alias.name}")
    return bad


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    bad = [b for mod, path in sorted(modules.items()) for b in _private_imports(mod, path, modules)]
    assert not bad, "\n".join(bad)


def test_private_import_check_would_fail(tmp_path):
    """The check above sees a private import when there is one."""
    mods = {"dgmr.a": tmp_path / "a.py", "dgmr.b": tmp_path / "b.py"}
    mods["dgmr.a"].write_text("def f():\n    from .b import _hidden\n")
    assert _private_imports("dgmr.a", mods["dgmr.a"], mods) == ["dgmr.a:2 imports dgmr.b._hidden"]


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_files_and_functions_are_short(path):
    rel = str(path.relative_to(SRC))
    lines = path.read_text().count("\n")
    assert lines <= MAX_FILE_LINES, f"{rel} has {lines} lines (at most {MAX_FILE_LINES})"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES and (rel, node.name) not in LONG_FUNCTION_ALLOWED]
    assert not long, f"{rel}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"
