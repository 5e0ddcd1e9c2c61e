"""One serve stopping stops only its own store's pool: another store's serve on the same Ray runtime keeps its warm one."""

from __future__ import annotations

import time


def _pool_names_once_settled(gone: str) -> set[str]:
    """Named actors of the runtime, once ``gone`` left the list (a kill reaches the GCS a moment later)."""
    import ray

    deadline = time.monotonic() + 10
    while True:
        names = {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)}
        if gone not in names or time.monotonic() > deadline:
            return names
        time.sleep(0.1)


def test_shutdown_pools_kills_only_that_stores_pool(ray_address, tmp_path):
    import ray

    from flows.train import RAY_NAMESPACE, pool_actor_name, shutdown_pools, worker_pool

    store_a, store_b = (f"file://{tmp_path / name}" for name in ("store-a", "store-b"))
    pids = ray.get([pool[0].pid.remote() for pool in (worker_pool(store_a, 1), worker_pool(store_b, 1))])
    assert len(set(pids)) == 2

    assert shutdown_pools(store_a) == 1

    names = _pool_names_once_settled(pool_actor_name(store_a, 0))
    assert pool_actor_name(store_a, 0) not in names
    assert pool_actor_name(store_b, 0) in names, "stopping store a's pool killed store b's warm worker too"
    survivor = ray.get_actor(pool_actor_name(store_b, 0), namespace=RAY_NAMESPACE)
    assert ray.get(survivor.pid.remote(), timeout=30) == pids[1]  # the same warm process, not a restart

    assert shutdown_pools(store_b) == 1
    assert pool_actor_name(store_b, 0) not in _pool_names_once_settled(pool_actor_name(store_b, 0))
