"""The model registry: block checkpoints, published versions and run descriptions in one store.

Layout under the store (all through :class:`storage.objects.ObjectStore`):

* ``runs/<run>/spec.json``: the :class:`obliviate.unlearning.service.RunSpec` (written once).
* ``runs/<run>/chains/<chain>/ckpt-<i>.pt``: checkpoint M_i of a chain, as
  :meth:`obliviate.unlearning.chain.Checkpoint.to_state` (tensors + JSON metadata, loaded with
  ``weights_only=True``), preceded by ``ckpt-<i>.json`` with its training seconds. ``<chain>`` is
  ``train`` for the original training, or a :func:`obliviate.unlearning.service.work_token` for an unlearning.
* ``runs/<run>/manifests/v<version>-<chain>.json``: a manifest whose members are M_0..M_B of one
  model version (unchanged checkpoints are shared with the previous version) and whose metadata
  holds the chain manifest, the metrics and the unlearning record.
* ``runs/<run>/current``: the version pointer. It moves (compare-and-swap) only after every
  member and the manifest are committed, so readers always find a complete version.
* ``registry/<run>.json``: the registry entry (dataset, which sample ids each block holds),
  written just before the first version is published (so no served run is unregistered; a run
  whose training stopped between the two is registered with no version and serves nothing).
* ``runs/<run>/pruned``: a pointer whose current version records the versions retention (``store check
  --repair --keep-versions N``) and the purge of superseded versions pruned: their pointer versions stay,
  their checkpoints and manifests are deleted (a manifest another kept version's checkpoints were
  published by stays, as replay's recipe), and when their requests were told. Every change is a
  compare-and-swap from the version read (:meth:`RunRegistry.update_pruned`), as a request's status
  is, so two purges of one run never lose each other's marks. Each version holds the whole record, so
  only the newest :data:`PRUNED_VERSIONS_KEPT` are kept (:meth:`storage.objects.ObjectStore.drop_pointer_versions`):
  all of them made a run's folder grow with the square of its deletions. A store written before kept
  the record in ``runs/<run>/pruned.json``: read while the pointer has no version, removed once it has one.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from obliviate.errors import ConfigError
from obliviate.unlearning.service import RunSpec, check_name
from storage.errors import CorruptObject, ObjectExists, ObjectNotFound, PointerConflict, StorageError
from storage.objects import Manifest, ObjectInfo, ObjectStore, Pointer
from storage.retry import swap_attempts

if TYPE_CHECKING:  # chain imports torch: imported where a checkpoint is loaded, so reading the store needs none
    from obliviate.unlearning.chain import Chain, Checkpoint

TRAIN_CHAIN = "train"


def checkpoint_key(run_id: str, chain: str, block_index: int) -> str:
    """Where checkpoint M_``block_index`` of ``run_id``'s chain ``chain`` is stored."""
    return f"runs/{run_id}/chains/{chain}/ckpt-{block_index:04d}.pt"


def training_claim_key(run_id: str) -> str:
    """The pointer whose compare-and-swap makes one process the trainer of run ``run_id`` (a group: its name)."""
    return f"runs/{run_id}/train-claim"


def pruned_key(run_id: str) -> str:
    """The pointer whose current version records the versions of a run pruned: ``runs/<run>/pruned``."""
    return f"runs/{run_id}/pruned"


def keeps_newest_versions_only(pointer_key: str) -> bool:
    """Whether pointer ``pointer_key`` keeps only its newest versions (:data:`PRUNED_VERSIONS_KEPT`): a run's pruned record.

    Each of its versions holds the whole record, so the older ones are dropped after each change
    (:meth:`RunRegistry.update_pruned`): a version missing below the oldest one kept is not damage.
    """
    parts = pointer_key.split("/")
    return len(parts) == 3 and parts[0] == "runs" and parts[2] == "pruned"


def legacy_pruned_key(run_id: str) -> str:
    """Where a store written before the pointer (:func:`pruned_key`) recorded them: ``runs/<run>/pruned.json``."""
    return f"runs/{run_id}/pruned.json"


# Compare-and-swaps of one run's pruned record before giving up (as the ledger's statuses: _CAS_ATTEMPTS).
_PRUNED_CAS_ATTEMPTS = 20
#: Versions of a run's pruned record kept after each change: the current one, and the one before for a reader
#: that listed the versions just before the change.
PRUNED_VERSIONS_KEPT = 2

