"""`obliviate verify --version N` with the run's pruned record damaged (SPEC 6, Proof by replay).

The pruned record (``runs/<run>/pruned``) only says whether a past version's checkpoints were deleted on
purpose (retention, a purge). Damaged, it made every past version fail with exit 4 and "no block replayed",
even one whose manifest and checkpoints were all there. Now such a version is replayed as usual, and the
report names the damaged record and its mend without changing the exit code; a checkpoint (or manifest)
found missing fails the proof as before, saying that it is missing and that the record that would say
whether it was deleted on purpose cannot be read.

A tiny run of three versions (v1 pruned by retention, v2 whole, v3 current), on a file:// store and on
moto's S3; no mocks of obliviate's components.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import storage.objects
from actors.chains import ChainWorker
from flows.cli import main
from flows.train import run_spec
from flows.verify import _markdown
from storage import ObjectStore
from storage.check import prune_versions, save_keep_superseded
from storage.registry import RunRegistry


@pytest.fixture(autouse=True)
def _damage_read_once(monkeypatch) -> None:
    # A record failing its checksum is read again over 1.5 s before it is called damaged (a read racing a
    # rewrite); here the damage stays, so once is enough.
    monkeypatch.setattr(storage.objects, "_REREAD_WAITS_S", ())


def _three_versions_pruned_record_damaged(url: str, tiny_run) -> str:
    """Run r1 with v1 pruned by retention (its own M_3 deleted), v2 whole and v3 current, and the newest version of
    its pruned record damaged (a flipped byte); returns that record's key."""
    store = ObjectStore(url)
    store.ensure_container()
    save_keep_superseded(store, keep=True)  # v2 stays to be verified; retention below prunes v1 only
    spec = run_spec(run_id="r1", split_seed=0, **tiny_run(blocks=3, train_size=300, heldout_size=100))
    worker = ChainWorker(url)
    worker.train(spec)
    last_block = RunRegistry(store).entry("r1")["block_sample_ids"][2]  # each deletion retrains block 3 only
    for n in (1, 2):
        assert worker.unlearn("r1", {f"req-{n}": [int(last_block[n])]})["status"] == "published"
    assert prune_versions(store, keep=2, apply=True)["runs"]["r1"]["versions"] == [1]
    key = f"runs/r1/pruned/v{store.pointer_versions('runs/r1/pruned')[-1]:09d}.json"
    raw = bytearray(store._fs.cat_file(store._path(key)))
    raw[len(raw) // 2] ^= 0x01
    store._fs.pipe_file(store._path(key), bytes(raw))
    return key


def _verify(url: str, capsys, *argv: str) -> tuple[int, str, dict]:
    """``obliviate verify`` of r1: its exit code, its stderr and the report it recorded (read back from the store)."""
    code = main(["verify", "--store", url, "--run", "r1", "--no-prefect", *argv])
    out, err = capsys.readouterr()
    report = re.search(r"^  report: (\S+)$", err, flags=re.MULTILINE)
    assert report, err
    recorded = ObjectStore(url).get_json(report.group(1).removeprefix(url + "/"))
    assert json.loads(out.strip().splitlines()[-1])["status"] == recorded["status"]
    return code, err, recorded


def _assert_whole_version_passes_with_a_note(url: str, key: str, capsys) -> None:
    code, err, recorded = _verify(url, capsys, "--version", "2", "--blocks", "3")
    assert code == 0, err  # the proof holds: the damaged record changes no exit code
    assert "verify r1 v2: passed; 1/1 replayed blocks bit-identical; M_0 is the seeded initial model" in err, err
    note = (
        "  note: the pruned record of run r1 (which of its versions retention or a purge deleted the checkpoints of, "
        f"{url}/{key}) cannot be read: "
    )
    assert note in err and "fails its checksum; it was damaged" in err, err
    assert "The result above does not rest on it" in err, err
    assert "restore it from a backup (`obliviate store check` reports it too)" in err, err
    assert recorded["status"] == "passed" and recorded["blocks_replayed"] == [3], recorded
    assert recorded["bit_identical"] == {"3": True} and recorded["problems"] == [], recorded
    assert recorded["records_damaged"] == [key] and "records_unreadable" not in recorded, recorded
    assert len(recorded["notes"]) == 1 and f"{url}/{key}" in recorded["notes"][0], recorded
    artifact = _markdown(recorded)  # the Prefect artifact of the same report
    assert "# verify r1 v2: **passed**" in artifact and "- note: the pruned record of run r1 (" in artifact, artifact


def _assert_missing_checkpoint_fails_saying_why_unknown(url: str, key: str, capsys) -> None:
    code, err, recorded = _verify(url, capsys, "--version", "1", "--blocks", "1")
    assert code == 4, err
    assert "verify r1 v1: failed; 1/1 replayed blocks bit-identical" in err, err  # M_0, M_1 are there: replayed
    problem = next((line for line in err.splitlines() if line.startswith("  checkpoint M_3 cannot be read: ")), "")
    assert (
        "; it is missing, and whether it was deleted on purpose (retention or a purge pruned version 1) is " in problem
    )
    assert f"unknown: the run's pruned record, which says so, cannot be read ({url}/{key}, note below)." in problem
    assert "rebuilds it by replay" not in problem, err  # not said as if surely lost
    assert "So whether M_3 of version 1 was deleted on purpose" in err and "restore it from a backup" in err, err
    assert recorded["status"] == "failed" and recorded["records_damaged"] == [key], recorded
    assert any("M_3" in p and "it is missing" in p for p in recorded["problems"]), recorded


def test_a_whole_past_version_verifies_and_a_pruned_one_fails_saying_why_on_a_file_store(
    store_url, tiny_run, capsys
) -> None:
    key = _three_versions_pruned_record_damaged(store_url, tiny_run)
    _assert_whole_version_passes_with_a_note(store_url, key, capsys)
    _assert_missing_checkpoint_fails_saying_why_unknown(store_url, key, capsys)
    code, err, recorded = _verify(store_url, capsys, "--blocks", "3")  # the current version: the record is not read
    assert code == 0 and "verify r1 v3: passed" in err and "note:" not in err, err
    assert recorded["records_damaged"] == [] and recorded["notes"] == [], recorded

    pointer = "runs/r1/current/v000000002.json"  # now v2's own pointer too: nothing of v2 is read
    path = Path(store_url.removeprefix("file://")) / pointer
    path.write_bytes(path.read_bytes().replace(b'"version": 2', b'"version": 5'))
    code, err, recorded = _verify(store_url, capsys, "--version", "2", "--blocks", "3")
    assert code == 4 and "verify r1 v2: failed; no block replayed: a record it needs cannot be read" in err, err
    assert recorded["records_unreadable"] == [pointer] and recorded["records_damaged"] == [key], recorded
    assert "Whether version 2 was pruned (its checkpoints deleted on purpose) is unknown too." in err, err


def test_a_past_version_whose_manifest_is_gone_says_the_pruned_record_would_tell(store_url, tiny_run, capsys) -> None:
    key = _three_versions_pruned_record_damaged(store_url, tiny_run)
    store = ObjectStore(store_url)
    manifest_key = store.read_pointer_version("runs/r1/current", 2).target["manifest"]
    store.delete(manifest_key)
    code, err, recorded = _verify(store_url, capsys, "--version", "2", "--blocks", "3")
    assert code == 4, err
    assert "verify r1 v2: failed; no block replayed: a record it needs cannot be read (below)" in err, err
    assert f"the manifest of version 2 (its lineage, recipe and checkpoints, {manifest_key}) cannot be read" in err
    assert "it is missing, and whether it was deleted on purpose (retention or a purge pruned version 2)" in err, err
    assert f"So whether its manifest ({manifest_key}) of version 2 was deleted on purpose" in err, err
    assert recorded["records_unreadable"] == [manifest_key] and recorded["records_damaged"] == [key], recorded


def test_a_whole_past_version_verifies_on_s3_with_its_pruned_record_damaged(s3_url, tiny_run, capsys) -> None:
    key = _three_versions_pruned_record_damaged(s3_url, tiny_run)
    _assert_whole_version_passes_with_a_note(s3_url, key, capsys)
    _assert_missing_checkpoint_fails_saying_why_unknown(s3_url, key, capsys)
