"""Shared fixtures of the extraction-audit tests: a small real MNIST slice, a tiny target, Prefect and Ray."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from obliviate.data import load_dataset, stratified_split
from obliviate.extraction.substitute import TrainConfig, train_classifier


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    # CI has 2 shared cores; one intra-op thread avoids oversubscription with Ray workers.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def mnist():
    return load_dataset("mnist5k")


@pytest.fixture(scope="session")
def split(mnist):
    """Stratified (train 300, pool 120, test 100) indices of real MNIST."""
    return stratified_split(mnist.labels, sizes=(300, 120, 100), rng=np.random.default_rng(7))


@pytest.fixture(scope="session")
def target_model(mnist, split):
    train_idx = split[0]
    return train_classifier(
        images=mnist.images[train_idx], labels=mnist.labels[train_idx], config=TrainConfig(steps=60), seed=3
    )


@pytest.fixture(scope="session")
def pool_images(mnist, split):
    return mnist.images[split[1]]


@pytest.fixture(scope="module")
def prefect_server():
    """One test module's Prefect test server, named by ``PREFECT_API_URL``.

    Also for a test that runs a flow or creates an artifact without Ray: with no API configured, Prefect would
    start a temporary server of its own and leave it running until the test session ends.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        from prefect.settings import PREFECT_API_URL

        # the CLI uses a configured server, as a user's PREFECT_API_URL, instead of starting its own
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
        try:
            yield PREFECT_API_URL.value()
        finally:
            os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="module")
def prefect_and_ray(prefect_server):
    """:func:`prefect_server` and a local Ray runtime of 2 CPUs."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def steal_served_run(prefect_and_ray, tmp_path):
    """``steal_served_run(store_url, run_id)``: a tiny audit (random queries, basic attacker, budget 15 of a 100-image
    pool) of ``run_id`` served by ``target serve``'s backend; the report's paths (json, markdown, ...)."""

    def audit(store_url: str, run_id: str) -> dict:
        from flows.audit import steal_flow
        from flows.model_server import RunBackend, TargetServer

        backend = RunBackend(store_url, run_id, refresh_s=0.0)
        with TargetServer(backend=backend, info=backend.spec_info) as server:
            return steal_flow(
                target=server.url,
                pool="digits",
                seeds=1,
                budgets=[15],
                selectors=["random"],
                attackers=["basic"],
                pool_size=100,
                test_size=80,
                steps=10,
                eps=[0.3],
                out=str(tmp_path),
            )

    return audit
