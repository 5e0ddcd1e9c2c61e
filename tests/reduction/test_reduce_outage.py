"""``reduce`` waits out a storage outage: a real moto server behind a proxy that the test takes down."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest

from obliviate.reduction.drmi import drmi_reduce
from obliviate.reduction.mi import mi_matrix


@pytest.mark.slow
def test_an_s3_outage_while_tiles_are_written_is_waited_out(
    ray_runtime, prefect_harness, moto_endpoint, flaky_s3, small_pool, monkeypatch
):
    from flows.progress import progress_to
    from flows.reduce import reduce_flow
    from storage import ObjectStore

    pool, path = small_pool
    # The flow's store reads its endpoint here and hands it to the workers with every tile.
    monkeypatch.setenv("AWS_ENDPOINT_URL", flaky_s3.endpoint)
    store_url = f"s3://outage-{uuid.uuid4().hex[:8]}/runs"
    events: list[tuple[str, int, int]] = []
    outage: list[threading.Timer] = []

    def listen(stage: str, done: int, total: int) -> None:
        events.append((stage, done, total))
        if stage == "tiles" and done == 1 and not outage:  # tiles are still being written by both workers
            flaky_s3.down()
            outage.append(threading.Timer(6.0, flaky_s3.up))  # longer than botocore and s3fs retry on their own
            outage[0].start()

    try:
        with progress_to(listen):
            result = reduce_flow(data=path, k=10, store_url=store_url, workers=2, tile_size=32, starts=10, seed=7)
    finally:
        for timer in outage:
            timer.join()
        flaky_s3.up()
    assert outage and flaky_s3.refused > 0  # the run did meet the outage

    expected = drmi_reduce(
        mi_matrix(pool.images, levels=pool.levels), k=10, num_starts=10, rng=np.random.default_rng(7)
    )
    assert result["tiles_computed"] == result["tiles_total"] == 15
    assert result["h"] == expected.h and result["best_start"] == expected.best_start
    store = ObjectStore(store_url)
    assert np.array_equal(store.get_array(f"{result['result_key']}/subset.npy"), expected.subset)
    assert [done for stage, done, _ in events if stage == "tiles"][-1] == 15
