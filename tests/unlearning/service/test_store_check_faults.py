"""`store check` on a store a fault left behind (fast; a local store, a tiny run, faults made by hand
or by a file-size limit in a child process): a damaged ledger record is one damaged object, not the
end of the check; write checks and failed writes leave nothing; bytes a write left without their
commit record are reported, as damage when something needs them, else as orphans `--repair` collects."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.chains import ChainWorker
from flows.cli import main
from flows.repair import check_and_repair
from flows.train import run_spec
from storage import ObjectStore
from storage.check import check_store, collect_orphans
from storage.errors import CorruptObject, WriteFailed
from storage.ledger import DeletionLedger

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def trained(store_url, tiny_run):
    spec = run_spec(run_id="r1", split_seed=0, **tiny_run(blocks=3, train_size=300, heldout_size=100))
    ChainWorker(store_url).train(spec)
    return store_url, spec


def _root(store_url: str) -> Path:
    return Path(store_url.removeprefix("file://"))


def _file_request(store: ObjectStore, request_id: str, ids: list[int]) -> None:
    DeletionLedger(store).append(request_id=request_id, ids=ids, dataset="digits", reason=None)


def _with_file_size_limit(store_url: str, limit: int, call: str) -> str:
    """Run ``call`` (``store``: the store) in a child process that cannot write past ``limit`` bytes per file.

    A real failed write, as on a full disk (EFBIG instead of ENOSPC), without root.
    """
    code = (
        "import resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))\n"
        "from storage.objects import ObjectStore\n"
        "from storage.ledger import DeletionLedger\n"
        f"store = ObjectStore({store_url!r})\n"
        "try:\n"
        f"    {call}\n"
        "except Exception as err:\n"
        "    print(type(err).__name__, err)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# ----- a damaged ledger record (probe defect 3) --------------------------------------------------


def test_a_damaged_request_record_is_damage_and_the_rest_is_still_checked_and_repaired(trained, capsys):
    """A request record failing its checksum made `store check` and `--repair` exit 2 for the whole store
    ("... the object is damaged (`obliviate store check` says what needs it ...)", pointing at itself)
    and repaired nothing else. Now it is one damaged object, said with what it loses and how to mend
    it; the rest of the store is checked and a damaged checkpoint still rebuilt."""
    store_url, spec = trained
    store = ObjectStore(store_url)
    _file_request(store, "req-1", [int(spec["train_ids"][0])])
    _file_request(store, "req-2", [int(spec["train_ids"][1])])
    root = _root(store_url)
    (root / "ledger/requests/req-1.json").write_bytes(b"\0garbage{{{")
    checkpoint = root / "runs/r1/chains/train/ckpt-0002.pt"
    with open(checkpoint, "r+b") as handle:
        handle.truncate(100)

    report = check_store(store, min_age_s=3600)
    damaged = {item["key"]: item["error"] for item in report.corrupt}
    assert set(damaged) == {"ledger/requests/req-1.json", "runs/r1/chains/train/ckpt-0002.pt"}, report.as_dict()
    said = damaged["ledger/requests/req-1.json"]
    assert "deletion request req-1" in said and "--request-id req-1" in said and "backup" in said
    assert "store check` says" not in said  # no longer sends the reader back to the command that said it

    assert main(["store", "check", "--store", store_url]) == 1
    err = capsys.readouterr().err
    assert "damaged ledger/requests/req-1.json" in err and "forget --ids IDS" in err

    report = check_and_repair(store_url, repair=True, min_orphan_age_s=3600)
    assert [item["key"] for item in report.repaired] == ["runs/r1/chains/train/ckpt-0002.pt"]
    assert [item["key"] for item in report.unrecoverable] == ["ledger/requests/req-1.json"]
    assert "--request-id req-1" in report.unrecoverable[0]["error"]
    assert [item["key"] for item in report.corrupt] == ["ledger/requests/req-1.json"] and not report.healthy
    assert DeletionLedger(store).get("req-2").status == "pending"


def test_forget_status_of_a_damaged_request_says_how_to_mend_it_and_refiling_mends_it(store_url, capsys):
    """`forget --status` of a request whose record is damaged printed the checksum error and "`obliviate
    store check` says ... how to mend it", which said nothing more. Now the ledger says what is lost and
    how to mend; removing the record and filing it again under its id rewrites it, history kept."""
    store = ObjectStore(store_url)
    store.ensure_container()
    _file_request(store, "req-1", [3, 4])
    ledger = DeletionLedger(store)
    ledger.cancel("req-1", applied_to=[])
    record = _root(store_url) / "ledger/requests/req-1.json"
    record.write_bytes(b"garbage{{")

    with pytest.raises(CorruptObject, match="forget --ids IDS --data DATASET --request-id req-1") as caught:
        ledger.get("req-1")
    assert "store check` says" not in str(caught.value)
    assert main(["forget", "--status", "req-1", "--store", store_url]) == 2
    assert "the record of deletion request req-1 is damaged" in capsys.readouterr().err

    record.unlink()
    Path(f"{record}.sha256").unlink()
    _file_request(store, "req-1", [3, 4])
    mended = ledger.get("req-1")
    assert mended.request["ids"] == [3, 4] and mended.status == "cancelled"
    assert [h["status"] for h in ledger.history("req-1")] == ["pending", "cancelled"]
    assert check_store(store, min_age_s=3600).healthy


