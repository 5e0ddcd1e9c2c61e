"""Request ids and work tokens depend on the set of ids only, and stay what they were for sorted unique ids."""

from __future__ import annotations

import hashlib

from obliviate.unlearning.service import request_id_for, work_token


def test_request_id_ignores_order_and_repeats_and_keeps_stored_ids() -> None:
    assert request_id_for([2, 1], dataset="digits", salt="s") == request_id_for([1, 2], dataset="digits", salt="s")
    assert request_id_for([1, 2, 2], dataset="digits", salt="s") == request_id_for((1, 2), dataset="digits", salt="s")
    assert (
        request_id_for((1, 2), dataset="digits", salt="s") == "del-" + hashlib.sha256(b"digits|1,2|s").hexdigest()[:16]
    )


def test_work_token_ignores_repeats_and_keeps_stored_tokens() -> None:
    assert work_token(base_version=1, excluded_positions=[1, 1], policy="exact") == work_token(
        base_version=1, excluded_positions=[1], policy="exact"
    )
    expected = "u000001-" + hashlib.sha256(b"1|exact|1,3").hexdigest()[:12]
    assert work_token(base_version=1, excluded_positions=frozenset({3, 1}), policy="exact") == expected
