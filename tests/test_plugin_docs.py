"""docs/writing-a-plugin.md describes every hook of framework/hookspecs.py with its exact
signature, and no hook that does not exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from framework import hookspecs

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "writing-a-plugin.md"


def hook_signatures() -> dict[str, str]:
    """Hook name -> ``def name(args) -> returns``, as written in the hookspec module."""
    tree = ast.parse(Path(hookspecs.__file__).read_text())
    return {
        node.name: f"def {node.name}({ast.unparse(node.args)}) -> {ast.unparse(node.returns)}"
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and hasattr(getattr(hookspecs, node.name), f"{hookspecs.PROJECT}_spec")
    }


def test_every_hook_is_described_with_its_signature():
    doc = DOC.read_text()
    hooks = hook_signatures()
    assert {"register_detectors", "run_finished"} <= set(hooks)
    for name, signature in hooks.items():
        assert f"### `{name}`" in doc, f"docs/writing-a-plugin.md does not describe the hook {name}"
        section = doc.split(f"### `{name}`", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
        assert signature in section, f"the section on {name} lacks its signature: {signature}"
        purpose = section.split("```", 2)[2].strip()
        assert len(purpose) > 40, f"the section on {name} does not say what the hook is for"


def test_the_document_describes_no_hook_that_does_not_exist():
    hooks_section = DOC.read_text().split("## The hooks", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"^### `(\w+)`", hooks_section, re.M)) == set(hook_signatures())
