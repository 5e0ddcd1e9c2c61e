"""``serve`` kept a record of every pass it ran in ``ServiceWatcher.passes``: memory grew with each pass
(about 0.6 MB a pass on a long run). It keeps the latest ``PASSES_KEPT`` now, and counts them all."""

from __future__ import annotations

from types import SimpleNamespace

from flows import deployments
from flows.deployments import PASSES_KEPT, ServiceOptions, ServiceWatcher
from obliviate.unlearning.service import RequestError


def test_serve_keeps_the_latest_passes_and_counts_every_one(tmp_path, monkeypatch):
    watcher = ServiceWatcher(
        ServiceOptions(store=f"file://{tmp_path}/store", dispatch="runner"),
        announcement={"pid": 1},
        api_url="http://127.0.0.1:9",
    )
    settled = iter(range(10**6))
    monkeypatch.setattr(watcher, "needs_pass", lambda: True)
    monkeypatch.setattr(deployments, "reconcile_flow", lambda **_: {"settled": {"n": next(settled)}})

    passes = 3 * PASSES_KEPT + 7
    for _ in range(passes):
        watcher.reconcile_if_needed()

    def refused(_parameters):
        raise RequestError("refused for the test")

    monkeypatch.setattr(watcher, "_run_unlearn", refused)
    watcher.handle_event(SimpleNamespace(payload={}, event_id="e-1"))

    assert len(watcher.passes) == PASSES_KEPT
    assert watcher.pass_count == passes + 1
    assert watcher.pass_outcomes == {"reconcile": passes, "refused": 1}
    # the latest, in order
    assert [p["settled"]["n"] for p in list(watcher.passes)[:-1]] == list(range(passes - PASSES_KEPT + 1, passes))
    assert watcher.passes[-1]["outcome"] == "refused" and watcher.passes[-1]["event_id"] == "e-1"
