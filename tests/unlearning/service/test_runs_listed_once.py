"""A deletion pass and the reconcile sweep find interrupted trainings with one listing of ``runs/``.

Both read which runs have a published version (the ``runs/<run>/current`` pointers) and which training chains are
stored (every checkpoint of every run). Each walked the whole ``runs/`` folder twice for it, once per question: on
S3, two paged listings of every stored checkpoint per pass and two more per sweep. One walk now answers both
(:meth:`storage.objects.ObjectStore.list_keys_and_pointers`), with the same answers as the two listings.
"""

from __future__ import annotations

import pytest

from storage import ObjectStore
from storage.erasure import InterruptedTrainings, sweep_dead_trainings, unpublished_training_chains


@pytest.fixture(params=["file", "s3"])
def runs_store(request, tmp_path) -> ObjectStore:
    """Runs r-pub (published: a version pointer, chains train and u-1) and r-dead (never published: two chains)."""
    url = f"file://{tmp_path}/store" if request.param == "file" else request.getfixturevalue("s3_url")
    store = ObjectStore(url)
    store.ensure_container()
    for run, chain, blocks in (
        ("r-pub", "train", 3),
        ("r-pub", "u-1", 2),
        ("r-dead", "train", 2),
        ("r-dead", "train-x0123456789ab", 1),
    ):
        for index in range(blocks):
            store.put_bytes(f"runs/{run}/chains/{chain}/ckpt-{index:04d}.pt", b"x")
    store.put_json("runs/r-pub/plan.json", {"blocks": 3})
    store.swap_pointer("runs/r-pub/current", {"manifest": "runs/r-pub/manifests/v1.json"}, expected_version=0)
    return store


def _count_walks(store: ObjectStore, monkeypatch) -> list[str]:
    """Count the store's recursive listings (fsspec's ``find`` on its filesystem, the backend's call)."""
    walks: list[str] = []
    find = store._fs.find

    def counted(path, *args, **kwargs):
        walks.append(path)
        return find(path, *args, **kwargs)

    monkeypatch.setattr(store._fs, "find", counted)
    return walks


def test_one_listing_answers_keys_and_pointers(runs_store) -> None:
    keys, pointers = runs_store.list_keys_and_pointers("runs")
    assert keys == runs_store.list("runs") and pointers == runs_store.list_pointers("runs")
    assert pointers == ["runs/r-pub/current"] and "runs/r-dead/chains/train/ckpt-0001.pt" in keys


def test_pass_and_sweep_walk_runs_once(runs_store, monkeypatch) -> None:
    walks = _count_walks(runs_store, monkeypatch)
    expected = {("r-dead", "train"): [0, 1], ("r-dead", "train-x0123456789ab"): [0]}
    assert unpublished_training_chains(runs_store) == expected
    assert len(walks) == 1, walks

    walks.clear()
    erasing = InterruptedTrainings(runs_store, command="a test pass")
    assert erasing.chains() == expected and erasing.chains() == expected  # listed once per pass, on first use
    assert len(walks) == 1, walks

    walks.clear()
    sweep_dead_trainings(runs_store, command="a test sweep")  # no done request: nothing to delete
    assert sum(where.rstrip("/").endswith("runs") for where in walks) == 1, walks
