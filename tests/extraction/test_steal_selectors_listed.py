"""``steal --selectors``: what its help lists, what README and docs/extraction.md name and what the audit accepts
are one set (probe 113: the help listed 6 of the 13 accepted, README 12)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import obliviate.extraction  # noqa: F401  (registers every selector, the active ones of .active too)
from flows.audit import check_audit_grid
from flows.cli import main
from obliviate.errors import ConfigError
from obliviate.extraction.selectors import SELECTORS

ROOT = Path(__file__).resolve().parents[2]


def _grid(selectors: list[str]) -> dict:
    return {
        "budgets": [10],
        "selectors": selectors,
        "attackers": ["basic"],
        "seeds": 1,
        "pool_size": 100,
        "substitute": "lenet5",
        "eps": [0.1],
    }


def test_the_help_lists_every_selector_the_audit_accepts(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["steal", "--help"])
    out = capsys.readouterr().out
    # the option's help text, from its name to the next option
    listed = re.search(r"--selectors SELECTORS(.*?)\n\s+--seeds", out, flags=re.DOTALL)
    assert listed, out
    words = set(re.findall(r"[a-z_0-9]+", listed.group(1)))
    missing = sorted(set(SELECTORS) - words)
    assert not missing, f"accepted by --selectors but not in its help: {missing}\n{listed.group(1)}"


def test_every_listed_selector_is_accepted_and_others_are_refused() -> None:
    from obliviate.defaults import STEAL_SELECTORS  # the light copy --help reads (torch-free)

    assert sorted(STEAL_SELECTORS) == sorted(SELECTORS)
    assert len(set(STEAL_SELECTORS)) == len(STEAL_SELECTORS)
    check_audit_grid(**_grid(list(STEAL_SELECTORS)))
    with pytest.raises(ConfigError, match="unknown selectors \\['kcentre'\\]"):
        check_audit_grid(**_grid(["kcentre"]))


@pytest.mark.parametrize("doc", ["README.md", "docs/extraction.md"])
def test_the_docs_name_every_selector(doc: str) -> None:
    text = (ROOT / doc).read_text()
    named = set(re.findall(r"`([a-z_0-9]+)`", text))
    missing = sorted(set(SELECTORS) - named)
    assert not missing, f"{doc} does not name the selectors {missing}, which steal --selectors accepts"
