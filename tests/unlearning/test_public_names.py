"""docs/unlearning.md promises: every public name of an ``obliviate/unlearning`` module is importable from
``obliviate.unlearning`` (and listed in its ``__all__``)."""

from __future__ import annotations

import ast
from pathlib import Path

import obliviate.unlearning as package

PACKAGE_DIR = Path(package.__file__).parent


def _public_names(path: Path) -> set[str]:
    """Top-level functions, classes and assigned names of a module that do not start with ``_``."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                elements = target.elts if isinstance(target, ast.Tuple) else [target]
                names.update(e.id for e in elements if isinstance(e, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if not name.startswith("_")}


def test_every_public_name_of_every_module_is_importable_from_the_package() -> None:
    missing = {}
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        if path.name == "__init__.py":
            continue
        absent = sorted(n for n in _public_names(path) if not hasattr(package, n) or n not in package.__all__)
        if absent:
            missing[path.stem] = absent
    assert not missing, f"public names not exported by obliviate.unlearning: {missing}"


def test_all_lists_only_importable_names() -> None:
    assert len(set(package.__all__)) == len(package.__all__)
    for name in package.__all__:
        assert hasattr(package, name), name
