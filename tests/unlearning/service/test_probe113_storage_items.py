"""Small findings of a new user's probe on S3 (probe 113, items 3, 4, 6, 7).

* A write to a store whose bucket is gone named `forget` among the commands that prepare a store, but `forget`
  refuses a missing store: only `train` and `serve` create one.
* `store check` after `tune` on S3 listed a "file not written by obliviate" with an empty name: the store's own
  folder marker (`prefix/`, an empty key Ray Tune writes). Folder markers are no files; a user's file still is.
* A store call with no retry around it (serve's own checks, `store check`) gave its own 120 s bound in words that
  read like the run's ("still waiting and retrying until ..."), beside the flow's 300 s one: it says now that it
  is this one call's bound; a call inside the retries still names the retries' deadline.
* `submit -- store check` was refused because "the job would write to file://./runs": it only reads. A read-only
  job is refused only when its store would not travel with the upload, and says so.

S3 cases run against the moto server of tests/conftest.py.
"""

from __future__ import annotations

import json
import socket
import time
import uuid

import pytest

from flows.cli import main
from storage import ObjectStore, retry
from storage.check import check_store
from storage.errors import WriteFailed
from storage.retry import RetryPolicy, retry_unavailable


def test_a_write_to_a_missing_bucket_names_only_commands_that_create_a_store(moto_endpoint):
    store = ObjectStore(f"s3://gone-{uuid.uuid4().hex[:10]}/prod")
    with pytest.raises(WriteFailed) as raised:
        store.put_json("ledger/verifications/v.json", {"passed": True})
    said = str(raised.value)
    assert "does not exist" in said and "`obliviate train` or `obliviate serve`" in said, said
    assert "forget" not in said, said


def test_store_check_on_s3_leaves_folder_markers_out_of_the_foreign_files(s3_url, moto_endpoint, capsys):
    import boto3

    bucket, prefix = s3_url.removeprefix("s3://").split("/", 1)
    store = ObjectStore(s3_url)
    store.put_json("groups/g1.json", {"runs": ["r1"]})
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    # the empty folder markers Ray Tune left on the probe's store, and one an S3 console makes for a user's folder
    for marker in ("", "tune-state/", "tune-state/tr1/", "notes/"):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{marker}", Body=b"")
    client.put_object(Bucket=bucket, Key=f"{prefix}/notes/steal.json", Body=b"{}")  # a user's file: still foreign

    report = check_store(store, min_age_s=0)
    assert report.foreign == ["notes/steal.json"], report.as_dict()
    assert report.orphans == [] and report.corrupt == [] and report.healthy, report.as_dict()

    assert main(["store", "check", "--store", s3_url]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["foreign"] == ["notes/steal.json"], out.out
    assert "1 file(s) not written by obliviate left alone (not checked, never collected): notes/steal.json" in out.err
    assert not out.err.rstrip().endswith(": "), out.err


@pytest.fixture
def notices(monkeypatch):
    seen: list[str] = []
    previous = retry.set_stall_reporter(seen.append)
    monkeypatch.setattr(retry, "STALL_NOTICE_AFTER_S", 0.5)
    yield seen
    retry.set_stall_reporter(previous)


def _stalled(store: str) -> None:
    with retry.watched_call(store, "http://127.0.0.1:9"):
        time.sleep(2.0)  # no answer: the watch reports it after 0.5 s


def test_a_call_without_retries_says_its_bound_is_its_own(notices):
    _stalled("s3://probe113/lone")
    stalled = [line for line in notices if "has not answered" in line]
    assert stalled, notices
    assert "this one call's bound, then it fails" in stalled[0], stalled[0]
    assert "retrying" not in stalled[0], stalled[0]
    left = int(stalled[0].split("(in ")[1].split(" s)")[0])
    assert retry.CALL_LIMIT_S - 3 <= left <= retry.CALL_LIMIT_S, stalled[0]


def test_a_call_inside_the_retries_names_their_deadline(notices):
    retry_unavailable(lambda: _stalled("s3://probe113/retried"), policy=RetryPolicy(deadline_s=280.0))
    stalled = [line for line in notices if "has not answered" in line]
    assert stalled, notices
    assert "still waiting and retrying until" in stalled[0] and "then the call fails" in stalled[0], stalled[0]
    assert "this one call" not in stalled[0], stalled[0]
    left = int(stalled[0].split("(in ")[1].split(" s)")[0])
    assert 275 <= left <= 280, stalled[0]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _submit(job: list[str]) -> int:
    # nothing listens on the port: a job past the checks fails on the connection
    return main(["submit", "--address", f"http://127.0.0.1:{_free_port()}", "--no-wait", "--", *job])


@pytest.mark.parametrize("job", [["store", "check", "--store", "file://mystore"], ["forget", "--status", "del-1"]])
def test_submit_lets_a_read_only_job_on_a_relative_store_that_travels_with_the_upload(
    job, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OBLIVIATE_STORE", "file://mystore")
    (tmp_path / "mystore").mkdir()
    assert _submit(job) == 2
    err = capsys.readouterr().err
    assert "no Ray cluster answers" in err and "would write" not in err, err


def test_submit_refuses_store_check_on_the_default_store_with_the_true_rule(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OBLIVIATE_STORE", raising=False)
    assert _submit(["store", "check"]) == 2
    err = capsys.readouterr().err
    assert "the job reads the store file://./runs (the default store), inside runs/, which submit does not upload" in (
        err
    ), err
    assert "would find no store there" in err and "Nothing was sent to the cluster" in err, err
    assert "would write" not in err and "results would be lost" not in err, err
    # --repair writes: the results rule still holds
    assert _submit(["store", "check", "--repair"]) == 2
    assert "the job would write to file://./runs (the default store)" in capsys.readouterr().err
