"""The cron reconcile pass against a store that is down: a sentence in serve's log, not Prefect's traceback.

serve's runner runs each cron ``reconcile`` in a subprocess, where nothing had quieted Prefect's engine:
an outage logged "Encountered exception during execution: StorageUnavailable" with three chained
tracebacks, every five minutes while it lasted. Real moto S3 behind tests/conftest.py's FlakyProxy
(taken down), a real Prefect server; no mocks of obliviate's components.
"""

from __future__ import annotations

import logging

import pytest

from flows.reconcile import reconcile_flow
from flows.unlearn import submit_deletion
from storage import ObjectStore
from storage.ledger import DeletionLedger


@pytest.fixture
def fresh_flow_run_logger():
    """Prefect's flow-run logger as a runner's new subprocess has it: no filter an earlier test installed."""
    logger = logging.getLogger("prefect.flow_runs")
    installed = list(logger.filters)
    for each in installed:
        logger.removeFilter(each)
    yield
    for each in installed:
        logger.addFilter(each)


def test_a_reconcile_pass_against_a_store_that_is_down_fails_with_a_sentence_and_keeps_every_request(
    flaky_s3, prefect_api_url, caplog, fresh_flow_run_logger
):
    with flaky_s3.routed():
        url = "s3://reconcile-outage/store"
        ObjectStore(url).ensure_container()
        submit_deletion(url, [5], dataset="digits", request_id="req-1", emit=False)
        flaky_s3.down()
        with caplog.at_level("INFO", logger="prefect.flow_runs"):
            state = reconcile_flow(store=url, return_state=True)
        flaky_s3.up()
        assert state.is_failed(), state
        assert "the reconcile pass stopped: storage at s3://reconcile-outage/store" in state.message
        assert "unreachable" in state.message and "the next reconcile pass" in state.message
        ended = [
            r for r in caplog.records if r.name == "prefect.flow_runs" and "Encountered exception" in r.getMessage()
        ]
        assert ended and all(r.exc_info is None for r in ended)
        assert "Traceback" not in caplog.text
        assert DeletionLedger(ObjectStore(url)).get("req-1").status == "pending"
