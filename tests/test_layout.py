"""The package's shape, checked: every module imports on its own, imports form no cycle (not even
under TYPE_CHECKING or inside functions), and layers depend downwards only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pytest_sandbox"

# Lower number = lower layer. A module may import only modules of its own layer or below.
LAYERS = {
    "errors": 0,
    "programs": 0,
    "types": 1,
    "image": 1,
    "refs": 1,
    "_lifeline": 1,
    "_hostfs": 1,
    "_proc": 2,
    "_netfilter": 2,
    "_offload": 2,
    "store": 2,
    "_services": 3,
    "_build": 3,
    "oci": 3,
    "engine": 4,
    "backends": 5,
    "session": 6,
    "aio": 6,
    "plugin": 7,
    "_relay": 7,
    "cli": 7,
    "server": 7,
    "__init__": 7,
}
CONCRETE = {"pytest_sandbox.backends.local", "pytest_sandbox.backends.docker", "pytest_sandbox.backends.daytona"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path) -> set[str]:
    """Package modules ``name`` imports anywhere in its file (top level, functions, TYPE_CHECKING)."""
    mods = _modules()
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in mods else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in mods and m != name}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


GRAPH = {name: _imports(name, path) for name, path in _modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_every_module_imports_on_its_own(module: str) -> None:
    res = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_no_import_cycle_anywhere() -> None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(GRAPH[node]):
            if dep.startswith(node + "."):
                continue  # a package's __init__ re-exporting its own modules is not a cycle
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


def test_layers_depend_downwards_only() -> None:
    wrong = [
        f"{mod} -> {dep}"
        for mod, deps in GRAPH.items()
        for dep in deps
        if mod != "pytest_sandbox" and not dep.startswith(mod + ".") and _layer(dep) > _layer(mod)
    ]
    assert not wrong, "imports that point up a layer: " + ", ".join(sorted(wrong))


def test_nothing_above_backends_imports_a_concrete_backend() -> None:
    wrong = [
        f"{mod} -> {dep}"
        for mod, deps in GRAPH.items()
        for dep in deps & CONCRETE
        if not mod.startswith("pytest_sandbox.backends")
    ]
    assert not wrong, "go through open_backend() and the protocol instead: " + ", ".join(sorted(wrong))


def test_no_module_is_over_800_lines() -> None:
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 800}
    assert not long, f"split these: {long}"
