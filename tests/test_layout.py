"""The layout the README describes: a core of a few subpackages whose imports run one way (no
module imports a module that imports it, however indirectly), no private name crosses a module,
the core imports alone without the analysis of finished runs or the training studies, and
plugins depend on the core only."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE_CORE = ("framework.analysis", "framework.studies")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for top in ("framework", "plugins") for p in (ROOT / top).rglob("*.py")}
CORE = sorted(name for name in MODULES if not name.startswith(OUTSIDE_CORE) and name != "framework.__main__")


def _imported(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) for every import in the file, at any depth (imports inside functions
    count: they tie the modules as much as top-level ones); ``name`` is None for ``import m``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
    return found


def _dependencies(path: Path) -> set[str]:
    """The project's modules that this file imports (``from pkg import mod`` names the module)."""
    deps = set()
    for module, name in _imported(path):
        if name is not None and f"{module}.{name}" in MODULES:
            deps.add(f"{module}.{name}")
        elif module in MODULES:
            deps.add(module)
    return deps


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_a_module_that_imports_it():
    graph = {name: _dependencies(path) for name, path in MODULES.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_sees_a_circle():  # the test above must be able to fail
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_private_name_crosses_a_module():
    crossings = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> project module, for `import m` and `from pkg import mod`
        for module, imported in _imported(path):
            if imported is None:
                continue
            if imported.startswith("_") and (module in MODULES or f"{module}.{imported}" in MODULES):
                crossings.append(f"{name}: from {module} import {imported}")
            if f"{module}.{imported}" in MODULES:
                aliases[imported] = f"{module}.{imported}"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.asname and f"{node.module}.{alias.name}" in MODULES:
                        aliases[alias.asname] = f"{node.module}.{alias.name}"
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and node.value.id in aliases):
                crossings.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    assert crossings == []


def test_the_top_of_the_core_holds_about_a_dozen_modules():
    top = sorted(p.name for p in (ROOT / "framework").glob("*.py"))
    packages = sorted(p.name for p in (ROOT / "framework").iterdir() if (p / "__init__.py").exists())
    assert len(top) <= 12, top
    assert {"model", "runner", "planning", "tracking"} <= set(packages), packages


def test_core_modules_import_without_analysis_or_studies():
    script = (
        "import importlib, json, sys\n"
        f"for name in {CORE!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('framework'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert "framework.runner.pipeline" in loaded and "framework.model.attention" in loaded
    assert [m for m in loaded if m.startswith(OUTSIDE_CORE)] == []


def test_core_and_plugins_never_import_the_studies():
    for name, path in MODULES.items():
        if not name.startswith("framework.studies"):
            assert not [m for m, _ in _imported(path) if m.startswith("framework.studies")], path
