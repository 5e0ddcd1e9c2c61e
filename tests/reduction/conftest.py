"""Real servers for the reduction tests, all on 127.0.0.1 and started here.

* ``s3_store``: a fresh bucket on the session's moto S3 server (``tests/conftest.py``), reset before each test.
* ``ray_runtime``: one local Ray runtime for the session (``address="local"``, no dashboard).
* ``prefect_harness``: Prefect's test harness (a temporary API server and database).
* ``make_mnist_pool``: real MNIST pools (n per class) as ``.npz`` files the reduce flow loads by path;
  ``small_pool`` is the 150-image one.

Fake credentials and the endpoint are put in the environment before Ray starts, so Ray's
worker processes inherit them as real deployments would.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import requests

from obliviate.data import load_dataset


@pytest.fixture
def s3_store(moto_endpoint):
    import s3fs

    from storage import ObjectStore

    requests.post(f"{moto_endpoint}/moto-api/reset", timeout=10).raise_for_status()
    s3fs.S3FileSystem.clear_instance_cache()
    store = ObjectStore(f"s3://test-bucket-{uuid.uuid4().hex[:8]}/runs")
    store.ensure_container()
    return store


@pytest.fixture
def file_store(tmp_path):
    from storage import ObjectStore

    return ObjectStore(f"file://{tmp_path}/store")


@pytest.fixture(params=["file", "s3"])
def store(request):
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture(scope="session")
def ray_runtime(moto_endpoint):
    import ray

    from flows.runtime import ensure_ray

    # A runtime left by an earlier test (an in-process CLI call) has workers started before the
    # S3 endpoint was in the environment; start a fresh one that inherits it.
    if ray.is_initialized():
        ray.shutdown()
    ensure_ray(address="local", num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_harness():
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def make_mnist_pool(tmp_path_factory):
    """Makes pools of the first ``per_class`` real MNIST images of each class, with the ``.npz`` the flow loads."""

    def make(*, per_class: int):
        data = load_dataset("mnist5k")
        idx = np.concatenate([np.flatnonzero(data.labels == c)[:per_class] for c in range(10)])
        pool = data.subset(idx)
        path = tmp_path_factory.mktemp("pool") / f"mnist{10 * per_class}.npz"
        np.savez(path, images=pool.images, labels=pool.labels)
        return pool, str(path)

    return make


@pytest.fixture(scope="module")
def small_pool(make_mnist_pool):
    """150 real MNIST images (15 per class): 15 tiles of side 32."""
    return make_mnist_pool(per_class=15)
