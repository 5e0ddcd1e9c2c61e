"""Checking a store: committed objects' checksums, versions' lineage, orphans (``obliviate store check``).

:func:`check_store` reads everything once and reports:

* ``corrupt``: committed objects whose bytes fail their commit record or are gone (a commit record
  left without its object: deleted or lost outside obliviate, since a write commits its bytes
  first and a delete removes the record first), and pointer versions that fail their own
  checksum; each with the ``(run, version)`` pairs whose manifests need it;
* ``lineage``: per run, problems of the version history: a version whose manifest is missing or
  damaged, a manifest member missing or not matching the checksum the manifest recorded, a
  version that dropped requests or deleted ids an earlier version had applied;
* ``orphans``: objects nothing can reach: checkpoints and manifests of attempts that lost a
  publish race or crashed, leases of settled requests, half-written temporary files. They are
  listed only when no pointer refers to them, no open request could still publish them (no
  request is ``pending`` or ``claimed``), their run has a current version (a training in
  progress is never touched) and they are older than ``min_age_s``.

Repair (rebuilding damaged checkpoints by replay) needs training, so it lives in
:mod:`flows.repair`; :func:`collect_orphans` deletes what :func:`check_store` listed.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from storage.errors import CorruptObject, ObjectNotFound, StorageError
from storage.objects import COMMIT_SUFFIX, ObjectStore

_TMP_MARK = ".tmp-"
# Short-lived objects that one writer rewrites while another may delete them: leases, open-request
# markers, flush requests, serve's announcement and heartbeat. A commit record left alone there is
# not damage; everything else (runs, manifests, registry, groups, the ledger's requests) is durable.
_REWRITTEN_AND_DELETED = ("ledger/leases/", "ledger/open/", "ledger/flush/", "service/")
_CHAIN_KEY = re.compile(r"^runs/(?P<run>[^/]+)/chains/(?P<chain>[^/]+)/ckpt-(?P<index>\d{4})\.(pt|json)$")
_REGISTRY_KEY = re.compile(r"^registry/(?P<run>[^/]+)\.json$")
_MANIFEST_KEY = re.compile(r"^runs/(?P<run>[^/]+)/manifests/v\d{6}-(?P<chain>[^/]+)\.json$")


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
    seconds: float = 0.0

    @property
    def healthy(self) -> bool:
        """No damage left (orphans are garbage, not damage)."""
        fixed = {r["key"] for r in self.repaired}
        return not [c for c in self.corrupt if c["key"] not in fixed] and not self.lineage_unfixed(fixed)

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
            "seconds": self.seconds,
        }


def check_store(store: ObjectStore, *, min_age_s: float = 600.0) -> StoreReport:
    """Verify every committed object and pointer version, every run's lineage; list orphans."""
    began = time.monotonic()
    report = StoreReport(url=store.url)
    names = store.stored_names("")
    keys = store.list("")
    for key in keys:
        report.objects_checked += 1
        try:
            store.get_bytes(key)
        except CorruptObject as err:
            report.corrupt.append({"key": key, "error": str(err)})
    lost = []
    for key in _records_alone(names):
        if key.startswith(_REWRITTEN_AND_DELETED):
            # A renewal racing its own delete (a lease renewed while the settled request drops it)
            # can leave such a record alone; it is garbage, collected below like other leases.
            lost.append(key)
            continue
        report.objects_checked += 1
        try:
            # Read again: a listing in pages can pass an object's name before a concurrent write
            # stores it and reach its commit record after; such an object is whole by now.
            store.get_bytes(key)
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
    pointer_keys = store.list_pointers("")
    for pointer_key in pointer_keys:
        latest = _latest_version(store, pointer_key)
        for version in range(1, latest + 1):
            report.pointers_checked += 1
            try:
                store.read_pointer_version(pointer_key, version)
            except (CorruptObject, ObjectNotFound) as err:
                report.corrupt.append({"key": f"{pointer_key}/v{version:09d}.json", "error": str(err)})

    referenced: set[str] = set()
    dependents: dict[str, list[dict[str, Any]]] = {}
    runs_with_versions: set[str] = set()
    for pointer_key in pointer_keys:
        if not (pointer_key.startswith("runs/") and pointer_key.endswith("/current")):
            continue
        run_id = pointer_key.split("/")[1]
        runs_with_versions.add(run_id)
        _check_run(store, run_id, pointer_key, report, referenced, dependents)
    for key in keys:
        registered = _REGISTRY_KEY.match(key)
        if registered and registered.group("run") not in runs_with_versions:
            run_id = registered.group("run")
            report.lineage.append(
                {
                    "run": run_id,
                    "version": None,
                    "key": f"runs/{run_id}/current",
                    "problem": f"run {run_id} is registered ({key}, written when it first published) but has no "
                    "version pointer: runs/" + run_id + "/current was lost outside obliviate. Restore it from a "
                    "backup; if the run never had a deletion applied, rerunning `obliviate train` with its options "
                    "publishes version 1 again from the stored checkpoints",
                }
            )
        if key.rsplit("/", 1)[-1] == "manifest.json" and not key.startswith("runs/"):
            _check_result_manifest(store, key, report)
    for item in report.corrupt:
        item["needed_by"] = dependents.get(item["key"], [])

    report.orphans, report.orphans_held_back = _orphans(
        store, keys + lost, names, referenced, runs_with_versions, min_age_s
    )
    report.seconds = time.monotonic() - began
    return report