#: A change of a run's pruned record (:meth:`RunRegistry.update_pruned`): the record read -> the record to
#: write, or ``None`` to write nothing. The record: ``{"versions": {version: entry}, ...}``.
PrunedChange = Callable[[dict[str, Any]], dict[str, Any] | None]


@dataclass(frozen=True)
class ModelVersion:
    """A published model version of a run: pointer version, its manifest and what it applied."""

    run_id: str
    version: int
    manifest_key: str
    applied_requests: tuple[str, ...]
    deleted_ids: tuple[int, ...]
    metrics: dict[str, Any]
    published_at: float

    @classmethod
    def from_pointer(cls, run_id: str, pointer: Pointer) -> ModelVersion:
        target = pointer.target
        return cls(
            run_id=run_id,
            version=pointer.version,
            manifest_key=target["manifest"],
            applied_requests=tuple(target.get("applied_requests", [])),
            deleted_ids=tuple(int(i) for i in target.get("deleted_ids", [])),
            metrics=dict(target.get("metrics", {})),
            published_at=pointer.created_at,
        )


class RunRegistry:
    """Checkpoints, versions and registry entries of every run in one :class:`ObjectStore`."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    # ----- run specs and registry entries -----------------------------------------------------

    def put_spec(self, spec: RunSpec) -> None:
        """Store a run's spec; a restarted run must bring the identical spec."""
        if self.check_spec(spec):
            return
        try:
            self.store.put_json_once(f"runs/{spec.run_id}/spec.json", spec.to_dict())
        except ObjectExists:
            # another training of this run id stored its spec first: the same spec passes, another is refused
            self.check_spec(spec)

    def check_spec(self, spec: RunSpec) -> bool:
        """Whether the run is stored already, with this very spec (read only).

        Raises:
            ConfigError: the run id is stored with another spec (a run id names one training).
        """
        key = f"runs/{spec.run_id}/spec.json"
        if not self.store.exists(key):
            return False
        # read back through RunSpec, so a field added since with its default still compares equal
        stored = RunSpec.from_dict(self.store.get_json(key)).to_dict()
        if stored != spec.to_dict():
            raise ConfigError(
                f"run {spec.run_id!r} already exists in {self.store.uri()} with another dataset split or config "
                f"({_differences(stored, spec.to_dict())}); a run id names one training: choose a new --run-id, "
                "or repeat the original options to resume or reuse it."
            )
        return True

    def spec(self, run_id: str) -> RunSpec:
        return RunSpec.from_dict(self.store.get_json(f"runs/{check_name(run_id, what='run id')}/spec.json"))

    def register(self, spec: RunSpec, *, block_ids: list[list[int]]) -> None:
        """Write the registry entry (idempotent): dataset and the sample ids of every block."""
        key = f"registry/{spec.run_id}.json"
        if self.store.exists(key):
            return
        # created once: two writers of one run's entry could interleave their bytes and commit records into an
        # entry whose checksum disagrees; the one that comes second keeps the first's (of the same spec)
        with contextlib.suppress(ObjectExists):
            self.store.put_json_once(
                key,
                {
                    "run_id": spec.run_id,
                    "dataset": spec.dataset,
                    "dataset_fingerprint": spec.dataset_fingerprint,
                    "model": spec.config.model,
                    "num_blocks": spec.config.num_blocks,
                    "block_sample_ids": block_ids,
                    "registered_at": time.time(),
                },
            )

    def is_registered(self, run_id: str) -> bool:
        """Whether run ``run_id`` has its registry entry."""
        return self.store.exists(f"registry/{check_name(run_id, what='run id')}.json")

    def run_ids(self) -> list[str]:
        """Registered runs: registered just before their version 1 is published, so one may have no version yet."""
        return sorted(key.rsplit("/", 1)[-1][: -len(".json")] for key in self.store.list("registry"))

    def entry(self, run_id: str) -> dict[str, Any]:
        """The registry entry plus the current version and its metrics."""
        entry = dict(self.store.get_json(f"registry/{check_name(run_id, what='run id')}.json"))
        current = self.current(run_id)
        entry["current_version"] = current.version if current else None
        entry["metrics"] = current.metrics if current else {}
        entry["deleted_ids"] = list(current.deleted_ids) if current else []
        return entry

    # ----- checkpoints -------------------------------------------------------------------------

    def checkpoint_key(self, run_id: str, chain: str, block_index: int) -> str:
        return checkpoint_key(run_id, chain, block_index)

    def checkpoint_sink(
        self, run_id: str, chain: str, *, seconds_of: Callable[[int], float | None], written: dict[int, ObjectInfo]
    ) -> Callable[[Checkpoint], None]:
        """A :data:`obliviate.unlearning.chain.CheckpointSink` writing each checkpoint as it is produced."""

        def sink(checkpoint: Checkpoint) -> None:
            index = checkpoint.block_index
            key = self.checkpoint_key(run_id, chain, index)
            self.store.put_json(key[: -len(".pt")] + ".json", {"seconds": seconds_of(index)})
            written[index] = self.store.put_torch(key, checkpoint.to_state())

        return sink

    def stored_checkpoints(self, run_id: str, chain: str, *, first: int) -> list[tuple[Checkpoint, ObjectInfo, float]]:
        """The contiguous committed checkpoints M_first, M_first+1, ... of a chain (a resume point)."""
        prefix = f"runs/{run_id}/chains/{chain}"
        present = set(self.store.list(prefix))
        out = []
        index = first
        while self.checkpoint_key(run_id, chain, index) in present:
            key = self.checkpoint_key(run_id, chain, index)
            timing = self.store.get_json(key[: -len(".pt")] + ".json").get("seconds")
            out.append((self.load_checkpoint(key), self.store.info(key), float(timing or 0.0)))
            index += 1
        return out

    def load_checkpoint(self, key: str, *, expected: ObjectInfo | None = None) -> Checkpoint:
        """A checkpoint read with ``torch.load(weights_only=True)``; code in the pickle is refused."""
        import torch

        from obliviate.unlearning.chain import Checkpoint

        data = self.store.get_member(_single(key, expected), "m") if expected else self.store.get_bytes(key)
        try:
            state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as err:  # UnpicklingError / RuntimeError for refused content
            raise CorruptObject(
                f"{self.store.uri(key)} is not loadable with torch.load(weights_only=True): {err}. Checkpoints hold "
                "tensors and plain containers only; a pickle that carries code is refused."
            ) from err
        try:
            return Checkpoint.from_state(state)
        except Exception as err:
            raise CorruptObject(f"{self.store.uri(key)} is not an obliviate checkpoint: {err}.") from err

    # ----- versions ------------------------------------------------------------------------------

    def pointer_key(self, run_id: str) -> str:
        return f"runs/{run_id}/current"

    def current(self, run_id: str) -> ModelVersion | None:
        pointer = self.store.read_pointer(self.pointer_key(run_id))
        return None if pointer is None else ModelVersion.from_pointer(run_id, pointer)

    def manifest(self, version: ModelVersion) -> Manifest:
        return self.store.read_manifest(version.manifest_key)

    def load_chain(self, version: ModelVersion) -> tuple[Chain, Manifest]:
        """The chain of a published version, every checkpoint verified against the manifest."""
        from obliviate.unlearning.chain import Chain

        manifest = self.manifest(version)

        def load(index: int) -> Checkpoint:
            member = manifest.members.get(str(index))
            if member is None:
                raise ObjectNotFound(f"manifest {self.store.uri(manifest.key)} lacks checkpoint {index}.")
            return self.load_checkpoint(member.key, expected=member)

        return Chain.from_manifest(manifest.metadata["chain"], load_checkpoint=load), manifest

    def publish(
        self,
        run_id: str,
        *,
        chain_name: str,
        members: Mapping[int, ObjectInfo],
        metadata: Mapping[str, Any],
        pointer_target: Mapping[str, Any],
        expected_version: int,
    ) -> ModelVersion:
        """Commit a version's manifest, then move the pointer from ``expected_version`` (CAS).

        Raises:
            PointerConflict: another publisher moved the pointer first; nothing was made current.
        """
        manifest_key = f"runs/{run_id}/manifests/v{expected_version + 1:06d}-{chain_name}.json"
        self.store.commit_manifest(manifest_key, {str(i): info for i, info in sorted(members.items())}, metadata)
        pointer = self.store.swap_pointer(
            self.pointer_key(run_id), {**pointer_target, "manifest": manifest_key}, expected_version=expected_version
        )
        return ModelVersion.from_pointer(run_id, pointer)

    def pruned_versions(self, run_id: str) -> dict[int, dict[str, Any]]:
        """Versions retention pruned (version -> when and by which ``--keep-versions``); empty if none.

        A pruned version keeps its pointer version (applied requests, deleted ids, metrics) but not
        its checkpoints, so it can no longer be served, rolled back to or replayed by ``verify``.
        """
        return dict(self.pruned_record(run_id)[1]["versions"])

    def pruned_record(self, run_id: str) -> tuple[int, dict[str, Any]]:
        """The run's pruned record and the pointer version it was read from (0: none yet, or the legacy file's).

        The record is ``{"versions": {version (int): entry}, ...}`` (other keys as :meth:`update_pruned` wrote them).

        Raises:
            CorruptObject: the record's current version (or the legacy file) is damaged.
        """
        key = pruned_key(check_name(run_id, what="run id"))
        pointer = self.store.read_pointer(key)
        if pointer is not None:
            body, version = dict(pointer.target), pointer.version
        else:
            try:
                body, version = dict(self.store.get_json(legacy_pruned_key(run_id))), 0
            except ObjectNotFound:
                body, version = {}, 0
        body.pop("run_id", None)
        body["versions"] = {int(v): dict(info) for v, info in (body.get("versions") or {}).items()}
        return version, body

    def update_pruned(self, run_id: str, change: PrunedChange) -> dict[str, Any] | None:
        """Write ``change(record)`` as the run's pruned record by compare-and-swap, retried from a fresh read.

        Two purges (a pass's, a reconcile pass's, ``store check --repair``) may change one run's record at
        once: each reads it, decides, and swaps from the version it read; the loser reads again and decides
        again, so no version recorded pruned and no told mark is lost (a lost mark told its requests twice).
        The legacy ``pruned.json`` goes once the pointer holds what it held, and the record's versions but the
        newest :data:`PRUNED_VERSIONS_KEPT` after each change (each holds the whole record).

        Returns:
            the record written, or ``None`` when ``change`` wrote nothing.

        Raises:
            PointerConflict: the record moved under every attempt (the message says to retry).
            CorruptObject: the record's current version is damaged (nothing written).
        """
        key = pruned_key(check_name(run_id, what="run id"))
        for _ in swap_attempts(_PRUNED_CAS_ATTEMPTS):
            version, record = self.pruned_record(run_id)
            changed = change(record)
            if changed is None:
                return None
            versions = changed.get("versions") or {}
            body = {**changed, "run_id": run_id, "versions": {str(v): versions[v] for v in sorted(versions)}}
            try:
                self.store.swap_pointer(key, body, expected_version=version)
            except PointerConflict:
                continue
            if version == 0:  # the pointer holds what the legacy file held now
                with contextlib.suppress(StorageError):
                    self.store.delete(legacy_pruned_key(run_id))
            with contextlib.suppress(StorageError):  # housekeeping: the next change drops what this one leaves
                self.store.drop_pointer_versions(key, keep_last=PRUNED_VERSIONS_KEPT)
            return changed
        raise PointerConflict(
            f"the pruned record of run {run_id} ({self.store.uri(key)}) kept moving under {_PRUNED_CAS_ATTEMPTS} "
            "attempts; retry later."
        )

    def history(self, run_id: str) -> list[int]:
        """Versions the pointer has had (1 = trained)."""
        current = self.current(run_id)
        return list(range(1, current.version + 1)) if current else []


def _single(key: str, expected: ObjectInfo) -> Manifest:
    """A one-member manifest, so a checkpoint is read through the manifest's checksum check."""
    return Manifest(key=key, members={"m": expected}, metadata={}, created_at=0.0)


def _differences(stored: dict[str, Any], asked: dict[str, Any], *, shown: int = 4) -> str:
    """``name: stored -> asked`` for the first ``shown`` differing fields (one level of nesting)."""

    def flat(d: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in d.items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out

    a, b = flat(stored), flat(asked)
    keys = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]

    def show(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 40 else "a different list" if isinstance(value, list) else text[:37] + "..."

    parts = [f"{k}: {show(a.get(k))} stored, {show(b.get(k))} asked" for k in keys[:shown]]
    return "; ".join(parts) + (f"; {len(keys) - shown} more" if len(keys) > shown else "")