def test_a_damaged_status_version_is_damage_with_its_mend_and_the_history_stays_readable(store_url, capsys):
    """A status pointer version failing its checksum aborted the check too. Now: the current one is
    damage said with what removing it does; an older one is damage while `forget --status` shows the
    rest of the history."""
    store = ObjectStore(store_url)
    store.ensure_container()
    ledger = DeletionLedger(store)
    _file_request(store, "req-1", [3])
    _file_request(store, "req-2", [4])
    ledger.cancel("req-1", applied_to=[])
    ledger.cancel("req-2", applied_to=[])
    status = _root(store_url) / "ledger/status"
    (status / "req-1/v000000002.json").write_bytes(b"garbage{{")
    (status / "req-2/v000000001.json").write_bytes(b"garbage{{")

    report = check_store(store, min_age_s=3600)
    damaged = {item["key"]: item["error"] for item in report.corrupt}
    assert set(damaged) == {"ledger/status/req-1/v000000002.json", "ledger/status/req-2/v000000001.json"}
    assert "removing it makes version 1 current again" in damaged["ledger/status/req-1/v000000002.json"]
    assert "version 2, is intact" in damaged["ledger/status/req-2/v000000001.json"]
    assert main(["store", "check", "--store", store_url]) == 1

    with pytest.raises(CorruptObject, match="removing it makes version 1 current again"):
        ledger.get("req-1")
    assert [h["status"] for h in ledger.history("req-2")] == ["unreadable", "cancelled"]
    assert main(["forget", "--status", "req-2", "--store", store_url]) == 0
    capsys.readouterr()


# ----- write checks and failed writes leave nothing (probe defect 6a) ---------------------------


def test_a_failed_write_check_leaves_nothing_and_a_leftover_is_collected_at_once(store_url):
    """A write check that failed (a full disk) left an empty `.tmp-write-check-<hex>` at the store's
    root, collected only after --orphan-age; now nothing is left, and one a crash left is collected
    at once (nothing reads it)."""
    store = ObjectStore(store_url)
    store.ensure_container()
    said = _with_file_size_limit(store_url, 0, "store.check_writable()")
    assert said.startswith(WriteFailed.__name__), said
    assert os.listdir(_root(store_url)) == []

    said = _with_file_size_limit(store_url, 40, "store.swap_pointer('p', {'x': 'y' * 100}, expected_version=0)")
    assert said.startswith(WriteFailed.__name__), said
    assert [name for name in store.stored_names("") if ".tmp-" in name] == []  # the pointer's temporary file

    leftover = _root(store_url) / ".tmp-write-check-0123456789ab"
    leftover.write_bytes(b"")
    report = check_store(store, min_age_s=3600)
    assert report.orphans == [".tmp-write-check-0123456789ab"] and report.healthy
    assert collect_orphans(store, report) == [".tmp-write-check-0123456789ab"] and not leftover.exists()


# ----- half-filed requests (probe defect 6b) ------------------------------------------------------


