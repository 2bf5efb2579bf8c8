"""docs/writing-a-plugin.md describes every hook of framework/hookspecs.py with its exact
signature, and no hook that does not exist; every name of the public API has a docstring."""

from __future__ import annotations

import ast
import inspect
import re
import sys
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


def _attribute_docstrings(module) -> dict[str, str]:
    """Module- and class-level names documented by a string right after their assignment (the
    convention Sphinx and IDEs read), as ``name`` or ``Class.name``."""
    found = {}

    def scan(body, prefix: str) -> None:
        for statement, following in zip(body, body[1:]):
            if isinstance(statement, ast.ClassDef):
                scan(statement.body, f"{statement.name}.")
            targets = ([t for t in statement.targets if isinstance(t, ast.Name)] if isinstance(statement, ast.Assign)
                       else [statement.target] if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                       else [])
            if (targets and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                found.update({f"{prefix}{t.id}": following.value.value for t in targets})
        if body and isinstance(body[-1], ast.ClassDef):
            scan(body[-1].body, f"{body[-1].name}.")

    scan(ast.parse(Path(module.__file__).read_text()).body, "")
    return found


def _own_docstring(obj) -> str | None:
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if inspect.isclass(obj) and doc and doc.startswith(f"{obj.__name__}("):  # the signature a dataclass makes up
        return None
    return doc


def test_every_public_api_name_has_a_docstring():
    """Every name in framework.api.__all__; every public method and property of its classes (a
    method may take its base class's docstring); every class-level attribute a plugin sets (such
    as ``name``). Names that cannot carry ``__doc__`` (constants, aliases, the hookimpl marker)
    are documented by a string right after their assignment."""
    from framework import api

    modules = {sys.modules[getattr(api, n).__module__] for n in api.__all__
               if inspect.isclass(getattr(api, n)) or inspect.isfunction(getattr(api, n))}
    module_of = {n: m for m in modules | {hookspecs, sys.modules[api.LoadedModel.__module__]}
                 for n in _attribute_docstrings(m)}
    attribute_docs = {name: doc for m in set(module_of.values()) for name, doc in _attribute_docstrings(m).items()}
    missing = []
    for name in api.__all__:
        obj = getattr(api, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            if not _own_docstring(obj):
                missing.append(name)
        elif name not in attribute_docs:
            missing.append(name)
        if not inspect.isclass(obj):
            continue
        for member, value in vars(obj).items():
            if member.startswith("_"):
                continue
            if callable(value) or isinstance(value, (property, staticmethod, classmethod)):
                if not inspect.getdoc(getattr(obj, member)):
                    missing.append(f"{name}.{member}")
        for member, annotation in vars(obj).get("__annotations__", {}).items():
            if "ClassVar" in str(annotation) and not member.startswith("_") and f"{name}.{member}" not in attribute_docs:
                missing.append(f"{name}.{member}")
    assert missing == [], missing
