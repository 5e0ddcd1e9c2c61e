"""Adaptive selection in rounds, with the substitute in the loop (SPEC section 3b).

ActiveThief (Pal et al., AAAI 2020): spend the budget over R rounds. Round 0 buys a k-center
cover of the pool (label-free). Each later round trains the current substitute on everything
bought so far, scores the pool images not yet bought by uncertainty (the margin between the
substitute's two most likely classes; entropy as a switch), keeps the ``candidates`` times more
uncertain ones than the round buys, and among them picks a diverse set by k-center greedy on the
substitute's penultimate-layer features (Sener & Savarese 2018), farthest from everything bought.

The selector is registered like the one-shot ones, flagged ``needs_target`` (it queries while
it chooses) and ``needs_substitute`` (it trains substitutes between rounds, so a cell costs R
trainings more). It never queries an image twice: each round draws only from pool images not
bought yet, and the total is exactly ``k``. A target answering class probabilities (SPEC section 3's
switch) costs the same per image; the in-loop substitute then trains on them (the attacker's one
``targets`` form), and its uncertainty scores are its own softmax, as with labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from obliviate.checks import is_whole
from obliviate.defaults import (
    ADAPTIVE_FROM_BUDGET,
    AUDIT_SELECTOR,  # noqa: F401 (re-exported from its old home)
)
from obliviate.errors import ConfigError
from obliviate.extraction.attackers import AttackOptions, train_substitute
from obliviate.extraction.selectors import (
    DEFAULT_SELECTOR,
    Acquisition,
    Pool,
    acquire,
    check_indices,
    get_selector,
    pool_features,
    selector,
)
from obliviate.extraction.substitute import TrainConfig, answer_classes
from obliviate.extraction.target import Target
from obliviate.models import images_to_tensor


@dataclass(frozen=True)
class ActiveOptions:
    """Rounds of the adaptive selector.

    Attributes:
        rounds: rounds the budget is spent over (round 0 included).
        uncertainty: ``margin`` (top-1 minus top-2 probability, smaller is more uncertain) or ``entropy``.
        candidates: the round's diverse picks are drawn from this many times more uncertain images.
        trainer: the attacker that trains the in-loop substitute (``augmented``: cheap and strong),
            for ``train.steps`` plus one step per bought image, at most ``2 * train.steps``.
        first_round: how round 0 is chosen, label-free: ``kcenter`` (ActiveThief's seed) or a
            registered one-shot selector such as ``cluster_centers``.
    """

    rounds: int = 4
    uncertainty: str = "margin"
    candidates: float = 4.0
    trainer: str = "augmented"
    first_round: str = "kcenter"

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.candidates < 1 or self.uncertainty not in ("margin", "entropy"):
            raise ConfigError(
                "need rounds >= 1, candidates >= 1 and uncertainty 'margin' or 'entropy'; got "
                f"{self.rounds}, {self.candidates}, {self.uncertainty!r}."
            )
        if self.first_round != "kcenter" and get_selector(self.first_round).needs_target:
            raise ConfigError(
                f"round 0 of the adaptive selector must be label-free; {self.first_round!r} queries the target. "
                "Use 'kcenter' or a one-shot selector such as 'cluster_centers'."
            )


def round_sizes(*, k: int, rounds: int) -> list[int]:
    """Queries per round: ``k`` split as evenly as possible over at most ``rounds`` non-empty rounds.

    ActiveThief (Pal et al., AAAI 2020) spends the budget over rounds (SPEC section 3b); the first
    ``k % rounds`` rounds buy one image more. With fewer images than rounds, each round buys one.

    Args:
        k: the budget, a whole number >= 1.
        rounds: the most rounds, a whole number >= 1.

    Returns:
        ``min(k, rounds)`` positive sizes summing to ``k``, largest first.

    Raises:
        ConfigError: ``k`` or ``rounds`` is not a whole number >= 1.
    """
    for what, value in (("k", k), ("rounds", rounds)):
        if not is_whole(value) or value < 1:
            raise ConfigError(f"{what} must be a whole number >= 1; got {value!r}. Pass an int.")
    r = max(1, min(rounds, k))
    return [k // r + (1 if i < k % r else 0) for i in range(r)]


@selector("adaptive", needs_target=True, needs_substitute=True)
def adaptive(
    pool: Pool,
    *,
    k: int,
    rng: np.random.Generator,
    target: Target,
    train: TrainConfig,
    options: ActiveOptions = ActiveOptions(),
) -> Acquisition:
    """ActiveThief rounds: k-center seed, then margin uncertainty + k-center diversity on substitute features."""
    sizes = round_sizes(k=k, rounds=options.rounds)
    taken = np.zeros(pool.n, bool)
    if options.first_round == "kcenter":
        chosen = _kcenter(pool_features(pool), sizes[0], taken=taken, rng=rng)
    else:
        first = get_selector(options.first_round)
        chosen = check_indices(first.fn(pool, k=sizes[0], rng=rng), k=sizes[0], n=pool.n, name=first.name)
    labels = target.query(pool.images[chosen])
    # The in-loop substitute: the `trainer` attacker at train.steps .. 2 x train.steps steps (cheap next to the cell's own).
    attack = AttackOptions(arch=train.arch, min_steps=train.steps, steps_per_image=1.0, max_steps=2 * train.steps)
    seed = int(rng.integers(2**31 - 1))
    for size in sizes[1:]:
        taken[chosen] = True
        rest = np.flatnonzero(~taken)
        sub = train_substitute(
            options.trainer,
            images=pool.images[chosen],
            labels=labels,
            unlabeled=pool.images[rest],
            options=attack,
            seed=seed,
            num_classes=answer_classes(labels, default=10),  # train_substitute's default: label mode as before
            levels=pool.levels,
        ).model
        probs, feats = _probs_and_features(sub, images_to_tensor(pool.images, levels=pool.levels))
        score = _uncertainty(probs[rest], options.uncertainty)
        n_cand = min(len(rest), max(size, int(np.ceil(options.candidates * size))))
        candidates = rest[np.argsort(score, kind="stable")[:n_cand]]
        mask = np.ones(pool.n, bool)
        mask[candidates] = False  # only candidates may be picked; distances count from everything bought
        new = _kcenter(feats, size, taken=mask, rng=rng, centers=chosen)
        chosen = np.concatenate([chosen, new])
        labels = np.concatenate([labels, target.query(pool.images[new])])
    return Acquisition(pool.images[chosen], labels, chosen, len(chosen))


# AUDIT_SELECTOR (what ``obliviate steal`` runs by default) and ADAPTIVE_FROM_BUDGET (the smallest budget at
# which auto runs adaptive rounds) are held, with why, in obliviate.defaults: building the command line
# reads them without importing torch.


@selector("auto", needs_target=True, needs_substitute=True)
def auto(pool: Pool, *, k: int, rng: np.random.Generator, target: Target, train: TrainConfig) -> Acquisition:
    """cluster_centers below 150 queries, adaptive rounds from 150 (the audit's default).

    It delegates with the generator it is given, so a cell picks exactly what ``cluster_centers``
    (``k < ADAPTIVE_FROM_BUDGET``) or ``adaptive`` (from it) would pick with the same seed.
    """
    if k < ADAPTIVE_FROM_BUDGET:
        return acquire(DEFAULT_SELECTOR, pool=pool, k=k, rng=rng, target=target, train=train)
    return adaptive(pool, k=k, rng=rng, target=target, train=train)


def _uncertainty(probs: np.ndarray, kind: str) -> np.ndarray:
    """Smaller is more uncertain: the top-1 minus top-2 margin, or minus the entropy."""
    if kind == "margin":
        top2 = np.sort(probs, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(probs > 0, probs * np.log(probs), 0.0).sum(axis=1)


def _kcenter(
    feats: np.ndarray,
    m: int,
    *,
    taken: np.ndarray,
    rng: np.random.Generator,
    centers: np.ndarray | None = None,
) -> np.ndarray:
    """k-center greedy: ``m`` indices not in ``taken``, each the farthest from the centres so far."""
    f = feats.astype(np.float64)
    free = ~taken.copy()
    if m > int(free.sum()):
        raise ConfigError(f"k-center needs {m} free images; only {int(free.sum())} are left.")
    nearest = np.full(len(f), np.inf)
    picks: list[int] = []
    if centers is not None and len(centers):
        for c in centers:
            nearest = np.minimum(nearest, ((f - f[c]) ** 2).sum(axis=1))
    else:
        first = int(rng.choice(np.flatnonzero(free)))
        picks.append(first)
        free[first] = False
        nearest = ((f - f[first]) ** 2).sum(axis=1)
    while len(picks) < m:
        nxt = int(np.argmax(np.where(free, nearest, -np.inf)))
        picks.append(nxt)
        free[nxt] = False
        nearest = np.minimum(nearest, ((f - f[nxt]) ** 2).sum(axis=1))
    return np.array(picks, dtype=np.int64)


def _probs_and_features(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Softmax outputs and the input of the last linear layer (penultimate features)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    captured: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach()))
    model.eval()
    try:
        with torch.no_grad():
            logits = torch.cat([model(x[s : s + batch_size]) for s in range(0, len(x), batch_size)])
    finally:
        hook.remove()
    return torch.softmax(logits, dim=1).numpy(), torch.cat(captured).numpy()
