"""The ``steal`` flow: audit how well a black-box target can be extracted (SPEC sections 3, 3b).

Prefect wires three steps; the (attacker, selector, budget, seed) cells fan out as Ray tasks:

1. ``prepare_audit``: open the target (checkpoint or URL; a server is asked up front whether it
   answers what ``target_output`` asks for, so one that answers labels only refuses probabilities
   before any work), draw pool and test set from the pool dataset minus the target's training
   indices (with :func:`~obliviate.extraction.audit.draw_split`, the target's own split when it
   declares its split seed: the bench's on mnist5k with the default sizes), take the target's labels
   on the test set once, and precompute what selectors need on the pool (MI matrices, features) so
   no cell repeats it.
2. ``run_cells``: one Ray task per cell (:func:`actors.extraction.run_cell_task`), as many at once as Ray
   has CPUs. Each cell logs a line when it ends; a cell takes minutes, so off a terminal (no bars) the
   log also names the cells running at least every ``progress_every_s`` (:class:`flows.progress.ProgressLines`).
   A cell waiting on an HTTP target says so ("has not answered for N s") in the flow run's log within
   :data:`WAIT_LINES_EVERY_S`, naming the cell: the lines travel through a
   :class:`~actors.extraction.WaitLines` actor (Ray runs with ``log_to_driver=False``).
3. ``write_report``: JSON + Markdown table + PNG plot + a Prefect table artifact. The three files are
   rendered first, then replaced together through :func:`write_outputs` (the one place that touches
   the output location); they carry the same run id. ``steal.md`` leads with the fewest queries at
   which any attacker and selector measured reaches 90 % and 95 % agreement, naming the pair; the flow
   returns that line too (``headline``), which ``obliviate steal`` prints.

Call ``ray.init(address="local", num_cpus=...)`` once before the ``steal`` flow (the CLI does); the
flow reuses that runtime. The ``extraction-audit`` flow joins Ray itself (:func:`flows.runtime.ensure_ray`:
``RAY_ADDRESS``, which ``obliviate serve`` exports to the runs its runner starts, else a local runtime).

The scheduled ``extraction-audit`` flow (:func:`audit_flow`) asks the same question of the
*current* model of each registered run: the current version's final model is exported as an audit
target checkpoint (``{"arch", "state_dict", "meta"}`` with the run's training ids and the erased rows of
its dataset, the ids it forgot and those of every done or accepted deletion request of the dataset, so the
attacker's pool excludes both: an erased row is not audit data) and :func:`steal_flow` audits it, asking
for what ``target_output`` says (labels by default, as ``steal``). The report's JSON is copied next to the
run in the store: ``runs/<run>/audits/v<version>/report.json``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from actors.extraction import WaitLines, run_cell_task
from flows.artifacts import publish_table
from flows.progress import ProgressLines, bars_drawn, report
from flows.runtime import writable_folder
from obliviate import __version__
from obliviate.data import load_dataset
from obliviate.errors import ConfigError, ObliviateError
from obliviate.extraction.active import AUDIT_SELECTOR
from obliviate.extraction.attackers import ATTACKERS, DEFAULT_ATTACKER, AttackOptions, step_cap_shortfall
from obliviate.extraction.audit import (
    DEFAULT_SEEDS,
    SEED_BUDGETS,
    SEED_COLUMNS,
    SEED_TABLE,
    SEED_TRANSFER_EPS,
    audit_split,
    check_pool_fits_target,
    draw_split,
    fit_split,
    forgotten_rows,
    is_bench_split,
    markdown_report,
    rate_cell,
    rates_said,
    seed_reference,
    summarize,
    target_training_indices,
)
from obliviate.extraction.headline import fewest_queries, headline_sentence, strongest, threat_model, unreached_note
from obliviate.extraction.selectors import SELECTORS, Pool, get_selector, image_entropy
from obliviate.extraction.substitute import TrainConfig, accuracy
from obliviate.extraction.target import (
    DEFAULT_TARGET_WAIT_S,
    OutputMode,
    Target,
    open_backend,
    output_mode,
    save_checkpoint,
)
from obliviate.files import write_failed
from obliviate.models import MODEL_BUILDERS
from storage.objects import ObjectStore
from storage.registry import RunRegistry
from storage.serving import DatasetErasures, group_members, served_model, sharded_runs

_OUT = "the report folder (--out)"
_REPORT_NOT_REPLACED = "No file of the report was replaced: --out holds the previous report, whole, or none."
#: The folders in a report folder that keep an unfinished audit's finished cells (:class:`FinishedCells`).
KEPT_CELLS_PREFIX = ".cells-"


def check_output(location: str) -> None:
    """Refuse a report folder that cannot be created or written into, before an audit spends its queries,
    without creating it: a refused or failed audit leaves no empty folder behind."""
    folder = Path(location).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{_OUT} {str(location)!r} is a file; give a folder path (the report is three files).")
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise ConfigError(
            f"cannot create {_OUT} {str(location)!r}: {str(existing)!r} is a file, not a folder; choose another path."
        )
    # probes with a temporary file: os.access says yes to root where nothing can be created
    writable_folder(existing, what=_OUT if existing == folder else f"the folder that would hold {_OUT}")


def prepare_output(location: str) -> Path:
    """The report folder, created (when the report is written) and checked writable."""
    check_output(location)
    return writable_folder(location, what=_OUT)


def write_outputs(
    location: str, files: dict[str, tuple[str, bytes]], *, kept: FinishedCells | None = None
) -> dict[str, str]:
    """Replace the report's files together: every file is written beside its name first, then all are
    renamed into place with Ctrl-C held off, so a reader finds the previous run's files or this run's,
    never a mix, and no half-written file. A write the system refuses (a full disk) is raised as
    :class:`~obliviate.files.OutputWriteFailed`, naming the file, the reason and the fix.

    Args:
        location: the report folder.
        files: ``{key: (file name, content)}``, every content already rendered.
        kept: where the audit's finished cells are kept, if anywhere: a failed write says whether a rerun
            takes them or starts over.

    Returns:
        ``{key: path}`` of the files written.
    """
    existed = Path(location).expanduser().is_dir()
    folder = prepare_output(location)
    staged: dict[str, tuple[Path, Path]] = {}
    final = folder
    written = False
    try:
        for key, (name, data) in files.items():
            final = folder / name
            partial = final.with_name(f".{name}.partial-{os.getpid()}")
            staged[key] = (partial, final)
            partial.write_bytes(data)
        with sigint_deferred():  # the renames take microseconds; a Ctrl-C among them would leave a mix
            for partial, final in staged.values():
                os.replace(partial, final)
        written = True
    except OSError as err:  # a full disk, a read-only one: the file, the reason and the fix in one line
        raise write_failed(final, err, option="--out", after=_report_lost(kept)) from err
    finally:
        for partial, _ in staged.values():
            partial.unlink(missing_ok=True)
        if not written and not existed:  # a failed write leaves no empty report folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()
    return {key: str(final) for key, (_, final) in staged.items()}


def _report_lost(kept: FinishedCells | None) -> str:
    """What a report that could not be written leaves: its cells kept for the same command, or nothing."""
    if kept is None or kept.unwritable is not None or not kept.folder.is_dir():
        return f"{_REPORT_NOT_REPLACED} This audit's results were not saved anywhere else; a rerun starts it over."
    return f"{_REPORT_NOT_REPLACED} Its finished cells are kept in {kept.folder}: the same command again takes them."


class FinishedCells:
    """The finished cells of one audit, kept in its report folder until its report is written.

    An audit whose target went away for good in its last cell lost every finished cell with it (minutes each:
    "a rerun starts over"). Each cell is written here as it finishes, one JSON file, whole or not at all; the same
    audit run again (same target, answers, pool, split and settings: :func:`audit_fingerprint`) takes them and runs
    only the others. A cell is seeded, so a kept cell is the one a rerun would measure. Writing the report clears
    every kept audit of the folder, as it replaces the report they would have made.

    A cell that cannot be written here (a full disk) is said once and the audit goes on: only the resumption is lost.
    """

    def __init__(self, out: str, *, fingerprint: str) -> None:
        self.folder = Path(out).expanduser() / f"{KEPT_CELLS_PREFIX}{fingerprint[:16]}"
        self.unwritable: str | None = None

    @staticmethod
    def file_name(cell: dict) -> str:
        name = f"{cell['attack']}-{cell['selector']}-k{cell['budget']}-seed{cell['seed']}"
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) + ".json"

    def load(self, cells: Sequence[dict]) -> dict[int, dict]:
        """The kept results of ``cells``: position in ``cells`` -> result. An unreadable file is run again."""
        kept: dict[int, dict] = {}
        for i, cell in enumerate(cells):
            path = self.folder / self.file_name(cell)
            try:
                result = json.loads(path.read_text())
            except (OSError, ValueError):  # absent, or not JSON: the cell runs again
                continue
            same = (result.get("attacker"), result.get("selector"), result.get("budget"), result.get("seed"))
            if same == (cell["attack"], cell["selector"], cell["budget"], cell["seed"]):
                kept[i] = result
        return kept

    def keep(self, cell: dict, result: dict) -> str | None:
        """Write ``result``; returns why it could not be (said once by the caller), or ``None``."""
        if self.unwritable is not None:
            return None
        final = self.folder / self.file_name(cell)
        partial = final.with_name(f".{final.name}.partial-{os.getpid()}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(result, default=float))
            os.replace(partial, final)
        except OSError as err:
            partial.unlink(missing_ok=True)
            self.unwritable = f"{err.strerror or err} ({final})"
            return self.unwritable
        return None

    @staticmethod
    def clear(out: str) -> None:
        """Remove every kept audit of the report folder ``out`` (its report was just written)."""
        folder = Path(out).expanduser()
        for kept in folder.glob(f"{KEPT_CELLS_PREFIX}*") if folder.is_dir() else ():
            shutil.rmtree(kept, ignore_errors=True)


def audit_fingerprint(setup: AuditSetup, config: dict) -> str:
    """What makes two runs of an audit the same one (their cells alike): the settings, the target (a checkpoint's
    bytes, a URL's declared metadata and its answers on the test set), the pool and test set, and this version."""
    digest = hashlib.sha256(__version__.encode())
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(json.dumps(setup.target_meta, sort_keys=True, default=str).encode())
    if not _is_url(setup.target):
        digest.update(Path(setup.target).read_bytes())
    for array in (setup.pool_indices, setup.test_labels, setup.oracle_test_labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C that arrives inside the block until the block ends, then deliver it.

    Only the main thread receives signals (and may set their handlers); elsewhere the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt here


@dataclass(frozen=True)
class AuditSetup:
    target: str
    target_meta: dict
    pool: Pool
    pool_indices: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    oracle_test_labels: np.ndarray
    pool_histogram: list[int]
    pool_entropy: float
    target_accuracy: float
    overlap_warning: str | None
    split: str
    #: rows left out of the pool and test set only because they are erased (``forgotten_indices``, not trained on)
    forgotten_left_out: int = 0


@task(cache_policy=NO_CACHE)
def prepare_audit(
    target: str,
    pool_source: str,
    *,
    pool_size: int,
    test_size: int,
    split_seed: int | None,
    selectors: list[str],
    drmi_starts: int | None,
    timeout_s: float,
    retries: int,
    target_wait_s: float = DEFAULT_TARGET_WAIT_S,
    target_output: str = OutputMode.LABELS.value,
) -> AuditSetup:
    logger = get_run_logger()
    backend, meta = open_backend(
        target,
        timeout_s=timeout_s,
        retries=retries,
        wait_s=target_wait_s,
        on_wait=logger.warning,
        output=output_mode(target_output),
    )
    data = load_dataset(pool_source)
    check_pool_fits_target(pool=data, target_meta=meta)
    exclude, warning = target_training_indices(pool=data, target_meta=meta)
    if warning:
        logger.warning(warning)
    forgotten = forgotten_rows(pool=data, target_meta=meta) if exclude else 0
    if forgotten:
        logger.info("left out of the pool and test set: %d erased row(s) (ids of deletion requests)", forgotten)
    pool_idx, test_idx, split = _pool_and_test(
        data, meta, exclude=exclude, pool_size=pool_size, test_size=test_size, split_seed=split_seed
    )
    logger.info("pool and test set: %s", split)
    pool = Pool(data.images[pool_idx], levels=data.levels, drmi_starts=drmi_starts)
    warm = np.random.default_rng(0)
    for name in selectors:
        spec = get_selector(name)
        if not spec.needs_target:
            # A tiny selection fills the pool's cache (MI matrix, features) once for every cell.
            spec.fn(pool, k=min(2, pool.n), rng=warm)
    oracle = Target(backend, budget=None)
    test_images, test_labels = data.images[test_idx], data.labels[test_idx]
    oracle_test = oracle.query(test_images)
    logger.info(
        "target accuracy on %d test images: %.2f %%",
        len(test_idx),
        100 * accuracy(predicted=oracle_test, truth=test_labels),
    )
    return AuditSetup(
        target=target,
        # the id lists stay out of the report: the forgotten ones are counted (forgotten_left_out), not copied
        target_meta={k: v for k, v in meta.items() if k not in ("train_indices", "forgotten_indices")},
        pool=pool,
        pool_indices=pool_idx,
        test_images=test_images,
        test_labels=test_labels,
        oracle_test_labels=oracle_test,
        pool_histogram=np.bincount(data.labels[pool_idx], minlength=data.num_classes).tolist(),
        pool_entropy=float(image_entropy(pool.images, levels=data.levels).mean()),
        target_accuracy=accuracy(predicted=oracle_test, truth=test_labels),
        overlap_warning=warning,
        split=split,
        forgotten_left_out=forgotten,
    )


def _pool_and_test(
    data, meta: dict, *, exclude: list, pool_size: int, test_size: int, split_seed: int | None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Pool and test indices, and how they were drawn. A target that declares its split
    (``split_seed``, ``train_size``: ``obliviate target train``) gets the rest of its own
    :func:`draw_split` when ``split_seed`` is ``None`` or equal to it (the bench's split when data
    and sizes are the bench's); otherwise the pool and test set are drawn from the images not in
    ``exclude`` with seed ``split_seed`` (0 when ``None``)."""
    declared = meta.get("split_seed"), meta.get("train_size")
    if exclude and None not in declared and split_seed in (None, declared[0]):
        train_size = int(declared[1])
        if train_size + pool_size + test_size <= len(data):
            train_idx, pool_idx, test_idx = draw_split(
                data.labels, train_size=train_size, pool_size=pool_size, test_size=test_size, seed=int(declared[0])
            )
            if sorted(int(i) for i in train_idx) == sorted(int(i) for i in exclude):
                said = f"draw_split(seed={declared[0]}, train_size={train_size})"
                # The bench's only with the bench's data and all three of its sizes: the target's own
                # split drawn with another pool or test size holds other pool and test images.
                bench = is_bench_split(
                    dataset=data.name, train_size=train_size, pool_size=pool_size, test_size=test_size
                )
                return pool_idx, test_idx, said + (f" (the bench's split {declared[0]})" if bench else "")
    seed = 0 if split_seed is None else split_seed
    pool_idx, test_idx = audit_split(data, exclude=exclude, pool_size=pool_size, test_size=test_size, seed=seed)
    # Nothing excluded: the target's training images are unknown here (or none fit this data), so the
    # draw cannot be said to avoid them; the overlap warning says why.
    drawn_from = "the images outside the target's training set" if exclude else "all images (none excluded)"
    return pool_idx, test_idx, f"audit_split(seed={seed}) of {drawn_from}"


def _is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


#: How often, at most, the driver takes the waiting lines of the cells from their WaitLines actor while it waits.
WAIT_LINES_EVERY_S = 2.0
# How long the driver waits for the WaitLines actor to hand its lines over before it gives up on it.
WAIT_LINES_TAKE_S = 10.0


class _CellWaits:
    """The driver's end of the cells' waiting lines: a :class:`~actors.extraction.WaitLines` actor the cells say
    into; :meth:`log` puts what they said in the flow run's log (hence the terminal and Prefect), naming each cell.

    Only an HTTP target is waited for: for a checkpoint no actor (a process of its own) is started.
    """

    def __init__(self, logger: Any, *, http: bool) -> None:
        self.logger = logger
        # num_cpus=0: an actor takes 1 CPU to be placed by default, and every CPU may be running a cell.
        self.actor: Any = ray.remote(num_cpus=0)(WaitLines).remote() if http else None

    def log(self) -> None:
        if self.actor is None:
            return
        try:
            said = ray.get(self.actor.take.remote(), timeout=WAIT_LINES_TAKE_S)
        except ray.exceptions.RayError as err:  # its node lost, say: the cells go on, their lines stay in their logs
            self.logger.warning(
                "the cells' lines about a target that does not answer can no longer be shown here (%s); they are "
                "still in the Ray workers' logs",
                err.__class__.__name__,
            )
            self.actor = None
            return
        for cell, line in said:
            self.logger.warning("%s: %s", _cell_name(cell), line)

    def close(self) -> None:
        if self.actor is not None:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.kill(self.actor)
            self.actor = None


@task(cache_policy=NO_CACHE)
def run_cells(
    setup: AuditSetup,
    cells: list[dict],
    *,
    timeout_s: float,
    retries: int,
    progress_every_s: float | None = None,
    target_wait_s: float = DEFAULT_TARGET_WAIT_S,
    target_output: str = OutputMode.LABELS.value,
    kept: FinishedCells | None = None,
) -> list[dict]:
    """Run ``cells`` on Ray; ``kept``: where finished cells are kept (and taken from, by a rerun of the audit)."""
    logger = get_run_logger()
    if not ray.is_initialized():
        raise ConfigError("Ray is not initialised: call ray.init(address='local', num_cpus=N) before the flow.")
    worker = ray.put(
        {
            "target": setup.target,
            # A cluster's workers cannot read a checkpoint on this machine: its bytes travel with the data.
            "checkpoint": None if _is_url(setup.target) else Path(setup.target).read_bytes(),
            "pool": setup.pool,
            "test_images": setup.test_images,
            "test_labels": setup.test_labels,
            "oracle_test_labels": setup.oracle_test_labels,
            "timeout_s": timeout_s,
            "retries": retries,
            "wait_s": target_wait_s,
            "output": target_output,
        }
    )
    remote = ray.remote(num_cpus=1)(run_cell_task)
    # As many cells in flight as Ray has CPUs (each takes one): the cells in flight are the ones
    # running, so the heartbeat can name them; the next cell starts as soon as one ends.
    width = max(1, int(ray.cluster_resources().get("CPU", 1)))
    taken = kept.load(cells) if kept is not None else {}
    if taken:
        logger.info(
            "%d of the %d cells were finished by an earlier run of this audit (same target, pool, split and "
            "settings): taken from %s, not run again",
            len(taken),
            len(cells),
            kept.folder if kept is not None else "",
        )
    queue = [cell for i, cell in reversed(list(enumerate(cells))) if i not in taken]
    pending: dict[Any, tuple[dict, float]] = {}

    waits = _CellWaits(logger, http=_is_url(setup.target))

    def start_next() -> None:
        cell = queue.pop()
        pending[remote.remote(worker, cell, waits.actor)] = (cell, time.perf_counter())

    t0 = time.perf_counter()
    lines = ProgressLines(len(cells), every_s=progress_every_s)
    results: list[dict] = list(taken.values())
    report("cells", len(results), len(cells))  # the bar shows from the start, not after the first cell (minutes)
    try:
        while queue and len(pending) < width:
            start_next()
        while pending:
            # Woken at least every WAIT_LINES_EVERY_S: a cell's waiting lines are logged while it waits.
            done, _ = ray.wait(
                list(pending), num_returns=1, timeout=max(0.05, min(lines.seconds_to_next(), WAIT_LINES_EVERY_S))
            )
            waits.log()  # before a cell's end or error: what it said while it waited comes first
            if not done:
                # A cell takes minutes: off a terminal (no bars) the log says what runs at least every every_s.
                if lines.quiet_too_long() and not bars_drawn():
                    now = time.perf_counter()
                    logger.info(
                        "cells %d/%d done (%.1f s); running %s",
                        len(results),
                        len(cells),
                        now - t0,
                        ", ".join(f"{_cell_name(c)} (for {now - began:.0f} s)" for c, began in pending.values()),
                    )
                continue
            cell, _ = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayTaskError as err:
                # A cell's own error (the target gone, a refused answer) in its own words: Prefect records the
                # message as the flow run's state, which otherwise held Ray's coloured remote traceback.
                if isinstance(err.cause, ObliviateError):
                    # The report needs every cell: the user is told where the finished ones are kept, if anywhere.
                    # The cell is named as its waiting lines name it, which come before this error.
                    err.cause.args = (f"{_cell_name(cell)}: {err.cause}{_stop_said(kept, len(results), cells)}",)
                    raise err.cause from None
                raise
            if queue:
                start_next()
            logger.info(
                "%s: accuracy %.2f %%, agreement with the target %.2f %% (%.1f s)",
                _cell_name(cell),
                100 * result["accuracy"],
                100 * result["agreement"],
                result["seconds"],
            )
            lines.logged()
            results.append(result)
            unwritable = kept.keep(cell, result) if kept is not None else None
            if unwritable is not None:
                logger.warning(
                    "finished cells cannot be kept for a rerun (%s); the audit goes on, and a rerun after a failure "
                    "would run every cell again",
                    unwritable,
                )
            report("cells", len(results), len(cells))
    finally:
        waits.close()
    order = {(c["attack"], c["selector"], c["budget"], c["seed"]): i for i, c in enumerate(cells)}
    return sorted(results, key=lambda r: order[(r["attacker"], r["selector"], r["budget"], r["seed"])])


def _stop_said(kept: FinishedCells | None, finished: int, cells: Sequence[dict]) -> str:
    """What the error that stops an audit adds about its finished cells: kept for the same command, or lost."""
    said = f" The audit stops: {finished} of its {len(cells)} cells had finished"
    if finished == 0:
        return said + "."
    if kept is None or kept.unwritable is not None:
        return said + ", and they are discarded (the report needs every cell; a rerun starts over)."
    return (
        f"{said}; they are kept in {kept.folder}, and the same command again runs only the other "
        f"{len(cells) - finished}."
    )


def _cell_name(cell: dict) -> str:
    """A cell as the log names it, e.g. ``semi_supervised/auto k=150 seed=0``."""
    return f"{cell['attack']}/{cell['selector']} k={cell['budget']} seed={cell['seed']}"


def _cut_short(config: dict) -> str | None:
    """:func:`step_cap_shortfall` of the audit ``config`` (its ``attack_options.max_steps`` is ``--attack-steps``)."""
    attack = config.get("attack_options") or {}
    if "max_steps" not in attack:
        return None
    return step_cap_shortfall(
        attackers=config["attackers"], budgets=config["budgets"], attack_steps=int(attack["max_steps"])
    )


@task(cache_policy=NO_CACHE)
def write_report(
    setup: AuditSetup, results: list[dict], *, out: str, config: dict, kept: FinishedCells | None = None
) -> dict:
    """Write steal.json, steal.md and steal.png; returns their paths (``json``, ``markdown``, ``png``) and
    ``headline``, the line steal.md leads with (the answer a caller prints). ``kept``: where the audit's finished
    cells are kept, said if the report cannot be written."""
    rows = summarize(results)
    # One id in all three files: a reader can tell they come from the same run.
    run_id = uuid.uuid4().hex[:12]
    best = strongest(results)
    # Per level, the fewest queries at which ANY pair measured reaches it: an owner must plan for the
    # cheapest theft, which need not come from the pair strongest on average.
    reach = {level: fewest_queries(results, level=level) for level in (0.9, 0.95)}
    # Only the DRMI selectors restart; the setting means nothing to a report without one.
    ran_drmi = any(name.startswith("drmi") for name in config["selectors"])
    drmi = f"DRMI restarts: {config['drmi_starts'] or 'one per pool image'}. " if ran_drmi else ""
    # A grid that never reaches 90 % does not show how many queries a theft needs, only that it needs more.
    # The headline is the mean over seeds: a single seed that reached 90 % is named, not hidden.
    unreached = unreached_note(results, level=0.9)
    rerun = f"Rerun with larger --budgets (the default is {','.join(map(str, SEED_BUDGETS))})."
    too_small = (
        [] if unreached is None else [f"**The budgets were too small to show the threat:** {unreached}. {rerun}", ""]
    )
    cut_short = _cut_short(config)
    starved = [] if cut_short is None else [f"**Attackers cut short:** {cut_short}.", ""]
    headline = headline_sentence(at90=reach[0.9], at95=reach[0.95])
    md = [
        "# Model-extraction audit",
        "",
        headline,
        "",
        *too_small,
        *starved,
        (
            f"Target: `{setup.target}` (accuracy on the {len(setup.test_labels)} test images: "
            f"{100 * setup.target_accuracy:.2f} %). Pool: {setup.pool.n} images; {_answers(config)}."
        ),
        (
            f"Attackers: {', '.join(config['attackers'])}; selectors: {', '.join(config['selectors'])}. "
            f"Substitute: {config['substitute']}. FGSM{' (iterative)' if config['iterative'] else ''}. "
            f"{drmi}Seeds per cell: {config['seeds']}. "
            f"Split: {setup.split}.{_forgotten_said(setup.forgotten_left_out)} "
            f"Run id: `{run_id}` (also in steal.json and steal.png)."
        ),
        "",
        threat_model(
            attackers=config["attackers"],
            selectors=config["selectors"],
            substitute=config["substitute"],
            target_arch=setup.target_meta.get("arch"),
            output=config.get("target_output", OutputMode.LABELS.value),
        ),
        f"{rates_said(rows)}; the seed's DRMI numbers (MNIST, LeNet-5) beside them.",
        "",
    ]
    if setup.overlap_warning:
        md += [f"**Warning:** {setup.overlap_warning}", ""]
    report_md = (
        "\n".join(md)
        + "\n"
        + markdown_report(rows, pool_histogram=setup.pool_histogram, pool_entropy=setup.pool_entropy)
    )
    doc = {
        "run_id": run_id,
        "config": config,
        "target": setup.target,
        "target_meta": setup.target_meta,
        "target_accuracy": setup.target_accuracy,
        "pool_class_histogram": setup.pool_histogram,
        "pool_mean_entropy": setup.pool_entropy,
        "overlap_warning": setup.overlap_warning,
        "attackers_cut_short": cut_short,
        "split": setup.split,
        "forgotten_rows_left_out": setup.forgotten_left_out,
        "strongest": {"attacker": best[0], "selector": best[1]},
        "queries_to_agreement": {f"{level:g}": q.to_dict() for level, q in reach.items()},
        "summary": [asdict(r) for r in rows],
        "cells": results,
        "seed_table": {"budgets": list(SEED_BUDGETS), **SEED_TABLE},
    }
    # Every file is rendered before any is replaced: a failure or a Ctrl-C while the plot renders
    # leaves the previous report whole.
    paths = write_outputs(
        out,
        {
            "json": ("steal.json", json.dumps(doc, indent=1, default=float).encode()),
            "markdown": ("steal.md", report_md.encode()),
            "png": ("steal.png", plot_summary(rows, eps=config["eps"], run_id=run_id)),
        },
        kept=kept,
    )
    table = []
    for r in rows:
        seed_acc, seed_tr = seed_reference(r.budget)
        row = {
            "attacker": r.attacker,
            "selector": r.selector,
            "budget": r.budget,
            "accuracy %": rate_cell(r.accuracy_mean, r.accuracy_std, runs=r.runs),
            "agreement %": rate_cell(r.agreement_mean, r.agreement_std, runs=r.runs),
        }
        row |= {f"transfer ε={e} %": f"{100 * r.transfer_mean[e]:.2f}" for e in r.transfer_mean}
        row |= dict(zip(SEED_COLUMNS, (seed_acc, seed_tr), strict=True))
        table.append(row)
    publish_table(
        key="steal-audit",
        title=f"Model-extraction audit of {Path(setup.target).name} (SPEC section 3)",
        rows=table,
        lines=[line for line in md[1:] if line],
        links=paths,
    )
    return paths | {"headline": headline}


def _forgotten_said(count: int) -> str:
    """The report's words for the rows left out because they are erased (nothing when none were)."""
    if not count:
        return ""
    rows = "1 row" if count == 1 else f"{count} rows"
    return (
        f" Also left out of the pool and test set: {rows} erased by deletion requests of its dataset (ids the "
        "target forgot, or never trained on); erased rows are not audit data."
    )


def _answers(config: dict) -> str:
    """What the target answered the attacker, as the report's first lines say it."""
    if config.get("target_output", OutputMode.LABELS.value) == OutputMode.LABELS.value:
        return "label-only queries"
    return "queries answered with class probabilities (--target-output probabilities)"


def plot_summary(rows, *, eps: list[float], run_id: str | None = None) -> bytes:
    """PNG bytes: accuracy, agreement and transferability vs budget, one line per (attacker,
    selector), the seed's DRMI numbers as a dashed reference; ``run_id`` goes in the PNG's
    ``Description`` text chunk, as in steal.json and steal.md.

    The agreement panel marks the headline's levels (90 % and 95 %). The budget axis spans the audit's
    budgets: the seed's curves, measured up to 600 queries, are cut at its edges and their legend says how
    far they go, so a small grid (50, 100) is not squeezed into a tenth of the panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("accuracy", "substitute accuracy %"), ("agreement", "agreement with target %")]
    panels += [(f"{e:g}", f"transferability ε={e:g} %") for e in eps]
    budgets = sorted({int(r.budget) for r in rows})
    low, high = (budgets[0], budgets[-1]) if budgets else (min(SEED_BUDGETS), max(SEED_BUDGETS))
    margin = 0.05 * (high - low) if high > low else 0.1 * high
    beyond = min(SEED_BUDGETS) < low or max(SEED_BUDGETS) > high
    seed = "seed's DRMI" + (f" ({min(SEED_BUDGETS)}-{max(SEED_BUDGETS)} queries, cut at this axis)" if beyond else "")
    # one budget axis for all panels, the audit's: the same budget sits at the same place across a row
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False, sharex=True)
    for ax, (key, title) in zip(axes[0], panels):
        for name in dict.fromkeys(r.label for r in rows):
            rs = sorted((r for r in rows if r.label == name), key=lambda r: r.budget)
            if key in ("accuracy", "agreement"):
                y = [100 * getattr(r, f"{key}_mean") for r in rs]
            else:
                y = [100 * r.transfer_mean[key] for r in rs]
            ax.plot([r.budget for r in rs], y, marker="o", ms=3, label=name)
        if key == "accuracy":
            ax.plot(SEED_BUDGETS, SEED_TABLE["drmi"]["accuracy"], "k--", label=seed)
        elif key == "agreement":  # the levels the headline answers for; the pairs' names are in the first legend
            levels = [
                ax.axhline(level, color="0.35", linestyle=style, linewidth=1, label=f"{level} % agreement")
                for level, style in ((90, ":"), (95, "-."))
            ]
            ax.legend(handles=levels, fontsize=7)
        elif key == f"{SEED_TRANSFER_EPS:g}":  # the seed's transferability is at one ε: elsewhere it compares nothing
            ax.legend(
                handles=ax.plot(SEED_BUDGETS, SEED_TABLE["drmi"]["transferability"], "k--", label=f"{seed}, ε={key}"),
                fontsize=7,
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("query budget")
        ax.grid(alpha=0.3)
    axes[0][0].set_xlim(low - margin, high + margin)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Description": f"run id {run_id}"} if run_id else None)
    plt.close(fig)
    return buf.getvalue()


def check_audit_grid(
    *,
    budgets: Sequence[int],
    selectors: Sequence[str],
    attackers: Sequence[str],
    seeds: int,
    pool_size: int,
    substitute: str,
    eps: Sequence[float],
) -> None:
    """Raise :class:`ConfigError` for an audit grid that cannot run, before anything is loaded or queried."""
    unknown = [s for s in selectors if s not in SELECTORS]
    if unknown or not selectors:
        raise ConfigError(f"unknown selectors {unknown or '(none given)'}: choose from {', '.join(sorted(SELECTORS))}.")
    unknown = [a for a in attackers if a not in ATTACKERS]
    if unknown or not attackers:
        raise ConfigError(f"unknown attackers {unknown or '(none given)'}: choose from {', '.join(ATTACKERS)}.")
    # A value given twice runs its cells twice, and the report counts the copies as independent runs.
    for name, values in (("budgets", budgets), ("selectors", selectors), ("attackers", attackers), ("eps", eps)):
        shown = [format(v, "g") if isinstance(v, float) else str(v) for v in values]  # eps keys columns by "g"
        twice = next((v for i, v in enumerate(shown) if v in shown[:i]), None)
        if twice is not None:
            raise ConfigError(f"{name} (--{name}) lists {twice} twice; got {list(values)}. Give each value once.")
    if not budgets or min(budgets) < 1:
        low = min(budgets) if budgets else "none"
        raise ConfigError(f"--budgets must each be >= 1 (queries bought); got {low}. Give budgets like 50,150,300.")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1 (seeds per budget); got {seeds}. Give 1 or more.")
    if max(budgets) > pool_size:
        raise ConfigError(
            f"a budget buys that many images of the pool, so it can be at most the pool size (--pool-size, "
            f"{pool_size} here); got {max(budgets)}. Lower --budgets or raise --pool-size."
        )
    if substitute not in MODEL_BUILDERS:
        raise ConfigError(f"unknown substitute {substitute!r}: choose one of {', '.join(MODEL_BUILDERS)}.")
    outside = [e for e in eps if not 0 < e <= 1]
    if outside:
        raise ConfigError(f"FGSM radii are on [0, 1] inputs and must be in (0, 1]; got {outside}.")


#: The fewest test images an audit reports agreement on (one image moves it by 1/30 = 3.3 points), for
#: `obliviate steal` and the scheduled audit alike.
MIN_AUDIT_TEST_IMAGES = 30


def check_audit_settings(
    *,
    pool_size: int,
    test_size: int,
    steps: int,
    attack_steps: int,
    rounds: int,
    round_steps: int,
    consistency_steps: int,
    drmi_starts: int | None,
    timeout_s: float,
    retries: int,
    progress_every_s: float | None = None,
    target_wait_s: float = DEFAULT_TARGET_WAIT_S,
    target_output: str = OutputMode.LABELS.value,
    target_key: str | None = None,
) -> None:
    """Raise :class:`ConfigError` naming every audit setting out of range, in the flow's and the CLI's names
    (``target_key`` is the flow's only: it has no option)."""
    rules = [
        ("pool_size", "--pool-size", pool_size, pool_size >= 1, ">= 1"),
        (
            "test_size",
            "--test-size",
            test_size,
            test_size >= MIN_AUDIT_TEST_IMAGES,
            (
                f">= {MIN_AUDIT_TEST_IMAGES} (one test image moves agreement by 1/test_size: "
                f"{100 / MIN_AUDIT_TEST_IMAGES:.1f} points at {MIN_AUDIT_TEST_IMAGES})"
            ),
        ),
        ("steps", "--steps", steps, steps >= 1, ">= 1"),
        ("attack_steps", "--attack-steps", attack_steps, attack_steps >= 1, ">= 1"),
        ("rounds", "--rounds", rounds, rounds >= 0, ">= 0"),
        ("round_steps", "--round-steps", round_steps, round_steps >= 1, ">= 1"),
        ("consistency_steps", "--consistency-steps", consistency_steps, consistency_steps >= 0, ">= 0"),
        (
            "drmi_starts",
            "--drmi-starts",
            drmi_starts,
            drmi_starts is None or drmi_starts >= 0,
            ">= 0 (0: one per image)",
        ),
        ("timeout_s", "--timeout", timeout_s, timeout_s > 0, "> 0 seconds"),
        ("retries", "--retries", retries, retries >= 0, ">= 0"),
        ("target_wait_s", "--target-wait", target_wait_s, target_wait_s >= 0, ">= 0 seconds"),
        (
            "progress_every_s",
            "--progress-every",
            progress_every_s,
            progress_every_s is None or progress_every_s > 0,
            "> 0 seconds",
        ),
        (
            "target_output",
            "--target-output",
            repr(target_output),
            target_output in {m.value for m in OutputMode},
            (
                "'labels' (the default: SPEC section 3's label-only oracle) or 'probabilities' (for a target whose "
                "API returns class probabilities)"
            ),
        ),
        (
            "target_key",
            None,
            repr(target_key),
            target_key is None or (isinstance(target_key, str) and bool(target_key.strip())),
            "a non-empty text naming the target, or None for the target itself",
        ),
    ]
    broken = [
        f"{name}{f' ({option})' if option else ''} must be {rule}; got {value}"
        for name, option, value, ok, rule in rules
        if not ok
    ]
    if broken:
        raise ConfigError("; ".join(broken) + ".")


@flow(name="steal")
def steal_flow(
    target: str,
    pool: str = "mnist5k",
    budgets: Sequence[int] = tuple(SEED_BUDGETS),
    selectors: Sequence[str] = (AUDIT_SELECTOR,),
    seeds: int = DEFAULT_SEEDS,
    out: str = "runs/steal",
    pool_size: int = 2000,
    test_size: int = 1000,
    split_seed: int | None = None,
    substitute: str = "lenet5",
    steps: int = 300,
    attackers: Sequence[str] = (DEFAULT_ATTACKER,),
    attack_steps: int = AttackOptions().max_steps,
    rounds: int = AttackOptions().rounds,
    round_steps: int = AttackOptions().round_steps,
    consistency_steps: int = AttackOptions().consistency_steps,
    eps: Sequence[float] = (0.1, 0.2, 0.3),
    iterative: bool = False,
    drmi_starts: int | None = 32,
    timeout_s: float = 30.0,
    retries: int = 3,
    progress_every_s: float | None = None,
    target_wait_s: float = DEFAULT_TARGET_WAIT_S,
    target_output: str = OutputMode.LABELS.value,
    target_key: str | None = None,
) -> dict:
    """Audit ``target`` with every (attacker, selector, budget, seed) cell; returns the report's paths and headline.

    Args:
        target: checkpoint path (``obliviate target train``) or ``http(s)://.../predict`` URL.
        pool: dataset the attacker's pool and the test set are drawn from (minus the target's
            training indices when the target declares them).
        budgets: query budgets.
        selectors: selector names (see :data:`obliviate.extraction.selectors.SELECTORS`).
        seeds: seeds per (selector, budget): 0 .. seeds-1.
        out: output directory.
        pool_size: attacker's pool size.
        test_size: held-out test size.
        split_seed: seed of the pool/test split (``None``: the target's own split seed when it
            declares one, the bench's split; otherwise 0).
        substitute: substitute architecture (``lenet5`` or ``c3f2``).
        steps: the ``basic`` attacker's training steps.
        attackers: attacker names (see :data:`obliviate.extraction.attackers.ATTACKERS`).
        attack_steps: cap of the supervised phase of ``augmented`` / ``semi_supervised``.
        rounds: self-training rounds of ``pseudo_label``.
        round_steps: steps per self-training round.
        consistency_steps: FixMatch steps of ``semi_supervised`` on the unlabeled pool.
        eps: FGSM radii.
        iterative: I-FGSM instead of FGSM.
        drmi_starts: seeded DRMI restarts (``None``: one per pool image, the SPEC default).
        timeout_s: HTTP timeout.
        retries: HTTP retries on transient errors.
        progress_every_s: while cells run and no terminal shows bars, the log says which cells run at least
            this often (``None``: :data:`flows.progress.PROGRESS_LOG_SECONDS`).
        target_wait_s: how long an unreachable HTTP target (connection refused, HTTP 502/503/504: a restart)
            is retried before the audit fails, seconds (``0``: only ``retries``).
        target_output: what the attacker's queries ask the target for (SPEC section 3): ``labels`` (the default,
            the label-only oracle) or ``probabilities`` (an API that returns class probabilities; the attackers
            train on them). Each image costs one query either way; the metrics compare classes.
        target_key: names the target, in place of ``target``, in what makes a rerun the same audit (its finished
            cells kept, :class:`FinishedCells`), for a target whose address changes between runs of one audit: the
            scheduled audit's server for a sharded run listens on a new port each time. ``None``: ``target``. The
            target's answers on the test set are part of that identity either way.

    Returns:
        ``json``, ``markdown``, ``png``: the report's files; ``headline``: the line steal.md leads with.
    """
    check_audit_grid(
        budgets=budgets,
        selectors=selectors,
        attackers=attackers,
        seeds=seeds,
        pool_size=pool_size,
        substitute=substitute,
        eps=eps,
    )
    check_audit_settings(
        pool_size=pool_size,
        test_size=test_size,
        steps=steps,
        attack_steps=attack_steps,
        rounds=rounds,
        round_steps=round_steps,
        consistency_steps=consistency_steps,
        drmi_starts=drmi_starts,
        timeout_s=timeout_s,
        retries=retries,
        progress_every_s=progress_every_s,
        target_wait_s=target_wait_s,
        target_output=target_output,
        target_key=target_key,
    )
    check_output(out)  # created only when the report is written
    cut_short = step_cap_shortfall(attackers=attackers, budgets=budgets, attack_steps=attack_steps)
    if cut_short is not None:  # said before the cells run (minutes), and again in steal.md and steal.json
        get_run_logger().warning("attackers cut short: %s.", cut_short)
    train = TrainConfig(arch=substitute, steps=steps)
    options = AttackOptions(
        arch=substitute,
        basic_steps=steps,
        min_steps=min(AttackOptions().min_steps, attack_steps),
        max_steps=attack_steps,
        rounds=rounds,
        round_steps=round_steps,
        consistency_steps=consistency_steps,
    )
    t0 = time.perf_counter()
    setup = prepare_audit(
        target,
        pool,
        pool_size=pool_size,
        test_size=test_size,
        split_seed=split_seed,
        selectors=selectors,
        drmi_starts=drmi_starts,
        timeout_s=timeout_s,
        retries=retries,
        target_wait_s=target_wait_s,
        target_output=target_output,
    )
    cells = [
        {
            "attack": a,
            "attack_options": options,
            "selector": s,
            "budget": b,
            "seed": seed,
            "train": train,
            "eps": list(eps),
            "iterative": iterative,
        }
        for a in attackers
        for s in selectors
        for b in budgets
        for seed in range(seeds)
    ]
    config = {
        "target": target,
        "pool": pool,
        "budgets": list(budgets),
        "attackers": list(attackers),
        "attack_options": asdict(options),
        "selectors": list(selectors),
        "seeds": seeds,
        "pool_size": pool_size,
        "test_size": test_size,
        "split_seed": split_seed,
        "substitute": substitute,
        "steps": steps,
        "eps": list(eps),
        "iterative": iterative,
        "drmi_starts": drmi_starts,
        "target_output": target_output,
    }
    same_audit = config if target_key is None else {**config, "target": target_key}
    kept = FinishedCells(out, fingerprint=audit_fingerprint(setup, same_audit))
    results = run_cells(
        setup,
        cells,
        timeout_s=timeout_s,
        retries=retries,
        progress_every_s=progress_every_s,
        target_wait_s=target_wait_s,
        target_output=target_output,
        kept=kept,
    )
    paths = write_report(setup, results, out=out, config=config, kept=kept)
    FinishedCells.clear(out)
    logger = get_run_logger()
    logger.info("audit written to %s in %.0fs", paths["markdown"], time.perf_counter() - t0)
    unreached = unreached_note(results, level=0.9)
    if unreached is not None:
        logger.warning("the budgets were too small to show the threat: %s. Rerun with larger --budgets", unreached)
    return paths


def export_target(registry: RunRegistry, run_id: str, path: Path) -> dict[str, Any]:
    """Write the current model of ``run_id`` as an audit target checkpoint; returns its metadata."""
    current = registry.current(run_id)
    if current is None:
        raise ConfigError(f"run {run_id!r} has no published version to audit; train it first.")
    spec = registry.spec(run_id)
    model = served_model(registry, run_id)  # issue 11: a rolled-back version serves M_s, not M_B
    if model is None:
        raise ConfigError(
            f"run {run_id!r} is paused: its rollback left no checkpoint to serve until the retrain lands."
        )
    # as a run server's GET /info says them: the forgotten ids, and every id of the dataset's done or accepted
    # deletion requests (one this run never trained on too), are erased rows, left out of the audit as well
    forgotten = set(current.deleted_ids) & set(spec.train_ids)
    erased = forgotten | DatasetErasures(registry.store, spec.dataset).ids()
    meta = {
        "num_classes": spec.config.num_classes,
        "image_size": spec.config.image_size,
        "levels": spec.config.levels,
        "dataset": spec.dataset,
        "dataset_fingerprint": spec.dataset_fingerprint,
        "train_indices": [i for i in spec.train_ids if i not in forgotten],
        "forgotten_indices": sorted(erased),
        "run_id": run_id,
        "version": current.version,
    }
    save_checkpoint(path, model=model, arch=spec.config.model, meta=meta)
    return meta


#: Where a scheduled audit that stopped part-way keeps its finished cells for the next one (``audit_flow``'s
#: ``cells_dir``).
DEFAULT_AUDIT_CELLS_DIR = "~/.obliviate/audits"


def _audit_work_folder(cells_root: Path, store_url: str, run: str, *, fallback: Path) -> Path:
    """The folder of ``cells_root`` where the audits of ``run`` of store ``store_url`` work.

    Named by a digest of the two (a run id is any text a store key admits; one store's run never meets
    another's cells). Cells of different versions or settings never mix: each audit keeps its own
    (:func:`audit_fingerprint`), and a report written clears them all. ``fallback`` when ``cells_root``
    cannot be written (said as a warning).
    """
    digest = hashlib.sha256(json.dumps([store_url, run]).encode()).hexdigest()[:20]
    folder = cells_root / digest
    try:
        check_output(str(folder))
        folder.mkdir(parents=True, exist_ok=True)
    except (ConfigError, OSError) as err:
        get_run_logger().warning(
            "the audit of run %s keeps no finished cells for a rerun: %s (audit_flow's cells_dir); it works in %s",
            run,
            err,
            fallback,
        )
        return fallback
    return folder


def _leave_work_folder(work: Path, cells_root: Path) -> None:
    """Remove an audit's work folder unless it keeps finished cells for the next audit, and then ``cells_root``
    if nothing else is left in it. A stored report cleared its cells; an audit that stopped before a cell
    finished has none to keep."""
    if any((work / "report").glob(f"{KEPT_CELLS_PREFIX}*/*.json")):
        return
    shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(OSError):
        cells_root.rmdir()


#: The scheduled audit's DRMI restarts (steal_flow's default is 32).
AUDIT_DRMI_STARTS = 8
#: The scheduled audit's HTTP settings (a sharded run is queried over 127.0.0.1): steal_flow's defaults.
AUDIT_TIMEOUT_S, AUDIT_RETRIES = 30.0, 3


@flow(name="extraction-audit")
def audit_flow(
    store: str,
    run_id: str | None = None,
    budgets: Sequence[int] = (50, 100),
    selectors: Sequence[str] = ("random", "drmi"),
    seeds: int = 1,
    pool_size: int = 200,
    test_size: int = 150,
    steps: int = 100,
    attackers: Sequence[str] = (DEFAULT_ATTACKER,),
    attack_steps: int = 400,
    rounds: int = 1,
    round_steps: int = 300,
    consistency_steps: int = 300,
    target_output: str = OutputMode.LABELS.value,
    cells_dir: str | None = None,
) -> dict[str, Any]:
    """Audit the current model of every registered run (or ``run_id``); returns where reports lie.

    Each run is audited on the images its training left out: the pool and test set shrink to fit
    them (2 : 1), and budgets that no longer fit below the pool are dropped. A run with too few
    such images is skipped with its reason; a run whose audit fails is recorded with its error
    and the others are still audited; the flow run fails at the end, naming them.

    Args:
        store: the store of runs; each report goes to ``runs/<run>/audits/v<version>/report.json``.
        run_id: audit this run only (``None``: every registered run).
        target_output: what the attacker's queries ask each run's model for, as :func:`steal_flow`'s
            ``target_output`` (SPEC section 3): ``labels`` (the default, the label-only oracle) or
            ``probabilities`` (for a service whose API returns class probabilities). Each report's
            ``config.target_output`` and each audited run's entry name it.
        cells_dir: where a run's audit that stops part-way (its process killed, a failed cell) keeps its
            finished cells, for the next audit of the same version with the same settings to take
            (:class:`FinishedCells`); default ``~/.obliviate/audits``. Emptied of each run once its
            report is stored. Not writable: the audit runs in a temporary folder and says so.

    The other arguments are :func:`steal_flow`'s (pool size, test size and budgets fitted to each run
    as above). What :func:`check_audit_settings` rules on (``target_output`` among them) is checked
    by it, as ``steal_flow`` checks its own, before any run is touched.

    Raises:
        ConfigError: a setting out of range, named with its rule.
        AuditFailed: at least one run's audit failed (the others were audited and stored).
    """
    # The settings every run is audited with: a bad one would fail each run alike, after exporting
    # its model, so it is refused here once, by steal_flow's own rule.
    settings = {
        "steps": steps,
        "attack_steps": attack_steps,
        "rounds": rounds,
        "round_steps": round_steps,
        "consistency_steps": consistency_steps,
        "drmi_starts": AUDIT_DRMI_STARTS,
        "target_output": target_output,
    }
    check_audit_settings(
        pool_size=pool_size,
        test_size=test_size,
        timeout_s=AUDIT_TIMEOUT_S,
        retries=AUDIT_RETRIES,
        **settings,
    )
    logger = get_run_logger()
    object_store = ObjectStore(store)
    registry = RunRegistry(object_store)
    # a sharded run is audited as the one model it serves (its shards' mean probability), not shard by shard
    groups = sharded_runs(object_store)
    shards = {member for members in groups.values() for member in members}
    runs = [run_id] if run_id else sorted(groups) + [r for r in registry.run_ids() if r not in shards]
    # the attack settings every run is audited with; each run adds its own target, sizes and budgets
    steal = functools.partial(
        steal_flow,
        selectors=list(selectors),
        seeds=seeds,
        attackers=list(attackers),
        timeout_s=AUDIT_TIMEOUT_S,
        retries=AUDIT_RETRIES,
        **settings,
    )
    cells_root = Path(cells_dir or DEFAULT_AUDIT_CELLS_DIR).expanduser()
    if runs:
        # A run the Prefect runner starts (serve's 03:00 cron, `prefect deployment run`) is a fresh
        # process: join serve's Ray runtime (RAY_ADDRESS, which serve exports) or start a local one,
        # as the unlearn flow's fan-out does. It raised "Ray is not initialised" for every run.
        from flows.runtime import ensure_ray

        ensure_ray()
    reports: dict[str, Any] = {}
    for run in runs:
        try:
            reports[run] = _audit_run(
                registry,
                run,
                steal=steal,
                budgets=list(budgets),
                pool_size=pool_size,
                test_size=test_size,
                cells_root=cells_root,
            )
        except ObliviateError as err:
            reports[run] = {"status": "failed", "reason": str(err)}
            logger.warning("run %s not audited: %s", run, err)
        else:
            if reports[run]["status"] == "skipped":
                logger.warning("run %s not audited: %s", run, reports[run]["reason"])
            else:
                reports[run]["target_output"] = target_output
                logger.info(
                    "run %s version %s audited (%s): %s",
                    run,
                    reports[run]["version"],
                    _answers({"target_output": target_output}),
                    reports[run]["report"],
                )
    failed = {run: r["reason"] for run, r in reports.items() if r["status"] == "failed"}
    if failed:
        raise AuditFailed(f"{len(failed)} of {len(reports)} run(s) could not be audited: {failed}")
    return reports


class AuditFailed(ObliviateError, RuntimeError):
    """At least one run's scheduled audit failed; the others were audited and stored."""


def _audit_run(
    registry: RunRegistry,
    run: str,
    *,
    steal: Callable[..., dict],
    budgets: Sequence[int],
    pool_size: int,
    test_size: int,
    cells_root: Path,
) -> dict[str, Any]:
    """One run's audit on the images its training left out; ``skipped`` with a reason when too few are left.

    A sharded run is queried as it is served, through a :class:`flows.model_server.TargetServer`
    on 127.0.0.1 answering with its shards' mean probability; its training set is the shards' union.

    The audit works in a folder of ``cells_root`` named by the store and the run, which holds the
    exported target (a single-chain run) and the report: an audit that stopped part-way leaves its
    finished cells there, and the next one of the same version takes them. A single-chain run's target
    is its checkpoint there (the same path and bytes make the same audit); a sharded run's server
    listens on a new port each time, so its audit is named by the run and its shards' versions instead
    (``steal_flow``'s ``target_key``). The folder is removed once the report is stored.
    """
    from flows.model_server import RunBackend, TargetServer

    members = group_members(registry.store, run) or [run]
    spec = registry.spec(members[0])
    trained_on = {int(i) for member in members for i in registry.spec(member).train_ids}
    available = len(load_dataset(spec.dataset)) - len(trained_on)
    pool, test = fit_split(available=available, pool_size=pool_size, test_size=test_size)
    fitting = [b for b in budgets if b < pool]
    if not fitting or test < MIN_AUDIT_TEST_IMAGES:
        return {
            "status": "skipped",
            "reason": f"its training left {available} images of {spec.dataset} out, too few for a pool above the "
            f"smallest budget {min(budgets)} and {MIN_AUDIT_TEST_IMAGES} test images; train it with a larger "
            "--heldout-size or audit it with `obliviate steal` on other data",
        }
    with tempfile.TemporaryDirectory(prefix="obliviate-audit-") as tmp, contextlib.ExitStack() as serving:
        work = _audit_work_folder(cells_root, registry.store.url, run, fallback=Path(tmp))
        if work.is_relative_to(cells_root):
            serving.callback(_leave_work_folder, work, cells_root)  # on success and on failure alike
        if len(members) > 1:
            backend = RunBackend(registry.store.url, run)
            server = serving.enter_context(TargetServer(backend=backend, info=backend.spec_info))
            current = [registry.current(m) for m in members]
            target, versions = server.url, [0 if c is None else c.version for c in current]
            version_tag = "-".join(f"v{v:06d}" for v in versions)
            target_key: str | None = f"{registry.store.uri(f'groups/{run}.json')} serving {version_tag}"
        else:
            target = str(work / "target.pt")
            versions = [export_target(registry, run, Path(target))["version"]]
            version_tag, target_key = f"v{versions[0]:06d}", None
        paths = steal(
            target=target,
            target_key=target_key,
            pool=spec.dataset,
            budgets=fitting,
            pool_size=pool,
            test_size=test,
            out=str(work / "report"),
        )
        report_key = f"runs/{run}/audits/{version_tag}/report.json"
        json_path = next((Path(p) for p in paths.values() if str(p).endswith(".json")), None)
        body = json.loads(json_path.read_text()) if json_path else {"paths": paths}
        registry.store.put_json(report_key, body)
    return {
        "status": "audited",
        "version": versions[0] if len(versions) == 1 else versions,
        "report": registry.store.uri(report_key),
        "pool_size": pool,
        "test_size": test,
        "budgets": fitting,
    }
