"""Training checkpoints that hold ids of settled deletion requests (SPEC 5), found and deleted.

A deletion request becomes ``done`` once every *registered* run has forgotten its ids, and the
superseded versions of those runs are purged. A training that was interrupted before it published
(and so before it registered its run) leaves its chain folder ``runs/<run>/chains/train[-x<hash>]``
behind, and no pass ever looked at it: its checkpoints from the block holding a deleted id on stayed
in the store, trained on that id, with no time limit (a rerun of the training only starts a new
chain folder beside it). The same goes for an old training chain that no version uses.

Checkpoint M_b of a chain was trained on blocks 1..b of the run's stored block plan
(``runs/<run>/plan.json``, positions into ``spec.json``'s ``train_ids``) minus the positions the
chain left out: none for ``train``, those of ``train-exclusions.json`` for the chain it names
(:mod:`actors.chains`); for an unlearning chain ``u<base>-<hash>`` (``work_token``: the base
version, the left-out set and the policy) the ``deleted_ids`` of a manifest that publishes it, else
the set whose token is its name among the base version's deleted ids plus those of settled
requests. An older ``train-x`` chain's set is not recorded; it is taken as empty, and an unlearning
chain's that no candidate matches as its base version's (what it surely left out), so each counts as
holding every other id of its blocks (said as ``exclusions_known: false``). So a deleted id in
block d is held by M_d and every later checkpoint, never by M_0..M_{d-1}: those stay, and a rerun of
``obliviate train`` resumes from them (its left-out ids start at block d or earlier).

Deleting takes the run's training claim (``runs/<run>/train-claim``, the one ``obliviate train``
holds while it trains), so it never races a training: a run whose training is live now is left to
it (that training re-reads the accepted requests before it publishes and leaves their ids out).
Checkpoints go from the last block down, each ``.pt`` before its timing record, so what is left at
any moment is a contiguous chain M_0..M_k that a resume reads as it is.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from storage.errors import CorruptObject, ObjectNotFound, PointerConflict, StorageError
from storage.lease import ClaimHeld, claim_free, holder_process_gone, release_claim, take_claim
from storage.objects import ObjectStore
from storage.registry import TRAIN_CHAIN, checkpoint_key, training_claim_key

# storage.registry.TRAIN_CHAIN and actors.chains.training_chain_name: ``train`` or ``train-x<12 hex>``.
_TRAINING_CHAIN = re.compile(r"^train(?:-x[0-9a-f]{12})?$")
# obliviate.unlearning.service.work_token: ``u<base version, 6 digits>-<12 hex>``.
_UNLEARNING_CHAIN = re.compile(r"^u(?P<base>\d{6})-[0-9a-f]{12}$")
_CHECKPOINT = re.compile(r"^runs/(?P<run>[^/]+)/chains/(?P<chain>[^/]+)/ckpt-(?P<index>\d{4})\.pt$")


def stored_chains(keys: Iterable[str]) -> dict[tuple[str, str], list[int]]:
    """``(run, chain) -> stored block indexes`` of every chain folder (training or unlearning) among committed ``keys``."""
    found: dict[tuple[str, str], list[int]] = {}
    for key in keys:
        match = _CHECKPOINT.match(key)
        if match is not None:
            found.setdefault((match.group("run"), match.group("chain")), []).append(int(match.group("index")))
    return {where: sorted(blocks) for where, blocks in sorted(found.items())}


def training_chains(keys: Iterable[str]) -> dict[tuple[str, str], list[int]]:
    """``(run, chain) -> stored block indexes`` of every training chain folder among committed ``keys``."""
    return {where: blocks for where, blocks in stored_chains(keys).items() if is_training_chain(where[1])}


def unpublished_training_chains(store: ObjectStore) -> dict[tuple[str, str], list[int]]:
    """:func:`training_chains` of the runs with no published version (interrupted first trainings).

    One listing of ``runs/`` gives both the versions' pointers and the checkpoints: a pass and its sweep each
    walk every stored checkpoint of every run once, not twice.
    """
    keys, pointers = store.list_keys_and_pointers("runs")
    published = {key.split("/")[1] for key in pointers if key.endswith("/current")}
    return {where: blocks for where, blocks in training_chains(keys).items() if where[0] not in published}


def is_training_chain(chain: str) -> bool:
    """Whether chain folder ``chain`` is a training's (``train``, ``train-x<hash>``), not an unlearning's."""
    return _TRAINING_CHAIN.match(chain) is not None


def live_training(store: ObjectStore, run_id: str) -> dict[str, Any] | None:
    """The holder of ``run_id``'s training claim when a training holds it now, else ``None``."""
    current = store.read_pointer(training_claim_key(run_id))
    if current is None or claim_free(store, current, gone=holder_process_gone, now=time.time()):
        return None
    return dict(current.target)