def test_a_half_filed_request_is_an_orphan_and_a_rerun_completes_it(store_url, exited_pid):
    """`forget` failing part-way (a full disk) left the request's open marker committed and its record's
    bytes without a commit record: `store check` said healthy and `--repair --orphan-age 0` never
    collected them. Now they are orphans (never acknowledged), collected past --orphan-age; a re-run
    of the same request id completes the request instead."""
    store = ObjectStore(store_url)
    store.ensure_container()
    root = _root(store_url)
    (root / "ledger/requests").mkdir(parents=True)
    for request_id in ("half-1", "half-2"):
        # as DeletionLedger.append writes it first, by a forget of this host that failed part way (its process gone)
        marker = {"at": time.time(), "host": socket.gethostname(), "pid": exited_pid}
        store.put_json(f"ledger/open/{request_id}.json", marker)
        # the record's bytes as append writes them, cut off before their commit record
        record = {"request_id": request_id, "ids": [5], "dataset": "digits", "reason": "", "requested_at": time.time()}
        (root / f"ledger/requests/{request_id}.json").write_text(json.dumps({**record, "deadline": time.time() + 60}))
    # room for the marker's bytes (its host's name, the longest pid and time) but never for their commit record
    marker_room = len(json.dumps({"at": 1796504766.8965535, "host": socket.gethostname(), "pid": 4194304}, indent=2))
    said = _with_file_size_limit(
        store_url,
        marker_room,
        "DeletionLedger(store).append(request_id='half-3', ids=[1], dataset='digits', reason=None)",
    )
    assert said.startswith(WriteFailed.__name__), said  # its marker's bytes alone: even the marker did not commit

    old = check_store(store, min_age_s=0).orphans
    assert {"ledger/open/half-1.json", "ledger/requests/half-1.json", "ledger/open/half-3.json"} <= set(old), old
    young = check_store(store, min_age_s=3600)
    assert young.half_filed == ["half-1", "half-2"] and young.orphans == [] and young.healthy, young.as_dict()
    assert young.uncommitted == ["ledger/open/half-3.json"]
    assert "half-filed request(s) ['half-1', 'half-2']" in (young.orphans_held_back or "")

    _file_request(store, "half-2", [5])  # the re-run the error message advised: it commits the record cut off
    assert DeletionLedger(store).get("half-2").status == "pending"
    report = check_and_repair(store_url, repair=True, min_orphan_age_s=0)
    assert sorted(report.collected) == [
        "ledger/open/half-1.json",
        "ledger/open/half-3.json",
        "ledger/requests/half-1.json",
    ], report.as_dict()
    assert report.healthy and sorted(os.listdir(root / "ledger/requests")) == ["half-2.json", "half-2.json.sha256"]
    assert DeletionLedger(store).open_request_ids() == ["half-2"]


# ----- bytes without a commit record under final names (probe defect 6c) ---------------------------


def test_bytes_without_a_commit_record_are_orphans_or_damage(trained, capsys):
    """Stray bytes under final names with no commit record (a write cut off between its bytes and its
    record) were never reported nor collected. Now those nothing needs are orphans `--repair` collects
    past --orphan-age; one something needs (a run's spec, a request with a status history) is damage;
    files of Ray Tune's state are not the store's objects and are left alone."""
    store_url, _ = trained
    store = ObjectStore(store_url)
    root = _root(store_url)
    stray = ["runs/r1/chains/train/ckpt-0009.pt", "runs/r1/manifests/v000009-train.json", "registry/gone.json"]
    an_hour_ago = time.time() - 3600  # now, not at import: CI imported this module over an hour before the test ran
    for name in stray:
        (root / name).write_bytes(b"")
        os.utime(root / name, (an_hour_ago, an_hour_ago))
    (root / "tune-state/exp").mkdir(parents=True)
    (root / "tune-state/exp/state.json").write_text("{}")
    os.remove(root / "runs/r1/spec.json.sha256")
    _file_request(store, "req-1", [1])
    os.remove(root / "ledger/requests/req-1.json.sha256")

    report = check_store(store, min_age_s=600)
    assert report.orphans == sorted(stray), report.as_dict()
    young = check_store(store, min_age_s=2 * 3600)
    assert young.uncommitted == sorted(stray) and young.orphans == [], young.as_dict()
    assert {item["key"] for item in report.corrupt} == {"runs/r1/spec.json", "ledger/requests/req-1.json"}
    assert main(["store", "check", "--store", store_url]) == 1
    assert "ckpt-0009.pt" in capsys.readouterr().err

    report = check_and_repair(store_url, repair=True, min_orphan_age_s=600)
    assert report.collected == sorted(stray) and not any((root / name).exists() for name in stray)
    assert (root / "tune-state/exp/state.json").exists() and (root / "runs/r1/spec.json").exists()
    assert "runs/r1/spec.json" in {item["key"] for item in report.corrupt}
