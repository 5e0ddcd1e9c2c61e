"""Faults injected into the deletion service, each several times → bench/results/service_faults.json.

Real servers on 127.0.0.1, started here: a moto S3 server, a ``prefect server``, one local Ray
runtime (2 CPUs), ``obliviate serve`` in subprocesses. Faults (``--repeats`` each):

* ``poison``: two poison requests (an id beyond int64, a non-integer id; written to the ledger
  around the rules) arrive between good ones; the good request's latency is compared with a good
  request alone, interleaved (normal, then behind poison, in each repeat);
* ``serve_kill``: ``kill -9`` of ``serve`` while it applies a request, then a restart; recovery =
  kill to the request claimed again (takeover), and kill to ``done``;
* ``ray_worker_kill``: ``kill -9`` of the Ray worker process mid-retrain;
* ``flipped_byte``: one bit of a checkpoint the retrain needs flipped; the request fails
  (bounded attempts), ``store check --repair`` rebuilds it, ``--retry`` completes it;
* ``race``: two workers apply two requests to one run at once; the loser's garbage is collected;
* ``s3_outage``: S3 unreachable (a TCP proxy cut) for 8 s during the retrain and publish.

For every repeat: requests lost (not settled as expected), applied twice (a request listed twice
in a version, or a version count that does not match), half-published versions (a sampler reads
the current pointer every 0.3 s during the fault and checks its manifest and every member's
checksum; ``store check`` afterwards), and every final model bit-identical to a retrain without
the deleted ids.

Peer for the serve crash: the old rule took over a crashed worker's claim only after a 600 s
stale limit, at the next 5-minute reconcile (600-900 s; 719 s observed in issue 12). It is not
re-run here (one repetition would take over ten minutes); its configured limit is the peer figure.

Usage: ``nice -n 10 python bench/service_faults.py [--repeats 3]`` (about 15-25 minutes on a
loaded 2-core machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import headline, machine, write_result

SMALL = {
    "data": "digits",
    "model": "lenet5",
    "blocks": 4,
    "epochs": 2,
    "batch_size": 16,
    "learning_rate": 0.005,
    "schedule": "constant",
    "seed": 0,
    "train_size": 400,
    "heldout_size": 150,
}
CHAINS = "runs/run-a/chains"
SLOW = {**SMALL, "epochs": 6, "batch_size": 8, "train_size": 600}  # about a second per block
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate, timeout: float, what: str) -> float:
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - began


class PointerSampler:
    """Reads a run's current pointer every 0.3 s and checks it names a complete, checksummed version."""

    def __init__(self, store_url: str, run_ids: list[str]) -> None:
        from storage.objects import ObjectStore
        from storage.registry import RunRegistry

        self.registry = RunRegistry(ObjectStore(store_url))
        self.run_ids = run_ids
        self.samples = 0
        self.bad: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        from storage.errors import StorageUnavailable

        while not self._stop.wait(0.3):
            for run_id in self.run_ids:
                try:
                    current = self.registry.current(run_id)
                    manifest = self.registry.manifest(current)
                    for member in manifest.members.values():
                        if self.registry.store.info(member.key).sha256 != member.sha256:
                            self.bad.append(f"{run_id} v{current.version}: {member.key} differs")
                    self.samples += 1
                except StorageUnavailable:
                    continue  # an injected outage: the sampler cannot see, which is not a half-published version
                except Exception as err:  # noqa: BLE001 -- anything else is a version readers could not use
                    self.bad.append(f"{run_id}: {type(err).__name__}: {err}"[:300])


