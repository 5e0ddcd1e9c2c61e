"""`store check` on a store a fault left behind (fast; a local store, a tiny run, faults made by hand
or by a file-size limit in a child process): a damaged ledger record is one damaged object, not the
end of the check; write checks and failed writes leave nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from actors.chains import ChainWorker
from flows.cli import main
from flows.repair import check_and_repair
from flows.train import run_spec
from storage import ObjectStore
from storage.check import check_store
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


def test_a_failed_write_check_leaves_nothing(store_url):
    """A write check that failed (a full disk) left an empty `.tmp-write-check-<hex>` at the store's
    root (forget, verify and store check --repair each left one); now nothing is left, nor does a
    pointer version whose write fails leave its temporary file."""
    store = ObjectStore(store_url)
    store.ensure_container()
    said = _with_file_size_limit(store_url, 0, "store.check_writable()")
    assert said.startswith(WriteFailed.__name__), said
    assert os.listdir(_root(store_url)) == []

    said = _with_file_size_limit(store_url, 40, "store.swap_pointer('p', {'x': 'y' * 100}, expected_version=0)")
    assert said.startswith(WriteFailed.__name__), said
    assert [name for name in store.stored_names("") if ".tmp-" in name] == []  # the pointer's temporary file
