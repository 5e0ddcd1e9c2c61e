"""Checking a store: committed objects' checksums, versions' lineage, orphans (``obliviate store check``).

:func:`check_store` reads everything once and reports:

* ``corrupt``: committed objects whose bytes fail their commit record or are gone (a commit record
  left without its object: deleted or lost outside obliviate, since a write commits its bytes
  first and a delete removes the record first), objects something needs (a version, a result, a
  request's status history) whose commit record is gone and bytes left, and pointer versions that
  fail their own checksum; each with the ``(run, version)`` pairs whose manifests need it. A
  damaged ledger record (a request or one of its status versions) is one such item, said with
  what it loses and how to mend it (:func:`_explain_ledger_damage`); the rest is checked all the same;
* ``lineage``: per run, problems of the version history: a version whose manifest is missing or
  damaged, a manifest member missing or not matching the checksum the manifest recorded, a
  version that dropped requests or deleted ids an earlier version had applied;
* ``orphans``: objects nothing can reach: checkpoints and manifests of attempts that lost a
  publish race or crashed, of versions pruned by retention, leases of settled requests,
  half-written temporary files, bytes a write left under their final name without committing them
  (``uncommitted``: a crash or a full disk between the bytes and their commit record; nothing
  needs them; a brand-new run's first write too, its training claim's temporary included, known by our writer's
  names: :data:`_FIRST_WRITE`), half-filed requests (``half_filed``: an open marker whose request was never
  committed, so never acknowledged; a re-run of the same ``forget --request-id`` completes it). They
  are listed only when no kept version refers to them, their run has a current version (a training
  in progress is never touched) and every version pointer of it reads (a damaged one may use any of
  them), they are older than ``min_age_s``, and no attempt may still write, publish or resume them
  (:func:`_in_flight`). A write check's leftover (:meth:`ObjectStore.check_writable`)
  is listed whatever its age: nothing reads it, and its writer tolerates its removal;
* ``nested``: folders that are stores of their own (the demo's ./runs/demo inside the default store
  ./runs): skipped whole, to be checked with their own ``--store``; their manifests pin keys of their
  own root, and their files are not this store's garbage;
* ``foreign``: files outside the key families obliviate writes (:meth:`_Scope.own`; a steal report or
  a target checkpoint kept under the store's folder): never verified (even with a ``.sha256`` of their
  own beside them, which is not our commit record) nor collected, said only as a count.

Retention (:func:`prune_versions`, ``store check --repair --keep-versions N``) marks the versions of
a run older than its newest N as pruned (``runs/<run>/pruned``, written first) and deletes what
only they referenced; their pointer versions stay (the history, small JSON).

Repair (rebuilding damaged checkpoints by replay) needs training, so it lives in
:mod:`flows.repair`; :func:`collect_orphans` deletes what :func:`check_store` listed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from storage.errors import CorruptObject, ObjectNotFound, PointerConflict, StorageError
from storage.lease import claim_free, holder_process_gone
from storage.objects import COMMIT_SUFFIX, WRITE_CHECK_MARK, ObjectStore, Pointer
from storage.registry import checkpoint_key, keeps_newest_versions_only

_TMP_MARK = ".tmp-"
# Short-lived objects that one writer rewrites while another may delete them: leases, open-request
# markers, flush requests, serve's announcement and heartbeat. A commit record left alone there is
# not damage; everything else (runs, manifests, registry, groups, the ledger's requests) is durable.
_REWRITTEN_AND_DELETED = ("ledger/leases/", "ledger/open/", "ledger/flush/", "service/")
_CHAIN_KEY = re.compile(r"^runs/(?P<run>[^/]+)/chains/(?P<chain>[^/]+)/ckpt-(?P<index>\d{4})\.(pt|json)$")
_REGISTRY_KEY = re.compile(r"^registry/(?P<run>[^/]+)\.json$")
_MANIFEST_KEY = re.compile(r"^runs/(?P<run>[^/]+)/manifests/v(?P<version>\d{6})-(?P<chain>[^/]+)\.json$")
# The chain folder of an unlearning: ``u<base version>-<hash>`` (obliviate.unlearning.service.work_token).
_TOKEN_CHAIN = re.compile(r"^u(?P<base>\d{6})-")
_REQUEST_KEY = re.compile(r"^ledger/requests/(?P<request>[^/]+)\.json$")
_OPEN_KEY = re.compile(r"^ledger/open/(?P<request>[^/]+)\.json$")
_STATUS_VERSION_KEY = re.compile(r"^ledger/status/(?P<request>[^/]+)/v(?P<version>\d{9})\.json$")
_POINTER_VERSION_NAME = re.compile(r"^v\d{9}\.json$")
# A version of a run's version pointer (storage.registry.RunRegistry.pointer_key).
_RUN_VERSION_KEY = re.compile(r"^runs/(?P<run>[^/]+)/current/v(?P<version>\d{9})\.json$")
# Folders of a store that hold no obliviate objects: Ray Tune's own state (flows.tune).
_FOREIGN = ("tune-state/",)
# The first folders of the keys obliviate writes (besides ``reduce-*`` results and temporaries at the root). A name
# elsewhere is not the store's: store check never collects it (a user's steal report or target checkpoint kept
# under the store's folder, the default ./runs). storage.tiles.MI_TILES is "mi-tiles"; not imported (numpy).
_OWN_TOP = ("runs", "registry", "ledger", "service", "groups", "tune", "mi-tiles")
# The names our writers put right under a run's folder runs/<run>/ (storage.registry, actors.chains, flows.train,
# flows.audit). Only these are a run's: a user's file there (with a .sha256 of its own or not) is not checked.
_RUN_LAYOUT = frozenset(
    {
        "chains",
        "manifests",
        "current",
        "pruned",
        "pruned.json",
        "spec.json",
        "plan.json",
        "train-claim",
        "train-claim-leases",
        "train-exclusions.json",
        "audits",
    }
)
# Where a pass's claim on the store (flows.settle.PASS_CLAIM_KEY, service/pass-claim) keeps its leases
# (storage.lease.claim_leases): service/pass-claim-leases/c<claim version>.json. Not imported: flows is above storage.
_PASS_CLAIM_LEASES = "pass-claim-leases"
# The pointers of claims (storage.lease.PointerClaim: storage.registry.training_claim_key, flows.settle.PASS_CLAIM_KEY): each
# release and take-over drops their versions but the newest (storage.lease.tidy_claim), so they are checked from the
# oldest one kept.
_CLAIM_POINTER = re.compile(r"^(?:runs/(?P<run>[^/]+)/train-claim|service/pass-claim)$")
# A temporary file of an atomic write (storage.objects: ``.tmp-<hex>-<final name>`` beside the final name).
_TMP_OF = re.compile(r"^\.tmp-[0-9a-f]+-(?P<final>.+)$")
# What a run's training writes first, before any commit record of its run exists (flows.train: the training claim,
# a pointer whose version is written as ``.tmp-<uuid hex>`` then linked to ``v<version>.json``, storage.objects;
# actors.chains: the block plan, then each block's checkpoint; storage.registry: the spec, the manifest): named so
# exactly that bytes left under such a name (or its temporary) by a crash are ours even in a run folder holding
# nothing committed yet.
_FIRST_WRITE = re.compile(
    r"^runs/[^/]+/(?:plan\.json|spec\.json|train-exclusions\.json|chains/[^/]+/ckpt-\d{4}\.(?:pt|json)"
    r"|manifests/v\d{6}-[^/]+\.json|train-claim/\.tmp-[0-9a-f]{32})$"
)
_RESULT_TOP = "reduce-"
# What only a store's root holds (a run's version pointer, a registry entry, a ledger request, a reduce result, an
# MI tile): a folder holding one of these, under a name that is not one of the outer store's own keys, is a store
# of its own (the demo's ./runs/demo inside the default store ./runs, and its deletion story's store at service/).
_STORE_MARK = re.compile(
    r"^(?P<root>.+?)/(?:runs/[^/]+/current/v\d{9}\.json|registry/[^/]+\.json\.sha256"
    r"|ledger/requests/[^/]+\.json\.sha256|reduce-[^/]+/manifest\.json\.sha256|mi-tiles/[^/]+/[^/]+\.sha256)$"
)
# A ledger request whose record or latest status cannot be read: counted as open (what it may still need is kept).
_UNREADABLE = "unreadable"
# How a damaged object's error (storage.objects) ends outside store check.
_SEE_STORE_CHECK = "; the object is damaged (`obliviate store check` says what needs it and how to mend it)."


@dataclass
class StoreReport:
    """What :func:`check_store` found (JSON-able through :meth:`as_dict`)."""

    url: str
    objects_checked: int = 0
    pointers_checked: int = 0
    corrupt: list[dict[str, Any]] = field(default_factory=list)
    lineage: list[dict[str, Any]] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    orphans_held_back: str | None = None
    repaired: list[dict[str, Any]] = field(default_factory=list)
    unrecoverable: list[dict[str, Any]] = field(default_factory=list)
    collected: list[str] = field(default_factory=list)
    pruned: dict[str, Any] | None = None
    seconds: float = 0.0
    uncommitted: list[str] = field(default_factory=list)
    half_filed: list[str] = field(default_factory=list)
    min_age_s: float = 600.0
    superseded: list[dict[str, Any]] = field(default_factory=list)
    purged: dict[str, Any] | None = None
    nested: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    deleted_ids_held: list[dict[str, Any]] = field(default_factory=list)
    unfinished_trainings: list[dict[str, Any]] = field(default_factory=list)
    erased: list[dict[str, Any]] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """No damage left (orphans are garbage, not damage)."""
        fixed = {r["key"] for r in self.repaired}
        return (
            not [c for c in self.corrupt if c["key"] not in fixed]
            and not self.lineage_unfixed(fixed)
            and not self.superseded
            and not self.deleted_ids_held
        )

    def lineage_unfixed(self, fixed: set[str]) -> list[dict[str, Any]]:
        return [problem for problem in self.lineage if problem.get("key") not in fixed]

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "objects_checked": self.objects_checked,
            "pointers_checked": self.pointers_checked,
            "corrupt": self.corrupt,
            "lineage": self.lineage,
            "orphans": self.orphans,
            "orphans_held_back": self.orphans_held_back,
            "repaired": self.repaired,
            "unrecoverable": self.unrecoverable,
            "collected": self.collected,
            "pruned": self.pruned,
            "uncommitted": self.uncommitted,
            "half_filed": self.half_filed,
            "superseded": self.superseded,
            "purged": self.purged,
            "nested": self.nested,
            "foreign": self.foreign,
            "deleted_ids_held": self.deleted_ids_held,
            "unfinished_trainings": self.unfinished_trainings,
            "erased": self.erased,
            "seconds": self.seconds,
        }


def check_store(store: ObjectStore, *, min_age_s: float = 600.0) -> StoreReport:
    """Verify every committed object and pointer version, every run's lineage; list orphans."""
    began = time.monotonic()
    report = StoreReport(url=store.url, min_age_s=min_age_s)
    # A folder marker (an empty key ending in "/", as Ray Tune and S3 consoles write them; the store's own prefix
    # reads as "") is no file at all: neither ours nor a user's, so not "foreign" either.
    everything = [name for name in store.stored_names("") if name and not name.endswith("/")]
    scope = _scope(everything)
    report.nested = list(scope.nested)
    names = [name for name in everything if scope.checked(name)]
    # only what our layout owns is verified: a user's file with a .sha256 of its own is not our commit
    keys = [key for key in store.list("") if scope.own(key)]
    gone: set[str] = set()
    for key in keys:
        try:
            store.verify(key)
        except CorruptObject as err:
            report.corrupt.append({"key": key, "error": str(err)})
        except ObjectNotFound:
            if store.exists(key):  # still committed: its bytes went, which only damage does (a delete ends with them)
                raise
            gone.add(key)  # deleted since the listing (a running serve drops leases and released claims): not damaged
            continue
        report.objects_checked += 1
    keys = [key for key in keys if key not in gone]
    lost = []
    for key in _records_alone([name for name in names if scope.own(name)]):
        if key.startswith(_REWRITTEN_AND_DELETED):
            # A renewal racing its own delete (a lease renewed while the settled request drops it)
            # can leave such a record alone; it is garbage, collected below like other leases.
            lost.append(key)
            continue
        report.objects_checked += 1
        try:
            # Read again: a listing in pages can pass an object's name before a concurrent write
            # stores it and reach its commit record after; such an object is whole by now.
            store.verify(key)
        except CorruptObject as err:
            report.corrupt.append({"key": key, "error": str(err)})
        except ObjectNotFound:
            lost.append(key)
            report.corrupt.append(
                {
                    "key": key,
                    # how to mend it depends on what it is (a checkpoint, a result's file, a record): said apart
                    "error": f"{store.uri(key)} was committed but its bytes are gone (deleted or lost outside "
                    "obliviate; its commit record remains)",
                }
            )
    pointer_keys = [key for key in store.list_pointers("") if scope.own(key)]
    # runs a version pointer of which cannot be read: what that version uses is unknown, so none of it is an orphan
    blind_runs: set[str] = set()
    for pointer_key in pointer_keys:
        versions = store.pointer_versions(pointer_key)
        latest = versions[-1] if versions else 0
        # a run's pruned record keeps only its newest versions, each holding the whole record (storage.registry), and
        # so does a claim's pointer (storage.lease.tidy_claim); a version lost above the oldest kept is still damage
        first = versions[0] if versions and _keeps_newest_only(pointer_key) else 1
        for version in range(first, latest + 1):
            try:
                store.read_pointer_version(pointer_key, version)
            except (CorruptObject, ObjectNotFound) as err:
                if isinstance(err, ObjectNotFound) and _dropped_since_listed(store, pointer_key, version):
                    continue  # not there to check, and not damaged
                report.corrupt.append({"key": f"{pointer_key}/v{version:09d}.json", "error": str(err)})
                if pointer_key.startswith("runs/") and pointer_key.endswith("/current"):
                    blind_runs.add(pointer_key.split("/")[1])
            report.pointers_checked += 1

    referenced: set[str] = set()
    dependents: dict[str, list[dict[str, Any]]] = {}
    runs_with_versions: dict[str, tuple[int, int]] = {}  # run -> (current version, version its chain comes from)
    for pointer_key in pointer_keys:
        if not (pointer_key.startswith("runs/") and pointer_key.endswith("/current")):
            continue
        run_id = pointer_key.split("/")[1]
        runs_with_versions[run_id] = _check_run(store, run_id, pointer_key, report, referenced, dependents)
    for key in keys:
        registered = _REGISTRY_KEY.match(key)
        if registered and registered.group("run") not in runs_with_versions:
            run_id = registered.group("run")
            report.lineage.append(
                {
                    "run": run_id,
                    "version": None,
                    "key": f"runs/{run_id}/current",
                    "problem": f"run {run_id} is registered ({key}, written just before version 1 is published) "
                    "but has no version pointer: its training stopped between the two (it serves nothing; rerun "
                    "`obliviate train` with its options, which resumes the stored checkpoints and publishes), or "
                    "runs/" + run_id + "/current was lost outside obliviate (restore it from a backup; if the run "
                    "never had a deletion applied, rerunning `obliviate train` publishes version 1 again)",
                }
            )
        if key.rsplit("/", 1)[-1] == "manifest.json" and not key.startswith("runs/"):
            _check_result_manifest(store, key, report)
    alone = _bytes_alone(store, report, names, keys, pointer_keys, referenced, dependents, scope)
    for item in report.corrupt:
        item["needed_by"] = dependents.get(item["key"], [])
        # a damaged object's own error sends its reader here; here it is said what needs it and how to mend it
        item["error"] = str(item["error"]).replace(_SEE_STORE_CHECK, ".")
    _explain_ledger_damage(store, report)
    _explain_version_pointer_damage(store, report)

    report.orphans, report.orphans_held_back = _orphans(
        store, keys + lost, names, referenced, runs_with_versions, min_age_s, alone, report, scope, blind_runs
    )
    report.superseded = _superseded_left(store)
    report.deleted_ids_held, report.unfinished_trainings = _chains_left(
        store, keys, referenced, runs_with_versions, blind_runs
    )
    report.seconds = time.monotonic() - began
    return report


