"""A damaged or lost version of a run's version pointer: store check says what it loses and exactly how to mend it.

``store check`` said only "not rebuildable by store check: restore it from a backup" and ``--repair`` "not a
chain checkpoint". It cannot be rebuilt from the run's manifests (they do not record the requests a version
applied, nor its holds), so nothing is rebuilt; the report now says what the run can and cannot do until it is
mended, to restore exactly that object from a backup, not to delete it (for the newest, the version before
would be served again), and what to do without a backup.
"""

from __future__ import annotations

import shutil

import pytest

from actors.chains import ChainWorker
from flows.cli import main
from flows.settle import run_pass
from flows.train import run_spec
from flows.unlearn import submit_deletion
from storage import ObjectStore
from storage.check import check_store


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    """A run trained (version 1) and unlearned once (version 2), to be copied by each test."""
    url = f"file://{tmp_path_factory.mktemp('two-versions')}/store"
    options = {"data": "digits", "model": "lenet5", "blocks": 3, "epochs": 1, "batch_size": 32, "seed": 0}
    options |= {"learning_rate": 0.01, "schedule": "constant", "train_size": 300, "heldout_size": 100}
    spec = run_spec(run_id="r1", split_seed=0, **options)  # conftest's tiny_run, module-wide
    worker = ChainWorker(url)
    worker.train(spec)
    submit_deletion(url, spec["train_ids"][:2], dataset="digits", request_id="req-1", emit=False)
    run_pass(url, unlearn_runs=lambda per_run: {r: worker.unlearn(r, reqs) for r, reqs in per_run.items()})
    assert ObjectStore(url).pointer_versions("runs/r1/current") == [1, 2]
    return url.removeprefix("file://")


def _copy_with(two_versions: str, tmp_path, version: int, how: str) -> ObjectStore:
    root = tmp_path / "store"
    shutil.copytree(two_versions, root)
    path = root / f"runs/r1/current/v{version:09d}.json"
    if how == "lost":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[12] ^= 1  # one bit flipped outside obliviate
        path.write_bytes(bytes(data))
    return ObjectStore(f"file://{root}")


@pytest.mark.parametrize("how", ["damaged", "lost"])
def test_an_older_version_says_the_run_still_serves_and_to_restore_it_from_a_backup(two_versions, tmp_path, how):
    store = _copy_with(two_versions, tmp_path, 1, how)
    report = check_store(store, min_age_s=0)
    (item,) = report.corrupt
    said = item["error"]
    assert item["key"] == "runs/r1/current/v000000001.json", report.as_dict()
    assert "version 1 of run r1's version pointer" in said and "cannot rebuild it" in said
    assert "run r1 still serves version 2" in said and "purge of superseded versions skip it" in said
    assert "restore exactly runs/r1/current/v000000001.json from a backup" in said
    assert "Do not delete it: a missing version is reported and skipped just the same" in said


def test_the_newest_version_says_the_run_cannot_be_read_and_not_to_delete_it(two_versions, tmp_path, capsys):
    store = _copy_with(two_versions, tmp_path, 2, "damaged")
    report = check_store(store, min_age_s=0)
    (item,) = report.corrupt
    said = item["error"]
    assert "fails its checksum" in said and "run r1's current version cannot be read" in said
    assert "every deletion request for its ids fails its attempts on it" in said
    assert "restore exactly runs/r1/current/v000000002.json from a backup" in said
    assert "that would make version 1 current again, which may serve a model trained on the ids version 2" in said
    assert "train its data under a new --run-id" in said and "file those ids again with `obliviate forget`" in said
    main(["store", "check", "--store", store.url])
    printed = capsys.readouterr().err
    assert "damaged runs/r1/current/v000000002.json" in printed and "make version 1 current again" in printed


def test_repair_keeps_the_checks_advice_for_a_damaged_version_rather_than_replays_words(two_versions, tmp_path, capsys):
    store = _copy_with(two_versions, tmp_path, 2, "damaged")
    main(["store", "check", "--store", store.url, "--repair", "--orphan-age", "0"])
    printed = capsys.readouterr().err
    assert "runs/r1/current/v000000002.json" in printed
    assert "make version 1 current again" in printed, printed
    assert "not a chain checkpoint" not in printed, printed
