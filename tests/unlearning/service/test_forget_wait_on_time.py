"""`forget --status ID --wait N` ends about N seconds after it starts, not N + 4-5 s.

Probe 107 timed `--wait 5` at 9.9 s and `--wait 10` at 14.7 s on a loaded machine (`--wait 0`: 1.2 s). The wait
itself was on time; the command imported :mod:`flows.unlearn` (Prefect, 2-5 s) to reach its polling loop, and the
last pause could overrun the end by up to the poll interval. The loop now lives in :mod:`flows.request_wait`
(ledger and leases only) and its last pause is cut to what is left.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
WAIT_S = 2.0

# The same --status without --wait runs first, so what is timed is what --wait adds (on a loaded machine the
# interpreter and the light imports alone take a second or more, whatever --wait asks).
_PROBE = """
import contextlib, io, json, sys, time
from flows.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    assert main({argv!r}[:-2]) == 0
out, err = io.StringIO(), io.StringIO()
began = time.monotonic()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = main({argv!r})
took = time.monotonic() - began
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"prefect", "torch", "ray"}})
print(json.dumps({{"rc": rc, "err": err.getvalue(), "took": took, "heavy": heavy}}))
"""


def test_status_wait_ends_on_time_without_importing_prefect(tmp_path) -> None:
    from storage.ledger import DeletionLedger
    from storage.objects import ObjectStore

    url = f"file://{tmp_path}/store"
    store = ObjectStore(url)
    store.ensure_container()
    DeletionLedger(store).append(request_id="p1", ids=[5], dataset="digits", reason="no serve: stays pending")
    argv = ["forget", "--store", url, "--status", "p1", "--wait", str(WAIT_S)]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(argv=argv)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    said = json.loads(done.stdout.strip().splitlines()[-1])
    assert said["rc"] == 5, said["err"]  # still pending: the wait ran out
    assert f"still not settled after {WAIT_S:.0f} s" in said["err"], said["err"]
    assert said["heavy"] == [], f"a wait on the ledger imported {said['heavy']}"
    assert WAIT_S <= said["took"] < WAIT_S + 1.0, f"--wait {WAIT_S:g} took {said['took']:.2f} s"


def test_the_last_pause_is_cut_to_what_is_left_of_the_wait(tmp_path) -> None:
    from flows.unlearn import wait_outcome  # still importable where README names it
    from storage.ledger import DeletionLedger
    from storage.objects import ObjectStore

    url = f"file://{tmp_path}/store"
    ObjectStore(url).ensure_container()
    DeletionLedger(ObjectStore(url)).append(request_id="p1", ids=[5], dataset="digits", reason="pending")
    began = time.monotonic()
    entry, settled = wait_outcome(url, "p1", timeout_s=0.3, poll_s=5.0)
    took = time.monotonic() - began
    assert (entry["status"], settled) == ("pending", False)
    assert 0.3 <= took < 2.0, f"a 0.3 s wait polled every 5 s took {took:.2f} s"
