"""The audit's answer a model owner can act on (SPEC section 3b): queries to steal.

* :func:`queries_to_agreement`: the fewest queries on the budget grid at which an (attacker,
  selector) reaches an agreement level with the target, on the mean over all runs and per group
  (split or seed), so the spread is visible.
* :func:`fewest_queries`: per level, the fewest queries at which *any* measured (attacker,
  selector) reaches it, and which pair that is: the answer a model owner must plan for (the
  pair strongest on average may need more queries at one level than another pair).
* :func:`strongest`: the (attacker, selector) with the highest mean agreement over the budgets.
* :func:`headline_sentence`: the line ``steal.md`` leads with.
* :func:`unreached_note`: why a thief's cost is not measured when no pair's mean reaches 90 %, naming any
  single seed (or split) that did.
* :func:`threat_model`: what each row of the report assumes the attacker holds.

The grid answer is an upper bound: "reaches 95 % at 300" means somewhere in (previous budget, 300].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from obliviate.errors import ConfigError
from obliviate.extraction.attackers import get_attacker
from obliviate.extraction.selectors import get_selector
from obliviate.extraction.target import OutputMode, output_mode


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
        pairs: how many (attacker, selector) pairs this is the fewest over (:func:`fewest_queries`); 1
            for one pair's answer.
    """

    attacker: str
    selector: str
    level: float
    mean: int | None
    per_group: dict[str, int | None]
    budgets: list[int]
    pairs: int = 1

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
            "pairs": self.pairs,
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


def fewest_queries(cells: Sequence[dict], *, level: float, group: str = "seed") -> QueriesTo:
    """The fewest queries on the grid at which any measured (attacker, selector) reaches ``level``.

    Pairs reaching it at the same budget are told apart by their mean agreement there (higher wins).
    When no pair reaches it, the answer is the closest pair's (the highest mean agreement at any one
    budget), with ``mean`` ``None``.

    Raises:
        ConfigError: no cells (nothing was measured).
    """
    pairs = list(dict.fromkeys((c.get("attacker", "basic"), c["selector"]) for c in cells))
    if not pairs:
        raise ConfigError(_NO_CELLS)
    answers = {
        pair: queries_to_agreement(cells, attacker=pair[0], selector=pair[1], level=level, group=group)
        for pair in pairs
    }

    def agreement_at(pair: tuple[str, str], budget: int) -> float:
        at = [
            c["agreement"]
            for c in cells
            if (c.get("attacker", "basic"), c["selector"]) == pair and int(c["budget"]) == budget
        ]
        return float(np.mean(at))

    reached = [pair for pair, q in answers.items() if q.mean is not None]
    if reached:
        pick = min(reached, key=lambda p: (answers[p].mean, -agreement_at(p, answers[p].mean or 0)))
    else:
        pick = max(pairs, key=lambda p: max(agreement_at(p, b) for b in answers[p].budgets))
    grid = sorted({int(c["budget"]) for c in cells})
    return replace(answers[pick], budgets=grid, pairs=len(pairs))


def unreached_note(
    cells: Sequence[dict], *, level: float = 0.9, group: str = "seed", group_name: str = "seeds", shown: int = 3
) -> str | None:
    """Why a thief's cost is not measured, when no pair's mean over groups reaches ``level`` on the grid.

    The answer is about the mean over groups (seeds or splits); a single group that did reach ``level`` is
    named with its budget, fewest queries first (at most ``shown`` of them, then how many more): a security
    audit must not say flatly that no attacker reached it when one seed did. ``None`` when some pair's mean
    reaches ``level`` (the headline then measures the cost).

    Raises:
        ConfigError: no cells (nothing was measured).
    """
    if fewest_queries(cells, level=level, group=group).mean is not None:
        return None
    top = max(int(c["budget"]) for c in cells)
    pairs = list(dict.fromkeys((c.get("attacker", "basic"), c["selector"]) for c in cells))
    groups = {c.get(group, 0) for c in cells}
    one = group_name.removesuffix("s")
    over = f"on the mean over {group_name}, " if len(groups) > 1 else ""
    note = (
        f"{over}no attacker reached {100 * level:g} % agreement within {top} queries, so a thief's cost is not measured"
    )
    reached = sorted(
        (budget, attacker, selector, name)
        for attacker, selector in pairs
        for name, budget in queries_to_agreement(
            cells, attacker=attacker, selector=selector, level=level, group=group
        ).per_group.items()
        if budget is not None
    )
    if not reached:
        return note
    said = [f"`{a}` (queries chosen by `{s}`) {one} {g} at {b} queries" for b, a, s, g in reached[:shown]]
    more = f", and {len(reached) - shown} more" if len(reached) > shown else ""
    single = f"a single {one} did" if len(reached) == 1 else f"single {group_name} did"
    return f"{note}; {single}: {'; '.join(said)}{more}"


