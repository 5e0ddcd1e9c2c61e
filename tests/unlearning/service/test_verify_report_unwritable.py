"""`verify` whose report folder (ledger/verifications/ in the store) cannot be written.

It replayed every block, then failed to record the result and printed nothing of it: the root of the
store was probed, not the folder the report goes to. Now that folder is probed before any replay,
and a report that still cannot be written (a disk that filled during the replay) carries the verdict.
The faults are real: a file where the folder should be, a folder where the report file should be.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from actors.chains import ChainWorker
from flows.cli import main
from flows.train import run_spec
from flows.verify import verify_run
from storage import ObjectStore
from storage.errors import WriteFailed


@pytest.fixture
def trained_store(tmp_path: Path, tiny_run) -> tuple[str, Path]:
    url = f"file://{tmp_path / 'store'}"
    ObjectStore(url).ensure_container()
    ChainWorker(url).train(run_spec(run_id="v-run", **tiny_run(split_seed=0)))
    return url, tmp_path / "store"


def test_verify_refuses_before_replaying_when_its_report_folder_cannot_be_written(trained_store, capsys) -> None:
    url, root = trained_store
    (root / "ledger").mkdir(exist_ok=True)
    (root / "ledger" / "verifications").write_text("not a folder")
    code = main(["verify", "--store", url, "--run", "v-run", "--blocks", "all", "--no-prefect"])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err and captured.err.count("\n") == 1, captured.err
    assert f"verify records its result under {url}/ledger/verifications, and that cannot be written" in captured.err
    assert "Nothing was replayed; make that folder writable" in captured.err
    assert "bit-identical" not in captured.err  # no replay ran
    # the same refusal for a by-hand call of the flow's work
    with pytest.raises(WriteFailed, match="Nothing was replayed"):
        verify_run(url, "v-run", blocks="4")
    assert (root / "ledger" / "verifications").read_text() == "not a folder"


def test_a_report_that_cannot_be_written_after_the_replay_carries_its_verdict(trained_store, capsys) -> None:
    url, root = trained_store
    reports = root / "ledger" / "verifications"
    reports.mkdir(parents=True)
    # a folder under every name the report can take in the next minutes: the folder is writable, the file is not
    now = int(time.time())
    for second in range(now, now + 300):
        (reports / f"v-run-v000001-{second}.json").mkdir()
    code = main(["verify", "--store", url, "--run", "v-run", "--blocks", "4", "--no-prefect"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    assert "The replay's result was not recorded: verify v-run v1: passed; 1/1 replayed blocks bit-identical" in err
