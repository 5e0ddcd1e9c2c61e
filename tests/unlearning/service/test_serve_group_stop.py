"""``obliviate serve`` stopped by a SIGTERM to its whole process group, as systemd stops a service.

A SIGTERM to serve's pid alone hands the request it is working on back (``pending``, its attempt
not counted). Sent to the group (systemd's default ``KillMode=control-group``, ``kill -TERM --
-PGID``), serve's own local Ray runtime gets it too: the retrain's workers died before serve's
handler marked the pass as stopping, so the flow run ended ``Crashed``, the request stayed
``claimed`` until its lease lapsed, and serve's log filled with "--- Logging error ---" tracebacks.
"""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_serve_stopped_by_a_sigterm_to_its_process_group_hands_the_request_back(serve_stopped_by_a_group_sigterm):
    stopped = serve_stopped_by_a_group_sigterm()
    # The defect: the request stayed "claimed" until its lease lapsed.
    stopped.assert_handed_back_or_settled()
    text = stopped.text
    # the unlearn flow run ends as on a SIGTERM to serve alone, not Crashed when serve exits
    assert "Finished in state Completed()" in text and "Crash detected" not in text, text[-3000:]


@pytest.mark.slow
def test_serve_whose_ray_shutdown_outlasts_its_bound_says_where_it_waits(serve_stopped_by_a_group_sigterm):
    """With its Ray runtime gone, serve ends the pass under way by ray.shutdown(), which waits on the dead GCS first.

    Here Ray is made to wait 30 s there (its task-event flush timeout: 5 s by default, 1 s under serve), past serve's
    20 s bound. serve said nothing for those 20 s, handed the request back itself, and exited once Ray's clean-up at
    exit had waited for that shutdown: the pass it let go then ran with the interpreter half torn down ("--- Logging
    error ---" tracebacks), its flow run's final state logged in them or lost. Then serve waited for the shutdown
    itself, but in one run of two the pass's blocking ray.get never returned after the shutdown did, and the flow run
    still had no final state. Now the pass's wait ends as serve begins to disconnect: the pass hands its request back
    itself and its flow run ends Completed; serve says where Ray's shutdown waits and goes on without it.
    """
    ray_env = {"RAY_task_events_shutdown_flush_timeout_ms": "30000"}
    # A retrain of about 45 s (4 blocks of 2500 epochs): Ray's workers may outlive the group signal (see the fixture), and
    # a 20 s retrain then finished before serve's 20 s bound in one CI run, so the request was settled and this test had
    # nothing to check. Deleting from block 0 makes the retrain as long as the training (3 blocks of 4500 epochs from
    # block 1 made a 135 s training for a 60 s retrain: 168 s, the suite's slowest test).
    stopped = serve_stopped_by_a_group_sigterm(ray_env=ray_env, epochs=2500, deleted_block=0)
    text, entry, history, handed_back_s = stopped.text, stopped.entry, stopped.history, stopped.handed_back_s
    assert entry.status == "pending" and entry.details["attempts"] == 0, (entry.details, text[-3000:])
    assert history == ["pending", "claimed", "pending"]
    said = [line for line in text.splitlines() if "Ray's shutdown has not returned after 20 s" in line]
    assert len(said) == 1 and "it waits in shutdown" in said[0], text[-3000:]  # inside its core worker's shutdown
    assert said[0].endswith("serve goes on without it"), said  # the pass had ended: nothing of it to hand back
    assert handed_back_s is not None and "obliviate serve: stopped;" in text, text[-3000:]
    assert "Logging error" not in text and "Traceback" not in text, text[-3000:]
    stopped = text.index("obliviate serve: stopped;")
    assert "Finished in state Completed()" in text[:stopped], text[-3000:]
    assert "had not ended when serve's stop gave up waiting" not in text, text[-3000:]
    # the pass handed its request back itself, as a stop, not serve for it nor as another pass's take-over
    assert "obliviate serve: request group-1 handed back" not in text, text[-3000:]
    assert "taken over by another pass" not in text, text[-3000:]
