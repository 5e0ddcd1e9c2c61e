"""What Ctrl-C during ``forget`` says: the request it already filed is named, not filed again by a rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from storage import ObjectStore
from storage.ledger import DeletionLedger


def test_ctrl_c_while_forget_waits_names_the_filed_request_and_files_no_second(tmp_path):
    """It said "rerunning the same command resumes from whatever it had stored": the rerun filed a second request."""
    url = f"file://{tmp_path}/store"
    ObjectStore(url).ensure_container()  # a store no serve serves: the request waits for good
    env = {key: value for key, value in os.environ.items() if key not in ("PREFECT_API_URL", "OBLIVIATE_STORE")}
    command = [sys.executable, "-m", "flows.cli", "forget", "--store", url, "--ids", "3,17", "--wait", "300"]
    forget = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = forget.stderr.readline()  # the request line comes before the waiting starts
            said.append(line)
            if line.startswith("request ") or not line:
                break
        assert said and said[-1].startswith("request del-"), "".join(said)
        time.sleep(1)  # in the waiting
        forget.send_signal(signal.SIGINT)
        code = forget.wait(timeout=60)
    finally:
        forget.kill()
    err = "".join(said) + forget.stderr.read()
    request_id = said[-1].split()[1].rstrip(":")
    assert code == 130, err
    assert f"Request {request_id} is recorded in the ledger (pending)" in err, err
    assert f"obliviate forget --status {request_id}" in err and "do not rerun forget --ids" in err
    assert "resumes" not in err and "Traceback" not in err
    assert DeletionLedger(ObjectStore(url)).request_ids() == [request_id]


def test_ctrl_c_says_what_each_forget_action_left():
    """--status, --cancel, --retry and --now had the same "rerunning resumes" sentence, though none resumes."""
    from flows.cli import interrupted_message, parse_args

    def said(*argv: str) -> str:
        return interrupted_message(parse_args(["forget", *argv]))

    assert "nothing to resume" in said("--status", "del-1") and "del-1 is as it was" in said("--status", "del-1")
    assert "may or may not be recorded" in said("--cancel", "del-1")  # before the command ran
    assert "may or may not be queued again" in said("--retry", "del-1")
    assert "files no request" in said("--now")
    assert "No request was filed yet" in said("--ids", "3")
    for argv in (("--status", "del-1"), ("--cancel", "del-1"), ("--retry", "del-1"), ("--now",), ("--ids", "3")):
        assert "resumes" not in said(*argv)
