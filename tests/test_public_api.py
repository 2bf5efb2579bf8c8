"""Plugins use only the public API: every built-in plugin and the example package import the
framework through ``framework.api`` alone, and nothing under plugins/ or the example imports an
underscore name or module from another module; the API's names are all documented."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import framework.api

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_FILES = sorted((ROOT / "plugins").rglob("*.py")) + sorted((ROOT / "examples").rglob("rh_example/**/*.py"))


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) for every import statement of a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return found


def violations(path: Path) -> list[str]:
    found = []
    for module, names in imports(path):
        if module == "framework" or module.startswith("framework."):
            if module != "framework.api":
                found.append(f"imports {module} (plugins use framework.api only)")
        if module.startswith("plugins") and "examples" in path.parts:
            found.append(f"imports the built-in plugin module {module}")
        if any(part.startswith("_") and part != "__future__" for part in module.split(".")):
            found.append(f"imports the private module {module}")
        if any(n.startswith("_") for n in names):
            found.append(f"imports private names {[n for n in names if n.startswith('_')]} from {module}")
    return found


def test_the_checker_finds_what_it_must_refuse(tmp_path):
    bad = ROOT / "plugins" / "tasks" / "_checker_probe.py"
    try:
        bad.write_text("from framework.model.attention import _active\nfrom plugins.tasks.niah import _helper\n"
                       "from framework.api import hookimpl\nimport plugins._private\n")
        found = violations(bad)
    finally:
        bad.unlink()
    assert len([f for f in found if "framework.api only" in f]) == 1
    assert any("private names ['_active']" in f for f in found) and any("['_helper']" in f for f in found)
    assert any("private module plugins._private" in f for f in found)


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_import_only_the_public_api(path):
    assert not violations(path), f"{path.relative_to(ROOT)}: {violations(path)}"


def test_the_plugin_files_are_found():
    names = {p.name for p in PLUGIN_FILES}
    assert {"niah.py", "attn_mass.py", "head_mask.py", "wilcoxon.py", "passage_qa.py", "output_scale.py"} <= names


def test_every_public_name_exists_and_is_documented():
    doc = (ROOT / "docs" / "writing-a-plugin.md").read_text()
    for name in framework.api.__all__:
        assert hasattr(framework.api, name), name
        assert f"`{name}`" in doc, f"docs/writing-a-plugin.md does not list the public name {name}"