def _chains_left(
    store: ObjectStore,
    keys: list[str],
    referenced: set[str],
    runs_with_versions: Mapping[str, tuple[int, int]],
    blind_runs: Collection[str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Checkpoints holding ids of settled deletion requests (SPEC 5), and unfinished trainings.

    Every chain folder is judged, a training's (``runs/<run>/chains/train[-x<hash>]``) or an
    unlearning's (``u<base>-<hash>``): of a run with no version (a training interrupted before it
    published, registered or not) all its checkpoints, of a published run those no stored manifest
    lists (what a version lists, kept or recorded pruned, is the superseded purge's and retention's:
    :func:`_superseded_left`, which also tells the ledger), such as the chain of an unlearning retrain
    that stopped half-way or lost its publish, and an old training chain. An unlearning chain that
    work in flight may still write, publish or resume (:func:`_in_flight`: one started from the chain
    the current version comes from) is left to it: it left out every id that chain had. A checkpoint
    M_b holds a deleted id when the run's block plan puts the id in a block up to b and the chain did
    not leave it out (:func:`storage.erasure.held_ids`). One whose run is being trained now is left to
    that training (it leaves the ids out before it publishes): said on its unfinished training, not
    as a breach.

    Returns:
        ``(held, unfinished)``: ``held`` one item per chain (run, chain, ``kind``, first block, blocks,
        ids, requests, bytes, ``registered``, ``published``); ``unfinished`` one per training chain of a
        run with no version (run, chain, blocks, bytes, ``registered``, ``training_now``, and the
        held item's ``holds_deleted_ids`` count while a live training holds it).
    """
    from storage.erasure import (
        held_ids,
        is_training_chain,
        live_training,
        settled_deletions,
        stored_chains,
    )

    chains: dict[tuple[str, str], list[int]] = {}
    listed: dict[str, set[str]] = {}
    for (run_id, chain), blocks in stored_chains(keys).items():
        if run_id in blind_runs:
            continue  # a version pointer of it cannot be read: what its versions use is unknown (reported above)
        if run_id in runs_with_versions:
            if _in_flight(checkpoint_key(run_id, chain, blocks[0]), runs_with_versions[run_id]):
                continue
            blocks = [b for b in blocks if checkpoint_key(run_id, chain, b) not in referenced]
            if blocks and run_id not in listed:
                listed[run_id] = _listed_by_any_manifest(store, run_id, keys)
            # a version recorded pruned but whose objects are still there: the superseded purge's (it tells the ledger)
            blocks = [b for b in blocks if checkpoint_key(run_id, chain, b) not in listed.get(run_id, set())]
        if blocks:
            chains[(run_id, chain)] = blocks
    if not chains:  # the usual store: every chain is what versions use or may (the ledger is not read again)
        return [], []
    deleted = settled_deletions(store)
    registered = {match.group("run") for key in keys if (match := _REGISTRY_KEY.match(key))}
    live: dict[str, dict[str, Any] | None] = {}
    held_items: list[dict[str, Any]] = []
    unfinished: list[dict[str, Any]] = []
    for (run_id, chain), blocks in chains.items():
        published = run_id in runs_with_versions
        if run_id not in live:
            live[run_id] = live_training(store, run_id)
        try:
            held = held_ids(store, run_id, chain, blocks, deleted)
            unreadable = None
        except (StorageError, KeyError, ValueError, TypeError) as err:
            held, unreadable = None, f"{type(err).__name__}: {err}"[:300]
        training_now = live[run_id] is not None
        if not published and is_training_chain(chain):
            size = 0
            for block in blocks:
                try:
                    size += store.info(checkpoint_key(run_id, chain, block)).size
                except StorageError:
                    pass  # its record is damaged (reported above) or it went meanwhile
            item: dict[str, Any] = {
                "run": run_id,
                "chain": chain,
                "blocks": blocks,
                "bytes": size,
                "registered": run_id in registered,
                "training_now": training_now,
            }
            if unreadable is not None:
                item["unreadable"] = unreadable
            if held is not None and training_now:
                item["holds_deleted_ids"] = len(held.ids)
            unfinished.append(item)
        if held is None or training_now:
            continue
        held.extra = {"registered": run_id in registered, "published": published}
        held_items.append(held.as_dict())
    return held_items, unfinished


def _listed_by_any_manifest(store: ObjectStore, run_id: str, keys: list[str]) -> set[str]:
    """The checkpoints that any stored manifest of ``run_id`` lists (kept or pruned versions; unreadable ones skipped)."""
    listed: set[str] = set()
    for key in keys:
        manifest = _MANIFEST_KEY.match(key)
        if manifest is None or manifest.group("run") != run_id:
            continue
        try:
            listed.update(member.key for member in store.read_manifest(key).members.values())
        except (StorageError, KeyError, ValueError, TypeError):
            continue  # a damaged manifest is reported above
    return listed


def erase_deleted_ids_held(store: ObjectStore, report: StoreReport) -> list[dict[str, Any]]:
    """Delete the checkpoints ``report.deleted_ids_held`` names, from each one's first block on (``--repair``).

    Each run's training claim is held while its chain goes (:func:`storage.erasure.erase_held`): a
    run whose training started since the check is left to it, and what a published run's versions
    use is never deleted. Returns what was deleted; ``report.deleted_ids_held`` keeps what was not.
    """
    from storage.erasure import HeldIds, TrainingLive, erase_held, settled_deletions

    if not report.deleted_ids_held:
        return []
    deleted = settled_deletions(store)
    erased, left = [], []
    for item in report.deleted_ids_held:
        held = HeldIds(
            run=item["run"],
            chain=item["chain"],
            first_block=int(item["first_block"]),
            blocks=[int(b) for b in item["blocks"]],
            ids=[int(i) for i in item["ids"]],
            requests=list(item["requests"]),
            exclusions_known=bool(item["exclusions_known"]),
        )
        try:
            done = erase_held(
                store,
                held,
                deleted,
                command="obliviate store check --repair",
                unpublished_only=not item["published"],
                within=held.blocks if item["published"] else None,
            )
        except TrainingLive as live:
            left.append({**item, "left_to_training": live.holder})
            continue
        if done is None:
            continue  # published or emptied meanwhile: the next check judges it again
        done.extra = {"registered": item["registered"], "published": item["published"]}
        erased.append(done.as_dict())
    gone = {key for item in erased for key in HeldIds(**_held_fields(item)).object_keys()}
    report.orphans = [name for name in report.orphans if name not in gone]
    report.deleted_ids_held = left
    return erased


def _held_fields(item: dict[str, Any]) -> dict[str, Any]:
    return {k: item[k] for k in ("run", "chain", "first_block", "blocks", "ids", "requests", "exclusions_known")}


def _dropped_since_listed(store: ObjectStore, pointer_key: str, version: int) -> bool:
    """Whether ``version`` of a pointer that keeps only its newest versions was dropped after the check listed it (a
    release by a running serve, :func:`storage.lease.tidy_claim`): it is below the oldest version kept now."""
    if not _keeps_newest_only(pointer_key):
        return False
    kept = store.pointer_versions(pointer_key)
    return bool(kept) and version < kept[0]


def _keeps_newest_only(pointer_key: str) -> bool:
    """Whether pointer ``pointer_key`` drops its old versions: a run's pruned record, a claim (a missing older one is no damage)."""
    return keeps_newest_versions_only(pointer_key) or _CLAIM_POINTER.match(pointer_key) is not None


def _superseded_left(store: ObjectStore) -> list[dict[str, Any]]:
    """Runs whose superseded versions still hold checkpoints trained on ids a later version deleted (SPEC 5).

    What :func:`purge_superseded` would delete now: a purge cut off after its version's publish (a
    crash, an outage), or a store written before purging was the default. Nothing while the store
    opted out (``serve --keep-superseded-versions``).
    """
    found = []
    would = purge_superseded(store, apply=False)
    for run_id, run in sorted(would["runs"].items()):
        if not run["versions"] and not run["objects"]:
            continue
        versions = run["versions"] or "already recorded pruned"
        found.append(
            {
                "run": run_id,
                "versions": run["versions"],
                "objects": run["objects"],
                "problem": f"run {run_id}: superseded version(s) {versions} still hold {run['objects']} object(s) "
                "(checkpoints, manifests) of chains trained on ids the current version deleted: their purge after "
                "the deletion's publish did not finish (a crash or an outage in between), or the store was written "
                "before purging was the default (SPEC 5: no stored checkpoint trained on a deleted id remains). "
                "`obliviate store check --repair` deletes them (their pointer versions stay as the record), as does "
                f"serve's next reconcile pass; `obliviate {KEEP_SUPERSEDED_OPTION}` keeps them on purpose instead",
            }
        )
    return found


@dataclass(frozen=True)
class _Scope:
    """Which stored names are this store's own (:func:`_scope`)."""

    nested: tuple[str, ...]  # folders ("demo/") that are stores of their own
    runs: frozenset[str]  # run folders (runs/<run>/) holding something obliviate committed

    def own(self, name: str) -> bool:
        """Whether ``name`` is in a key family obliviate writes: its objects, commit records, pointers, temporaries.

        Only these are ever verified or collected. A run's folder is one holding a commit record or a pointer
        version under a name of a run's layout (:data:`_RUN_LAYOUT`; runs/steal/ with steal's plain files is not,
        on a store at ./), and in it only those names are the run's.
        """
        parts = name.split("/")
        top = parts[0]
        if len(parts) == 1:
            return top.startswith(_TMP_MARK)  # at the root only temporaries (write checks)
        if top == "runs":
            return (
                len(parts) >= 3
                and _in_run_layout(parts[2])
                and (parts[1] in self.runs or _interrupted_first_write(name))
            )
        if top in ("registry", "groups") or top.startswith(_RESULT_TOP):
            return len(parts) == 2
        if top == "service":  # its records, the pass claim's pointer versions and the leases of its claims
            last = parts[-1]
            return len(parts) == 2 or (
                len(parts) == 3
                and (
                    _POINTER_VERSION_NAME.match(last) is not None
                    or last.startswith(_TMP_MARK)
                    or parts[1] == _PASS_CLAIM_LEASES
                )
            )
        return top in _OWN_TOP

    def checked(self, name: str) -> bool:
        """Whether store check reads ``name``: not inside a nested store, unless it is one of this store's own keys."""
        return self.own(name) or not name.startswith(self.nested)


def _scope(names: list[str]) -> _Scope:
    """This store's own names and the folders in it that are stores of their own (shallowest first kept)."""
    runs = frozenset(
        parts[1]
        for parts in (name.split("/") for name in names if name.startswith("runs/"))
        if (
            len(parts) >= 4
            and parts[2] in _RUN_LAYOUT
            and (parts[-1].endswith(COMMIT_SUFFIX) or _POINTER_VERSION_NAME.match(parts[-1]))
        )
        or (len(parts) == 3 and parts[2].endswith(COMMIT_SUFFIX) and _in_run_layout(parts[2]))
    )
    own = _Scope(nested=(), runs=runs)
    roots = set()
    for name in names:
        mark = _STORE_MARK.match(name)
        if mark is not None and not own.own(name):
            roots.add(mark.group("root") + "/")
    nested = tuple(sorted(root for root in roots if not any(root != o and root.startswith(o) for o in roots)))
    return _Scope(nested=nested, runs=runs)


def _in_run_layout(first: str) -> bool:
    """Whether ``first``, a name right under a run's folder, is one our writers use there (its temporary, its record)."""
    temporary = _TMP_OF.match(first)
    return (temporary.group("final") if temporary else first).removesuffix(COMMIT_SUFFIX) in _RUN_LAYOUT


def _interrupted_first_write(name: str) -> bool:
    """Whether ``name`` is what a run's training writes (:data:`_FIRST_WRITE`), or the temporary of one.

    A brand-new run's first write cut off before its commit record leaves its run folder with nothing
    committed, so its folder alone does not say it is ours: the name does.
    """
    parent, _, base = name.rpartition("/")
    temporary = _TMP_OF.match(base)
    return _FIRST_WRITE.match(f"{parent}/{temporary.group('final') if temporary else base}") is not None


def _records_alone(names: list[str]) -> list[str]:
    """Keys whose commit record was listed without the object it commits."""
    present = set(names)
    return sorted(
        name[: -len(COMMIT_SUFFIX)]
        for name in names
        if name.endswith(COMMIT_SUFFIX) and _TMP_MARK not in name and name[: -len(COMMIT_SUFFIX)] not in present
    )


def _bytes_alone(
    store: ObjectStore,
    report: StoreReport,
    names: list[str],
    keys: list[str],
    pointer_keys: list[str],
    referenced: set[str],
    dependents: dict[str, list[dict[str, Any]]],
    scope: _Scope,
) -> list[str]:
    """Bytes under a final name without a commit record: damage when something needs them, else returned.

    A write stores its bytes, then their commit record; a crash or a full disk in between leaves the
    bytes alone, never acknowledged (an orphan, returned here). Their record lost outside obliviate
    looks the same: when a version, a result or a request's status history needs the object, it is
    damage (added to ``report.corrupt``; a version's member already reported as missing is not
    repeated). A request whose status history exists needs its record; one without (its record
    alone, or only its open marker) is half-filed: ``report.half_filed`` (its marker and bytes are
    orphans). A status history whose request is gone entirely is damage too. A file outside the key
    families obliviate writes (:meth:`_Scope.own`) that nothing needs is not an orphan: obliviate did not
    write it (a user's file kept under the store's folder), so it goes to ``report.foreign``, left alone; so
    does one there with a ``.sha256`` of its own beside it (and that ``.sha256``): not our commit, never verified.
    """
    present = set(names)
    pointers = set(pointer_keys)
    statuses = {key.split("/")[2] for key in pointer_keys if key.startswith("ledger/status/") and key.count("/") == 2}
    said = {item["key"] for item in report.corrupt} | {problem.get("key") for problem in report.lineage}
    found: list[str] = []
    requests_with_bytes: set[str] = set()
    for name in names:
        parent, _, base = name.rpartition("/")
        if (
            not scope.own(name)
            and _TMP_MARK not in name
            and not name.startswith(_FOREIGN)
            and (name.endswith(COMMIT_SUFFIX) or name + COMMIT_SUFFIX in present)
        ):
            report.foreign.append(name)  # a user's file with a .sha256 of its own (or that .sha256): not our commit
            continue
        if (
            name.endswith(COMMIT_SUFFIX)
            or _TMP_MARK in name
            or name + COMMIT_SUFFIX in present
            or name.startswith(_FOREIGN)
            or (parent in pointers and _POINTER_VERSION_NAME.match(base))
        ):
            continue
        request = _REQUEST_KEY.match(name)
        if request is not None:
            requests_with_bytes.add(request.group("request"))
        if name in said:
            continue
        if name in dependents or name in referenced or (request is not None and request.group("request") in statuses):
            report.objects_checked += 1
            report.corrupt.append(
                {
                    "key": name,
                    "error": f"{store.uri(name)} has bytes but no commit record ({COMMIT_SUFFIX}): its record was "
                    "lost outside obliviate (or a write of it was interrupted), and it is needed",
                }
            )
        elif request is not None:
            report.half_filed.append(request.group("request"))
        elif not scope.own(name):
            report.foreign.append(name)
        else:
            found.append(name)
    committed = set(keys)
    for request_id in sorted(statuses):
        key = f"ledger/requests/{request_id}.json"
        if key not in committed and request_id not in requests_with_bytes and key not in said:
            report.corrupt.append(
                {
                    "key": key,
                    "error": f"{store.uri(key)} is gone (bytes and commit record, deleted or lost outside obliviate) "
                    f"while the request's status history ledger/status/{request_id} remains",
                }
            )
    for key in keys:  # an open marker of a request never committed (the write of its record failed or never came)
        marker = _OPEN_KEY.match(key)
        opened = marker.group("request") if marker is not None else ""
        if opened and f"ledger/requests/{opened}.json" not in committed and opened not in statuses:
            report.half_filed.append(opened)
    report.half_filed = sorted(set(report.half_filed))
    report.foreign = sorted(report.foreign)
    report.uncommitted = sorted(found)
    return report.uncommitted


def _explain_ledger_damage(store: ObjectStore, report: StoreReport) -> None:
    """Say, for each damaged ledger request record or status version, what it loses and how to mend it."""
    from storage.ledger import TERMINAL, current_status_mend, request_record_mend

    waiting: dict[str, list[dict[str, Any]]] | None = None
    for item in report.corrupt:
        request = _REQUEST_KEY.match(item["key"])
        status = _STATUS_VERSION_KEY.match(item["key"])
        if request is None and status is None:
            continue
        request_id = (request or status).group("request")  # type: ignore[union-attr]
        history = _readable_history(store, request_id)
        latest = max(history) if history else 0
        versions = store.pointer_versions(f"ledger/status/{request_id}")
        newest = versions[-1] if versions else 0
        error = str(item["error"]).rstrip(".")
        if request is not None:
            ids = sorted(
                {
                    int(i)
                    for details in history.values()
                    for run in ((details.get("details") or {}).get("runs") or {}).values()
                    if isinstance(run, dict)
                    for i in run.get("deleted_ids") or []
                }
            )
            said = (
                f"its status history (ledger/status/{request_id}) is readable up to version {latest} of {newest}, "
                f"latest status {history[latest]['status']!r}" + (f", naming ids {ids[:20]}" if ids else "")
                if history
                else "it has no readable status history"
            )
            settled = bool(history) and history[latest]["status"] in TERMINAL
            fails = "fails" if settled else "and a pass that takes it fail"
            item["error"] = (
                f"{error}. It is the record of deletion request {request_id}: the ids, dataset and reason it was "
                f"filed with cannot be read, so `obliviate forget --status {request_id}` {fails}; {said}. To "
                f"mend: {request_record_mend(request_id)}"
            )
            continue
        version = int(status.group("version"))  # type: ignore[union-attr]
        if version < newest:
            item["error"] = (
                f"{error}. Version {version} of deletion request {request_id}'s status history is lost (its current "
                f"status, version {newest}, is intact and `obliviate forget --status {request_id}` shows the version "
                f"as unreadable). To mend: restore {item['key']} from a backup"
            )
            continue
        before = history.get(version - 1)
        then = f" (version {version - 1} says {before['status']!r})" if before else ""
        item["error"] = (
            f"{error}. It is the current status of deletion request {request_id}, now unknown{then}: "
            f"`obliviate forget --status {request_id}` and a pass that takes it fail. To mend: "
            f"{current_status_mend(request_id, version)}"
        )
        if waiting is None:
            waiting = _purges_waiting(store)
        if waiting.get(request_id):
            item["purge_waiting"] = waiting[request_id]
            runs = "; ".join(
                f"run {w['run']}" + (f" (superseded version(s) {w['versions']} deleted)" if w["versions"] else "")
                for w in waiting[request_id]
            )
            item["error"] += (
                f". A purge waits to tell this request (noted in the run's pruned record, {UNTOLD_DAMAGED}): {runs}; "
                "it could not be told while this status is damaged, and once it is mended the next reconcile pass "
                "(or `obliviate store check --repair`) tells it"
            )


def _purges_waiting(store: ObjectStore) -> dict[str, list[dict[str, Any]]]:
    """Request -> the purges noted in runs' pruned records as waiting to tell it (:data:`UNTOLD_DAMAGED`).

    A run whose pruned record cannot be read is passed over (its damage is reported on its own).
    """
    from storage.registry import RunRegistry

    registry = RunRegistry(store)
    found: dict[str, list[dict[str, Any]]] = {}
    for run_id in registry.run_ids():
        try:
            notes = registry.pruned_record(run_id)[1].get(UNTOLD_DAMAGED) or {}
            for request_id, note in sorted(notes.items()):
                purged = note.get("purged") if isinstance(note, dict) else None
                versions = sorted(purged.get("versions") or []) if isinstance(purged, dict) else []
                found.setdefault(str(request_id), []).append({"run": run_id, "versions": versions})
        except (CorruptObject, StorageError, ValueError, TypeError, AttributeError):
            continue
    return found


def _explain_version_pointer_damage(store: ObjectStore, report: StoreReport) -> None:
    """Say, for each damaged or lost version of a run's version pointer, what it loses and exactly how to mend it.

    Such a version is not rebuilt (not by ``--repair`` either): it records what the version served (its
    manifest), the requests it applied, the ids it deleted, its metrics and serving state (held requests,
    the block served), and the manifests do not record all of that: the applied requests and holds are
    carried from version to version in the pointer only, a release or an interim version's target copies
    its predecessor's, and one version number can have several manifests when publishes raced. Only a
    backup holds it.
    """
    for item in report.corrupt:
        damaged = _RUN_VERSION_KEY.match(item["key"])
        if damaged is None:
            continue
        run_id, version = damaged.group("run"), int(damaged.group("version"))
        key = item["key"]
        latest = _latest_version(store, f"runs/{run_id}/current")
        if version >= latest:
            until = (
                f"run {run_id}'s current version cannot be read: serving it and unlearning from it fail (every "
                "deletion request for its ids fails its attempts on it), retention (--keep-versions) and the purge of "
                "superseded versions skip it, and store check keeps all its checkpoints and manifests"
            )
            deleting = (
                f"that would make version {version - 1} current again, which may serve a model trained on the ids "
                f"version {version} deleted"
                if version > 1
                else f"run {run_id} would then have no version at all"
            )
            without = (
                f"Without a backup nothing in obliviate can mend run {run_id}: train its data under a new --run-id "
                "and serve that run; the training leaves out the ids of every pending, claimed or done request, not "
                f"those of a request that failed on run {run_id} meanwhile: file those ids again with `obliviate "
                "forget` before training"
            )
        else:
            until = (
                f"run {run_id} still serves version {latest} and takes deletions, but retention (--keep-versions) and "
                "the purge of superseded versions skip it (checkpoints of versions a deletion superseded stay, SPEC 5) "
                "and store check keeps all its checkpoints and manifests"
            )
            deleting = "a missing version is reported and skipped just the same"
            without = (
                f"Without a backup the run keeps serving as it is; the record of version {version}, and the pruning "
                f"and purge of run {run_id}'s old versions, stay lost"
            )
        item["error"] = (
            f"{str(item['error']).rstrip('.')}. It is version {version} of run {run_id}'s version pointer: the "
            "manifest it served, the requests it applied, the ids it deleted, its metrics and serving state. "
            "`store check --repair` cannot rebuild it: the manifests do not record all of that (applied requests and "
            f"holds live in the pointer only). Until it is mended {until}. To mend: restore exactly {key} from a "
            "backup of the store (a snapshot, or the bucket's object versioning), then run `obliviate store check` "
            f"again. Do not delete it: {deleting}. {without}"
        )


def _readable_history(store: ObjectStore, request_id: str) -> dict[int, dict[str, Any]]:
    """``version -> status target`` of the readable versions of a request's status history."""
    key = f"ledger/status/{request_id}"
    found = {}
    for version in store.pointer_versions(key):
        try:
            found[version] = dict(store.read_pointer_version(key, version).target)
        except (CorruptObject, ObjectNotFound):
            continue
    return found


def _latest_version(store: ObjectStore, pointer_key: str) -> int:
    versions = store.pointer_versions(pointer_key)
    return versions[-1] if versions else 0


def _check_run(
    store: ObjectStore,
    run_id: str,
    pointer_key: str,
    report: StoreReport,
    referenced: set[str],
    dependents: dict[str, list[dict[str, Any]]],
) -> tuple[int, int]:
    """Check one run's versions; returns (current version, the version its chain comes from; 0 if unknown)."""
    from storage.registry import RunRegistry, pruned_key

    previous: dict[str, Any] | None = None
    latest = _latest_version(store, pointer_key)
    base = 0
    try:
        pruned = RunRegistry(store).pruned_versions(run_id)
    except (CorruptObject, StorageError) as err:
        report.lineage.append(
            {"run": run_id, "version": None, "key": pruned_key(run_id), "problem": f"unreadable: {err}"}
        )
        pruned = {}
    pruned_manifests: list[str] = []
    for version in range(1, latest + 1):
        # What every version of the run needs besides its manifest: the pointer version itself, the
        # run's spec, block plan and registry entry (its data and block membership).
        needs = (f"{pointer_key}/v{version:09d}.json", f"runs/{run_id}/spec.json", f"runs/{run_id}/plan.json")
        for needed in (*needs, f"registry/{run_id}.json"):
            dependents.setdefault(needed, []).append({"run": run_id, "version": version})
        try:
            target = store.read_pointer_version(pointer_key, version).target
        except (CorruptObject, ObjectNotFound):
            continue  # already reported as corrupt
        manifest_key = str(target.get("manifest", ""))
        if version in pruned:  # retention deleted what only it needed: nothing of it is checked or kept
            pruned_manifests.append(manifest_key)
            previous = target
            continue
        referenced.add(manifest_key)
        dependents.setdefault(manifest_key, []).append({"run": run_id, "version": version})
        try:
            body = store.get_unverified_json(manifest_key)  # members even if the manifest is damaged
        except Exception as err:  # noqa: BLE001 -- any failure here is a lineage problem to report
            report.lineage.append(
                {"run": run_id, "version": version, "key": manifest_key, "problem": f"manifest unreadable: {err}"}
            )
            body = {"members": {}}
        if version == latest:
            source = (body.get("metadata") or {}).get("chain_of") or {}
            base = int(source.get("version", version)) if isinstance(source, dict) else version
        for name, member in body.get("members", {}).items():
            key = member["key"]
            timing_sidecar = key[: -len(".pt")] + ".json" if key.endswith(".pt") else key
            referenced.update({key, timing_sidecar})
            for needed in {key, timing_sidecar}:
                dependents.setdefault(needed, []).append({"run": run_id, "version": version, "member": name})
            try:
                committed = store.info(key)
            except (ObjectNotFound, CorruptObject) as err:
                report.lineage.append(
                    {"run": run_id, "version": version, "key": key, "problem": f"member {name} missing: {err}"}
                )
                continue
            if timing_sidecar != key and not store.exists(timing_sidecar):
                report.lineage.append(
                    {
                        "run": run_id,
                        "version": version,
                        "key": timing_sidecar,
                        "problem": f"member {name}'s timing record is not committed (resuming the chain reads it)",
                    }
                )
            if committed.sha256 != member["sha256"]:
                report.lineage.append(
                    {
                        "run": run_id,
                        "version": version,
                        "key": key,
                        "problem": f"member {name} was rewritten after publication (sha256 {committed.sha256[:12]}..."
                        f" != manifest's {member['sha256'][:12]}...)",
                    }
                )
        if previous is not None:
            dropped = set(previous.get("applied_requests", [])) - set(target.get("applied_requests", []))
            undeleted = set(previous.get("deleted_ids", [])) - set(target.get("deleted_ids", []))
            if dropped or undeleted:
                report.lineage.append(
                    {
                        "run": run_id,
                        "version": version,
                        "key": manifest_key,
                        "problem": f"version {version} dropped requests {sorted(dropped)[:5]} / ids "
                        f"{sorted(undeleted)[:5]} that version {version - 1} had applied",
                    }
                )
        previous = target
    # A pruned version's manifest that published a chain kept versions still use is replay's recipe for it.
    kept_folders = {key.rsplit("/", 1)[0] for key in referenced if key.startswith(f"runs/{run_id}/chains/")}
    referenced.update(key for key in pruned_manifests if _recipe_folder(key) in kept_folders)
    return latest, base


def _recipe_folder(manifest_key: str) -> str | None:
    """The chain folder whose checkpoints the manifest ``manifest_key`` published (``None``: not a manifest)."""
    match = _MANIFEST_KEY.match(manifest_key)
    return f"runs/{match.group('run')}/chains/{match.group('chain')}" if match else None


def _check_result_manifest(store: ObjectStore, key: str, report: StoreReport) -> None:
    """A result outside the runs (a reduction's subset): every member its manifest pins is committed, unchanged."""
    result = key.rsplit("/", 1)[0]
    try:
        members = store.get_unverified_json(key).get("members", {})
    except Exception:  # noqa: BLE001 -- a damaged manifest is already reported by its checksum
        return
    damaged = {item["key"]: item for item in report.corrupt}
    for name, member in members.items():
        if member["key"] in damaged:  # its bytes fail their checksum or are gone: say what it belongs to
            damaged[member["key"]]["part_of"] = result
            continue
        try:
            committed = store.info(member["key"])
        except ObjectNotFound:
            problem = "its commit record is gone" if member["key"] in store.stored_names(result) else "it is gone"
        except CorruptObject as err:
            problem = f"its commit record is unreadable ({err})"
        else:
            if committed.sha256 == member["sha256"]:
                continue
            problem = f"it was rewritten after publication (sha256 {committed.sha256[:12]}... != manifest's "
            problem += f"{member['sha256'][:12]}...)"
        report.corrupt.append(
            {
                "key": member["key"],
                "error": f"member {name} of the result, pinned by {key}, but {problem}",
                "part_of": result,
            }
        )


def _orphans(
    store: ObjectStore,
    keys: list[str],
    names: list[str],
    referenced: set[str],
    runs_with_versions: dict[str, tuple[int, int]],
    min_age_s: float,
    alone: list[str],
    report: StoreReport,
    scope: _Scope,
    blind_runs: Collection[str] = (),
) -> tuple[list[str], str | None]:
    """Unreferenced objects old enough to collect, and why some were kept (``None``: none were).

    ``alone``: bytes without a commit record that nothing needs (:func:`_bytes_alone`), judged like
    committed objects by the time their bytes were written. ``report.half_filed``: requests never
    committed; their marker and bytes go once both are older than ``min_age_s``. ``blind_runs``: runs
    a version pointer of which cannot be read; their checkpoints and manifests are all kept, as that
    version may use any of them (restored from a backup, it finds them still there).

    Open requests no longer hold everything back (with a batch window one nearly always is): only
    what an attempt may still write, publish or resume is kept while a request is open
    (:func:`_in_flight`); a pending request writes nothing, and everything else is garbage for good.
    """
    from storage.ledger import CLAIMED, PENDING

    states = _request_states(store)
    open_requests = [request_id for request_id, status in states if status in (PENDING, CLAIMED, _UNREADABLE)]
    settled = {request_id for request_id, _ in states} - set(open_requests)
    now = time.time()
    found, kept, kept_blind = [], set(), set()
    uncommitted = set(alone)
    for key in [*keys, *alone]:
        chain = _CHAIN_KEY.match(key) or _MANIFEST_KEY.match(key)
        lease_of = key.split("/")[2] if key.startswith("ledger/leases/") else None
        if chain is not None and key in uncommitted and chain.group("run") not in runs_with_versions:
            pass  # an interrupted write of a run not yet published: nothing reads uncommitted bytes, a resume rewrites
        elif chain is not None:
            if chain.group("run") not in runs_with_versions or key in referenced:
                continue
            if chain.group("run") in blind_runs:
                kept_blind.add(key)
                continue
            if open_requests and _in_flight(key, runs_with_versions[chain.group("run")]):
                kept.add(key)
                continue
        elif key in uncommitted:
            pass  # nothing committed it, nothing needs it: garbage once old enough
        elif lease_of is None or lease_of not in settled:
            continue
        age = _stored_age_s(store, key) if key in uncommitted else now - _committed_at(store, key)
        if age >= min_age_s:
            found.append(key)
    for request_id in report.half_filed:
        marker, record = f"ledger/open/{request_id}.json", f"ledger/requests/{request_id}.json"
        parts = [key for key in (marker,) if key in keys] + [key for key in (record,) if key in names]
        ages = [now - _committed_at(store, marker) if key == marker else _stored_age_s(store, key) for key in parts]
        if parts and min(ages) >= min_age_s:
            found.extend(parts)
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if base.startswith(WRITE_CHECK_MARK) and "/" not in name:
            found.append(name)  # a write check's leftover: nothing reads it, its writer tolerates its removal
        elif base.startswith(_TMP_MARK) and scope.own(name) and _stored_age_s(store, name) >= min_age_s:
            found.append(name)
    found = list(set(found))
    held = None
    if kept:
        runs = sorted({key.split("/")[1] for key in kept})
        held = (
            f"{len(kept)} unreferenced object(s) of run(s) {runs[:5]} kept while {len(open_requests)} request(s) are "
            f"still open ({open_requests[:5]}): they belong to work from the version being served now, which an "
            "attempt in progress may still publish or the next attempt resumes; they are collected once that "
            "work publishes or no request is open. Everything else unreferenced is collected."
        )
    if kept_blind:
        runs = sorted({key.split("/")[1] for key in kept_blind})
        note = (
            f"{len(kept_blind)} unreferenced checkpoint(s) and manifest(s) of run(s) {runs[:5]} kept: a version "
            "pointer of theirs cannot be read (damaged, above), so what that version uses is unknown; once it is "
            "restored from a backup, --repair collects what no version uses."
        )
        held = f"{held} {note}" if held else note
    young = [r for r in report.half_filed if not {f"ledger/open/{r}.json", f"ledger/requests/{r}.json"} & set(found)]
    if young:
        note = (
            f"{len(young)} half-filed request(s) {young[:5]}: an open marker without a committed request record, "
            "as a `forget` that failed part way leaves it (never acknowledged); repeating that `forget` with its "
            "--request-id completes the request, else --repair collects the leftovers once older than --orphan-age."
        )
        held = f"{held} {note}" if held else note
    return sorted(found), held


def _request_states(store: ObjectStore) -> list[tuple[str, str]]:
    """``(request id, status)`` of every ledger request, in :meth:`DeletionLedger.entries` order (oldest first).

    Read one request at a time and only its status kept: ``entries()`` holds every request with its
    details (a done request's audit of every run; 140 MB of Python objects for 5,000 requests on 11 runs).
    A request whose record or latest status is damaged is listed as :data:`_UNREADABLE` (first;
    ``store check`` reports the damage), counted as open by its callers.
    """
    from storage.ledger import DeletionLedger

    ledger = DeletionLedger(store)
    found: list[tuple[Any, str, str]] = []
    for request_id in ledger.request_ids():
        try:
            entry = ledger.get(request_id)
        except ObjectNotFound:  # as entries(): a request being appended (or never was) is not yet a request
            continue
        except CorruptObject:
            found.append((0.0, request_id, _UNREADABLE))
            continue
        found.append((entry.request.get("requested_at", 0.0), entry.request_id, entry.status))
    found.sort(key=lambda item: (item[0], item[1]))
    return [(request_id, status) for _, request_id, status in found]


def _in_flight(key: str, run: tuple[int, int]) -> bool:
    """Whether an unreferenced chain object or manifest of a run may still be written, published or resumed.

    ``run``: (current version, the version the current one's chain comes from). Every attempt starts
    from that chain (``chain_source``; it never moves back), so it writes to ``u<that version>-...``
    (or a later one) and publishes manifests numbered above the current version. A chain folder
    of an older base, a training folder of a run already published, or a manifest numbered at or
    below the current version (its publish lost the compare-and-swap, or its version was pruned)
    is garbage for good. An unknown folder name counts as in flight.
    """
    current, base = run
    manifest = _MANIFEST_KEY.match(key)
    if manifest is not None:
        return int(manifest.group("version")) > current
    chain = key.split("/")[3]
    token = _TOKEN_CHAIN.match(chain)
    if token is not None:
        return int(token.group("base")) >= base
    return not (chain == "train" or chain.startswith("train-x"))


def _stored_age_s(store: ObjectStore, name: str) -> float:
    """Seconds since ``name``'s bytes were written (0.0 if they are gone by now: nothing to collect)."""
    try:
        return store.stored_age_s(name)
    except StorageError:
        return 0.0


def _committed_at(store: ObjectStore, key: str) -> float:
    try:
        return store.committed_at(key)
    except StorageError:  # unreadable record: treat as old; the object is unreferenced anyway
        return 0.0


def live_claims(store: ObjectStore) -> list[Pointer]:
    """The claims held now on ``store``: each run's training claim and the store's pass claim whose holder is live.

    Their holders write while they hold them (a ``train``'s checkpoints, a deletion pass's retrains and statuses),
    so an orphan younger than a write takes may be one of theirs in flight. Live as :func:`storage.lease.take_claim`
    judges it: not released, its lease renewed in time, and its process not known gone (one of this host).
    """
    now = time.time()
    held = []
    for key in [*store.list_pointers("runs"), *store.list_pointers("service")]:
        if not _CLAIM_POINTER.match(key):
            continue
        try:
            current = store.read_pointer(key)
            if current is not None and not claim_free(store, current, gone=holder_process_gone, now=now):
                held.append(current)
        except (ObjectNotFound, CorruptObject):
            continue  # released and tidied since the listing, or damaged: check_store reports a damaged one
    return held


def claim_of_training(key: str) -> str | None:
    """The run whose training claim ``key`` is (``runs/<run>/train-claim``); None for the store's pass claim."""
    match = _CLAIM_POINTER.match(key)
    return match.group("run") if match is not None else None


def filings_in_flight(store: ObjectStore, *, younger_than_s: float) -> list[tuple[str, float, str | None]]:
    """Requests a ``forget`` is filing now, as far as the store says: ``(request id, seconds since its marker, who)``.

    A filing writes the request's open marker, then its record's bytes, then their commit record
    (:meth:`storage.ledger.DeletionLedger.append`); a filing holds no claim, so what shows it is a half-filed
    request (a marker without a committed record) whose marker is younger than ``younger_than_s``. The marker
    names its writer (``pid P on H``, ``who``; None in a marker written before it did): one whose process of this
    host is gone (a ``forget`` that failed part way) is no filing. One that crashed on another host that recently
    looks the same as one in flight.
    """
    markers = store.list("ledger/open")
    if not markers:
        return []
    committed = set(store.list("ledger/requests"))
    now, filing = time.time(), []
    for key in markers:
        opened = _OPEN_KEY.match(key)
        if opened is None or f"ledger/requests/{opened.group('request')}.json" in committed:
            continue
        age_s = now - _committed_at(store, key)
        if age_s >= younger_than_s:
            continue
        try:
            marker = store.get_json(key)
        except (ObjectNotFound, CorruptObject):
            continue  # gone since the listing (its request settled), or damaged: check_store reports it
        writer = marker if isinstance(marker, Mapping) and "pid" in marker else None
        if writer is not None and holder_process_gone(writer):
            continue
        who = f"pid {writer.get('pid')} on {writer.get('host')}" if writer is not None else None
        filing.append((opened.group("request"), max(0.0, age_s), who))
    return filing


def collect_orphans(store: ObjectStore, report: StoreReport) -> list[str]:
    """Delete the orphans ``report`` listed (commit record first, as every delete); returns those deleted.

    First the purge of superseded versions ``report.superseded`` names is finished
    (:func:`purge_superseded`; ``report.purged`` says what it deleted). Bytes without a commit record go only if still uncommitted and old (a write may have come
    back since the check); a half-filed request's marker only if its request is still uncommitted
    and the marker was not written again (a re-run of its ``forget``), and put back if the request
    got committed while it was deleted (an open request always has its marker).
    """
    # SPEC 5: finish the purge a deletion's publish began (or never ran), and tell the ledger of one whose deletes
    # finished but whose ledger entries were never told
    runs = {item["run"] for item in report.superseded} | set(runs_with_purge_left(store))
    if runs:
        report.purged = purge_superseded(store, apply=True, runs=sorted(runs))
        left = set(report.purged["skipped"])
        report.superseded = [item for item in report.superseded if item["run"] in left]
    # after the purge, which deletes what superseded versions used and tells the ledger: what is left is no version's
    report.erased = erase_deleted_ids_held(store, report)
    collected = []
    uncommitted = set(report.uncommitted) | {f"ledger/requests/{r}.json" for r in report.half_filed}
    half_filed = {f"ledger/open/{r}.json": r for r in report.half_filed}
    for name in report.orphans:
        if name.rsplit("/", 1)[-1].startswith(_TMP_MARK):
            store.remove_temporary(name)
        elif name in uncommitted:
            if not store.remove_uncommitted(name, older_than_s=report.min_age_s):
                continue
        elif name in half_filed:
            if not _drop_half_filed_marker(store, half_filed[name], min_age_s=report.min_age_s):
                continue
        else:
            store.delete(name)
        collected.append(name)
    report.collected = collected
    return collected


def _drop_half_filed_marker(store: ObjectStore, request_id: str, *, min_age_s: float) -> bool:
    """Delete the open marker of a request never committed; whether it was deleted (see :func:`collect_orphans`)."""
    marker, record = f"ledger/open/{request_id}.json", f"ledger/requests/{request_id}.json"
    if store.exists(record) or time.time() - _committed_at(store, marker) < min_age_s:
        return False
    store.delete(marker)
    if store.exists(record):  # a re-run committed it meanwhile: it is open, so it keeps its marker
        store.put_json(marker, {"at": time.time()})
        return False
    return True


def prune_versions(store: ObjectStore, *, keep: int, apply: bool) -> dict[str, Any]:
    """Retention: the versions of each run older than its newest ``keep`` become pruned; ``apply`` deletes.

    Kept: the newest ``keep`` versions (the current one always) and, transitively, the full version
    each of them derives from (``chain_of``: what a rollback judges against, a release serves again
    and a retrain starts from; a rollback itself serves checkpoints of the current version's own
    manifest). A pruned version's checkpoints and manifest are deleted unless a kept version uses
    them; its manifest also stays when it published a chain whose checkpoints kept versions share
    (replay's recipe for rebuilding them). Its pointer version stays: the history of what was
    applied. Order, so that an interruption never leaves a kept version missing anything: the
    versions are recorded pruned first (``runs/<run>/pruned``), then only objects no kept
    version references are deleted, checkpoints before the manifests that list them, each commit
    record before its bytes; what an interruption leaves is an orphan the next ``--repair`` collects.
    While a request is open, objects of work from the current version's chain are kept (see
    :func:`_in_flight`). Without ``apply`` nothing is written: the result says what would go.

    Returns:
        ``{"keep_versions", "runs": {run: {"versions": [...], "objects", "bytes", "held"}}, "objects",
        "bytes", "held", "deleted"}``: per run the versions pruned now and the objects (and their
        bytes) deleted (or that would be), ``held`` those kept for work in flight, ``skipped`` runs
        whose versions could not be read (damage: `store check` reports it; nothing of them is pruned).
    """
    from storage.ledger import CLAIMED, PENDING

    open_requests = any(status in (PENDING, CLAIMED, _UNREADABLE) for _, status in _request_states(store))
    return _prune_runs(
        store, keep=keep, apply=apply, runs=None, open_requests=open_requests, note={"keep_versions": keep}
    )


# SPEC 5: once a deletion is published, no stored checkpoint trained on its ids remains (:func:`purge_superseded`).
# ``serve --keep-superseded-versions`` records the store's opt-out here (like serve's rollback and batch settings).
SUPERSEDED_KEY = "service/superseded.json"
KEEP_SUPERSEDED_OPTION = "serve --keep-superseded-versions"


def save_keep_superseded(store: ObjectStore, *, keep: bool) -> None:
    """Record whether this store keeps superseded versions (``serve --keep-superseded-versions``; default not)."""
    by = KEEP_SUPERSEDED_OPTION if keep else "serve"  # what wrote it: serve without the option purges them
    store.put_json(SUPERSEDED_KEY, {"keep": bool(keep), "set_at": time.time(), "by": by})


def keeps_superseded(store: ObjectStore) -> bool:
    """Whether the store opted out of purging superseded versions (``serve --keep-superseded-versions``)."""
    try:
        return bool(store.get_json(SUPERSEDED_KEY).get("keep", False))
    except ObjectNotFound:
        return False


def purge_superseded(
    store: ObjectStore,
    *,
    apply: bool,
    runs: list[str] | None = None,
    open_requests: bool = True,
    settling: Collection[str] = (),
) -> dict[str, Any]:
    """SPEC 5: delete what versions superseded by a deletion's version still hold (trained on its ids).

    A run whose current version applied deletions (its pointer's ``deleted_ids``) keeps, as
    ``--keep-versions 1`` does, only the current version and the full version it derives from
    (``chain_of``: an interim rollback's chain, which a release serves again and the retrain in
    flight starts from); every other version that had not applied some id the current version
    deleted is superseded (:func:`_superseded_by`: it may have trained on it); the interims and
    releases published since the last retrain carry its deleted ids, so they stay until the next
    retrain lands (and what they serve is shared with the kept versions anyway). The
    same machinery as retention (:func:`prune_versions`): recorded pruned first in
    ``runs/<run>/pruned`` (``"superseded": true``), then only objects no kept version uses are
    deleted, checkpoints before manifests; the pointer versions stay (the audit record). Idempotent;
    an interruption leaves a state :func:`check_store` reports (``superseded``) and the next purge
    (a pass, ``store check --repair``) finishes. ``open_requests``: keep what work in flight may
    still use (:func:`_in_flight`; conservative, and never a superseded chain after a full publish).
    Nothing is purged when the store opted out (:func:`keeps_superseded`); ``runs``: only these.
    ``settling``: requests the caller settles itself with this purge's result (the pass that applied them:
    ``actors.chains.ChainWorker``); still claimed, they cannot be told now, and need not be told later.

    Returns:
        as :func:`prune_versions`, plus ``"kept_by_option"`` (the opt-out) and per run ``"purged_at"``
        and, where something was deleted or requests were told, ``"requests"``: those whose ledger entry said
        the purge was kept or pending and now says purged (:func:`_record_purged`; also for a purge an
        interruption kept from telling them).
    """
    if keeps_superseded(store):
        return {
            "keep_versions": None,
            "runs": {},
            "objects": 0,
            "bytes": 0,
            "held": 0,
            "skipped": {},
            "deleted": False,
            "kept_by_option": KEEP_SUPERSEDED_OPTION,
        }
    out = _prune_runs(
        store,
        keep=1,
        apply=apply,
        runs=runs,
        open_requests=open_requests,
        note={"superseded": True},
        due=_applied_deletions,
        superseded=True,
    )
    out["kept_by_option"] = None
    for run_id, run in out["runs"].items():
        unpurged = run.pop("_unpurged_requests", [])
        if apply:
            told = _record_purged(store, run_id, run, unpurged, settling=settling)
            if told or run["versions"] or run["objects"]:
                run["requests"] = told
    return out


#: On a version in a run's pruned record (``runs/<run>/pruned``): when every request applied to the run since that
#: version was told its purge (:func:`_record_purged`). A pruned version without it still has ledger entries a purge
#: may have to finish.
REQUESTS_TOLD = "requests_told_at"
#: In a run's pruned record: requests a purge went through for but could not tell because their current status is
#: damaged (request -> what to tell it, ``purged`` and ``purged_at``; the damage and its mend, ``reason``; when it was
#: first met, ``noted_at``). Noted once, so no pass plans the run again for them; the first pass that finds one's
#: status readable again (mended) tells it (:func:`runs_with_purge_left`).
UNTOLD_DAMAGED = "untold_damaged"
_FOUND_PURGED = (
    "found already deleted by a later purge: the purge that deleted them stopped before it told this entry (or ran "
    "before the ledger heard of purges); purged_at is when that purge recorded them pruned"
)


def runs_with_purge_left(store: ObjectStore) -> list[str]:
    """Runs a purge pass has work on (:func:`purge_superseded`), found without planning a purge of each run.

    A run whose current version applied deletions, and that has a version superseded by it not yet
    recorded pruned, or a pruned version whose requests were not told yet (:data:`REQUESTS_TOLD`: a
    purge cut off between its deletes and the ledger, or one done before the ledger heard of
    purges). Reads per run its pointer's version list, its current version, its pruned record and
    the versions not recorded pruned (the current one's source and interims of an open batch), not
    every version it had. None while the store keeps superseded versions (:func:`keeps_superseded`).
    A run whose versions cannot be read is left out: ``store check`` reports that damage. A request a
    purge could not tell for its damaged status (:data:`UNTOLD_DAMAGED`) lists its run again only once
    its status reads again (one read of its status pointer), not on every pass.
    """
    from storage.ledger import DeletionLedger
    from storage.registry import RunRegistry

    if keeps_superseded(store):
        return []
    registry = RunRegistry(store)
    ledger = DeletionLedger(store)
    due = []
    for run_id in registry.run_ids():
        pointer_key = f"runs/{run_id}/current"
        try:
            versions = store.pointer_versions(pointer_key)
            if not versions:
                continue
            current = dict(store.read_pointer_version(pointer_key, versions[-1]).target)
            if not _applied_deletions(current):
                continue
            _, body = registry.pruned_record(run_id)
            record = body["versions"]
            deleted_now = {int(i) for i in current.get("deleted_ids") or []}
            if (
                any(REQUESTS_TOLD not in info for info in record.values())
                or any(
                    _superseded_by(deleted_now, store.read_pointer_version(pointer_key, v).target)
                    for v in versions[:-1]
                    if v not in record
                )
                or any(_status_readable(ledger, request_id) for request_id in body.get(UNTOLD_DAMAGED) or {})
            ):
                due.append(run_id)
        except (CorruptObject, ObjectNotFound, KeyError, ValueError, TypeError):
            continue
    return due


def _status_readable(ledger: Any, request_id: str) -> bool:
    """Whether a request's current status reads (mended, after a purge noted it damaged: :data:`UNTOLD_DAMAGED`)."""
    try:
        ledger.current_status(request_id)
    except (CorruptObject, StorageError, ValueError):
        return False
    return True


def _record_purged(
    store: ObjectStore, run_id: str, run: dict[str, Any], unpurged: list[str], *, settling: Collection[str] = ()
) -> list[str]:
    """Tell the ledger entries of requests applied to ``run_id`` that say the purge was kept or pending that it is
    done (SPEC 5), once a purge of the run went through (every object its pruned versions held is deleted).

    Two kinds of request are told, and only these are read (a long-lived run applied many):

    * ``unpurged``, those applied after a version whose objects this purge deleted: what was deleted now
      and the run's ``purged_at`` (now);
    * those applied after a version recorded pruned but not told (no :data:`REQUESTS_TOLD`: a purge cut
      off between its deletes and the ledger, or done before the ledger heard of purges): the versions
      and, as ``purged_at``, when the record says they were pruned.

    Then those versions are marked told, so no later purge reads their requests again; unless a
    request is still open (its pass settles it later, maybe saying ``pending``; not one in ``settling``,
    whose pass is this purge's caller and settles it saying ``purged``) or its entry could not
    be read or written: then the next purge tells them again (idempotent:
    :meth:`storage.ledger.DeletionLedger.record_purge`). Written after the objects are gone, so an
    interruption leaves an entry saying what it said. A ledger or record that cannot be read or
    written never fails the purge. A request whose current status is damaged holds nothing back: it
    is noted in the run's pruned record with what to tell it and the damage's mend
    (:data:`UNTOLD_DAMAGED`; newly noted ones in ``run["untold"]``, request -> reason, which the
    reconcile pass says), and told by the first purge after its status reads again. Returns the requests
    updated.
    """
    from storage.ledger import TERMINAL, DeletionLedger
    from storage.registry import RunRegistry

    now = float(run["purged_at"])
    todo: dict[str, tuple[dict[str, Any], float]] = {}
    try:
        untold, since = _untold_versions(store, run_id)
        noted = {
            str(r): dict(e) for r, e in (RunRegistry(store).pruned_record(run_id)[1].get(UNTOLD_DAMAGED) or {}).items()
        }
    except (CorruptObject, StorageError, KeyError, ValueError, TypeError, AttributeError):
        untold, since, noted = {}, {}, {}
    for request_id, versions in since.items():
        times = [
            float(untold[v]["pruned_at"]) for v in versions if isinstance(untold[v].get("pruned_at"), (int, float))
        ]
        found = {"status": "purged", "versions": versions, "note": _FOUND_PURGED}
        todo[request_id] = (found, max(times) if times else now)
    if run["versions"] or run["objects"]:
        deleted = {key: run[key] for key in ("versions", "objects", "bytes", "held")}
        todo.update({request_id: ({"status": "purged", **deleted}, now) for request_id in unpurged})
    for request_id, entry in noted.items():  # noted damaged before: told now if mended
        if request_id not in todo and isinstance(entry.get("purged"), dict):
            todo[request_id] = (dict(entry["purged"]), float(entry.get("purged_at") or now))
    ledger = DeletionLedger(store)
    updated, retell, open_noted = [], False, set()
    damaged: dict[str, dict[str, Any]] = {}
    for request_id, (purged, purged_at) in sorted(todo.items()):
        try:
            if ledger.record_purge(request_id, run_id, purged, purged_at=purged_at):
                updated.append(request_id)
            elif request_id not in settling and ledger.current_status(request_id) not in TERMINAL:
                # its pass may still settle it saying the purge is pending; one in ``settling`` is settled by
                # the caller with this very purge's result, which went through
                retell = True
                open_noted.add(request_id)
        except ObjectNotFound:  # applied to the run without a ledger request (a direct unlearn): nobody to tell
            continue
        except CorruptObject as err:  # its status is damaged: noted with its mend, told once mended
            reason = str(err).rstrip(".")[:1000]
            first = noted.get(request_id, {})
            at = first.get("noted_at") if first.get("reason") == reason else None
            damaged[request_id] = {"purged": purged, "purged_at": purged_at, "reason": reason, "noted_at": at or now}
        except ValueError:  # not a request id
            continue
        except (StorageError, PointerConflict):
            retell = True
            open_noted.add(request_id)
    waiting = {**{r: noted[r] for r in noted if r in open_noted}, **damaged}
    _mark_told(store, run_id, [] if retell else sorted(untold), dropped=set(noted), noted=waiting)
    fresh = {r: d["reason"] for r, d in damaged.items() if noted.get(r, {}).get("reason") != d["reason"]}
    if fresh:
        run["untold"] = fresh
    return updated


def _untold_versions(store: ObjectStore, run_id: str) -> tuple[dict[int, dict[str, Any]], dict[str, list[int]]]:
    """The run's pruned versions not told yet (version -> its entry in the run's pruned record) and, for each request the
    current version applied that one of them had not, those versions."""
    from storage.registry import RunRegistry

    untold = {v: info for v, info in RunRegistry(store).pruned_versions(run_id).items() if REQUESTS_TOLD not in info}
    if not untold:
        return {}, {}
    pointer_key = f"runs/{run_id}/current"
    latest = _latest_version(store, pointer_key)
    applied_now = [str(r) for r in store.read_pointer_version(pointer_key, latest).target.get("applied_requests") or []]
    since: dict[str, list[int]] = {}
    for version in sorted(v for v in untold if v < latest):
        applied = {
            str(r) for r in store.read_pointer_version(pointer_key, version).target.get("applied_requests") or []
        }
        for request_id in applied_now:
            if request_id not in applied:
                since.setdefault(request_id, []).append(version)
    return untold, since


def _mark_told(
    store: ObjectStore,
    run_id: str,
    versions: list[int],
    *,
    dropped: Collection[str] = (),
    noted: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Record in the run's pruned record that the requests of these pruned versions were told (:data:`REQUESTS_TOLD`),
    and which requests wait to be told once their damaged status is mended (:data:`UNTOLD_DAMAGED`: ``dropped``
    leave it, ``noted`` join it).

    By compare-and-swap (:meth:`storage.registry.RunRegistry.update_pruned`): a purge or a retention pass
    recording other versions meanwhile keeps this mark. A write that fails leaves them to be told again
    (idempotent).
    """
    from storage.registry import RunRegistry

    at = time.time()

    def told(record: dict[str, Any]) -> dict[str, Any] | None:
        entries = record["versions"]
        fresh = [v for v in versions if v in entries and REQUESTS_TOLD not in entries[v]]
        entries.update({v: {**entries[v], REQUESTS_TOLD: at} for v in fresh})
        before = dict(record.get(UNTOLD_DAMAGED) or {})
        after = {**{r: e for r, e in before.items() if r not in dropped}, **(noted or {})}
        if not fresh and after == before:
            return None
        record[UNTOLD_DAMAGED] = after
        if not after:
            del record[UNTOLD_DAMAGED]
        return record

    try:
        RunRegistry(store).update_pruned(run_id, told)
    except (CorruptObject, StorageError, PointerConflict):
        return


def _recording(versions: list[int], entry: dict[str, Any]) -> Any:
    """A change of a run's pruned record (:meth:`storage.registry.RunRegistry.update_pruned`) that records
    ``versions`` pruned with ``entry``; a version recorded meanwhile keeps its own entry (and its told mark)."""

    def recorded(record: dict[str, Any]) -> dict[str, Any] | None:
        fresh = [v for v in versions if v not in record["versions"]]
        if not fresh:
            return None
        record["versions"].update({v: dict(entry) for v in fresh})
        return record

    return recorded


def _superseded_by(deleted_now: set[int], target: Any) -> bool:
    """Whether a deletion superseded a version (pointer ``target``): it had not applied some id the current
    version deleted (``deleted_now``), so its chains may have trained on it.

    Only a published retrain (or unlearning) adds deleted ids; an interim rollback or a release
    carries the deleted ids of the full version it derives from, so the versions published since that
    retrain (earlier interims of the same open batch, a release's) are not due until the next one lands.
    """
    return not deleted_now <= {int(i) for i in target.get("deleted_ids") or []}


def _applied_deletions(target: dict[str, Any]) -> bool:
    """Whether a version pointer's target says deletions were applied (its superseded versions saw those ids)."""
    return bool(target.get("deleted_ids"))


def _prune_runs(
    store: ObjectStore,
    *,
    keep: int,
    apply: bool,
    runs: list[str] | None,
    open_requests: bool,
    note: dict[str, Any],
    due: Any = None,
    superseded: bool = False,
) -> dict[str, Any]:
    """:func:`prune_versions`'s work for ``runs`` (all if ``None``); ``due(target)``: whether a run's current
    pointer target asks for it (all if ``None``); ``note``: what the pruned record records with each version;
    ``superseded``: only versions a deletion superseded go (:func:`_superseded_by`), the others are kept."""
    from storage.registry import RunRegistry

    registry = RunRegistry(store)
    out: dict[str, Any] = {
        "keep_versions": note.get("keep_versions"),
        "runs": {},
        "objects": 0,
        "bytes": 0,
        "held": 0,
        "skipped": {},
    }
    for pointer_key in store.list_pointers("runs"):
        if not pointer_key.endswith("/current") or pointer_key.count("/") != 2:
            continue
        run_id = pointer_key.split("/")[1]
        if runs is not None and run_id not in runs:
            continue
        try:
            if due is not None:
                latest = _latest_version(store, pointer_key)
                if latest == 0 or not due(dict(store.read_pointer_version(pointer_key, latest).target)):
                    continue
            plan = _retention_plan(store, registry, run_id, pointer_key, keep=keep, superseded=superseded)
        except (CorruptObject, ObjectNotFound, StorageError, KeyError, ValueError, TypeError) as err:
            out["skipped"][run_id] = f"{type(err).__name__}: {err}"[:300]
            continue
        if plan is None:
            continue
        versions, members, manifests, run_state, unpurged = plan
        held = [k for k in [*members, *manifests] if open_requests and _in_flight(k, run_state)]
        doomed = [k for k in members if k not in held] + [k for k in manifests if k not in held]
        sizes = {key: _size(store, key) for key in doomed}
        now = time.time()
        if apply:
            if versions:
                registry.update_pruned(run_id, _recording(versions, {"pruned_at": now, **note}))
            for key in doomed:  # checkpoints first, manifests last (the order of ``doomed``)
                store.delete(key)
        run_bytes = sum(size for size in sizes.values() if size is not None)
        gone = sum(size is not None for size in sizes.values())
        out["runs"][run_id] = {"versions": versions, "objects": gone, "bytes": run_bytes, "held": len(held)}
        if superseded:
            out["runs"][run_id]["_unpurged_requests"] = unpurged
        if apply:
            out["runs"][run_id]["purged_at"] = now
        out["objects"] += gone
        out["bytes"] += run_bytes
        out["held"] += len(held)
    out["deleted"] = apply
    return out


def _retention_plan(
    store: ObjectStore, registry: Any, run_id: str, pointer_key: str, *, keep: int, superseded: bool = False
) -> tuple[list[int], list[str], list[str], tuple[int, int], list[str]] | None:
    """(versions to prune now, objects only pruned versions use, their manifests to delete, (current, base),
    requests applied by the current version that a version with something left to delete had not applied).

    ``superseded``: a version no deletion superseded (:func:`_superseded_by`) is kept too
    (an interim of the batch still open, a release), unless recorded pruned already.
    """
    latest = _latest_version(store, pointer_key)
    if latest == 0:
        return None
    already = registry.pruned_versions(run_id)
    current = dict(store.read_pointer_version(pointer_key, latest).target)
    deleted_now = {int(i) for i in current.get("deleted_ids") or []}
    manifest_of: dict[int, str] = {}
    due: set[int] = set()  # only what is needed of each pointer version is kept (a run may have many)
    for v in range(1, latest + 1):
        target = store.read_pointer_version(pointer_key, v).target if v < latest else current
        manifest_of[v] = str(target["manifest"])
        if superseded and _superseded_by(deleted_now, target):
            due.add(v)
    kept = set(range(max(1, latest - keep + 1), latest + 1))
    not_due: set[int] = set()
    if superseded:
        not_due = {v for v in range(1, latest) if v not in due and v not in already} - kept
        kept |= not_due
    bodies: dict[int, dict[str, Any]] = {}
    todo = sorted(kept)
    while todo:  # the full versions kept versions derive from, transitively
        version = todo.pop()
        try:
            bodies[version] = store.get_json(manifest_of[version])
        except ObjectNotFound:
            if version not in not_due:  # a version kept only as not due may have been pruned by retention
                raise
            bodies[version] = {}
            continue
        source = (bodies[version].get("metadata") or {}).get("chain_of")
        if source and int(source["version"]) not in kept:
            kept.add(int(source["version"]))
            todo.append(int(source["version"]))
    latest_source = (bodies[latest].get("metadata") or {}).get("chain_of")
    base = int(latest_source["version"]) if latest_source else latest
    used: set[str] = set()
    for version in kept:
        used.add(manifest_of[version])
        used.update(_member_keys(bodies[version]))
    versions = [v for v in range(1, latest + 1) if v not in kept and v not in already]
    members: list[str] = []
    manifests: list[str] = []
    kept_folders = {key.rsplit("/", 1)[0] for key in used if key.startswith(f"runs/{run_id}/chains/")}
    present = set(store.list(f"runs/{run_id}"))
    applied_now = {str(r) for r in current.get("applied_requests") or []}
    unpurged: set[str] = set()
    for version in sorted(set(versions) | {v for v in already if v not in kept}):
        key = manifest_of[version]
        if key not in present:  # deleted before (or lost: nothing to delete)
            continue
        if superseded:  # the requests whose ledger entries a purge of this version may finish
            applied = store.read_pointer_version(pointer_key, version).target.get("applied_requests") or []
            unpurged |= applied_now - {str(r) for r in applied}
        try:
            body = store.get_unverified_json(key)
        except (CorruptObject, ObjectNotFound):
            body = {}
        members.extend(k for k in _member_keys(body) if k not in used and k in present and k not in members)
        if key not in used and _recipe_folder(key) not in kept_folders and key not in manifests:
            manifests.append(key)
    return versions, members, manifests, (latest, base), sorted(unpurged)


def _member_keys(body: dict[str, Any]) -> list[str]:
    """A manifest's member keys with each checkpoint's timing record."""
    keys = []
    for member in (body.get("members") or {}).values():
        key = str(member["key"])
        keys.append(key)
        if key.endswith(".pt"):
            keys.append(key[: -len(".pt")] + ".json")
    return keys


def _size(store: ObjectStore, key: str) -> int | None:
    """An object's size in bytes, or ``None`` if it is gone already."""
    try:
        return store.info(key).size
    except ObjectNotFound:
        return None
    except CorruptObject:  # an unreadable commit record: the object is still deleted
        return 0
