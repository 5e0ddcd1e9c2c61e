"""A pass waiting on its fan-out says what it waits on, that the store is unreachable, and that it answers again.

A probe killed serve's S3 endpoint right after "claimed 1 request(s): k1": then no line at all for
3 min 40 s. The pass waited in ``ray.get`` while the run's ``ChainWorker`` retried its storage calls
silently (Ray forwards no worker logs to serve's console, and storage's stall notices only fire for a
call left unanswered, not for one refused at once). Now, while the fan-out waits, a thread of its own
names every ``FAN_OUT_LOG_S`` the runs it waits on, asks the store a cheap question itself and, refused,
says the store is unreachable and until when the workers retry it; and then that it answers again.

Real components: a tiny trained run on moto S3, reached through tests/conftest.py's FlakyProxy, which
goes down at the retrain's first checkpoint write and comes back seconds later. The pass runs in a child
process with a local Ray runtime of its own: its workers read the proxy's endpoint from the environment
that runtime starts in (the session's runtime, shared with other tests, points at moto directly).
"""

from __future__ import annotations

import json
import threading
import time

from flows.unlearn import submit_deletion
from storage import ObjectStore
from storage.ledger import DeletionLedger

OUTAGE_S = 8.0

# The pass, as serve runs it, with the fan-out's lines on stderr (flows.unlearn's logger, the fan-out's default;
# a flow run passes its own); lowered timing constants (module-level, as other tests do):
# a line every second, and a question to the store unanswered after 3 s counts as not answered (the proxy, down,
# takes connections and closes them: s3fs retries that for 7-11 s, so the first question asked in the outage must
# end, unanswered, well inside it).
PASS = """
import json, logging, sys
from flows import unlearn
from flows.runtime import ensure_ray
from flows.settle import run_pass

unlearn.FAN_OUT_LOG_S = 1.0
unlearn.STORE_PROBE_WAIT_S = 3.0
handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(logging.Formatter("LINE %(levelname)s %(message)s"))
logger = logging.getLogger("flows.unlearn")
logger.addHandler(handler)
logger.setLevel(logging.INFO)
logger.propagate = False
url = sys.argv[1]
ensure_ray(num_cpus=2)
result = run_pass(
    url,
    unlearn_runs=lambda per_run: unlearn.fan_out_unlearning(url, per_run, policy="exact", verify=False, workers=1)[0],
)
print(json.dumps({"settled": result["settled"]}))
"""


def test_a_store_outage_during_the_fan_out_is_said_and_so_is_its_end(s3_url, flaky_s3, train_r1, child_env, run_python):
    victim = train_r1(s3_url)[1]  # a dataset id block 2 trained on
    with flaky_s3.routed():
        submit_deletion(s3_url, [victim], dataset="digits", request_id="req-1", emit=False)
        env = child_env("RAY_ADDRESS")
    crash = flaky_s3.down_at("PUT", f"/{s3_url.removeprefix('s3://')}/runs/r1/")  # the retrain's first write
    back: list[float] = []

    def bring_back() -> None:
        while not crash.refused:
            time.sleep(0.1)
        time.sleep(OUTAGE_S)
        flaky_s3.up()
        back.append(time.monotonic())

    restorer = threading.Thread(target=bring_back, daemon=True)
    restorer.start()
    done = run_python(PASS, s3_url, env=env, timeout=240)
    flaky_s3.up()
    assert done.returncode == 0, done.stderr[-3000:]
    said = [line.split(" ", 2)[2] for line in done.stderr.splitlines() if line.startswith("LINE ")]
    assert crash.refused and back, "the store never went down during the retrain"
    assert json.loads(done.stdout.splitlines()[-1])["settled"] == {"req-1": "done"}, done.stdout
    assert DeletionLedger(ObjectStore(s3_url)).get("req-1").status == "done"
    assert any(line.startswith("waiting on the unlearning of run r1 for ") for line in said), said
    down = [line for line in said if line.startswith(f"storage {s3_url} is unreachable (")]
    assert down, said
    assert "the unlearning of run r1" in down[0] and "retries its storage calls until about" in down[0], down[0]
    assert " UTC (300 s after the outage was first seen)" in down[0], down[0]
    again = [line for line in said if line.startswith(f"storage {s3_url} answers again, after ")]
    assert len(again) == 1, said
    assert said.index(down[0]) < said.index(again[0]), said
