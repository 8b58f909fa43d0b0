"""The e2e package's modules import one another one way (e2e.base at the bottom, e2e.cluster
at the top): an import cycle is what the function-local imports that used to stand in
for it hid. Read from the source, no cluster needed."""

from __future__ import annotations

import ast
from pathlib import Path

from e2e.base import E2E_DIR, REPO_ROOT


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def e2e_imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of the package that ``path`` imports, at the top or in a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return {name for name in found & modules if name != "e2e"} - {module_name(path)}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or None."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        for other in sorted(graph[name]):
            found = visit(other, [*path, name])
            if found:
                return found
        done.add(name)
        return None

    return next((c for name in sorted(graph) if (c := visit(name, []))), None)


def test_the_e2e_package_has_no_import_cycle():
    files = [p for p in E2E_DIR.rglob("*.py") if "tests" not in p.relative_to(E2E_DIR).parts]
    modules = {module_name(p) for p in files}
    graph = {module_name(p): e2e_imports(p, modules) for p in files}
    assert "e2e.base" in graph["e2e.cluster"], graph  # the imports are read
    assert cycle(graph) is None, " -> ".join(cycle(graph) or [])


def test_the_cycle_check_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
