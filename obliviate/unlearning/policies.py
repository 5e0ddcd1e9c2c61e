"""Choosing an unlearning policy: ``exact`` (default) or ``deepobliviate`` (SPEC section 5).

Every policy takes the current :class:`~obliviate.unlearning.chain.Chain`, a set of training-sample
ids to forget and the chain's :class:`~obliviate.unlearning.chain.BlockData`, and returns an
:class:`~obliviate.unlearning.records.UnlearningResult`: the new current chain (which a second
deletion starts from) and an :class:`~obliviate.unlearning.records.UnlearningRecord`. New
checkpoints reach the caller's sink only once the result is final; a rejected request
(:class:`~obliviate.unlearning.records.DeletionError`) changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from obliviate.errors import ConfigError, named_choice
from obliviate.unlearning.chain import (
    BlockData,
    Chain,
    CheckpointSink,
)
from obliviate.unlearning.deepobliviate import DeepObliviateOptions, unlearn_deepobliviate
from obliviate.unlearning.exact import unlearn_exact
from obliviate.unlearning.records import Policy, UnlearningResult


def unlearn(
    chain: Chain,
    *,
    ids: Iterable[int],
    data: BlockData,
    policy: Policy | str = Policy.EXACT,
    options: DeepObliviateOptions | None = None,
    sink: CheckpointSink | None = None,
) -> UnlearningResult:
    """Forget ``ids`` with the chosen policy (``exact`` by default; SPEC section 5). See the module docstring.

    Args:
        chain: the current chain.
        ids: training-sample ids to forget.
        data: the chain's training and held-out data.
        policy: ``exact`` (retrain from the first affected block) or ``deepobliviate`` (stop early and stitch).
        options: DeepObliviate's options (``deepobliviate`` only; its defaults if omitted).
        sink: receives the new checkpoints once the result is final.

    Returns:
        the new current chain and the record of what was done.

    Raises:
        ConfigError: an unknown policy, or options given to the exact policy.
        DeletionError: a bad request (nothing changes).
        ChainMismatchError: ``data`` is not the chain's data.
    """
    policy = named_choice(Policy, value=policy, what="policy")
    if policy is Policy.EXACT:
        if options is not None:
            raise ConfigError("options apply to the deepobliviate policy only; the exact policy takes none.")
        return unlearn_exact(chain, ids=ids, data=data, sink=sink)
    return unlearn_deepobliviate(chain, ids=ids, data=data, options=options or DeepObliviateOptions(), sink=sink)