def _verdict(store_url: str, run_ids: list[str], expected: dict[str, str]) -> dict[str, Any]:
    """Lost / applied twice / half-published / exact, for a store after a fault."""
    import torch

    from obliviate.data import load_dataset
    from obliviate.unlearning.service import block_data
    from obliviate.unlearning.trainer import train_chain
    from storage.check import check_store
    from storage.ledger import DeletionLedger
    from storage.objects import ObjectStore
    from storage.registry import RunRegistry

    store = ObjectStore(store_url)
    registry, ledger = RunRegistry(store), DeletionLedger(store)
    lost = [r for r, status in expected.items() if ledger.get(r).status != status]
    twice, exact = 0, True
    for run_id in run_ids:
        current = registry.current(run_id)
        applied = list(current.applied_requests)
        twice += len(applied) - len(set(applied))
        spec = registry.spec(run_id)
        chain = registry.load_chain(current)[0]
        positions = set(spec.positions(current.deleted_ids)[0].tolist())
        data = block_data(spec, dataset=load_dataset(spec.dataset))
        naive = train_chain(config=spec.config, data=data, excluded_ids=frozenset(positions)).final.model_state
        exact = exact and all(torch.equal(chain.final.model_state[k], v) for k, v in naive.items())
    report = check_store(store, min_age_s=3600)
    half = len(report.corrupt) + len(report.lineage)
    return {"lost": len(lost), "lost_ids": lost, "applied_twice": twice, "half_published": half, "exact": exact}


def _start_serve(store_url: str, api_url: str, log: Path, lease_s: float) -> subprocess.Popen:
    from flows.unlearn import ENDPOINT_KEY
    from storage.objects import ObjectStore

    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PREFECT_API_URL": api_url,
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PYTHONUNBUFFERED": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--store", store_url, "--audit-cron", "off"]
        + ["--lease", str(lease_s)],
        cwd=ROOT,
        env=env,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    store = ObjectStore(store_url)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited early; see {log}")
        try:
            return store.get_json(ENDPOINT_KEY).get("pid") == process.pid
        except Exception:  # noqa: BLE001 -- not written yet
            return False

    _wait(ready, 240, "serve to be ready")
    return process