def settled_deletions(store: ObjectStore) -> dict[str, dict[int, list[str]]]:
    """``dataset -> {dataset id -> [request ids]}`` of every ``done`` deletion request (read one at a time).

    Narrower than the rows a training or an audit leaves out (:func:`storage.ledger.erased_ids`: pending, claimed
    and failed requests too) on purpose: these are the ids a stored checkpoint must no longer hold, so a
    checkpoint holding them is a breach (``store check``'s ``deleted_ids_held``) or a dead training's leftover to
    delete (:func:`sweep_dead_trainings`). A request not yet ``done`` is still being deleted (or waits for
    ``forget --retry``): its deletion pass, not a breach report, removes what the checkpoints hold of its ids.

    A request whose record cannot be read is skipped here; ``store check`` reports its damage.
    """
    from storage.ledger import DONE, DeletionLedger

    ledger = DeletionLedger(store)
    deleted: dict[str, dict[int, list[str]]] = {}
    for request_id in ledger.request_ids():
        try:
            entry = ledger.get(request_id)
        except (ObjectNotFound, CorruptObject):
            continue
        if entry.status == DONE:
            by_id = deleted.setdefault(str(entry.request.get("dataset")), {})
            for value in entry.request.get("ids", []):
                by_id.setdefault(int(value), []).append(request_id)
    return deleted