def _records_alone(names: list[str]) -> list[str]:
    """Keys whose commit record was listed without the object it commits."""
    present = set(names)
    return sorted(
        name[: -len(COMMIT_SUFFIX)]
        for name in names
        if name.endswith(COMMIT_SUFFIX) and _TMP_MARK not in name and name[: -len(COMMIT_SUFFIX)] not in present
    )


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
) -> None:
    previous: dict[str, Any] | None = None
    for version in range(1, _latest_version(store, pointer_key) + 1):
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
        referenced.add(manifest_key)
        dependents.setdefault(manifest_key, []).append({"run": run_id, "version": version})
        try:
            body = store.get_unverified_json(manifest_key)  # members even if the manifest is damaged
        except Exception as err:  # noqa: BLE001 -- any failure here is a lineage problem to report
            report.lineage.append(
                {"run": run_id, "version": version, "key": manifest_key, "problem": f"manifest unreadable: {err}"}
            )
            body = {"members": {}}
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
    runs_with_versions: set[str],
    min_age_s: float,
) -> tuple[list[str], str | None]:
    from storage.ledger import CLAIMED, PENDING, DeletionLedger

    ledger = DeletionLedger(store)
    open_requests = [e.request_id for e in ledger.entries() if e.status in (PENDING, CLAIMED)]
    if open_requests:
        return [], (
            f"{len(open_requests)} request(s) still open ({open_requests[:5]}): an attempt in progress may still "
            "publish what looks unreferenced, so nothing is collected now."
        )
    now = time.time()
    settled = {e.request_id for e in ledger.entries()}
    found = []
    for key in keys:
        chain = _CHAIN_KEY.match(key) or _MANIFEST_KEY.match(key)
        lease_of = key.split("/")[2] if key.startswith("ledger/leases/") else None
        if chain is not None:
            if chain.group("run") not in runs_with_versions or key in referenced:
                continue
        elif lease_of is None or lease_of not in settled:
            continue
        if now - _committed_at(store, key) >= min_age_s:
            found.append(key)
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if base.startswith(_TMP_MARK) and store.stored_age_s(name) >= min_age_s:
            found.append(name)
    return sorted(found), None


def _committed_at(store: ObjectStore, key: str) -> float:
    try:
        return store.committed_at(key)
    except StorageError:  # unreadable record: treat as old; the object is unreferenced anyway
        return 0.0


def collect_orphans(store: ObjectStore, report: StoreReport) -> list[str]:
    """Delete the orphans ``report`` listed (commit record first, as every delete); returns them."""
    collected = []
    for name in report.orphans:
        if name.rsplit("/", 1)[-1].startswith(_TMP_MARK):
            store.remove_temporary(name)
        else:
            store.delete(name)
        collected.append(name)
    report.collected = collected
    return collected