def _stop_serve(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _hand_written(store_url: str, request_id: str, ids: list) -> None:
    from storage.objects import ObjectStore

    ObjectStore(store_url).put_json(
        f"ledger/requests/{request_id}.json",
        {"request_id": request_id, "ids": ids, "dataset": "digits", "reason": "bench", "requested_at": time.time()},
    )


def _latency(store_url: str, request_id: str, timeout: float = 400) -> tuple[float, str]:
    from flows.unlearn import wait_outcome

    entry, settled = wait_outcome(store_url, request_id, timeout_s=timeout, poll_s=0.2)
    if not settled:
        return float("nan"), entry["status"]
    finished = float(entry["updated_at"])
    return finished - float(entry["requested_at"]), entry["status"]


def serve_cases(work: Path, api_url: str, repeats: int, lease_s: float, log) -> list[dict[str, Any]]:
    """``poison`` and ``serve_kill`` against one S3 store and a served ``obliviate serve``."""
    from actors.chains import ChainWorker
    from flows.train import run_spec, shutdown_pools
    from flows.unlearn import emit_deletion_event, served_endpoint, submit_deletion
    from storage.ledger import CLAIMED, DONE, REJECTED, DeletionLedger
    from storage.objects import ObjectStore
    from storage.registry import RunRegistry

    url = f"s3://bench-faults-{int(time.time())}/store"
    store = ObjectStore(url)
    store.ensure_container()
    ChainWorker(url).train(run_spec(run_id="run-a", split_seed=0, **SLOW))
    registry, ledger = RunRegistry(store), DeletionLedger(store)
    blocks = registry.entry("run-a")["block_sample_ids"]
    free = {b: list(ids) for b, ids in enumerate(blocks)}

    def take(block: int, n: int = 2) -> list[int]:
        out, free[block] = free[block][:n], free[block][n:]
        return out

    cases: list[dict[str, Any]] = []
    expected: dict[str, str] = {}
    serve_log = work / "serve.log"
    process = _start_serve(url, api_url, serve_log, lease_s)
    try:
        for repeat in range(repeats):
            with PointerSampler(url, ["run-a"]) as sampler:
                alone = submit_deletion(url, take(3), dataset="digits")["request_id"]
                normal, status = _latency(url, alone)
                expected[alone] = DONE
                poisons = [f"poison-{repeat}-big", f"poison-{repeat}-text"]
                _hand_written(url, poisons[0], [2**64])
                _hand_written(url, poisons[1], ["x1"])
                for poison in poisons:
                    emit_deletion_event(store.url, {"request_id": poison}, api_url=api_url)
                    expected[poison] = REJECTED
                behind = submit_deletion(url, take(3), dataset="digits")["request_id"]
                expected[behind] = DONE
                behind_s, behind_status = _latency(url, behind)
                for poison in poisons:
                    _latency(url, poison)
            log(f"poison {repeat}: alone {normal:.1f} s, behind poison {behind_s:.1f} s")
            cases.append(
                {
                    "fault": "poison",
                    "repeat": repeat,
                    "normal_latency_s": normal,
                    "behind_poison_latency_s": behind_s,
                    "statuses": {alone: status, behind: behind_status} | {p: ledger.get(p).status for p in poisons},
                    "pointer_samples": sampler.samples,
                    "pointer_bad": sampler.bad,
                    "survived": status == DONE
                    and behind_status == DONE
                    and all(ledger.get(p).status == REJECTED for p in poisons),
                }
            )

            with PointerSampler(url, ["run-a"]) as sampler:
                victim = submit_deletion(url, take(0), dataset="digits")["request_id"]
                expected[victim] = DONE
                _wait(lambda v=victim: ledger.get(v).status in (CLAIMED, DONE), 300, "the victim to be claimed")
                first_claim = ledger.get(victim)
                os.kill(process.pid, signal.SIGKILL)
                killed = time.monotonic()
                mid_flight = first_claim.status == CLAIMED
                withdrawn_s = _wait(lambda: served_endpoint(store)[0] is None, 120, "withdrawal")
                process = _start_serve(url, api_url, serve_log, lease_s)
                restarted_s = time.monotonic() - killed

                def retaken(v: str = victim, version: int = first_claim.version) -> bool:
                    entry = ledger.get(v)
                    return entry.status == DONE or (entry.status == CLAIMED and entry.version != version)

                _wait(retaken, 600, "the takeover")
                takeover_s = time.monotonic() - killed
                _, status = _latency(url, victim, timeout=600)
                done_s = time.monotonic() - killed
            log(f"serve kill {repeat}: mid-flight {mid_flight}, takeover {takeover_s:.1f} s, done {done_s:.1f} s")
            cases.append(
                {
                    "fault": "serve_kill",
                    "repeat": repeat,
                    "mid_flight": mid_flight,
                    "announcement_withdrawn_s": withdrawn_s,
                    "serve_restarted_s": restarted_s,
                    "recovery_s": takeover_s,
                    "kill_to_done_s": done_s,
                    "attempt": ledger.get(victim).details.get("attempt"),
                    "pointer_samples": sampler.samples,
                    "pointer_bad": sampler.bad,
                    "survived": status == DONE,
                }
            )
    finally:
        _stop_serve(process)
        shutdown_pools(url)
    verdict = _verdict(url, ["run-a"], expected)
    for case in cases:
        case.update(verdict)
    return cases


def _trained_copy(template: Path, work: Path, name: str) -> str:
    target = work / name
    shutil.copytree(template, target)
    return f"file://{target}"


def local_cases(work: Path, repeats: int, moto_port: int, log) -> list[dict[str, Any]]:
    """``ray_worker_kill``, ``flipped_byte``, ``race`` on file:// copies of one trained run; ``s3_outage`` on S3."""
    import ray

    from actors.chains import ChainWorker
    from flows.reconcile import reconcile_flow
    from flows.repair import check_and_repair
    from flows.train import pool_actor_name, run_spec, shutdown_pools, worker_pool
    from flows.unlearn import submit_deletion
    from storage.ledger import DONE, FAILED, DeletionLedger
    from storage.objects import ObjectStore
    from storage.registry import RunRegistry

    template = work / "template"
    ChainWorker(f"file://{template}").train(run_spec(run_id="run-a", split_seed=0, **SLOW))
    blocks = RunRegistry(ObjectStore(f"file://{template}")).entry("run-a")["block_sample_ids"]
    cases: list[dict[str, Any]] = []

    for repeat in range(repeats):
        url = _trained_copy(template, work, f"ray-kill-{repeat}")
        store = ObjectStore(url)
        request = submit_deletion(url, blocks[0][:2], dataset="digits", emit=False)["request_id"]
        pool = worker_pool(url, 1)
        pid = ray.get(pool[0].pid.remote())
        result: dict[str, Any] = {}
        with PointerSampler(url, ["run-a"]) as sampler:
            thread = threading.Thread(target=lambda u=url, r=result: r.update(reconcile_flow(store=u, workers=1)))
            thread.start()
            _wait(lambda s=store: any("/u0" in k for k in s.list(CHAINS)), 300, "the retrain to start")
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            thread.join(timeout=600)
            recovery = time.monotonic() - killed
        status = DeletionLedger(store).get(request).status
        log(f"ray worker kill {repeat}: {status} {recovery:.1f} s after the kill")
        case = {
            "fault": "ray_worker_kill",
            "repeat": repeat,
            "recovery_s": recovery,
            "pointer_samples": sampler.samples,
            "pointer_bad": sampler.bad,
            "survived": status == DONE,
            "pool_actor": pool_actor_name(url, 0),
        }
        case.update(_verdict(url, ["run-a"], {request: DONE}))
        cases.append(case)
        shutdown_pools(url)

    for repeat in range(repeats):
        url = _trained_copy(template, work, f"flip-{repeat}")
        store = ObjectStore(url)
        registry, ledger = RunRegistry(store), DeletionLedger(store)
        key = registry.manifest(registry.current("run-a")).members["3"].key
        path = Path(url.removeprefix("file://")) / key
        damaged = bytearray(path.read_bytes())
        damaged[(len(damaged) // 3) + repeat] ^= 0x10
        path.write_bytes(bytes(damaged))
        request = submit_deletion(url, blocks[3][:2], dataset="digits", emit=False)["request_id"]
        began = time.monotonic()
        with PointerSampler(url, ["run-a"]) as sampler:
            first = reconcile_flow(store=url, workers=1, max_attempts=2)["settled"].get(request)
            failed_s = time.monotonic() - began
            repaired = check_and_repair(url, repair=True, min_orphan_age_s=0)
            ledger.retry(request)
            final = reconcile_flow(store=url, workers=1)["settled"].get(request)
        recovery = time.monotonic() - began
        log(f"flipped byte {repeat}: first {first} after {failed_s:.1f} s, repaired, then {final}")
        case = {
            "fault": "flipped_byte",
            "repeat": repeat,
            "terminal_state_first": first,
            "failed_after_s": failed_s,
            "repaired": [r["key"] for r in repaired.repaired],
            "recovery_s": recovery,
            "pointer_samples": sampler.samples,
            "pointer_bad": sampler.bad,
            "survived": first == FAILED and final == DONE and bool(repaired.repaired),
        }
        case.update(_verdict(url, ["run-a"], {request: DONE}))
        cases.append(case)
        shutdown_pools(url)

    for repeat in range(repeats):
        url = _trained_copy(template, work, f"race-{repeat}")
        store = ObjectStore(url)
        results: dict[str, dict] = {}
        barrier = threading.Barrier(2)

        def apply(request_id: str, ids: list[int], u: str = url, b=barrier, out=results) -> None:
            worker = ChainWorker(u)
            b.wait()
            out[request_id] = worker.unlearn("run-a", {request_id: ids})

        with PointerSampler(url, ["run-a"]) as sampler:
            threads = [
                threading.Thread(target=apply, args=(f"race-{repeat}-1", blocks[2][:2])),
                threading.Thread(target=apply, args=(f"race-{repeat}-2", blocks[3][:2])),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=600)
        report = check_and_repair(url, repair=True, min_orphan_age_s=0)
        current = RunRegistry(store).current("run-a")
        lost_races = sum(len(r.get("lost_races", [])) for r in results.values())
        log(f"race {repeat}: versions {current.version}, lost races {lost_races}, collected {len(report.collected)}")
        case = {
            "fault": "race",
            "repeat": repeat,
            "lost_races_recorded": lost_races,
            "orphans_collected": len(report.collected),
            "pointer_samples": sampler.samples,
            "pointer_bad": sampler.bad,
            "survived": {r["status"] for r in results.values()} == {"published"} and current.version == 3,
            "lost": 2 - len(set(current.applied_requests) & set(results)),
        }
        verdict = _verdict(url, ["run-a"], {})
        case.update({k: v for k, v in verdict.items() if k != "lost" and k != "lost_ids"})
        cases.append(case)

    conftest = ROOT / "tests" / "unlearning" / "service" / "conftest.py"
    spec = importlib.util.spec_from_file_location("service_conftest", conftest)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for repeat in range(repeats):
        url = f"s3://bench-outage-{repeat}-{int(time.time())}/store"
        ObjectStore(url).ensure_container()
        ChainWorker(url).train(run_spec(run_id="run-a", split_seed=0, **SLOW))
        direct = RunRegistry(ObjectStore(url))
        proxy = module.FlakyProxy(moto_port)
        previous = os.environ["AWS_ENDPOINT_URL"]
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        try:
            worker = ChainWorker(url, retry_deadline_s=120)
        finally:
            os.environ["AWS_ENDPOINT_URL"] = previous
        ids = direct.entry("run-a")["block_sample_ids"][0][:2]
        result: dict[str, Any] = {}
        stayed_old = True
        with PointerSampler(url, ["run-a"]) as sampler:
            thread = threading.Thread(
                target=lambda w=worker, i=ids, r=result: r.update(w.unlearn("run-a", {"out-1": i}))
            )
            thread.start()
            _wait(lambda d=direct: any("/u0" in k for k in d.store.list(CHAINS)), 300, "the retrain to start")
            proxy.down()
            began = time.monotonic()
            time.sleep(8)
            stayed_old = direct.current("run-a").version == 1
            proxy.up()
            thread.join(timeout=600)
            recovery = time.monotonic() - began - 8
        proxy.close()
        log(f"s3 outage {repeat}: {result.get('status')}, refused {proxy.refused}, {recovery:.1f} s after it ended")
        # The outage request went straight to the worker (no ledger entry): judge it by the run's versions.
        case = {
            "fault": "s3_outage",
            "repeat": repeat,
            "connections_refused": proxy.refused,
            "old_version_current_during_outage": stayed_old,
            "recovery_s": recovery,
            "pointer_samples": sampler.samples,
            "pointer_bad": sampler.bad,
            "survived": result.get("status") == "published" and stayed_old,
        }
        verdict = _verdict(url, ["run-a"], {})
        case.update({k: v for k, v in verdict.items() if k != "lost_ids"})
        case["lost"] = 0 if "out-1" in direct.current("run-a").applied_requests else 1
        cases.append(case)
    return cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lease", type=float, default=20.0, help="serve --lease (the default)")
    parser.add_argument("--only", default=None, help="serve or local: run one group of faults")
    args = parser.parse_args()
    started = machine()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.server import ThreadedMotoServer

    from flows.runtime import ensure_ray, prefect_api

    moto_port = _free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    os.environ.update(FAKE_AWS)
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{moto_port}"
    os.environ.pop("RAY_ADDRESS", None)
    work = Path(tempfile.mkdtemp(prefix="service-faults-"))
    raw = ROOT / "bench" / "results" / "service_faults"
    raw.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(line: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        print(stamped, flush=True)
        lines.append(stamped)

    cases: list[dict[str, Any]] = []
    began = time.monotonic()
    try:
        with prefect_api(home=work / "prefect") as api_url:
            ensure_ray(num_cpus=2)
            import ray

            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
            if args.only in (None, "serve"):
                cases += serve_cases(work, api_url, args.repeats, args.lease, log)
            if args.only in (None, "local"):
                cases += local_cases(work, args.repeats, moto_port, log)
            ray.shutdown()
    finally:
        moto.stop()
        (raw / "log.txt").write_text("\n".join(lines) + "\n")
        if (work / "serve.log").exists():
            shutil.copy(work / "serve.log", raw / "serve.log")
        shutil.rmtree(work, ignore_errors=True)

    injected = len(cases)
    survived = sum(bool(c["survived"]) and c.get("exact", True) for c in cases)
    lost = sum(int(c.get("lost", 0)) for c in cases if c["fault"] != "serve_kill" and c["fault"] != "poison")
    serve_group = [c for c in cases if c["fault"] in ("serve_kill", "poison")]
    lost += serve_group[0]["lost"] if serve_group else 0  # one verdict for the whole served store
    twice = sum(int(c.get("applied_twice", 0)) for c in cases if c["fault"] not in ("serve_kill", "poison"))
    twice += serve_group[0]["applied_twice"] if serve_group else 0
    half = sum(len(c.get("pointer_bad", [])) for c in cases)
    half += sum(int(c.get("half_published", 0)) for c in cases if c["fault"] not in ("serve_kill", "poison"))
    half += serve_group[0]["half_published"] if serve_group else 0
    crash = [c["recovery_s"] for c in cases if c["fault"] == "serve_kill"]
    poison = [c for c in cases if c["fault"] == "poison"]
    extra = [c["behind_poison_latency_s"] - c["normal_latency_s"] for c in poison]
    heads = [
        headline("faults injected", injected, target=None, better="higher", unit="faults", peer="-"),
        headline(
            "faults survived", survived, target=injected, better="higher", unit="faults", peer="all of them (target)"
        ),
        headline("requests lost", lost, target=0, better="lower", unit="requests", peer="-"),
        headline("requests applied twice", twice, target=0, better="lower", unit="requests", peer="-"),
        headline("half-published versions seen", half, target=0, better="lower", unit="versions", peer="-"),
    ]
    if crash:
        heads.append(
            headline(
                "median recovery after serve kill -9 (kill to takeover, restart included)",
                statistics.median(crash),
                target=60,
                better="lower",
                unit="s",
                peer="600 s stale limit + next 5-min reconcile (old rule, configured value; not re-run)",
            )
        )
    if extra:
        heads.append(
            headline(
                "good request behind a poison one: extra latency over a good request alone (median)",
                statistics.median(extra),
                target=10,
                better="lower",
                unit="s",
                peer="good requests stuck 875 s until the poison was rejected by hand (issue 12)",
            )
        )
    data = {
        "repeats": args.repeats,
        "lease_s": args.lease,
        "seconds": time.monotonic() - began,
        "cases": cases,
        "contention_note": "shared 2-core machine with other jobs running; see machine.load_average_*",
    }
    path = write_result("service_faults", headlines=heads, data=data, started=started)
    _markdown(path, heads, cases)
    print(path)
    return 0


def _markdown(path: Path, heads: list[dict], cases: list[dict[str, Any]]) -> None:
    rows = ["| metric | value | target | peer |", "| --- | --- | --- | --- |"]
    for h in heads:
        value = f"{h['value']:.1f}" if isinstance(h["value"], float) else str(h["value"])
        rows.append(f"| {h['metric']} | {value} {h['unit']} | {h['target']} | {h['peer']} |")
    rows += ["", "| fault | repeat | survived | exact | recovery s |", "| --- | --- | --- | --- | --- |"]
    for c in cases:
        recovery = c.get("recovery_s", c.get("behind_poison_latency_s"))
        shown = f"{recovery:.1f}" if isinstance(recovery, float) else "-"
        rows.append(f"| {c['fault']} | {c['repeat']} | {c['survived']} | {c.get('exact')} | {shown} |")
    path.with_suffix(".md").write_text("# Deletion service under faults\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
