"""Every dotted Python name README.md and docs/*.md write in backticks (``obliviate.reduction.partitioned.
partitioned_reduce``, ``storage.tiles.TiledRows``...) is importable: a module, or an attribute of one."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVENTS = {"obliviate.deletion.requested"}  # Prefect event names, not Python names


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


def test_dotted_names_in_the_docs_resolve() -> None:
    names = {
        (doc.name, match.group(1))
        for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        for match in re.finditer(r"`((?:obliviate|storage|flows|actors)(?:\.[A-Za-z_]\w*)+)", doc.read_text())
    }
    assert len(names) > 10
    missing = sorted((doc, name) for doc, name in names if name not in EVENTS and not _resolves(name))
    assert not missing, f"names the docs give that do not import: {missing}"
