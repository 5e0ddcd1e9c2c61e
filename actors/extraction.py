"""Ray-side work of the extraction audit: one (attacker, selector, budget, seed) cell per call.

Plain code, made remote at the call site (``ray.remote(run_cell_task)``, ``ray.remote(WaitLines)``); each call
is one call into :func:`obliviate.extraction.audit.run_cell`.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from obliviate.extraction.attackers import AttackOptions
from obliviate.extraction.audit import run_cell
from obliviate.extraction.selectors import Pool
from obliviate.extraction.substitute import TrainConfig
from obliviate.extraction.target import (
    DEFAULT_TARGET_WAIT_S,
    BudgetExceeded,
    OutputMode,
    Target,
    open_backend,
    output_mode,
)

DEFAULT_CLASSES = 10  # run_cell's default, for a target that does not declare its classes
# How long a cell that said it waited holds its result back for those lines to reach the driver's WaitLines.
WAIT_LINES_FLUSH_S = 5.0
#: The keys of a cell that name it in a waiting line (the driver names it from them, as its other lines do).
CELL_KEYS = ("attack", "selector", "budget", "seed")


class AuditWorker:
    """Holds one target connection and the audit's data; runs cells against them.

    Args:
        target: checkpoint path or ``http(s)://`` URL.
        pool: the attacker's pool (with any precomputed selector cache).
        test_images: held-out images.
        test_labels: their true labels.
        oracle_test_labels: the target's labels on the test images (computed once by the driver).
        timeout_s: HTTP timeout per request.
        retries: HTTP retries on transient errors.
        wait_s: how long an unreachable HTTP target is retried (a restart).
        on_wait: what is done with each waiting line of the HTTP target ("has not answered for N s");
            by default it goes to stderr (on a Ray worker: the worker's log only).
        output: what the attacker's queries ask the target for: ``labels`` (SPEC section 3's default) or
            ``probabilities``; the metrics' oracle asks for labels either way.
    """

    def __init__(
        self,
        *,
        target: str,
        pool: Pool,
        test_images: np.ndarray,
        test_labels: np.ndarray,
        oracle_test_labels: np.ndarray,
        timeout_s: float = 30.0,
        retries: int = 3,
        wait_s: float = DEFAULT_TARGET_WAIT_S,
        on_wait: Callable[[str], None] | None = None,
        output: str = OutputMode.LABELS.value,
    ) -> None:
        self.output = output_mode(output, option="target_output (--target-output)")
        self.backend, self.meta = open_backend(
            target,
            timeout_s=timeout_s,
            retries=retries,
            wait_s=wait_s,
            on_wait=on_wait or _say_on_stderr,
            output=self.output,
        )
        self.pool = pool
        self.test_images = test_images
        self.test_labels = test_labels
        self.oracle_test_labels = oracle_test_labels

    def run_cell(
        self,
        *,
        selector: str,
        budget: int,
        seed: int,
        train: TrainConfig,
        eps: Sequence[float],
        iterative: bool,
        attack: str = "basic",
        attack_options: AttackOptions | None = None,
    ) -> dict:
        # The substitute has this many outputs; a label past them is refused at the query, in words, instead
        # of failing inside training ("IndexError: Target 10 is out of bounds").
        num_classes = int(self.meta.get("num_classes", DEFAULT_CLASSES))
        attacker = Target(self.backend, budget=budget, output=self.output, num_classes=num_classes)
        oracle = Target(self.backend, budget=None, num_classes=num_classes)
        try:
            cell = run_cell(
                selector=selector,
                budget=budget,
                seed=seed,
                pool=self.pool,
                attacker=attacker,
                oracle=oracle,
                test_images=self.test_images,
                test_labels=self.test_labels,
                train=train,
                eps=eps,
                iterative=iterative,
                num_classes=num_classes,
                oracle_test_labels=self.oracle_test_labels,
                attack=attack,
                attack_options=attack_options,
            )
        except BudgetExceeded as err:
            # The refused batch is in the log too: the error says what the cell asked before it.
            raise BudgetExceeded(
                f"{err} Cell {attack}/{selector} k={budget} seed={seed}; its queries (digest, size, refused, output): "
                f"{[list(q.values()) for q in query_log(attacker)]}."
            ) from None
        # SPEC 3: every query is logged; the log goes into the cell's record (steal.json), one entry per batch.
        return cell.to_dict() | {
            "query_calls": len(attacker.log),
            "queries_used": attacker.used,
            "target_output": attacker.output.value,
            "queries": query_log(attacker),
        }


def query_log(target: Target) -> list[dict[str, Any]]:
    """The target's log, compact: per query batch its digest (SHA-256 of the images, 16 hex), size, refusal and
    what it asked for (``output``: ``labels`` or ``probabilities``; a refused batch asked and was not answered).

    The answers themselves stay out: a probabilities cell would carry a row of class probabilities per image
    (600 x 10 floats at budget 600), and what they amount to is in the cell's class histogram and metrics.
    """
    return [{"digest": q.digest, "size": q.size, "refused": q.refused, "output": q.output.value} for q in target.log]


def run_cell_task(worker: dict, cell: dict, wait_lines: Any = None) -> dict:
    """One cell as a Ray task: ``worker`` holds :class:`AuditWorker`'s arguments, ``cell`` :meth:`run_cell`'s.

    ``worker["checkpoint"]``, when not ``None``, is the target checkpoint's bytes: a cluster's node cannot read
    the driver's file, so the target is opened from a copy of them here.

    ``wait_lines``, when not ``None``, is the handle of the driver's :class:`WaitLines` actor: each waiting line
    of the HTTP target goes to it with the cell's :data:`CELL_KEYS`, for the driver to log while the cell waits
    (the driver's Ray runs with ``log_to_driver=False``: a worker's stderr reaches only its log file).
    """
    import torch

    torch.set_num_threads(1)
    said = _SayToDriver(wait_lines, {key: cell[key] for key in CELL_KEYS if key in cell})
    options = dict(worker) | {"on_wait": said}
    checkpoint = options.pop("checkpoint", None)
    try:
        if checkpoint is None:
            return AuditWorker(**options).run_cell(**cell)
        with tempfile.TemporaryDirectory(prefix="obliviate-target-") as folder:
            copy = Path(folder) / "target.pt"
            copy.write_bytes(checkpoint)
            audit_worker = AuditWorker(**options | {"target": str(copy)})  # the model is loaded: the copy can go
        return audit_worker.run_cell(**cell)
    finally:
        said.flush()


class WaitLines:
    """The waiting lines of the cells running on Ray, kept until the driver takes them (a Ray actor, made
    remote by the driver with ``num_cpus=0``: it must be placed while every CPU runs a cell)."""

    def __init__(self) -> None:
        self._lines: list[tuple[dict, str]] = []

    def say(self, cell: dict, line: str) -> None:
        self._lines.append((cell, line))

    def take(self) -> list[tuple[dict, str]]:
        """The lines said since the last call, oldest first: ``(cell keys, line)``."""
        lines, self._lines = self._lines, []
        return lines


class _SayToDriver:
    """A cell's ``on_wait`` on a Ray worker: each line to the worker's stderr and, without waiting for it (the
    cell goes on retrying), to the driver's :class:`WaitLines`."""

    def __init__(self, wait_lines: Any, cell: dict) -> None:
        self.wait_lines, self.cell = wait_lines, cell
        self.sent: list[Any] = []

    def __call__(self, line: str) -> None:
        _say_on_stderr(line)
        if self.wait_lines is not None:
            self.sent.append(self.wait_lines.say.remote(self.cell, line))

    def flush(self) -> None:
        """Wait (a little) until the lines sent are kept: the driver takes them before the cell's result, in order."""
        if self.sent:
            import ray

            ray.wait(self.sent, num_returns=len(self.sent), timeout=WAIT_LINES_FLUSH_S)


def _say_on_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
