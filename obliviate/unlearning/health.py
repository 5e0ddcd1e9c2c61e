"""Block-training health checks (SPEC section 4): sharp held-out accuracy drops between blocks.

A diverging setting (a learning rate too high for the optimizer, say) shows up as a block whose
held-out accuracy falls sharply below the best seen so far; such chains used to be accepted
silently. :func:`sharp_drops` names those blocks so the train flow can warn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from obliviate.errors import ConfigError

DEFAULT_DROP = 0.05


@dataclass(frozen=True)
class SharpDrop:
    """Block ``block``'s held-out accuracy is ``drop`` below the best of the blocks before it."""

    block: int
    accuracy: float
    best_before: float

    @property
    def drop(self) -> float:
        return self.best_before - self.accuracy

    def message(self) -> str:
        return (
            f"block {self.block}: held-out accuracy {100 * self.accuracy:.1f} % is {100 * self.drop:.1f} points below "
            f"the best before it ({100 * self.best_before:.1f} %); the learning rate or epochs per block may be too high."
        )


def sharp_drops(accuracies: Sequence[float | None], *, threshold: float = DEFAULT_DROP) -> list[SharpDrop]:
    """Blocks whose accuracy is more than ``threshold`` below the best earlier block (``accuracies[0]`` is M_0).

    ``None`` entries (not evaluated) are skipped.
    """
    if not 0 < threshold < 1:
        raise ConfigError(f"threshold must be in (0, 1) (a fraction of accuracy); got {threshold!r}.")
    out, best = [], None
    for block, value in enumerate(accuracies):
        if value is None or block == 0:
            continue
        if best is not None and best - value > threshold:
            out.append(SharpDrop(block, float(value), float(best)))
        best = value if best is None else max(best, value)
    return out