def strongest(cells: Sequence[dict], *, selector: str | None = None) -> tuple[str, str]:
    """The (attacker, selector) with the highest mean agreement averaged over its budgets.

    Only pairs run at every budget of the grid compete; ``selector`` restricts to one selector.

    Raises:
        ConfigError: no cells (or none of ``selector``).
    """
    pairs: dict[tuple[str, str], dict[int, list[float]]] = {}
    for c in cells:
        if selector is not None and c["selector"] != selector:
            continue
        key = (c.get("attacker", "basic"), c["selector"])
        pairs.setdefault(key, {}).setdefault(int(c["budget"]), []).append(c["agreement"])
    if not pairs:
        if selector is not None and cells:
            raise ConfigError(
                f"no cells of selector {selector!r} to rank: the cells hold selectors "
                f"{', '.join(sorted({str(c['selector']) for c in cells}))}. Pass one of them, or None for all."
            )
        raise ConfigError(_NO_CELLS)
    grid = set().union(*(set(v) for v in pairs.values()))
    full = {k: v for k, v in pairs.items() if set(v) == grid} or pairs
    return max(full, key=lambda k: float(np.mean([np.mean(a) for a in full[k].values()])))


_NO_CELLS = (
    "no cells to rank: the answer needs at least one measured audit cell; got none. Pass the cells of an audit "
    "(run_cell(...).to_dict() per cell, or the 'cells' of a steal report)."
)


def headline_sentence(*, at90: QueriesTo, at95: QueriesTo, group_name: str = "seeds") -> str:
    """The line an audit report leads with: per level, the pair that reaches it and at how many queries.

    A level no pair reaches is said of the pair that came closest (:func:`fewest_queries`), e.g. "`a`
    (queries chosen by `s`) comes closest to **95 % agreement**, which no pair reaches within 600
    queries"; the same pair at both levels is named once.
    """

    def outcome(q: QueriesTo) -> str:
        level = f"{100 * q.level:g} % agreement"
        spread = f"({group_name}: {q.spread()})"
        if q.mean is not None:
            return f"reaches **{level} at {q.mean} queries** {spread}"
        if q.pairs > 1:
            return f"comes closest to **{level}**, which no pair reaches within {max(q.budgets)} queries {spread}"
        return f"does not reach **{level} within {max(q.budgets)} queries** {spread}"

    def who(q: QueriesTo) -> str:
        return f"`{q.attacker}` (queries chosen by `{q.selector}`)"

    pairs = max(at90.pairs, at95.pairs)
    over = (
        f"the fewest queries over the {pairs} attacker / selector pairs measured"
        if pairs > 1
        else "the one attacker / selector pair measured"
    )
    same = (at90.attacker, at90.selector) == (at95.attacker, at95.selector)
    if same and at90.mean is None and at95.mean is None and at90.pairs > 1:
        answer = (
            f"{who(at90)} comes closest to **{100 * at90.level:g} % agreement** ({group_name}: {at90.spread()}) and "
            f"to **{100 * at95.level:g} % agreement** ({group_name}: {at95.spread()}), which no pair reaches within "
            f"{max(at95.budgets)} queries"
        )
    elif same:
        answer = f"{who(at90)} {outcome(at90)} and {outcome(at95)}"
    else:
        answer = f"{who(at90)} {outcome(at90)}; {who(at95)} {outcome(at95)}"
    grid = ", ".join(map(str, sorted(set(at90.budgets) | set(at95.budgets))))
    return f"Queries to steal: against the target ({over}), {answer}; on the budget grid {grid}."


def threat_model(
    *,
    attackers: Sequence[str],
    selectors: Sequence[str],
    substitute: str,
    target_arch: str | None,
    output: str = "labels",
) -> str:
    """Markdown: what the audit assumes the attacker holds, per attacker and selector.

    ``output`` is what the target answered (SPEC section 3): ``labels`` (the default) or ``probabilities``.
    """
    labels_only = output_mode(output) is OutputMode.LABELS
    answers = (
        "label-only queries (the target answers labels only)"
        if labels_only
        else "queries the target answers with class probabilities (its whole softmax row per image, which the "
        "attackers train on)"
    )
    arch = f"the substitute is `{substitute}`" + (
        ", the target's own architecture (the attacker is assumed to know or guess it)"
        if target_arch == substitute
        else f" (target: `{target_arch or 'unknown'}`)"
    )
    lines = [
        (
            f"Threat model: the attacker sees the target only through {answers}, counted against the "
            "budget; the attacker's pool and the test set are disjoint from the target's training data (when "
            f"the target declares it); {arch}. What each row assumes besides the bought "
            f"{'labels' if labels_only else 'probabilities'}:"
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
