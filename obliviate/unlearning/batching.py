"""Deadline-aware batching of deletion requests (SPEC section 6, Batching).

N requests applied in one exact retrain from the earliest affected block d_min cost
(B - d_min + 1)/B of a naive retrain, so batching is the cheap way to stay exact. Every request
carries a deadline (receipt + ``deadline_s``, GDPR Art. 12(3): one month by default), fixed when the
request is accepted: a later policy moves no deadline already given. The open batch flushes at the
first of:

* ``window``: the batch's window closes (``window_s`` after its first request; 0 = immediately);
* ``count``: it holds ``batch_max`` requests;
* ``deadline``: the earliest deadline minus the expected retrain time (from the run's recorded
  block times) minus a safety margin arrives;
* ``now``: an operator forces it (``forget --now``) or a rollback found no interim version that
  meets the accuracy floor (see :mod:`obliviate.unlearning.rollback`).

A request becomes exact when the retrain of its batch lands (``exact_at``); :func:`late_requests`
names any request whose ``exact_at`` is past its deadline (the rules keep that list empty as long
as a retrain takes no longer than expected + margin). Times are plain floats (seconds), so the
same rules drive the service (wall clock) and the benchmark (simulated clock).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from obliviate.errors import ConfigError

DAY_S = 86_400.0
DEFAULT_DEADLINE_S = 30 * DAY_S
DEFAULT_MARGIN_S = 3_600.0
_UNITS = {"s": 1.0, "m": 60.0, "h": 3_600.0, "d": DAY_S, "w": 7 * DAY_S}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")

WINDOW, COUNT, DEADLINE, NOW = "window", "count", "deadline", "now"


def parse_duration(text: str | float) -> float:
    """Seconds in ``text``: a number of seconds or ``<number><s|m|h|d|w>`` (``90s``, ``1h``, ``30d``).

    Raises:
        ConfigError: not a finite, non-negative duration (NaN and infinity are refused).
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text) or text < 0:
            raise ConfigError(f"a duration must be a finite number of seconds >= 0; got {text!r}.")
        return float(text)
    match = _DURATION.match(str(text))
    if not match:
        raise ConfigError(
            f"a duration is a number with an optional unit s, m, h, d or w (e.g. 90s, 1h, 1d, 30d); got {text!r}."
        )
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not math.isfinite(seconds):
        raise ConfigError(f"a duration must be a finite number of seconds; got {text!r}. Give a shorter one.")
    return seconds


def parse_option_duration(option: str, text: str | float) -> float:
    """:func:`parse_duration` of ``option``'s value; a refusal names the option (``--deadline: a duration is ...``).

    Raises:
        ConfigError: :func:`parse_duration`'s rule and the value seen, after ``<option>: ``.
    """
    try:
        return parse_duration(text)
    except ConfigError as err:
        raise ConfigError(f"{option}: {err}") from err


@dataclass(frozen=True)
class BatchPolicy:
    """When the open batch of deletion requests flushes (SPEC section 6).

    Attributes:
        window_s: seconds from the batch's first request until it flushes (0: every request
            flushes at once, the service's behaviour before batching).
        batch_max: flush as soon as the batch holds this many requests (``None``: no cap).
        deadline_s: each request's deadline is its receipt time + this (default 30 days).
        margin_s: safety margin kept before the earliest deadline on top of the expected retrain.
    """

    window_s: float = 0.0
    batch_max: int | None = None
    deadline_s: float = DEFAULT_DEADLINE_S
    margin_s: float = DEFAULT_MARGIN_S

    def __post_init__(self) -> None:
        for name in ("window_s", "deadline_s", "margin_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number of seconds; got {value!r}.")
        if self.window_s < 0 or self.margin_s < 0:
            raise ConfigError(f"window_s and margin_s must be >= 0; got {self.window_s!r}, {self.margin_s!r}.")
        if self.batch_max is not None and (isinstance(self.batch_max, bool) or self.batch_max < 1):
            raise ConfigError(f"batch_max must be a positive integer or None; got {self.batch_max!r}.")
        if self.deadline_s <= self.margin_s:
            raise ConfigError(
                f"deadline_s ({self.deadline_s}) must exceed margin_s ({self.margin_s}): otherwise every request "
                "would be due before it arrives. Lengthen the deadline (serve --deadline) past the margin, or lower margin_s."
            )


@dataclass(frozen=True)
class PendingRequest:
    """A deletion request waiting in a batch."""

    request_id: str
    received_at: float
    deadline: float
    ids: tuple[int, ...] = ()


