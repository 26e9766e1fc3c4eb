"""The shape of the code, checked: short functions, imports that point one way, no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "distillery"
MAX_FUNCTION_LINES = 60
# Modules a layer must never import (methods sit below the cache, the trainer and everything above).
FORBIDDEN = {
    "distillery.methods": ("distillery.cache", "distillery.stored_targets", "distillery.train", "distillery.runner",
                           "distillery.spec", "distillery.recipe", "distillery.pipeline", "distillery.cli"),
    "distillery.config": ("distillery.methods",),
}


def _modules() -> dict[str, ast.Module]:
    trees = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        trees[name] = ast.parse(path.read_text(), filename=str(path))
    return trees


def _runtime_imports(tree: ast.Module) -> set[str]:
    """distillery modules a module imports (anywhere, but not under ``if TYPE_CHECKING``)."""
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distillery"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("distillery")}
    return found


def test_no_function_is_longer_than_60_lines() -> None:
    long = [f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name, tree in _modules().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_layers_never_import_upwards() -> None:
    bad = [(name, dep) for name, tree in _modules().items() for layer, banned in FORBIDDEN.items()
           if name == layer or name.startswith(layer + ".") for dep in _runtime_imports(tree)
           if any(dep == b or dep.startswith(b + ".") for b in banned)]
    assert not bad, bad


def test_there_is_no_import_cycle() -> None:
    graph = {name: {d for d in _runtime_imports(tree) if d not in ("distillery", name)}
             for name, tree in _modules().items()}
    graph = {name: {d for d in deps if d in graph} for name, deps in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep):], dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles
