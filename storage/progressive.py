"""Progressive versions of an exact retrain (issue 11, SPEC 6 Rollback): what a batch's retrain publishes.

When the run serves a rolled-back version (:mod:`storage.serving`), each retrained block M'_i is
exact (trained from a checkpoint that never saw the batch's ids, on data without them), so
:class:`ProgressivePublisher` publishes it as it lands and served accuracy climbs back. With
``serve --rollback`` it reads the ledger's open requests after every block: a request accepted
meanwhile becomes a hold, so this retrain (its progressive versions and its final one) never serves a block at or
after the held request's earliest block, provided the block the hold leaves served meets the served
floor (``acceptable``); otherwise the request is left to the next pass, which flushes its batch.
Used by :class:`actors.chains.ChainWorker`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from obliviate.unlearning.chain import Checkpoint
from storage.ledger import CLAIMED, PENDING, DeletionLedger
from storage.objects import ObjectInfo
from storage.registry import ModelVersion, RunRegistry
from storage.serving import first_blocks, load_rollback, pointer_target, publish_served, record_forgotten, serve_cap

Io = Callable[[Callable[[], Any]], Any]
"""How storage calls are made (the worker retries outages: :func:`storage.retry.retry_unavailable`)."""


class ProgressivePublisher:
    """Publishes each block of one exact retrain as it lands, capped by the holds (module docstring).

    Args:
        registry: the run's registry.
        io: how storage calls are made (with the worker's outage retries).
        current: the version the retrain started from (rolled back or full).
        todo: the batch's requests (request id -> ids) this retrain applies.
        dataset: the run's dataset (requests of other datasets never hold it back).
        chain_meta: the new chain's manifest (its ``deleted_ids`` exclude the batch's ids).
        chain_of: the full version the retrain starts from (``version``, ``manifest``).
        token: the retrain's work token (its chain folder).
        members: checkpoints of the new chain by block, filled as blocks land.
        reference_accuracy: the pre-deletion model's held-out accuracy (the rollback floor's reference).
        first_block: the batch's earliest affected block.
        acceptable: whether serving block ``b`` of the new chain (``None``: out of the vote, paused
            for a single chain) meets the served floor, as an interim at acceptance must
            (:meth:`obliviate.unlearning.judge.HeldoutJudge.meets_floor`). A request accepted
            meanwhile is held only if the block its hold leaves served meets it; otherwise it is
            left to the batch gate, which flushes it now (``below_floor``). ``None``: hold unjudged.
        measure: held-out accuracy of block ``b`` of the new chain, for a served block the retrain
            did not evaluate (``served_accuracy`` of its version); ``None``: left unknown.
    """

    def __init__(
        self,
        registry: RunRegistry,
        *,
        io: Io,
        current: ModelVersion,
        todo: dict[str, list[int]],
        dataset: str,
        chain_meta: dict[str, Any],
        chain_of: dict[str, Any],
        token: str,
        members: dict[int, ObjectInfo],
        reference_accuracy: float | None,
        first_block: int,
        acceptable: Callable[[int | None], bool] | None = None,
        measure: Callable[[int], float] | None = None,
    ) -> None:
        self.registry, self.io = registry, io
        self.run_id, self.todo, self.dataset = current.run_id, todo, dataset
        self.applied = set(current.applied_requests)
        _, self.target = io(lambda: pointer_target(registry, current.run_id))
        self.expected_version = current.version
        self.chain_meta, self.chain_of, self.token, self.members = chain_meta, chain_of, token, members
        self.reference_accuracy = reference_accuracy
        self.holds = {str(k): int(v) for k, v in (self.target.get("holds") or {}).items()}
        # The batch's own requests hold every other chain back (a concurrent retrain that kept their
        # ids must not serve past them); this retrain's chain excludes them, so its cap ignores them.
        self.holds.update({r: int(first_block) for r in todo if r not in self.holds})
        self.progressive = "serve_block" in self.target
        self.served = self.target.get("serve_block")
        self.rollback = io(lambda: load_rollback(registry.store))
        self.published: list[dict[str, Any]] = []
        self.acceptable, self.measure = acceptable, measure
        self.latest = int(first_block) - 1  # the newest block of the new chain that has landed
        self.below_floor: set[str] = set()

    @property
    def floor_points(self) -> float:
        """The served floor of ``serve --rollback`` (points below the pre-deletion accuracy)."""
        return float(self.rollback.get("floor_points", 2.0))

    def remaining_holds(self, *, poll: bool) -> dict[str, int]:
        """Holds of requests not applied by this retrain (after reading the ledger when ``poll``)."""
        if poll and self.rollback.get("enabled"):
            self._poll()
        return {r: b for r, b in self.holds.items() if r not in self.todo and r not in self.applied}

    def _poll(self) -> list[str]:
        """Hold back every request accepted meanwhile (pending or claimed elsewhere) that touches this run."""
        ledger = DeletionLedger(self.registry.store)
        for request_id in [r for r in self.holds if r not in self.todo]:
            # a request refused or withdrawn before it was applied holds nothing back
            if self.io(functools.partial(ledger.refused, request_id)):
                self.holds.pop(request_id, None)
        # the open requests only (their markers), so a block's poll costs what is open, not the ledger's history
        entries = self.io(lambda: ledger.entries(open_only=True))
        fresh = {
            e.request_id: [int(i) for i in e.request["ids"]]
            for e in entries
            if e.status in (PENDING, CLAIMED)
            and e.request.get("dataset") == self.dataset
            and e.request_id not in self.todo
            and e.request_id not in self.applied
            and e.request_id not in self.holds
            and e.request_id not in self.below_floor
        }
        if not fresh:
            return []
        deleted = frozenset(int(i) for i in self.chain_meta["deleted_ids"])
        found = self.io(lambda: first_blocks(self.registry, self.run_id, fresh, deleted=deleted))
        if found and self.acceptable is not None:
            cap = serve_cap({**self.remaining_holds(poll=False), **found})
            candidate = self.latest if cap is None else min(self.latest, cap)
            if not self.acceptable(candidate if candidate >= 1 else None):
                self.below_floor.update(found)  # the gate flushes them now; forgotten when their retrain lands
                return []
        self.holds.update(found)
        return sorted(found)

    def landed(self, checkpoint: Checkpoint) -> None:
        """A retrained block landed: publish it (or the newest block the holds allow) as the served model."""
        index = int(checkpoint.block_index)
        self.latest = max(self.latest, index)
        entries = self.chain_meta["checkpoints"]
        entries[index] = {
            **entries[index],
            "origin": checkpoint.origin,
            "heldout_accuracy": checkpoint.heldout_accuracy,
        }
        fresh = self._poll() if self.rollback.get("enabled") else []
        last = index >= int(self.chain_meta["config"]["num_blocks"])  # the final version follows at once
        if not (self.progressive or fresh) or last:
            return
        cap = serve_cap(self.remaining_holds(poll=False))
        serve = index if cap is None else min(index, cap)
        if serve < 1:
            serve_block: int | None = None
        else:
            serve_block = serve
        if serve_block == self.served and not fresh:
            return
        holds = {r: b for r, b in self.holds.items() if r not in self.applied}
        accuracy = None if serve_block is None else entries[serve_block]["heldout_accuracy"]
        if accuracy is None and serve_block is not None and self.measure is not None:
            accuracy = self.measure(serve_block)  # a block this retrain did not evaluate (it was not to serve it)
        target = {
            "applied_requests": sorted(self.applied),
            "deleted_ids": list(self.target.get("deleted_ids", [])),
            "metrics": {**dict(self.target.get("metrics", {})), "served_accuracy": accuracy},
            "forgotten_requests": sorted(holds),
            "holds": holds,
            "retraining": sorted(self.todo),
        }
        version = self.io(
            lambda: publish_served(
                self.registry,
                self.run_id,
                chain_name=f"{self.token}-at{index:04d}",
                chain_meta=self.chain_meta,
                members=self.members,
                serve=serve_block,
                chain_of=self.chain_of,
                target=target,
                metadata={
                    "metrics": target["metrics"],
                    "record": None,
                    "reference_accuracy": self.reference_accuracy,
                    "published_for": "progressive",
                    "retrained_through": index,
                    "retraining": sorted(self.todo),
                    "interim_for": sorted(holds),
                },
                expected_version=self.expected_version,
            )
        )
        if fresh:
            record_forgotten(self.registry.store, fresh, runs={self.run_id: {"serve_block": serve_block}})
        self.expected_version, self.served, self.target = version.version, serve_block, target
        self.published.append(
            {"version": version.version, "block": index, "serve_block": serve_block, "at": version.published_at}
        )