def new_request(
    *,
    request_id: str,
    received_at: float,
    policy: BatchPolicy,
    ids: Sequence[int] = (),
    deadline: float | None = None,
) -> PendingRequest:
    """A request with its deadline: ``deadline`` when given, else receipt + ``policy.deadline_s``.

    The service passes the deadline the ledger recorded when it accepted the request, so a later
    policy (``serve`` restarted with another ``--deadline``) moves no promise already made; a
    request recorded before deadlines were (an older ledger) gets receipt + the policy's, as then.

    Raises:
        ConfigError: ``deadline`` is not a finite number of seconds.
    """
    if deadline is None:
        return PendingRequest(request_id, float(received_at), float(received_at) + policy.deadline_s, tuple(ids))
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not math.isfinite(deadline):
        raise ConfigError(
            f"rule: a request's deadline is a finite time in seconds; request {request_id!r} has {deadline!r}. "
            "Give a number (or none: receipt + the policy's deadline)."
        )
    return PendingRequest(request_id, float(received_at), float(deadline), tuple(ids))


def expected_retrain_seconds(block_seconds: Sequence[float | None], *, first_block: int = 1) -> float:
    """Expected exact-retrain time from ``first_block`` to B: the recorded times of those blocks.

    Unknown times (``None``) count as the mean of the known ones. Use ``first_block=1`` (the worst
    case) while the batch's earliest affected block is not known.

    Raises:
        ConfigError: no recorded block time, a negative or non-finite one, or ``first_block`` outside 1..B.
    """
    known = [float(s) for s in block_seconds if s is not None]
    bad = [s for s in known if not math.isfinite(s) or s < 0]
    if bad:
        raise ConfigError(
            f"rule: recorded block times are finite seconds >= 0; got {bad[:5]!r}. Pass the times the run recorded "
            "(None for unknown ones)."
        )
    if not known:
        raise ConfigError("need at least one recorded block time to predict a retrain; none was given.")
    if not 1 <= first_block <= len(block_seconds):
        raise ConfigError(f"first_block must be in 1..{len(block_seconds)}; got {first_block}.")
    mean = sum(known) / len(known)
    return float(sum(mean if s is None else float(s) for s in block_seconds[first_block - 1 :]))


@dataclass(frozen=True)
class FlushDecision:
    """When the batch flushes and which rule decides it (``at`` may be in the past: flush now)."""

    at: float
    reason: str
    due: bool


def flush_time(batch: Sequence[PendingRequest], *, policy: BatchPolicy, expected_retrain_s: float) -> tuple[float, str]:
    """The time the batch must flush and the rule that sets it (the earliest of window, count, deadline).

    Raises:
        ConfigError: an empty batch (nothing to flush).
    """
    if not batch:
        raise ConfigError("an empty batch never flushes; add a request first.")
    ordered = sorted(batch, key=lambda r: (r.received_at, r.request_id))
    candidates = [(ordered[0].received_at + policy.window_s, WINDOW)]
    if policy.batch_max is not None and len(ordered) >= policy.batch_max:
        candidates.append((ordered[policy.batch_max - 1].received_at, COUNT))
    earliest_deadline = min(r.deadline for r in ordered)
    candidates.append((earliest_deadline - expected_retrain_s - policy.margin_s, DEADLINE))
    at, reason = min(candidates, key=lambda c: (c[0], c[1] != COUNT))
    return float(at), reason


def flush_decision(
    batch: Sequence[PendingRequest],
    *,
    now: float,
    policy: BatchPolicy,
    expected_retrain_s: float,
    force: bool = False,
) -> FlushDecision:
    """Whether the batch flushes at ``now`` (``force``: an operator's ``--now`` or a rollback below the floor)."""
    if force:
        return FlushDecision(at=float(now), reason=NOW, due=True)
    at, reason = flush_time(batch, policy=policy, expected_retrain_s=expected_retrain_s)
    return FlushDecision(at=at, reason=reason, due=at <= now)


def late_requests(batch: Sequence[PendingRequest], *, exact_at: float) -> list[str]:
    """Ids of the requests whose deadline passed before ``exact_at`` (must be empty; reported, never hidden)."""
    return sorted(r.request_id for r in batch if exact_at > r.deadline)


def amortised_fraction(*, first_affected_block: int, num_blocks: int, requests: int) -> float:
    """Per-request compute of one exact batch retrain, as a fraction of one naive retrain (SPEC 6).

    ``(B - d_min + 1) / B / N``: the batch retrains blocks d_min..B once for its N requests.
    """
    if requests < 1 or not 1 <= first_affected_block <= num_blocks:
        raise ConfigError(
            f"need requests >= 1 and 1 <= first_affected_block <= num_blocks; got {requests}, "
            f"{first_affected_block}, {num_blocks}."
        )
    return (num_blocks - first_affected_block + 1) / num_blocks / requests
