"""The package's shape (issue 10): modules small enough to read in one sitting, no import cycles.

Read from the source with :mod:`ast`, so the test sees function-level imports too (they make cycles as well).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_ema"
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 250


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(encoding="utf-8")) for path in sorted(PACKAGE.glob("*.py"))}


def _imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The package modules ``tree`` imports, anywhere in it (``from lightning_ema import x`` included)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "lightning_ema":
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "lightning_ema" and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_no_module_is_longer_than_the_limit() -> None:
    lengths = {path.name: len(path.read_text(encoding="utf-8").splitlines()) for path in PACKAGE.glob("*.py")}
    assert {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES} == {}


def test_no_class_is_longer_than_the_limit() -> None:
    long = {
        f"{module}.{node.name}": node.end_lineno - node.lineno + 1
        for module, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and node.end_lineno is not None
        if node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES
    }
    assert long == {}


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {name: _imports(tree, set(modules)) - {name, "__init__"} for name, tree in modules.items()}
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dependency in sorted(graph.get(name, ())):
            if state.get(dependency) == "open":
                cycles.append([*path[path.index(dependency) :], dependency])
            elif dependency not in state:
                visit(dependency, [*path, dependency])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state and name != "__init__":
            visit(name, [name])
    assert cycles == []


def _third_party(tree: ast.Module) -> set[str]:
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module and not node.level
    }
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize("public", ["ema", "posthoc", "formats", "schedules", "functional", "sharding"])
def test_the_torch_only_modules_import_no_lightning(public: str) -> None:
    """``EMA`` and the torch-only public modules, with everything they import, work without Lightning."""
    modules = _modules()
    reached, todo = set(), [public]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += sorted(_imports(modules[name], set(modules)) - {"__init__"})
    lightning = {"lightning", "pytorch_lightning", "lightning_fabric"}
    assert {name for name in reached if _third_party(modules[name]) & lightning} == set()
