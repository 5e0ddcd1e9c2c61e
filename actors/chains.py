"""Block-chain worker: trains a run or unlearns sample ids from it, persisting as it goes.

A plain class, made remote at the call site (``ray.remote(ChainWorker)``). Each public method
is one call into :mod:`obliviate` (``train_chain`` / ``unlearn``) plus storage I/O through
:class:`storage.registry.RunRegistry`:

* every checkpoint is handed to a background writer the moment it exists and written while the
  next block trains (:mod:`storage.background`, in order, atomically), under a folder named by
  what is computed, so a worker killed mid-way and started again (Ray retries the call) resumes
  after the last complete checkpoint instead of starting over;
* a new model version becomes current only by a compare-and-swap of the run's version pointer
  after all its checkpoints (every background write finished), the metrics and the manifest
  are committed; a lost race re-reads the
  pointer and recomputes from the newer version, so nothing is applied to a stale model;
* storage outages are retried with back-off (:mod:`storage.retry`); meanwhile the old version
  stays current;
* pooled workers (:func:`flows.train.warm_pool`) are warmed before any request:
  :meth:`ChainWorker.warm` loads every run's data once and warms torch up.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from obliviate.data import load_dataset
from obliviate.defaults import DEFAULT_MIN_POINTS, DEFAULT_STOP_RULE
from obliviate.errors import ConfigError
from obliviate.unlearning.chain import BlockData, Chain, Checkpoint
from obliviate.unlearning.config import model_from_state
from obliviate.unlearning.deepobliviate import DEFAULT_EPSILON, DeepObliviateOptions
from obliviate.unlearning.exact import validate_deletion
from obliviate.unlearning.health import sharp_drops
from obliviate.unlearning.judge import HeldoutJudge
from obliviate.unlearning.lineage import lineage_manifest
from obliviate.unlearning.plan import BlockPlan, make_block_plan
from obliviate.unlearning.policies import unlearn
from obliviate.unlearning.records import GuardrailResult, Policy, UnlearningRecord
from obliviate.unlearning.service import RunSpec, block_data, block_holdings, work_token
from obliviate.unlearning.trainer import heldout_accuracy, predict, train_chain, warm_up
from obliviate.unlearning.verification import consistency
from obliviate.unlearning.verification import verify as verification_figures
from storage.background import BackgroundWriteError, BackgroundWriter
from storage.errors import ObjectNotFound, PointerConflict, StorageError
from storage.lease import ClaimGuard, ClaimLost, PointerClaim
from storage.ledger import DeletionLedger, request_part
from storage.objects import ObjectInfo, ObjectStore
from storage.progressive import ProgressivePublisher
from storage.registry import TRAIN_CHAIN, ModelVersion, RunRegistry
from storage.retry import DEFAULT_RETRY_DEADLINE_S, RetryPolicy, retry_unavailable
from storage.serving import (
    DatasetErasures,
    chain_source,
    checkpoint_model,
    record_forgotten,
    reference_model,
    run_state,
    serve_cap,
    sharded_runs,
)

_PUBLISH_ATTEMPTS = 5
#: A run's audit entry on a request it applied by training without its ids (ledger ``details.runs``).
TRAINED_WITHOUT_IDS = "trained_without_ids"


def exclusions_key(run_id: str) -> str:
    """Where a run's training records the dataset positions it leaves out (deletion requests accepted before)."""
    return f"runs/{run_id}/train-exclusions.json"


def training_chain_name(positions: set[int] | frozenset[int]) -> str:
    """The chain folder of a training that leaves ``positions`` out: ``train``, or ``train-x<hash of the set>``."""
    if not positions:
        return TRAIN_CHAIN
    digest = hashlib.sha256(",".join(str(p) for p in sorted(positions)).encode()).hexdigest()
    return f"{TRAIN_CHAIN}-x{digest[:12]}"


@dataclass(frozen=True)
class TrainingExclusions:
    """What a training leaves out: training positions, the requests they come from, the chain folder.

    ``first_touched``: the first block that ids added since the last training attempt fall in;
    checkpoints from M_b on must be retrained (``None``: nothing was added).
    """

    positions: frozenset[int]
    requests: list[str]
    chain: str
    previous_chain: str
    first_touched: int | None


