"""docs/architecture.md's layer diagram names every module of actors/, storage/ and obliviate/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"


def _box(label: str) -> str:
    """The text of the diagram's box whose first line starts with ``label`` (up to the box's bottom edge)."""
    text = DOC.read_text()
    diagram = text[text.index("```text") : text.index("```", text.index("```text") + 7)]
    lines = diagram.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(label))
    end = next(i for i in range(start, len(lines)) if "└" in lines[i])
    # only the box's inside: between the first and the last vertical bar of each line
    return "\n".join(line.split("│")[1] for line in lines[start:end] if line.count("│") >= 2)


def _modules(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize(
    ("label", "folders"),
    [
        ("actors/", ["actors"]),
        ("storage/", ["storage"]),
        (
            "obliviate/",
            ["obliviate", "obliviate/reduction", "obliviate/extraction", "obliviate/unlearning"],
        ),
    ],
)
def test_layer_box_names_every_module(label: str, folders: list[str]) -> None:
    box = _box(label)
    missing = [
        f"{folder}/{name}.py"
        for folder in folders
        for name in _modules(ROOT / folder)
        if not re.search(rf"(?<![\w/]){re.escape(name)}(?![\w/])", box)
    ]
    assert not missing, f"docs/architecture.md's {label} box does not name: {missing}"
