"""docs/unlearning.md promises: every public name of an ``obliviate/unlearning`` module is importable from
``obliviate.unlearning`` (and listed in its ``__all__``)."""

from __future__ import annotations

from pathlib import Path

import obliviate.unlearning as package

PACKAGE_DIR = Path(package.__file__).parent


def test_every_public_name_of_every_module_is_importable_from_the_package(public_names) -> None:
    missing = {}
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        if path.name == "__init__.py":
            continue
        absent = sorted(n for n in public_names(path) if not hasattr(package, n) or n not in package.__all__)
        if absent:
            missing[path.stem] = absent
    assert not missing, f"public names not exported by obliviate.unlearning: {missing}"


def test_all_lists_only_importable_names() -> None:
    assert len(set(package.__all__)) == len(package.__all__)
    for name in package.__all__:
        assert hasattr(package, name), name
