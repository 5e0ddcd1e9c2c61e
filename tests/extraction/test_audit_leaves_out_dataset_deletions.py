"""The extraction audit of a served run leaves out every erased row of its dataset, not only the run's own.

Two runs of digits, `a` and `b`, trained on other rows. A deletion request for a row only `a` trained on became
`done` (a forgot it). `obliviate target serve --run b`'s GET /info declared as forgotten only what b's versions
forgot (nothing), so `steal --target` of b, and serve's scheduled audit of b, drew that erased row into the
attacker's pool or test set: a data subject's row queried and trained on after the erasure was done. Now
`forgotten_indices` lists every id of every done or accepted request of the dataset, read from the ledger.
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
    "train_size": 200,
    "heldout_size": 100,
    "seed": 0,
}


@pytest.fixture(scope="module")
def two_runs_one_dataset(tmp_path_factory):
    """Runs a and b of digits; ``(store url, erased ids, withdrawn id)``.

    Erased: an id only a trained on, its request ``done``; an id neither trained on, its request still pending.
    Withdrawn: an id whose request was cancelled (erased nothing, so the audit may use its row).
    """
    from actors.chains import ChainWorker
    from flows.settle import run_pass
    from flows.train import run_spec
    from flows.unlearn import submit_deletion
    from obliviate.data import load_dataset
    from storage import ObjectStore
    from storage.ledger import DONE, PENDING, DeletionLedger

    url = f"file://{tmp_path_factory.mktemp('store')}"
    store = ObjectStore(url)
    store.ensure_container()
    worker = ChainWorker(url)
    specs = {run: run_spec(run_id=run, split_seed=seed, **TINY_RUN) for run, seed in (("a", 0), ("b", 1))}
    for spec in specs.values():
        worker.train(spec)
    only_a = next(int(i) for i in specs["a"]["train_ids"] if i not in set(specs["b"]["train_ids"]))
    done = submit_deletion(url, [only_a], dataset="digits", emit=False)["request_id"]
    settled = run_pass(url, unlearn_runs=lambda per_run: {r: worker.unlearn(r, q) for r, q in per_run.items()})
    assert settled["settled"] == {done: DONE}
    trained = {int(i) for spec in specs.values() for i in spec["train_ids"]}
    neither, withdrawn = [i for i in range(len(load_dataset("digits"))) if i not in trained][:2]
    pending = submit_deletion(url, [neither], dataset="digits", emit=False)["request_id"]
    cancelled = submit_deletion(url, [withdrawn], dataset="digits", emit=False)["request_id"]
    ledger = DeletionLedger(store)
    ledger.cancel(cancelled, applied_to=[])
    assert ledger.get(pending).status == PENDING
    return url, sorted([only_a, neither]), withdrawn


def test_info_of_the_other_run_declares_the_datasets_erased_rows(two_runs_one_dataset) -> None:
    from flows.model_server import RunBackend, TargetServer
    from obliviate.data import load_dataset
    from obliviate.extraction.audit import audit_split, forgotten_rows, target_training_indices
    from obliviate.extraction.target import open_backend

    url, erased, withdrawn = two_runs_one_dataset
    backend = RunBackend(url, "b", refresh_s=0.0)
    with TargetServer(backend=backend, info=backend.spec_info) as server:
        with urllib.request.urlopen(server.url.replace("/predict", "/info"), timeout=10) as reply:
            info = json.loads(reply.read())
        _, meta = open_backend(server.url, timeout_s=10, retries=0, wait_s=0)
    assert set(erased) <= set(info["forgotten_indices"]), info["forgotten_indices"]
    assert withdrawn not in info["forgotten_indices"]
    assert info["forgotten_ids"] == 0  # b's versions forgot nothing: the count keeps its meaning
    data = load_dataset("digits")
    assert forgotten_rows(pool=data, target_meta=meta) == len(erased)
    exclude, warning = target_training_indices(pool=data, target_meta=meta)
    assert warning is None and set(erased) <= set(exclude) and withdrawn not in exclude
    available = len(data) - len(exclude)
    pool, test = audit_split(data, exclude=exclude, pool_size=available - 100, test_size=100, seed=0)
    assert not set(erased) & {int(i) for i in [*pool, *test]}


def test_steal_of_the_other_run_counts_the_datasets_erased_rows(two_runs_one_dataset, steal_served_run):
    url, erased, _ = two_runs_one_dataset
    paths = steal_served_run(url, "b")
    doc = json.loads(Path(paths["json"]).read_text())
    assert doc["forgotten_rows_left_out"] == len(erased)
    md = Path(paths["markdown"]).read_text()
    assert f"Also left out of the pool and test set: {len(erased)} rows erased by deletion requests" in md


def test_the_scheduled_audit_of_the_other_run_declares_the_datasets_erased_rows(two_runs_one_dataset, tmp_path):
    from flows.audit import export_target
    from obliviate.extraction.target import load_checkpoint
    from storage import ObjectStore
    from storage.registry import RunRegistry

    url, erased, withdrawn = two_runs_one_dataset
    export_target(RunRegistry(ObjectStore(url)), "b", tmp_path / "target.pt")
    _, meta = load_checkpoint(tmp_path / "target.pt")
    assert set(erased) <= set(meta["forgotten_indices"]) and withdrawn not in meta["forgotten_indices"]
