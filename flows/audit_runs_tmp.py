"""The scheduled extraction audit: how cheaply can the *current* model of each run be stolen?

For every registered run (or one), the current version's final model is exported as an audit
target checkpoint (``{"arch", "state_dict", "meta"}`` with the run's training ids, so the
attacker's pool excludes them) and the ``steal`` flow of the extraction-audit issue
(:func:`flows.steal.steal_flow`, looked up by name at run time) audits it. The report's JSON is
copied next to the run in the store: ``runs/<run>/audits/v<version>/report.json``.
"""

from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from obliviate.errors import ConfigError
from storage.objects import ObjectStore
from storage.registry import RunRegistry

STEAL_FLOW = "flows.steal:steal_flow"
TARGET_SAVER = "obliviate.target:save_checkpoint"


def _by_name(reference: str):
    module_name, attribute = reference.split(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ConfigError(
            f"the extraction audit calls {reference}, which is not installed here ({err}); it comes with the "
            "extraction-audit work (obliviate/target.py, flows/steal.py)."
        ) from err


def export_target(registry: RunRegistry, run_id: str, path: Path) -> dict[str, Any]:
    """Write the current model of ``run_id`` as an audit target checkpoint; returns its metadata."""
    current = registry.current(run_id)
    if current is None:
        raise ConfigError(f"run {run_id!r} has no published version to audit; train it first.")
    spec = registry.spec(run_id)
    chain, _ = registry.load_chain(current)
    meta = {
        "num_classes": spec.config.num_classes,
        "image_size": spec.config.image_size,
        "levels": spec.config.levels,
        "dataset": spec.dataset,
        "dataset_fingerprint": spec.dataset_fingerprint,
        "train_indices": list(spec.train_ids),
        "run_id": run_id,
        "version": current.version,
    }
    _by_name(TARGET_SAVER)(path, chain.model(), arch=spec.config.model, meta=meta)
    return meta


@flow(name="extraction-audit")
def audit_flow(
    store: str,
    run_id: str | None = None,
    budgets: list[int] = [50, 100],
    selectors: list[str] = ["random", "drmi"],
    seeds: int = 1,
    pool_size: int = 200,
    test_size: int = 150,
    steps: int = 100,
) -> dict[str, Any]:
    """Audit the current model of every registered run (or ``run_id``); returns where reports lie."""
    logger = get_run_logger()
    object_store = ObjectStore(store)
    registry = RunRegistry(object_store)
    runs = [run_id] if run_id else registry.run_ids()
    steal = _by_name(STEAL_FLOW)
    reports: dict[str, Any] = {}
    for run in runs:
        with tempfile.TemporaryDirectory(prefix="obliviate-audit-") as tmp:
            target = Path(tmp) / "target.pt"
            meta = export_target(registry, run, target)
            paths = steal(
                target=str(target), pool=meta["dataset"], budgets=list(budgets), selectors=list(selectors),
                seeds=seeds, out=str(Path(tmp) / "report"), pool_size=pool_size, test_size=test_size,
                steps=steps, drmi_starts=8,
            )
            report_key = f"runs/{run}/audits/v{meta['version']:06d}/report.json"
            json_path = next((Path(p) for p in paths.values() if str(p).endswith(".json")), None)
            body = json.loads(json_path.read_text()) if json_path else {"paths": paths}
            object_store.put_json(report_key, body)
            reports[run] = {"version": meta["version"], "report": object_store.uri(report_key)}
            logger.info("run %s version %s audited: %s", run, meta["version"], object_store.uri(report_key))
    return reports
