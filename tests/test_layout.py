"""The layout the README describes: the core package imports alone, without the analysis of
finished runs or the training studies, and plugins depend on the core only."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = sorted(p.stem for p in (ROOT / "framework").glob("*.py") if p.stem != "__main__")
OUTSIDE_CORE = ("framework.analysis", "framework.studies")


def test_core_modules_import_without_analysis_or_studies():
    script = (
        "import importlib, json, sys\n"
        f"for name in {CORE!r}:\n"
        "    importlib.import_module('framework' if name == '__init__' else 'framework.' + name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('framework'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert "framework.pipeline" in loaded and "framework.attention" in loaded
    assert [m for m in loaded if m.startswith(OUTSIDE_CORE)] == []


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_core_and_plugins_never_import_the_studies():
    for path in [*(ROOT / "framework").glob("*.py"), *(ROOT / "plugins").rglob("*.py")]:
        assert not [m for m in _imports(path) if m.startswith("framework.studies")], path