class ChainWorker:
    """Trains and unlearns block chains of runs kept in one store.

    Args:
        store_url: the store (``file://...`` or ``s3://...``; S3 endpoint from the environment).
        retry_deadline_s: how long storage outages are retried before the call fails.
        threads: torch threads of this worker's process: 1 (the default), so W pooled workers
            use W cores and never oversubscribe them, whatever ``OMP_NUM_THREADS`` says.
        write_depth: checkpoints that may wait for the background writer while the next block
            trains (issue 14); 0 writes each one before training goes on.
    """

    def __init__(
        self,
        store_url: str,
        *,
        retry_deadline_s: float = DEFAULT_RETRY_DEADLINE_S,
        threads: int = 1,
        write_depth: int = 2,
    ) -> None:
        import torch

        torch.set_num_threads(threads)
        self.write_depth = write_depth
        self.registry = RunRegistry(ObjectStore(store_url))
        self.retry_policy = RetryPolicy(deadline_s=retry_deadline_s)
        self.storage_retries = 0
        self._data: dict[str, BlockData] = {}
        # The training claim of the train() running now, checked before each of its writes (None: unguarded).
        self._claim_guard: ClaimGuard | None = None
        self._erasures: dict[str, DatasetErasures] = {}  # dataset -> the ledger's standing requests of it

    def pid(self) -> int:
        return os.getpid()

    def warm(self, run_ids: list[str] | None = None) -> dict[str, Any]:
        """Get ready for the store's unlearnings before any arrives (issue 14: warm pool).

        Loads the data of each registered run (``run_ids``, default all) once into this worker
        and runs a few throwaway training steps (:func:`obliviate.unlearning.trainer.warm_up`),
        so the first unlearning this worker runs costs what later ones cost. A run whose spec
        cannot be read is skipped and named; it is loaded on first use instead.

        Returns:
            ``pid``, ``runs`` loaded, ``skipped`` (run id -> error), ``seconds`` and the
            warm-up's own ``warm_up_seconds``.
        """
        began = time.perf_counter()
        registry = self.registry
        wanted = run_ids if run_ids is not None else self._io(registry.run_ids)
        loaded, skipped, warm_up_seconds = [], {}, 0.0
        datasets: dict[str, Any] = {}
        for run_id in wanted:
            try:
                spec = self._io(lambda run_id=run_id: registry.spec(run_id))
                if spec.dataset not in datasets:
                    datasets[spec.dataset] = load_dataset(spec.dataset)
                data = self._block_data(spec, dataset=datasets[spec.dataset])
                if not loaded:
                    warm_up_seconds = warm_up(config=spec.config, data=data)
                loaded.append(run_id)
            except Exception as err:  # noqa: BLE001 -- warming is an optimisation; the real call reports errors
                skipped[run_id] = f"{type(err).__name__}: {err}"[:300]
        return {
            "pid": os.getpid(),
            "runs": loaded,
            "skipped": skipped,
            "seconds": time.perf_counter() - began,
            "warm_up_seconds": warm_up_seconds,
        }

    # ----- training ------------------------------------------------------------------------------

    def train(self, spec: dict[str, Any], claim: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Train a run block by block (resuming stored checkpoints), register it, publish version 1.

        ``claim``: the run's training claim (``key``, ``version``, ``holder``: :func:`flows.train.training_claim`,
        held by the process that asked). Before each write of the training (each checkpoint, the registration, the
        publish, the late unlearning) the worker reads that claim's pointer through the store: the driver that
        renews the claim may have stalled past its lease and been taken over, and only the store can tell this
        worker so. Found taken over, the training stops there, between blocks, and writes nothing more.

        The run is registered before its version 1 is published: once a model is served, a deletion
        request for its ids finds the run (a served but unregistered run had them rejected for good).
        A registered run with no version yet serves nothing; a pass records its requests as done
        with ``not_trained`` for it, and its training leaves their ids out or unlearns them before
        returning. A rerun of a trained run whose registration is missing (a store written before
        this order) registers it and applies the accepted requests its current version misses.

        Returns:
            a summary: run id, version, held-out accuracy, blocks trained now and resumed.

        Raises:
            ClaimLost: ``claim`` was taken over by another training (the message is the one line to say).
        """
        run = RunSpec.from_dict(spec)
        with self._held_by(claim, what=f"the training of run {run.run_id}"):
            return self._train(run)

    @contextlib.contextmanager
    def _held_by(self, claim: Mapping[str, Any] | None, *, what: str) -> Iterator[None]:
        """Check ``claim`` (``key``, ``version``, ``holder``) before the work inside writes anything and at every
        safe point of it (``None``: the claim checked already, if any: the late unlearning of a training is that
        training's work).

        The first check, before any write, also stops a worker whose node does not see its driver's store (a
        ``file://`` folder only the driver's machine has): there the claim is missing, and the work would otherwise
        write its run's spec and first checkpoint to that node's own disk before saying a misleading take-over.

        Raises:
            ClaimLost: found taken over or missing (:func:`storage.lease.missing_claim_text`), also by the
                checkpoint writer's own check.
        """
        if claim is None:
            yield
            return
        guard = ClaimGuard(
            self.registry.store,
            PointerClaim(key=str(claim["key"]), version=int(claim["version"]), holder=dict(claim.get("holder") or {})),
            what=what,
        )
        guard.check()
        outer, self._claim_guard = self._claim_guard, guard
        try:
            yield
        except BackgroundWriteError as err:
            if isinstance(err.__cause__, ClaimLost):  # found by the checkpoint writer's own check
                raise err.__cause__ from None
            raise
        finally:
            self._claim_guard = outer

    def _still_claimed(self) -> None:
        """The safe-point check of the work running now (:meth:`train`'s or :meth:`unlearn`'s ``claim``)."""
        if self._claim_guard is not None:
            self._claim_guard.check()

    def _train(self, run: RunSpec) -> dict[str, Any]:
        """:meth:`train`, its claim (if any) checked before each write."""
        registry = self.registry
        # Before anything else: a run id names one training, so other options for it are refused even
        # once it is trained (they used to be answered "already_trained" with the stored model).
        self._io(lambda: registry.put_spec(run))
        current = self._io(lambda: registry.current(run.run_id))
        data = self._block_data(run)
        plan = self._fixed_plan(run, data)
        if current is not None:
            registered = self._io(lambda: registry.is_registered(run.run_id))
            summary = {"run_id": run.run_id, "version": current.version, "status": "already_trained", **current.metrics}
            if registered:
                return summary
            # Served but not registered (its registration failed after publishing, before this order):
            # a pass could not see it, so the accepted requests for its ids it misses are applied now, by the
            # training that holds the claim only, as every write of a training is.
            self._still_claimed()
            self._io(lambda: registry.register(run, block_ids=block_holdings(run, plan=plan)))
            self._still_claimed()
            late, late_audit = self._apply_late(run, current.applied_requests)
            if late:
                self._record_training(
                    run.run_id, version=current.version, applied=[], late=sorted(late), audit=late_audit, late_ids=late
                )
                summary["version"] = int(late_audit.get("to_version") or late_audit.get("version") or current.version)
            return {**summary, "late_requests": sorted(late)}
        began = time.perf_counter()
        # A run trained after deletion requests were accepted on this store never trains on their
        # ids: they are left out from the start (a served version 1 holding them would undo the
        # deletion). Requests accepted while it trains are read again before publishing; a block
        # they touch is retrained from the checkpoint before it, as an exact unlearning would.
        chain: Chain | None = None
        resumed_blocks = trained_blocks = 0
        while True:
            exclusions = self._training_exclusions(run, plan)
            if chain is not None and exclusions.first_touched is None:
                break
            excluded, applied, chain_name = exclusions.positions, exclusions.requests, exclusions.chain
            stored = self._io(lambda name=chain_name: registry.stored_checkpoints(run.run_id, name, first=0))
            if not stored and exclusions.first_touched is not None:
                self._still_claimed()
                stored = self._carry_over(run.run_id, exclusions)
            if chain is None:
                resumed_blocks = len(stored) - 1 if stored else 0
            members = {checkpoint.block_index: info for checkpoint, info, _ in stored}
            seconds = {checkpoint.block_index: s for checkpoint, _, s in stored}
            timings: list = []
            with self._sink(run.run_id, chain_name, timings, members) as sink:
                chain = train_chain(
                    config=run.config,
                    data=data,
                    plan=plan,
                    excluded_ids=excluded,
                    sink=sink,
                    resume_from=[c for c, _, _ in stored],
                    timings=timings,
                )
            seconds.update({t.block_index: t.seconds for t in timings})
            trained_blocks += len(timings)
        block_seconds = [float(seconds.get(b, 0.0)) for b in range(1, run.config.num_blocks + 1)]
        metrics = {
            "heldout_accuracy": chain.final.heldout_accuracy,
            # issue 11: a block that drops held-out accuracy sharply is reported (the train flow warns)
            "sharp_drops": [d.message() for d in sharp_drops([c.heldout_accuracy for c in chain.checkpoints])],
            "train_seconds": float(sum(block_seconds)),
            "num_blocks": run.config.num_blocks,
            "num_train": data.num_train,
        }
        forgotten = run.dataset_ids(sorted(chain.deleted_ids))
        # Registered first: were it registered after publishing, a failed registration would leave
        # version 1 served while passes reject every request for its ids (no registered run).
        self._still_claimed()
        self._io(lambda: registry.register(run, block_ids=block_holdings(run, plan=plan)))
        version = self._publish(
            run.run_id,
            chain_name=chain_name,
            members=members,
            metadata={
                "chain": chain.manifest(),
                "metrics": metrics,
                "block_seconds": block_seconds,
                "record": None,
                "lineage": _lineage(chain, members),  # issue 11: proof by replay (obliviate verify)
            },
            target={"applied_requests": applied, "deleted_ids": forgotten, "metrics": metrics},
            expected_version=0,
        )
        # A request accepted after the last read above may have been settled by a pass while this
        # run had no version yet (``not_trained``): apply what this version misses now.
        self._still_claimed()
        late, late_audit = self._apply_late(run, applied)
        self._record_training(
            run.run_id, version=version.version, applied=applied, late=sorted(late), audit=late_audit, late_ids=late
        )
        return {
            "run_id": run.run_id,
            "version": int(late_audit.get("to_version") or late_audit.get("version") or version.version)
            if late_audit
            else version.version,
            "status": "trained",
            "resumed_blocks": resumed_blocks,
            "trained_blocks": trained_blocks,
            "late_requests": sorted(late),
            "left_out_ids": len(forgotten),
            "left_out_for_requests": applied,
            "wall_seconds": time.perf_counter() - began,
            **metrics,
        }

    def _apply_late(self, run: RunSpec, applied: Sequence[str]) -> tuple[dict[str, list[int]], dict[str, Any] | None]:
        """Unlearn from run ``run`` the accepted requests for its ids not in ``applied``; returns them and the audit."""
        late = {
            request_id: ids
            for request_id, ids in self._accepted_requests(run.dataset).items()
            if request_id not in applied and run.positions(ids)[0].size
        }
        return late, (self.unlearn(run.run_id, late) if late else None)

    def _record_training(
        self,
        run_id: str,
        *,
        version: int,
        applied: list[str],
        late: list[str],
        audit: dict[str, Any] | None,
        late_ids: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        """Put this run in the audit trail of every request its training applied (the ledger's ``details.runs``).

        ``applied``: left out from the start, so version ``version`` never saw their ids; ``late``:
        accepted while it trained, unlearned right after (``audit``, the unlearning's own audit, with
        ``late_ids`` their ids). The audit's lists that grow with the late requests (all of them, all
        their deleted ids) are stored once, as a batch record; each late request keeps its own part
        (:func:`storage.ledger.request_part`): copied whole into each, they grew with the square.
        """
        ledger = DeletionLedger(self.registry.store)
        at = time.time()
        batch_id = self._record_late_batch(ledger, run_id, late, audit) if late and audit is not None else None
        deleted = {int(i) for i in (audit or {}).get("deleted_ids") or ()}
        entries: dict[str, dict[str, Any]] = {
            request_id: {
                "run_id": run_id,
                "status": TRAINED_WITHOUT_IDS,
                "applied_by": "training",
                "version": version,
                "to_version": version,
                "note": f"accepted before run {run_id} finished training: version {version} was trained without its ids",
                "at": at,
            }
            for request_id in applied
        }
        for request_id in late if audit is not None else []:
            part = request_part(
                audit, request_id, ids=(late_ids or {}).get(request_id, ()), deleted=deleted, batch_id=batch_id
            )
            part.setdefault("merged_with_count", len(late) - 1)
            entries[request_id] = {
                **part,
                "applied_by": "training",
                "note": f"accepted while run {run_id} trained: unlearned right after its version {version}, "
                "before the training returned",
                "at": at,
            }
        for request_id, entry in sorted(entries.items()):
            self._io(lambda request_id=request_id, entry=entry: ledger.record_training(request_id, run_id, entry))

    def _record_late_batch(
        self, ledger: DeletionLedger, run_id: str, late: list[str], audit: Mapping[str, Any]
    ) -> str | None:
        """Store the unlearning of a training's late requests once (a batch record); its id, or ``None`` if unwritten."""
        batch_id = f"b{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:10]}"
        body = {
            "requests": sorted(late),
            "reason": f"accepted while run {run_id} trained",
            "holder": f"training of run {run_id}",
            "runs": {run_id: dict(audit)},
        }
        try:
            self._io(lambda: ledger.record_batch(batch_id, body))
        except StorageError:
            return None  # each late request then keeps its own part only
        return batch_id

    def _accepted_requests(self, dataset: str) -> dict[str, list[int]]:
        """Request id -> dataset ids of every standing deletion request on this store for ``dataset``.

        The ledger's one rule (:func:`storage.ledger.erased_ids`): pending, claimed and failed requests count
        with done ones, since their ids will be forgotten, so a run trained now leaves them out rather than
        learning them first.
        """
        erasures = self._erasures.get(dataset)
        if erasures is None:  # one per dataset for the worker's life: a final request is read once
            erasures = self._erasures[dataset] = DatasetErasures(self.registry.store, dataset)
        return self._io(erasures.requests)

    def _training_exclusions(self, run: RunSpec, plan: BlockPlan) -> TrainingExclusions:
        """What a training leaves out, and where its checkpoints go (:class:`TrainingExclusions`).

        The set only grows and is kept in ``runs/<run>/train-exclusions.json``. Checkpoints live in a
        chain folder named by the set (``train`` when empty), so a folder only ever holds checkpoints
        trained without exactly that set, and an interrupted training resumes only from those.
        """
        store, key = self.registry.store, exclusions_key(run.run_id)
        known = self._io(lambda: store.exists(key))
        before = self._io(lambda: store.get_json(key)) if known else {"positions": [], "requests": []}
        previous = {int(p) for p in before["positions"]}
        positions, requests = set(previous), set(before["requests"])
        for request_id, ids in self._accepted_requests(run.dataset).items():
            held, _ = run.positions(ids)
            if held.size:
                positions.update(held.tolist())
                requests.add(request_id)
        added = sorted(positions - previous)
        chain = training_chain_name(positions)
        if added or not known:
            record = {"positions": sorted(positions), "requests": sorted(requests), "chain": chain}
            self._io(lambda: store.put_json(key, record))
        return TrainingExclusions(
            positions=frozenset(positions),
            requests=sorted(requests),
            chain=chain,
            previous_chain=training_chain_name(previous),
            first_touched=int(plan.block_of(np.asarray(added, dtype=np.int64)).min()) if added else None,
        )

    def _carry_over(self, run_id: str, exclusions: TrainingExclusions) -> list[tuple[Checkpoint, ObjectInfo, float]]:
        """Copy M_0..M_{b-1} of the previous set's chain (b: the first block the new ids touch) into the new one.

        Those checkpoints never saw an id of block b or later, so they are valid for the larger set
        too; the copy is what the new chain resumes from, and the old folder becomes an orphan.
        """
        old = self._io(lambda: self.registry.stored_checkpoints(run_id, exclusions.previous_chain, first=0))
        valid = old[: exclusions.first_touched or 0]
        timing = {checkpoint.block_index: s for checkpoint, _, s in valid}
        written: dict[int, ObjectInfo] = {}
        write = self.registry.checkpoint_sink(run_id, exclusions.chain, seconds_of=timing.get, written=written)
        for checkpoint, _, _ in valid:
            self._io(lambda checkpoint=checkpoint: write(checkpoint))
        return [(checkpoint, written[checkpoint.block_index], s) for checkpoint, _, s in valid]

    def _fixed_plan(self, run: RunSpec, data: BlockData) -> BlockPlan:
        """The run's block plan, fixed at registration (issue 11): stored once, then always read back.

        Deriving it again from the labels would move samples between blocks if labels changed
        (relabelled or poisoned data); the stored plan keeps every block's ids fixed.
        """
        key = f"runs/{run.run_id}/plan.json"
        if self._io(lambda: self.registry.store.exists(key)):
            return BlockPlan.from_dict(self._io(lambda: self.registry.store.get_json(key)))
        plan = make_block_plan(data.train.labels, num_blocks=run.config.num_blocks, seed=run.config.seed)
        self._io(lambda: self.registry.store.put_json(key, plan.to_dict()))
        return plan

    # ----- unlearning ----------------------------------------------------------------------------

    def unlearn(
        self,
        run_id: str,
        requests: dict[str, list[int]],
        *,
        policy: str = Policy.EXACT.value,
        verify: bool = False,
        epsilon: float = DEFAULT_EPSILON,
        stop_rule: str = DEFAULT_STOP_RULE,
        min_points: int = DEFAULT_MIN_POINTS,
        claim: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Forget the dataset ids of ``requests`` (request id -> ids) from run ``run_id``.

        ``epsilon``, ``stop_rule`` and ``min_points`` are DeepObliviate's switches (SPEC section 5;
        ``policy="deepobliviate"`` only), recorded in the audit of the version they made.

        ``claim``: the store's pass claim of the deletion pass that fans this out (``key``, ``version``,
        ``holder``: :func:`flows.settle.held_pass_claim`). As a training does, the worker reads its pointer before
        each checkpoint write and each publish (the idempotent purge of superseded versions is not held back): a
        pass that stalled past its lease was taken over, and its taker retrains the same runs, so this unlearning
        stops there and writes nothing more.
        Requests the current version already applied are skipped; the rest are merged into one
        unlearning from the current version, published by compare-and-swap. On a lost race the
        pointer is re-read and the remaining requests are applied to the newer version.

        Returns:
            the audit trail: versions, requests applied, blocks retrained, Δ series, speed-up,
            held-out accuracy, consistency with a naive retrain when ``verify``.

        Raises:
            ClaimLost: ``claim`` was taken over by another pass (the message is the one line to say).
        """
        with self._held_by(claim, what=f"the unlearning of run {run_id}"):
            return self._unlearn(
                run_id, requests, policy=policy, verify=verify, epsilon=epsilon, stop_rule=stop_rule,
                min_points=min_points,
            )  # fmt: skip

    def _unlearn(
        self,
        run_id: str,
        requests: dict[str, list[int]],
        *,
        policy: str,
        verify: bool,
        epsilon: float,
        stop_rule: str,
        min_points: int,
    ) -> dict[str, Any]:
        """:meth:`unlearn`, its claim (if any) checked before each write."""
        started_at, cpu_before = time.time(), time.process_time()
        retries_before = self.storage_retries
        registry = self.registry
        lost_races: list[dict[str, Any]] = []  # audit: publishes that lost the compare-and-swap
        for _ in range(_PUBLISH_ATTEMPTS):
            current = self._io(lambda: registry.current(run_id))
            if current is None:
                return {
                    "run_id": run_id,
                    "status": "not_trained",
                    "started_at": started_at,
                    "note": "registered with no version yet: its training leaves these ids out, or unlearns them "
                    "before it returns",
                }
            todo = {rid: ids for rid, ids in requests.items() if rid not in current.applied_requests}
            if not todo:
                # A crash between an attempt's publish and its purge: this attempt finishes the purge.
                return {
                    "run_id": run_id,
                    "status": "already_applied",
                    "version": current.version,
                    "requests": sorted(requests),
                    "started_at": started_at,
                    "lost_races": lost_races,
                    **self._purge_superseded(run_id, settling=requests),
                }
            try:
                audit = self._unlearn_from(
                    current,
                    todo,
                    policy=Policy(policy),
                    verify=verify,
                    options=DeepObliviateOptions(epsilon=epsilon, stop_rule=stop_rule, min_points=min_points),
                    started_at=started_at,
                )
                if audit.get("status") == "published":
                    audit.update(self._purge_superseded(run_id, settling=requests))
                return {
                    **audit,
                    "storage_retries": self.storage_retries - retries_before,
                    "lost_races": lost_races,
                    # CPU seconds of this worker's process for the call (all threads): with the wall
                    # time it says what share of a core the worker got (issue 14, fan-out figures).
                    "cpu_seconds": time.process_time() - cpu_before,
                }
            except PointerConflict as err:
                # Another publisher won: recompute from the newer version. The chain written for the
                # stale base is an orphan now; `obliviate store check --repair` collects it.
                lost_races.append({"base_version": current.version, "at": time.time(), "error": str(err)[:300]})
                continue
            except ObjectNotFound as err:
                # Another publisher won and purged the superseded checkpoints this attempt shares (SPEC 5):
                # a lost race too, met before the compare-and-swap. Unless the pointer moved, it is damage.
                latest = self._io(lambda: registry.current(run_id))
                if latest is None or latest.version == current.version:
                    raise
                lost_races.append({"base_version": current.version, "at": time.time(), "error": str(err)[:300]})
                continue
        raise PointerConflict(f"run {run_id}: the version pointer kept moving over {_PUBLISH_ATTEMPTS} attempts.")

    def _purge_superseded(self, run_id: str, *, settling: Collection[str]) -> dict[str, Any]:
        """SPEC 5: once a deletion's version is published, the superseded versions' checkpoints trained on its ids go.

        :func:`storage.check.purge_superseded` (the machinery of ``store check --keep-versions``,
        idempotent, safe to interrupt). A failure never fails or un-applies the deletion: the audit
        (each request's ledger record) says the purge is pending and why, ``store check`` reports the
        run and serve's next ``reconcile`` pass (or ``store check --repair``, or the run's next deletion) finishes it.
        ``settling``: the requests this call applies, which its pass settles with this result (so the purge
        leaves no ledger entry of theirs for a later pass to tell).

        Returns:
            ``{"superseded_versions": {"status": "purged" | "kept" | "pending" | "none", ...}, "purged_at"}``:
            ``purged_at`` is when the data left storage (``None`` while kept or pending; absent with
            ``none``: the run applied no deletion, so nothing it stores saw a deleted id).
        """
        from storage.check import KEEP_SUPERSEDED_OPTION, purge_superseded

        try:
            result = purge_superseded(self.registry.store, apply=True, runs=[run_id], settling=settling)
            failed = result["skipped"].get(run_id)
        except Exception as err:  # noqa: BLE001 -- a failed purge is recorded, never the deletion's failure
            failed = f"{type(err).__name__}: {err}"[:300]
        if failed:
            return {
                "superseded_versions": {
                    "status": "pending",
                    "reason": f"the purge of superseded versions failed ({failed}); `obliviate store check` reports "
                    "the run and serve's next reconcile pass (or `obliviate store check --repair`, or the run's next "
                    "deletion) finishes it",
                },
                "purged_at": None,
            }
        if result["kept_by_option"]:
            return {
                "superseded_versions": {
                    "status": "kept",
                    "reason": f"the store keeps superseded versions ({KEEP_SUPERSEDED_OPTION}): checkpoints trained "
                    "on the deleted ids remain stored, for audit (SPEC 5's invariant does not hold)",
                },
                "purged_at": None,
            }
        run = result["runs"].get(run_id)
        if run is None:  # no deletion applied to the run (nothing superseded saw a deleted id)
            return {"superseded_versions": {"status": "none"}}
        return {
            "superseded_versions": {
                "status": "purged",
                "versions": run["versions"],
                "objects": run["objects"],
                "bytes": run["bytes"],
                "held": run["held"],
            },
            "purged_at": run["purged_at"],
        }

    def _unlearn_from(
        self,
        current: ModelVersion,
        todo: dict[str, list[int]],
        *,
        policy: Policy,
        verify: bool,
        options: DeepObliviateOptions,
        started_at: float,
    ) -> dict[str, Any]:
        registry, run_id = self.registry, current.run_id
        spec = self._io(lambda: registry.spec(run_id))
        # A rolled-back (interim or progressive) version keeps only M_0..M_s: retrain from the full
        # chain it derives from (issue 11), under that version's work token so stored progress resumes.
        base_version, base_key = chain_source(current, self._io(lambda: registry.manifest(current)))
        base = replace(current, version=base_version, manifest_key=base_key)
        chain, manifest = self._io(lambda: registry.load_chain(base))
        wanted = sorted({int(i) for ids in todo.values() for i in ids})
        positions, _ = spec.positions(wanted)
        new_positions = np.asarray(sorted(set(positions.tolist()) - chain.deleted_ids), dtype=np.int64)
        base = {"run_id": run_id, "requests": sorted(todo), "from_version": current.version, "started_at": started_at}
        if new_positions.size == 0:
            return {
                **base,
                "status": "nothing_to_forget",
                "version": current.version,
                "note": "every requested id this run trained on was already forgotten",
            }
        validate_deletion(chain, ids=new_positions)
        data = self._block_data(spec)
        excluded = frozenset(chain.deleted_ids | set(new_positions.tolist()))
        token = work_token(base_version=base_version, excluded_positions=excluded, policy=policy.value)
        blocks = chain.plan.block_of(new_positions)
        first, last, num_blocks = int(blocks.min()), int(blocks.max()), chain.config.num_blocks
        members = {i: manifest.members[str(i)] for i in range(first)}
        acceptable, measure = self._hold_judgement(
            run_id, chain, data, members, floor_points=lambda: progress.floor_points
        )
        progress = ProgressivePublisher(
            registry,
            io=self._io,
            current=current,
            todo=todo,
            dataset=spec.dataset,
            chain_meta={**chain.manifest(), "deleted_ids": sorted(excluded), "generation": chain.generation + 1},
            chain_of={"version": base_version, "manifest": base_key},
            token=token,
            members=members,
            reference_accuracy=chain.final.heldout_accuracy,
            first_block=first,
            acceptable=acceptable,
            measure=measure,
        )
        began = time.perf_counter()
        if policy is Policy.EXACT:
            new_chain, record, resumed_from = self._retrain_exact(
                run_id,
                chain,
                data,
                excluded=excluded,
                token=token,
                first=first,
                last=last,
                members=members,
                new_ids=new_positions,
                progress=progress,
            )
        else:
            timings: list = []
            with self._sink(run_id, token, timings, members) as sink:
                result = unlearn(
                    chain,
                    ids=new_positions.tolist(),
                    data=data,
                    policy=policy,
                    options=options,
                    sink=sink,
                )
            new_chain, record, resumed_from = result.chain, result.record, 0
        wall = time.perf_counter() - began
        train_seconds = float(sum(manifest.metadata.get("block_seconds") or [0.0])) or float(
            current.metrics.get("train_seconds", 0.0)
        )
        metrics = {
            "heldout_accuracy": new_chain.final.heldout_accuracy,
            "previous_heldout_accuracy": chain.final.heldout_accuracy,
            "train_seconds": current.metrics.get("train_seconds", train_seconds),
            "unlearn_seconds": wall,
            "num_blocks": num_blocks,
            "num_train": data.num_train,
        }
        audit = {
            **base,
            "policy": policy.value,
            **(
                {"epsilon": options.epsilon, "stop_rule": options.stop_rule.value, "min_points": options.min_points}
                if policy is Policy.DEEPOBLIVIATE
                else {}
            ),
            "deleted_ids": spec.dataset_ids(new_positions),
            "first_affected_block": first,
            "last_affected_block": last,
            "blocks_retrained": list(record.blocks_retrained),
            "resumed_checkpoints": resumed_from,
            "delta_series": list(record.delta_series),
            "stop_reason": record.stop_reason,
            "guardrail": record.guardrail.outcome if record.guardrail else None,
            "retrain_seconds": record.retrain_seconds,
            "wall_seconds": wall,
            # Speed-up over retraining every block from scratch, like with like: a full retrain is
            # not timed, so it is estimated at this retrain's own pace (see _full_retrain_estimate);
            # storage I/O and loading are in wall_seconds, not here.
            **_full_retrain_estimate(
                new_chain.plan, deleted=excluded, retrained=record.blocks_retrained, seconds=record.retrain_seconds
            ),
            "theoretical_speedup": num_blocks / (num_blocks - first + 1),
            "heldout_accuracy": new_chain.final.heldout_accuracy,
            "previous_heldout_accuracy": chain.final.heldout_accuracy,
        }
        if verify:
            audit["verification"] = _verify(chain, new_chain, data, excluded)
        all_deleted = sorted(set(current.deleted_ids) | set(audit["deleted_ids"]))
        # Requests accepted meanwhile and rolled back still hold the served block back (issue 11).
        holds = progress.remaining_holds(poll=True)
        cap = serve_cap(holds)
        held: dict[str, Any] = {}
        if cap is not None:  # serve the newest block before every hold (M_0 is no model: paused)
            block = cap if cap >= 1 else None
            held = {"serve_block": block, "holds": holds, "forgotten_requests": sorted(holds)}
            served = None if block is None else new_chain.checkpoints[block].heldout_accuracy
            if served is None and block is not None:  # a retrain records only what it serves (_retrain_exact)
                served = heldout_accuracy(new_chain.model(block), data=data)
            metrics = {**metrics, "served_accuracy": served}
        version = self._publish(
            run_id,
            chain_name=token,
            members=members,
            metadata={
                "chain": new_chain.manifest(),
                "metrics": metrics,
                "record": record.to_dict(),
                "audit": audit,
                "block_seconds": manifest.metadata.get("block_seconds"),
                "lineage": _lineage(new_chain, members),  # issue 11: proof by replay (obliviate verify)
                **({"serve_block": held["serve_block"]} if held else {}),
            },
            target={
                "applied_requests": [*current.applied_requests, *sorted(todo)],
                "deleted_ids": all_deleted,
                "metrics": metrics,
                **held,
            },
            expected_version=progress.expected_version,
        )
        if holds:  # first time only: when each held request became forgotten
            record_forgotten(registry.store, sorted(holds), runs={run_id: {"serve_block": held["serve_block"]}})
        audit.update(
            status="published",
            to_version=version.version,
            published_at=version.published_at,
            progressive_versions=progress.published,
            held_by=sorted(holds),
            # accepted meanwhile, but the block a hold would leave served is below the floor: the gate flushes them
            not_held_below_floor=sorted(progress.below_floor),
        )
        return audit

    def _retrain_exact(
        self,
        run_id: str,
        chain: Chain,
        data: BlockData,
        *,
        excluded: frozenset[int],
        token: str,
        first: int,
        last: int,
        members: dict[int, ObjectInfo],
        new_ids: np.ndarray,
        progress: ProgressivePublisher | None = None,
    ) -> tuple[Chain, UnlearningRecord, int]:
        """Exact unlearning (SPEC 5): retrain from M_{d-1} without the ids, resuming stored progress.

        Equal to :func:`obliviate.unlearning.unlearn_exact` (same trainer, same per-block randomness)
        and, like it, bit-identical to naive retraining; checkpoints go to storage one by one so a
        restarted worker continues after the last complete one.
        """
        stored = self._io(lambda: self.registry.stored_checkpoints(run_id, token, first=first))
        members.update({c.block_index: info for c, info, _ in stored})
        seconds = {c.block_index: s for c, _, s in stored}
        timings: list = []
        began = time.perf_counter()
        # issue 11: serve each exact retrained block as it lands, once its checkpoint is stored
        landed = progress.landed if progress is not None else None
        # Held-out evaluation is a fixed cost per block that does not shrink with a shard (about
        # 10 ms for LeNet-5 on 500 samples, against 90 ms of training per block of a half shard),
        # so a retrain evaluates only the blocks it serves as they land and M_B. A rollback that
        # later needs an unrecorded block's accuracy evaluates it then (storage.serving.roll_back).
        serves_each_block = progress is not None and progress.progressive
        with self._sink(run_id, token, timings, members, after_write=landed) as sink:
            retrained = train_chain(
                config=chain.config,
                data=data,
                plan=chain.plan,
                excluded_ids=excluded,
                sink=sink,
                resume_from=list(chain.checkpoints[:first]) + [c for c, _, _ in stored],
                timings=timings,
                evaluate=lambda _block: serves_each_block,
            )
        elapsed = time.perf_counter() - began
        seconds.update({t.block_index: t.seconds for t in timings})
        new_chain = replace(retrained, generation=chain.generation + 1)
        retrain_seconds = float(sum(seconds.values()))
        record = UnlearningRecord(
            policy=Policy.EXACT.value,
            deleted_ids=tuple(int(i) for i in new_ids),
            first_affected_block=first,
            last_affected_block=last,
            blocks_retrained=tuple(range(first, chain.config.num_blocks + 1)),
            stop_reason="exact: retrained every block from the first affected one",
            guardrail=GuardrailResult(attempts=(), outcome="not_needed"),
            retrain_seconds=retrain_seconds,
            overhead_seconds=max(elapsed - float(sum(t.seconds for t in timings)), 0.0),
            wall_time_seconds=retrain_seconds + max(elapsed - float(sum(t.seconds for t in timings)), 0.0),
            heldout_accuracy=new_chain.final.heldout_accuracy,
        )
        return new_chain, record, len(stored)

    # ----- helpers -------------------------------------------------------------------------------

    def _hold_judgement(
        self,
        run_id: str,
        chain: Chain,
        data: BlockData,
        members: dict[int, ObjectInfo],
        *,
        floor_points: Callable[[], float],
    ) -> tuple[Callable[[int | None], bool], Callable[[int], float]]:
        """How a retrain judges serving block ``b`` of its new chain (issue 11): ProgressivePublisher's
        ``acceptable`` and ``measure``.

        ``acceptable(b)``: whether it meets the served floor by the acceptance rule
        (:meth:`HeldoutJudge.meets_floor`) on the run's held-out set; the pre-deletion model is the
        final model of the chain the retrain started from, and ``b`` is loaded from the new chain's
        stored checkpoints (``members``, filled as blocks land). A shard of a sharded run is judged
        in the vote, with the other shards as they serve now. ``measure(b)``: M'_b's own held-out
        accuracy. One judge, built on first use.
        """
        registry = self.registry

        @functools.cache
        def judged() -> tuple[HeldoutJudge, dict[int, int | None], int]:
            group = next((m for m in sharded_runs(registry.store).values() if run_id in m), [run_id])
            position = group.index(run_id)
            states = {k: run_state(registry, m) for k, m in enumerate(group) if k != position}
            others = {k: s for k, s in states.items() if s is not None}
            missing = [group[k] for k, s in states.items() if s is None]
            if missing:
                raise ConfigError(f"shards {missing} of {group} have no published version; train them first.")
            references = [
                chain.model() if k == position else reference_model(registry, others[k]) for k in range(len(group))
            ]
            served = {k: None if k == position else others[k].served_block for k in range(len(group))}

            def load(shard: int, block: int) -> Any:
                if shard == position:
                    member = members[block]
                    return model_from_state(
                        config=chain.config, state=registry.load_checkpoint(member.key, expected=member).model_state
                    )
                return checkpoint_model(registry, others[shard].manifest, block)

            judge = HeldoutJudge(x=data.x_heldout, y=data.y_heldout, reference=references, load=load)
            return judge, served, position

        def acceptable(block: int | None) -> bool:
            judge, served, position = self._io(judged)  # storage reads retried; built once
            return judge.meets_floor({**served, position: block}, floor_points=floor_points())

        def measure(block: int) -> float:
            judge, _, position = self._io(judged)
            return judge.accuracy({position: block})

        return acceptable, measure

    def _io(self, call):
        def count(attempt: int, err: Exception) -> None:
            self.storage_retries += 1

        return retry_unavailable(call, policy=self.retry_policy, on_retry=count)

    def _sink(
        self,
        run_id: str,
        chain_name: str,
        timings: list,
        members: dict[int, ObjectInfo],
        *,
        after_write: Callable[[Checkpoint], None] | None = None,
    ) -> contextlib.AbstractContextManager[Callable[[Checkpoint], None]]:
        """The checkpoint sink of one chain: each checkpoint is written while the next block trains.

        A :class:`storage.background.BackgroundWriter` (one thread, at most
        ``self.write_depth`` checkpoints waiting) writes them in order; leaving the ``with``
        block waits for every write and raises the first failure, so ``members`` is complete
        before anything is published. The block's training seconds are taken when the
        checkpoint is handed over (the trainer has appended them), not when it is written.
        With ``write_depth`` 0 the writes happen in the caller, one after the other.
        ``after_write`` runs (on the writer's thread) once a checkpoint is stored and in
        ``members``: a progressive version may only name checkpoints that exist.
        """
        seconds: dict[int, float | None] = {}
        write = self.registry.checkpoint_sink(run_id, chain_name, seconds_of=seconds.get, written=members)

        def put(checkpoint: Checkpoint) -> None:
            self._still_claimed()  # between blocks: a training whose claim was taken over writes no more
            self._io(lambda: write(checkpoint))
            if after_write is not None:
                after_write(checkpoint)

        def hand_over(writer: Callable[[Checkpoint], None]) -> Callable[[Checkpoint], None]:
            def sink(checkpoint: Checkpoint) -> None:
                index = checkpoint.block_index
                seconds[index] = timings[-1].seconds if timings and timings[-1].block_index == index else None
                writer(checkpoint)

            return sink

        if self.write_depth < 1:
            return contextlib.nullcontext(hand_over(put))
        return _handing_over(
            BackgroundWriter(
                put,
                depth=self.write_depth,
                name=f"checkpoints-{run_id}",
                describe=lambda c: f"checkpoint {c.block_index} of run {run_id}, chain {chain_name}",
            ),
            hand_over,
        )

    def _publish(
        self, run_id: str, *, chain_name: str, members, metadata, target, expected_version: int
    ) -> ModelVersion:
        def attempt() -> ModelVersion:
            self._still_claimed()
            try:
                return self.registry.publish(
                    run_id,
                    chain_name=chain_name,
                    members=members,
                    metadata=metadata,
                    pointer_target=target,
                    expected_version=expected_version,
                )
            except PointerConflict:
                # A swap whose reply was lost to an outage may have landed: that is our version.
                current = self.registry.current(run_id)
                mine = f"runs/{run_id}/manifests/v{expected_version + 1:06d}-{chain_name}.json"
                if current is not None and current.version == expected_version + 1 and current.manifest_key == mine:
                    return current
                raise

        return self._io(attempt)

    def _block_data(self, spec: RunSpec, *, dataset: Any = None) -> BlockData:
        key = f"{spec.dataset_fingerprint}|{hash((spec.train_ids, spec.heldout_ids))}"
        if key not in self._data:
            self._data[key] = block_data(spec, dataset=dataset if dataset is not None else load_dataset(spec.dataset))
        return self._data[key]


@contextlib.contextmanager
def _handing_over(
    writer: BackgroundWriter[Checkpoint],
    hand_over: Callable[[Callable[[Checkpoint], None]], Callable[[Checkpoint], None]],
) -> Iterator[Callable[[Checkpoint], None]]:
    with writer:
        yield hand_over(writer)


def _logits(model: Any, batch_size: int = 1000) -> Callable[[Any], Any]:
    """``x -> model(x)`` in batches (the model in eval mode; verification runs it without autograd)."""
    import torch

    return lambda x: torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _verify(original: Chain, unlearned: Chain, data: BlockData, excluded: frozenset[int]) -> dict[str, Any]:
    """Compare with naive retraining from scratch without every deleted id (SPEC 5 metrics)."""
    began = time.perf_counter()
    naive = train_chain(config=original.config, data=data, plan=original.plan, excluded_ids=excluded)
    naive_seconds = time.perf_counter() - began
    x = data.x_heldout
    naive_pred = predict(naive.model(), x=x)
    new_state, naive_state = unlearned.final.model_state, naive.final.model_state
    unlearned_logits, naive_logits, original_logits = (_logits(c.model().eval()) for c in (unlearned, naive, original))
    top5 = verification_figures(
        unlearned=unlearned_logits, naive=naive_logits, original=original_logits, x_test=x, y_test=data.y_heldout
    )
    return {
        "consistency_with_naive": consistency(a=predict(unlearned.model(), x=x), b=naive_pred),
        "noise_floor_consistency": consistency(a=predict(original.model(), x=x), b=naive_pred),
        "bit_identical_to_naive": all(bool((new_state[k] == naive_state[k]).all()) for k in new_state),
        "naive_heldout_accuracy": heldout_accuracy(naive.model(), data=data),
        # top-5 next to the top-1 figures (SPEC 5): the new version's, the version it replaced, the naive retrain's
        "heldout_top5_accuracy": top5.top5_accuracy,
        "previous_heldout_top5_accuracy": top5.original_top5_accuracy,
        "naive_heldout_top5_accuracy": top5.naive_top5_accuracy,
        "naive_retrain_seconds": naive_seconds,
    }


def _full_retrain_estimate(
    plan: BlockPlan, *, deleted: frozenset[int], retrained: Sequence[int], seconds: float
) -> dict[str, Any]:
    """The audit's speed-up over a full retrain, both sides at this retrain's own pace.

    The chain's training time, measured once when the run was trained (other load, a cold
    process), was divided by the retrain time measured now: noise (two identical retrains of
    every block printed "2.61x slower" and "1.32x faster"; block 3 alone of 3 "13.64x faster").
    Now a full retrain is estimated as this retrain's seconds per training sample times the
    training samples of all blocks after the deletions, so the speed-up is the samples of all
    blocks over those retrained (about B/(B-d+1), ``theoretical_speedup``, for equal blocks).

    Returns:
        ``speedup_vs_full_retrain`` and ``full_retrain_estimate_seconds`` (``None`` when nothing
        was retrained or timed) and ``speedup_basis``, which says how they were obtained.
    """
    removed = np.fromiter(deleted, dtype=np.int64, count=len(deleted))
    sizes = {b: int((~np.isin(ids, removed)).sum()) for b, ids in enumerate(plan.blocks, start=1)}
    done = sum(sizes.get(int(b), 0) for b in retrained)
    usable = done > 0 and seconds > 0
    return {
        "speedup_vs_full_retrain": sum(sizes.values()) / done if usable else None,
        "full_retrain_estimate_seconds": seconds * sum(sizes.values()) / done if usable else None,
        "speedup_basis": "estimate: this retrain's seconds per training sample times the training samples of all "
        f"{len(sizes)} blocks (a full retrain is not timed; the blocks retrained hold {done} of "
        f"{sum(sizes.values())} samples)",
    }


def _lineage(chain: Chain, members: dict[int, ObjectInfo]) -> dict[str, Any]:
    """The lineage manifest of a version about to be published (issue 11, SPEC 6 Proof)."""
    return lineage_manifest(
        config=chain.config,
        plan=chain.plan,
        deleted_ids=chain.deleted_ids,
        checkpoint_sha256={index: info.sha256 for index, info in members.items()},
    )
