"""Reserving more workers than the Ray cluster has CPUs: refused at once where it cannot grow, said while waiting."""

from __future__ import annotations

import pytest

from obliviate.errors import ConfigError


def test_more_workers_than_a_local_runtime_has_cpus_is_refused_at_once(ray_runtime) -> None:
    """reduce --workers 8 on 2 CPUs said nothing for 120 s, then 'could not reserve ... within 120 s'."""
    from flows import reduce

    with pytest.raises(ConfigError) as refusal:
        reduce.WorkerSlots(8, 1, grows=not reduce._local_session_dirs)  # the 2-CPU local runtime of ray_runtime
    said = str(refusal.value)
    assert said.startswith("the Ray cluster could not reserve 8 workers x 1 CPUs: it has 2 CPUs"), said
    assert "refused at once; lower --workers." in said


def test_a_cluster_that_may_grow_is_waited_for_and_the_wait_says_so(ray_runtime, monkeypatch) -> None:
    from flows import reduce

    monkeypatch.setattr(reduce, "SLOT_NOTICE_EVERY_S", 0.5)
    notices: list[str] = []
    with pytest.raises(ConfigError, match=r"could not reserve 8 workers x 1 CPUs within 2 s \(it has 2 CPUs\)"):
        reduce.WorkerSlots(8, 1, timeout=2.0, grows=True, say=notices.append)
    assert notices, "nothing said while waiting"
    assert notices[0].startswith("waiting for the Ray cluster to reserve 8 workers x 1 CPUs: 0 of 8 placed after ")
    assert "(it has 2 CPUs, 2 free)" in notices[0] and "(2 s), then giving up." in notices[0]
    fits = reduce.WorkerSlots(2, 1)  # what fits is reserved as before
    fits.close()


@pytest.fixture
def shared_prefect_api(prefect_harness, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    return PREFECT_API_URL.value()


@pytest.mark.slow
def test_reduce_on_a_local_runtime_too_small_says_so_at_once(ray_runtime, shared_prefect_api, tmp_path, capsys):
    """The Ray flow on the 2-CPU runtime with 3 workers: 120 s of silence, then the refusal.

    The flow itself, not the CLI: the CLI refuses more workers than this machine's CPUs before Ray starts.
    """
    from flows.reduce import reduce_flow

    with pytest.raises(ConfigError) as refusal:
        reduce_flow(data="digits", k=4, store_url=f"file://{tmp_path}/store", workers=3)
    err = str(refusal.value)
    assert "could not reserve 3 workers x 1 CPUs: it has 2 CPUs and, a local runtime, never grows, so this was " in err
    assert "refused at once; lower --workers." in err
