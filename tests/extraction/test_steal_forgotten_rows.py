"""The extraction audit of a served run leaves the run's forgotten (deleted) rows out of its pool and test set.

`obliviate target serve --run R`'s GET /info listed the run's training ids less the forgotten ones, so `steal`
counted the deleted rows as images "outside the training set": they were queried to the model and trained
substitutes, after their data subjects' erasure.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

TINY_RUN = {
    "data": "digits",
    "model": "lenet5",
    "blocks": 2,
    "epochs": 1,
    "batch_size": 32,
    "learning_rate": 0.01,
    "schedule": "constant",
    "train_size": 400,
    "heldout_size": 200,
    "seed": 0,
    "split_seed": 0,
}


@pytest.fixture(scope="module")
def served_run_with_deletions(tmp_path_factory):
    """A tiny digits run in a store, with 6 of its training ids forgotten: ``(store url, forgotten ids)``."""
    from actors.chains import ChainWorker
    from flows.train import run_spec
    from storage import ObjectStore

    url = f"file://{tmp_path_factory.mktemp('store')}"
    ObjectStore(url).ensure_container()
    spec = run_spec(run_id="r", **TINY_RUN)
    worker = ChainWorker(url)
    worker.train(spec)
    forgotten = sorted(int(i) for i in spec["train_ids"][-6:])  # the last block's: a retrain of one block
    worker.unlearn("r", {"del-1": forgotten})
    return url, forgotten


def test_info_declares_the_forgotten_ids_and_the_audit_split_leaves_them_out(served_run_with_deletions) -> None:
    from flows.model_server import RunBackend, TargetServer
    from obliviate.data import load_dataset
    from obliviate.extraction.audit import audit_split, target_training_indices
    from obliviate.extraction.target import open_backend

    url, forgotten = served_run_with_deletions
    backend = RunBackend(url, "r", refresh_s=0.0)
    data = load_dataset("digits")
    with TargetServer(backend=backend, info=backend.spec_info) as server:
        with urllib.request.urlopen(server.url.replace("/predict", "/info"), timeout=10) as reply:
            info = json.loads(reply.read())
        _, meta = open_backend(server.url, timeout_s=10, retries=0, wait_s=0)
    # the fields readers had keep their meaning: training ids less the forgotten, and their count
    assert info["forgotten_ids"] == len(forgotten) and not set(forgotten) & set(info["train_indices"])
    assert info["forgotten_indices"] == forgotten
    exclude, warning = target_training_indices(pool=data, target_meta=meta)
    assert warning is None and set(forgotten) <= set(exclude)
    # every image the audit may use: none of them is a forgotten row
    available = len(data) - len(exclude)
    pool, test = audit_split(data, exclude=exclude, pool_size=available - 100, test_size=100, seed=0)
    assert not set(forgotten) & {int(i) for i in [*pool, *test]}
    from obliviate.extraction.audit import forgotten_rows

    assert forgotten_rows(pool=data, target_meta=meta) == len(forgotten)


def test_steal_of_a_served_run_says_how_many_forgotten_rows_it_left_out(
    served_run_with_deletions, steal_served_run
) -> None:
    url, forgotten = served_run_with_deletions
    paths = steal_served_run(url, "r")
    doc = json.loads(Path(paths["json"]).read_text())
    assert doc["forgotten_rows_left_out"] == len(forgotten)
    assert "forgotten_indices" not in doc["target_meta"]  # counted, not copied into the report
    md = Path(paths["markdown"]).read_text()
    assert (
        f"Also left out of the pool and test set: {len(forgotten)} rows erased by deletion requests of its "
        "dataset (ids the target forgot, or never trained on)"
    ) in md


def test_the_scheduled_audits_target_declares_the_forgotten_ids(served_run_with_deletions, tmp_path) -> None:
    """``serve``'s extraction audit exports the run's model with metadata a run server's /info would give."""
    from flows.audit import export_target
    from obliviate.data import load_dataset
    from obliviate.extraction.audit import forgotten_rows
    from obliviate.extraction.target import load_checkpoint
    from storage import ObjectStore
    from storage.registry import RunRegistry

    url, forgotten = served_run_with_deletions
    export_target(RunRegistry(ObjectStore(url)), "r", tmp_path / "target.pt")
    _, meta = load_checkpoint(tmp_path / "target.pt")
    assert meta["forgotten_indices"] == forgotten and not set(forgotten) & set(meta["train_indices"])
    assert forgotten_rows(pool=load_dataset("digits"), target_meta=meta) == len(forgotten)
