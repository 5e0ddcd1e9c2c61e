"""The defaults ``obliviate ... --help`` states, where reading them imports nothing heavy.

Building the command line needs these values for its defaults and help, but their home modules
import torch (:mod:`obliviate.unlearning.config`, :mod:`obliviate.extraction`): importing them there
cost every command, ``--help`` included, seconds and hundreds of MB before it ran. They live here,
with no import beyond the standard library, and each home module re-exports its own, so
``obliviate.unlearning.config.DEFAULT_RECIPE`` and the others still import as before.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

DEFAULT_RECIPE: MappingProxyType[str, Any] = MappingProxyType(
    {
        "num_blocks": 6,
        "local_epochs": 3,
        "batch_size": 32,
        "optimizer": "adam",
        "learning_rate": 1e-2,
        "schedule": "cosine",
        "min_lr_fraction": 0.3,
    }
)
"""The recipe ``obliviate train`` uses unless told otherwise (issue 11, "block training that trains well").

Block tax (held-out accuracy of plain training minus the chain's, same data and epochs, mnist5k,
4,000 train / 1,000 held-out, 5 seeds; ``bench/deletion_stream.py``, its ``block_tax`` rows): -0.88 points
(chain 95.1 %), against 0.62 for the earlier default (Adam 1e-2 constant; chain 93.6 %). The cosine
decay across blocks to 30 % keeps late blocks from overwriting early ones; starting at 1e-2 keeps short
chains (few blocks, small data) learning.
"""

#: What ``obliviate steal`` runs by default: of the selectors measured with the default attacker on
#: 6 splits (``cluster_centers``, ``adaptive``), the stronger at each budget (bench/results/extraction.md).
AUDIT_SELECTOR = "auto"

#: The smallest budget at which :func:`obliviate.extraction.active.auto` runs adaptive rounds. Below it a
#: round buys so few images (13 at k = 50) that round 0 can miss a class, and the substitute then collapses:
#: on bench/extraction.py's split 2 the default attacker fell to 83.8 % agreement at k = 50 with
#: ``adaptive`` and stayed at 94.4 % with ``cluster_centers``; from 150 (rounds of 37-38 images)
#: adaptive was ahead on the mean, and on every split at 600.
ADAPTIVE_FROM_BUDGET = 150

#: The label-free selector the audit recommends, and what the audit's default (``auto`` in
#: :mod:`obliviate.extraction.active`) buys below 150 queries. bench/extraction.py (MNIST 5k, 6 splits):
#: cluster_centers beat random's mean agreement in 24 of 30 (split, budget) cells, facility
#: (registered as default before the run) in 21 of 30; neither wins every cell (see
#: bench/results/extraction.md). Both win by 6-11 points at k = 50 and by about 0-2 above.
DEFAULT_SELECTOR = "cluster_centers"

#: Every selector ``obliviate steal --selectors`` accepts, in the order its help lists them: the names registered in
#: obliviate.extraction.selectors.SELECTORS (by obliviate.extraction.selectors and .active, which import torch).
#: tests/extraction/test_steal_selectors_listed.py holds the two equal.
STEAL_SELECTORS = (
    "auto",
    "cluster_centers",
    "adaptive",
    "random",
    "drmi",
    "drmi_nmi",
    "drmi_bins16",
    "drmi_binary",
    "drmi_coarse",
    "kcenter",
    "facility",
    "jacobian",
    "jacobian_r2",
)

#: The attacker the audit assumes by default: the strongest measured (bench/results/extraction.md).
DEFAULT_ATTACKER = "semi_supervised_ensemble"

#: Seeds per (selector, budget) of a default audit. Two, not three: each cell of the default attacker
#: already averages three substitutes, and three seeds of it took 15.7 min end to end (issue 13: <= 15).
DEFAULT_SEEDS = 2

# The defaults of obliviate.extraction.attackers.AttackOptions that ``obliviate steal`` has options for
# (the dataclass takes its defaults from here).
ATTACK_MAX_STEPS = 1200
#: The least supervised steps the attackers' own schedule trains (AttackOptions.min_steps: min_steps + 2 per bought
#: image, at most max_steps): an --attack-steps below it cuts that schedule at every budget, and steal warns.
ATTACK_MIN_STEPS = 400
ATTACK_ROUNDS = 2
ATTACK_CONSISTENCY_STEPS = 1200
ATTACK_ROUND_STEPS = 600

# ``obliviate reduce``'s switches of SPEC sections 1-2 (their home modules import numpy and numba).
#: How colour images become gray: ``luma`` (ITU-R 601-2) or ``mean`` (per-channel mean); see obliviate.data.GrayMode.
DEFAULT_GRAY = "luma"
#: Greedy initialisation's fold g: ``sum`` (f is then exactly the growth of H) or ``max``; see drmi.Aggregate.
DEFAULT_AGGREGATE = "sum"

# DeepObliviate's switches of SPEC section 5 that ``obliviate serve`` has options for (their home,
# obliviate.unlearning.deepobliviate, imports torch). The default rule: (Δ_τ − b̂)/(Δ_1 − b̂) < ε.
#: The stop rule: ``residual_ratio`` (default), ``ratio`` (Δ_τ/Δ_1 < ε) or ``slope`` (|a·h·τ^(−h−1)| < ε).
DEFAULT_STOP_RULE = "residual_ratio"
#: m: the fewest Δ points before the power-law fit and the stop rule are tried.
DEFAULT_MIN_POINTS = 5
