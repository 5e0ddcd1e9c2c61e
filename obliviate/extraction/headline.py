"""The audit's answer a model owner can act on (SPEC section 3b): queries to steal.

* :func:`queries_to_agreement`: the fewest queries on the budget grid at which an (attacker,
  selector) reaches an agreement level with the target, on the mean over all runs and per group
  (split or seed), so the spread is visible.
* :func:`strongest`: the (attacker, selector) with the highest mean agreement over the budgets.
* :func:`headline_sentence`: the line ``steal.md`` leads with.
* :func:`threat_model`: what each row of the report assumes the attacker holds.

The grid answer is an upper bound: "reaches 95 % at 300" means somewhere in (previous budget, 300].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from obliviate.extraction.attackers import get_attacker
from obliviate.extraction.selectors import get_selector


@dataclass(frozen=True)
class QueriesTo:
    """Fewest queries on the grid to reach ``level`` agreement.

    Attributes:
        attacker: attacker name.
        selector: selector name.
        level: agreement level, a fraction.
        mean: budget where the mean agreement over all runs first reaches ``level`` (``None``: not on the grid).
        per_group: the same per group (split or seed); ``None`` where the group never reaches it.
        budgets: the grid.
    """

    attacker: str
    selector: str
    level: float
    mean: int | None
    per_group: dict[str, int | None]
    budgets: list[int]

    def spread(self) -> str:
        """Each group's answer, e.g. ``"150, 300, >600"`` (``>B``: never reached on the grid up to ``B``)."""
        top = max(self.budgets) if self.budgets else 0
        return ", ".join(str(v) if v is not None else f">{top}" for v in self.per_group.values()) or "none"

    def to_dict(self) -> dict:
        return {
            "attacker": self.attacker,
            "selector": self.selector,
            "level": self.level,
            "mean": self.mean,
            "per_group": self.per_group,
            "budgets": self.budgets,
        }


def queries_to_agreement(
    cells: Sequence[dict], *, attacker: str, selector: str, level: float, group: str = "seed"
) -> QueriesTo:
    """Fewest budget at which mean agreement reaches ``level`` (overall and per ``group`` key of the cells)."""
    mine = [c for c in cells if c.get("attacker", "basic") == attacker and c["selector"] == selector]
    budgets = sorted({int(c["budget"]) for c in mine})

    def first(members: list[dict]) -> int | None:
        for b in budgets:
            agr = [c["agreement"] for c in members if int(c["budget"]) == b]
            if agr and float(np.mean(agr)) >= level:
                return b
        return None

    groups = sorted({c.get(group, 0) for c in mine})
    per_group = {str(g): first([c for c in mine if c.get(group, 0) == g]) for g in groups}
    return QueriesTo(attacker, selector, level, first(mine), per_group, budgets)


def strongest(cells: Sequence[dict], *, selector: str | None = None) -> tuple[str, str]:
    """The (attacker, selector) with the highest mean agreement averaged over its budgets.

    Only pairs run at every budget of the grid compete; ``selector`` restricts to one selector.
    """
    pairs: dict[tuple[str, str], dict[int, list[float]]] = {}
    for c in cells:
        if selector is not None and c["selector"] != selector:
            continue
        key = (c.get("attacker", "basic"), c["selector"])
        pairs.setdefault(key, {}).setdefault(int(c["budget"]), []).append(c["agreement"])
    if not pairs:
        raise ValueError("no cells to rank")
    grid = set().union(*(set(v) for v in pairs.values()))
    full = {k: v for k, v in pairs.items() if set(v) == grid} or pairs
    return max(full, key=lambda k: float(np.mean([np.mean(a) for a in full[k].values()])))


def headline_sentence(at90: QueriesTo, at95: QueriesTo, *, group_name: str = "seeds") -> str:
    """The line an audit report leads with."""

    def part(q: QueriesTo) -> str:
        if q.mean is None:
            return (
                f"does not reach **{100 * q.level:g} % agreement within {max(q.budgets)} queries** "
                f"({group_name}: {q.spread()})"
            )
        return f"reaches **{100 * q.level:g} % agreement at {q.mean} queries** ({group_name}: {q.spread()})"

    return (
        f"Queries to steal: against the target, the strongest attacker measured (`{at90.attacker}`, queries "
        f"chosen by `{at90.selector}`) {part(at90)} and {part(at95)}, on the budget grid "
        f"{', '.join(map(str, at90.budgets))}."
    )


def threat_model(
    attackers: Sequence[str], selectors: Sequence[str], *, substitute: str, target_arch: str | None
) -> str:
    """Markdown: what the audit assumes the attacker holds, per attacker and selector."""
    arch = f"the substitute is `{substitute}`" + (
        ", the target's own architecture (the attacker is assumed to know or guess it)"
        if target_arch == substitute
        else f" (target: `{target_arch or 'unknown'}`)"
    )
    lines = [
        (
            "Threat model: the attacker sees the target only through label-only queries, counted against the "
            "budget; the attacker's pool and the test set are disjoint from the target's training data (when "
            f"the target declares it); {arch}. What each row assumes besides the bought labels:"
        ),
        "",
    ]
    for name in attackers:
        lines.append(f"- attacker `{name}`: {get_attacker(name).assumes}.")
    for name in selectors:
        spec = get_selector(name)
        kind = (
            "queries in rounds, choosing with a substitute trained in the loop"
            if spec.needs_substitute
            else ("queries while it chooses" if spec.needs_target else "the unlabeled pool, label-free")
        )
        lines.append(f"- selector `{name}`: {kind}.")
    return "\n".join(lines) + "\n"