@dataclass
class HeldIds:
    """Checkpoints of one chain trained on ids of settled deletion requests.

    Attributes:
        run: the run.
        chain: its chain folder (a training's or an unlearning's).
        first_block: the earliest block holding one of the ids: M_first_block and every later checkpoint hold it.
        blocks: the stored checkpoints from ``first_block`` on (the ones to delete).
        ids: the dataset ids held (of settled requests).
        requests: the requests they come from.
        exclusions_known: whether the chain's left-out set is known (else taken as what it surely left out).
        size: bytes of those checkpoints.
        ids_of: request -> how many of its ids are held.
    """

    run: str
    chain: str
    first_block: int
    blocks: list[int]
    ids: list[int]
    requests: list[str]
    exclusions_known: bool
    size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    ids_of: dict[str, int] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``training`` or ``unlearning``: what wrote the chain."""
        return "training" if is_training_chain(self.chain) else "unlearning"

    def object_keys(self) -> list[str]:
        """The objects to delete, last block first, each checkpoint before its timing record."""
        out = []
        for block in sorted(self.blocks, reverse=True):
            key = checkpoint_key(self.run, self.chain, block)
            out += [key, key[: -len(".pt")] + ".json"]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "chain": self.chain,
            "kind": self.kind,
            "first_block": self.first_block,
            "blocks": list(self.blocks),
            "ids_count": len(self.ids),
            "ids": list(self.ids),
            "requests": list(self.requests),
            "exclusions_known": self.exclusions_known,
            "bytes": self.size,
            **self.extra,
        }


def _left_out(
    store: ObjectStore,
    run_id: str,
    chain: str,
    position_of: Mapping[int, int],
    wanted: Mapping[int, list[str]],
) -> tuple[set[int], bool]:
    """The training positions chain ``chain`` left out, and whether that is known.

    Not known: an older ``train-x`` set (taken as empty), an unlearning chain no manifest publishes
    whose name no candidate set matches (taken as its base version's), an unknown folder (empty):
    a part of what it left out, so what it is said to hold is never less than what it holds.
    ``position_of``: dataset id -> training position of the settled ids; ``wanted``: id -> requests.
    """
    if chain == TRAIN_CHAIN:
        return set(), True
    if is_training_chain(chain):
        key = f"runs/{run_id}/train-exclusions.json"
        if not store.exists(key):
            return set(), False
        record = store.get_json(key)
        if record.get("chain") != chain:
            return set(), False
        return {int(p) for p in record.get("positions", [])}, True
    token = _UNLEARNING_CHAIN.match(chain)
    if token is None:
        return set(), False
    return _unlearning_left_out(store, run_id, chain, int(token.group("base")), position_of, wanted)


def _unlearning_left_out(
    store: ObjectStore,
    run_id: str,
    chain: str,
    base: int,
    position_of: Mapping[int, int],
    wanted: Mapping[int, list[str]],
) -> tuple[set[int], bool]:
    """:func:`_left_out` of an unlearning chain (``u<base>-<hash>``).

    A retrain that stopped half-way (or lost its publish) wrote no manifest, and only the hash of
    its left-out set names the folder: the base version's deleted ids plus the ids of the requests it
    was applying. Those requests are tried (each settled one alone, then all of them), under every policy.
    """
    for key in store.list(f"runs/{run_id}/manifests"):
        if key.endswith(f"-{chain}.json"):
            try:
                return {int(p) for p in store.read_manifest(key).metadata["chain"]["deleted_ids"]}, True
            except (StorageError, KeyError, TypeError, ValueError):
                continue  # damaged: store check reports it; the name is tried below
    try:
        # the ids a version deleted (its pointer, kept for good): the positions its chain left out
        target = store.read_pointer_version(f"runs/{run_id}/current", base).target
        position = {int(d): p for p, d in enumerate(store.get_json(f"runs/{run_id}/spec.json")["train_ids"])}
        surely = {position[int(i)] for i in target.get("deleted_ids") or () if int(i) in position}
    except (StorageError, KeyError, TypeError, ValueError):
        surely = set()  # the base version cannot be read (store check reports it): taken as nothing left out
    by_request: dict[str, set[int]] = {}
    for dataset_id, at in position_of.items():
        for request_id in wanted.get(dataset_id, ()):
            by_request.setdefault(request_id, set()).add(at)
    candidates = [surely, *(surely | p for _, p in sorted(by_request.items())), surely | set(position_of.values())]
    # Imported here, not at the top: both modules load torch, and `store check` (which imports this module)
    # stays torch-free until it meets an unlearning chain no version names.
    from obliviate.unlearning.records import Policy
    from obliviate.unlearning.service import work_token

    for candidate in candidates:
        for policy in Policy:
            if work_token(base_version=base, excluded_positions=candidate, policy=policy.value) == chain:
                return candidate, True
    return surely, False


def held_ids(
    store: ObjectStore,
    run_id: str,
    chain: str,
    blocks: Iterable[int],
    deleted: Mapping[str, Mapping[int, list[str]]],
) -> HeldIds | None:
    """What of ``blocks`` (stored checkpoints of ``run_id``'s chain ``chain``, a training's or an unlearning's) holds
    ids in ``deleted``; ``None``: nothing.

    ``deleted``: ``dataset -> {dataset id -> [request ids]}`` (:func:`settled_deletions`).

    Raises:
        StorageError: the run's spec or block plan cannot be read (so what its checkpoints hold is unknown).
    """
    spec = store.get_json(f"runs/{run_id}/spec.json")
    wanted = deleted.get(str(spec.get("dataset")), {})
    stored = sorted(int(b) for b in blocks)
    if not wanted or not stored:
        return None
    position_of = {int(d): p for p, d in enumerate(spec["train_ids"]) if int(d) in wanted}
    if not position_of:
        return None
    left_out, known = _left_out(store, run_id, chain, position_of, wanted)
    trained = {p: d for d, p in position_of.items() if p not in left_out}
    if not trained:
        return None
    plan = store.get_json(f"runs/{run_id}/plan.json")
    block_of: dict[int, int] = {}
    for number, positions in enumerate(plan["blocks"], start=1):
        for position in positions:
            if int(position) in trained:
                block_of[int(position)] = number
    if not block_of:
        return None
    first = min(block_of.values())
    affected = [b for b in stored if b >= first]
    if not affected:
        return None
    ids = sorted(trained[p] for p in block_of)
    requests = sorted({r for i in ids for r in wanted[i]})
    held = HeldIds(run_id, chain, first, affected, ids, requests, exclusions_known=known)
    for dataset_id in ids:
        for request_id in wanted[dataset_id]:
            held.ids_of[request_id] = held.ids_of.get(request_id, 0) + 1
    for block in affected:
        try:
            held.size += store.info(checkpoint_key(run_id, chain, block)).size
        except StorageError:
            pass  # gone meanwhile, or its record damaged (store check reports that): its size is unknown
    return held


class TrainingLive(Exception):
    """A training of the run holds its claim now: its checkpoints are left to it (``holder`` names it)."""

    def __init__(self, run_id: str, holder: Mapping[str, Any]) -> None:
        super().__init__(f"run {run_id} is being trained now by {dict(holder)}")
        self.run_id, self.holder = run_id, dict(holder)


def erase_held(
    store: ObjectStore,
    held: HeldIds,
    deleted: Mapping[str, Mapping[int, list[str]]],
    *,
    command: str,
    unpublished_only: bool,
    within: Iterable[int] | None = None,
) -> HeldIds | None:
    """Delete the checkpoints ``held`` names, holding the run's training claim; what was deleted (``None``: nothing).

    Under the claim the chain is read again (a training may have stored blocks since ``held`` was
    found), and with ``unpublished_only`` nothing is deleted once the run has a version (a training
    that published meanwhile: what its version uses is never touched here). ``within``: only these
    blocks may go (a published run's checkpoints no version uses); ``None``: any stored one.

    Raises:
        TrainingLive: a training holds the run's claim now.
    """
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": command}
    try:
        claim = take_claim(store, training_claim_key(held.run), holder=holder, gone=holder_process_gone)
    except ClaimHeld as taken:
        raise TrainingLive(held.run, taken.holder) from None
    try:
        if unpublished_only and store.read_pointer(f"runs/{held.run}/current") is not None:
            return None
        prefix = f"runs/{held.run}/chains/{held.chain}"
        stored = stored_chains(store.list(prefix)).get((held.run, held.chain), [])
        if within is not None:
            stored = sorted(set(stored) & {int(b) for b in within})
        now = held_ids(store, held.run, held.chain, stored, deleted)
        if now is None:
            return None
        for key in now.object_keys():
            store.delete(key)
        if not store.list(prefix):
            store.remove_empty_folder(prefix)
        return now
    finally:
        try:
            release_claim(store, claim)
        except StorageError:
            pass  # not released: a training takes it over once its lease lapses (at once on this host)


class InterruptedTrainings:
    """A deletion pass's view of the store's runs without a published version (interrupted first trainings).

    Listed once per pass, on first use; :meth:`erase` then deletes, for one settled request, what
    their training chains hold of its ids (:func:`erase_held`).
    """

    def __init__(self, store: ObjectStore, *, command: str) -> None:
        self.store, self.command = store, command
        self._chains: dict[tuple[str, str], list[int]] | None = None

    def chains(self) -> dict[tuple[str, str], list[int]]:
        if self._chains is None:
            self._chains = unpublished_training_chains(self.store)
        return self._chains

    def erase(self, request_id: str, dataset: str, ids: Iterable[int]) -> dict[str, Any]:
        """Delete what the unpublished runs' training chains hold of request ``request_id``'s ids.

        Returns:
            ``purged``: run -> what was deleted (chain, first block, blocks, ids count, bytes);
            ``left_to_training``: run -> the live training's holder (left to it); ``unreadable``:
            run -> why what it holds is unknown. Empty dicts when nothing was found.
        """
        deleted = {dataset: {int(i): [request_id] for i in ids}}
        out: dict[str, dict[str, Any]] = {"purged": {}, "left_to_training": {}, "unreadable": {}}
        for (run_id, chain), blocks in list(self.chains().items()):
            try:
                held = held_ids(self.store, run_id, chain, blocks, deleted)
                if held is None:
                    continue
                done = erase_held(self.store, held, deleted, command=self.command, unpublished_only=True)
            except TrainingLive as live:
                out["left_to_training"][run_id] = {
                    "holder": {k: live.holder.get(k) for k in ("command", "pid", "host")},
                    "note": "a training of this run was live; it leaves the ids out before it publishes",
                }
                continue
            except (StorageError, KeyError, ValueError, TypeError) as err:
                out["unreadable"][run_id] = f"{type(err).__name__}: {err}"[:300]
                continue
            if done is None:
                continue
            self._chains[(run_id, chain)] = [b for b in blocks if b < done.first_block]  # type: ignore[index]
            entry = {k: v for k, v in done.as_dict().items() if k not in ("ids", "requests", "run")}
            out["purged"].setdefault(run_id, {})[chain] = entry
        return {k: v for k, v in out.items() if v}


def sweep_dead_trainings(store: ObjectStore, *, command: str) -> dict[str, Any]:
    """Delete what the training chains of runs with no version, whose training is not live, hold of settled ids.

    The pass that settles a request leaves a run being trained right then to its training (which
    leaves the request's ids out before it publishes); a training that then dies never publishes,
    and its checkpoints keep the ids. This sweep (the scheduled reconcile pass) finds each such chain
    whose run's training claim is free (its holder is gone or its lease lapsed, or there is none),
    deletes its checkpoints from the first block holding a settled id on (:func:`erase_held`, under
    the claim), and tells each request whose ids they held: its ``details.interrupted_trainings``
    says the run and chain as the pass says it (``purged``), with ``swept_at``, and no longer lists
    the run as ``left_to_training`` (:meth:`storage.ledger.DeletionLedger.record_interrupted_training`).

    Returns:
        ``purged``: run -> chain -> what was deleted (first block, blocks, ids count, bytes, requests);
        ``unreadable``: run -> why what it holds is unknown; ``untold``: request -> why its record could
        not be written (the checkpoints are gone all the same). Empty dict: nothing to do.

    Raises:
        StorageError: the store's runs or ledger could not be listed.
    """
    from storage.ledger import DeletionLedger

    chains = unpublished_training_chains(store)
    if not chains:
        return {}
    deleted = settled_deletions(store)
    ledger = DeletionLedger(store)
    out: dict[str, dict[str, Any]] = {"purged": {}, "unreadable": {}, "untold": {}}
    for (run_id, chain), blocks in chains.items():
        try:
            if live_training(store, run_id) is not None:
                continue  # its training leaves the ids out before it publishes; a later sweep sees it if it dies
            held = held_ids(store, run_id, chain, blocks, deleted)
            if held is None:
                continue
            done = erase_held(store, held, deleted, command=command, unpublished_only=True)
        except TrainingLive:
            continue  # a training took the claim since: left to it
        except (StorageError, KeyError, ValueError, TypeError) as err:
            out["unreadable"][run_id] = f"{type(err).__name__}: {err}"[:300]
            continue
        if done is None:
            continue
        swept_at = time.time()
        entry = {k: v for k, v in done.as_dict().items() if k not in ("ids", "run")}
        out["purged"].setdefault(run_id, {})[chain] = entry
        for request_id in done.requests:
            told = {**entry, "ids_count": done.ids_of.get(request_id, 0), "swept_at": swept_at}
            told.pop("requests")
            try:
                ledger.record_interrupted_training(request_id, run_id, chain, told)
            except (StorageError, CorruptObject, PointerConflict) as err:  # damaged or busy: store check says it
                out["untold"][request_id] = f"{type(err).__name__}: {err}"[:300]
    return {k: v for k, v in out.items() if v}
