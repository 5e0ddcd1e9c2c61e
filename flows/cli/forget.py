"""``obliviate forget``: ask every model that saw some samples to forget them.

The request goes to the store's ledger first, then a Prefect event wakes the ``unlearn``
deployment of ``obliviate serve``. ``--wait`` polls the ledger until the request is settled and
exits with a code per outcome (:data:`EXIT_CODES`, README "Exit codes of forget"); ``--status``
shows an entry, ``--cancel`` withdraws one before any model applied it, ``--retry`` puts a
``failed`` one back in the queue.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer

from flows.cli._store import StoreOption, prepare_store, probe_store, store_url
from flows.cli._types import Args, flag, number, option, parsed, usage_error
from flows.cli._types import dataset as dataset_type

# Exit codes of `forget --wait` (and of --status when asked with --wait 0): one per outcome.
EXIT_DONE, EXIT_ERROR, EXIT_REJECTED, EXIT_FAILED, EXIT_PENDING, EXIT_TIMEOUT, EXIT_CANCELLED = 0, 2, 3, 4, 5, 6, 7
# The wait ended with the store unreachable: the request is recorded, its state unknown (not a refusal: that is 2).
EXIT_UNREACHABLE = 8
EXIT_CODES = {
    "done": EXIT_DONE,
    "rejected": EXIT_REJECTED,
    "failed": EXIT_FAILED,
    "pending": EXIT_PENDING,
    "claimed": EXIT_TIMEOUT,
    "cancelled": EXIT_CANCELLED,
}


def forget_command(
    ctx: typer.Context,
    store: StoreOption = None,
    ids: Annotated[str | None, option("--ids", help="dataset sample ids, comma separated: 3,17,42")] = None,
    data: Annotated[
        str,
        option(
            "--data",
            parser=dataset_type,
            help="the dataset the ids index (the same name or file as train --data; a relative path may be spelled "
            "differently; default digits)",
        ),
    ] = "digits",
    reason: Annotated[str | None, option("--reason", help="free text kept in the ledger (ticket, legal basis)")] = None,
    request_id: Annotated[
        str | None, option("--request-id", help="idempotency key; repeating it changes nothing")
    ] = None,
    no_event: Annotated[
        bool,
        flag(
            "--no-event",
            help="only record it, send no event: a running `obliviate serve` takes it at its next reconciliation "
            "tick (the note says whether one is running)",
        ),
    ] = False,
    wait: Annotated[
        float,
        option(
            "--wait",
            parser=number,
            metavar="SECONDS",
            help="wait up to SECONDS for the request to be settled; the exit code tells the outcome (default 0: do "
            "not wait). The SECONDS count from when the request is in the ledger: with --ids, that is after the "
            "command has loaded its libraries and filed it (a few seconds, more on a busy machine)",
        ),
    ] = 0.0,
    status: Annotated[
        str | None, option("--status", metavar="REQUEST_ID", help="print a request's ledger entry and exit")
    ] = None,
    cancel: Annotated[
        str | None, option("--cancel", metavar="REQUEST_ID", help="withdraw a request no model applied yet")
    ] = None,
    retry: Annotated[str | None, option("--retry", metavar="REQUEST_ID", help="queue a failed request again")] = None,
    now: Annotated[
        bool,
        flag(
            "--now",
            help="flush the open batch now instead of waiting for it; with --wait SECONDS, wait for the requests it "
            "flushes (exit code: the first of failed, rejected, claimed, pending, cancelled that any of them has; 0 "
            "when every one is done)",
        ),
    ] = False,
    deadline: Annotated[
        str | None,
        option(
            "--deadline",
            metavar="DURATION",
            help="this request must be forgotten within DURATION of receipt: 90s, 12h, 7d, 2w (default: the store's "
            "deadline, serve --deadline, 30d unless serve set another). It may be shorter than the store's, not "
            "longer: a longer one is refused (the service promises no more). Recorded when the request is accepted; "
            "repeating a --request-id keeps the deadline first given",
        ),
    ] = None,
) -> Args:
    given = [f"--{name}" for name in ("status", "cancel", "retry") if ctx.params[name] is not None]
    if len(given) > 1:
        raise usage_error(ctx, f"option {given[1]} not allowed with option {given[0]}")
    args = parsed(ctx, run_forget)
    args.interrupted_note = _interrupted_note(args)  # a Ctrl-C before the command changed anything
    return args


def register(app: typer.Typer) -> None:
    codes = ", ".join(f"{code} {status}" for status, code in EXIT_CODES.items())
    help = "request deletion of sample ids from every registered run"
    app.command(
        "forget",
        help=help,
        short_help=help,
        epilog=f"exit codes with --wait: {codes}, {EXIT_UNREACHABLE} the store stayed unreachable until the wait "
        f"ended (the request is recorded), {EXIT_ERROR} refused (the error says why)",
    )(forget_command)


#: Why a batch was retrained before its window closed, in words (the ledger keeps the rule's name).
_FLUSHED_BECAUSE = {
    "count": "its batch was retrained once it held --batch-max requests",
    "deadline": "its batch was retrained early to land before the earliest deadline in it",
    "now": "its batch was retrained when `forget --now` asked",
    "rollback_below_floor": "retrained at once: no rolled-back version of an affected run met the held-out "
    "accuracy floor (--floor-points), so the model from before the deletion stayed served until the retrain landed",
    "rollback_no_earlier_model": "retrained at once: the ids lie in the first block of an affected run, and no "
    "checkpoint before it is a model (M_0 is no model), so nothing could be rolled back whatever --floor-points "
    "allows and the model from before the deletion stayed served until the retrain landed",
    "rollback_damaged": "retrained at once: a checkpoint the rolled-back version needed was damaged or missing, so "
    "nothing was rolled back and the model from before the deletion stayed served until the retrain landed",
}

#: A run's outcomes in which this pass retrained nothing (every id already forgotten; no version to retrain yet).
_NOT_RETRAINED = frozenset({"nothing_to_forget", "not_trained", "trained_without_ids"})


def _flushed_words(rule: str, runs: dict[str, Any]) -> str:
    """Why the request's batch ended early; a batch whose ids every run had already forgotten retrained nothing."""
    outcomes = [audit.get("status") for audit in runs.values() if isinstance(audit, dict)]
    if outcomes and all(outcome in _NOT_RETRAINED for outcome in outcomes) and rule in ("count", "deadline", "now"):
        when = _FLUSHED_BECAUSE[rule].removeprefix("its batch was retrained ")
        return f"its batch was flushed {when}; every id in it was already forgotten, so no run was retrained"
    return _FLUSHED_BECAUSE[rule]


def _not_trained_words(ids: list[int], *, dataset: str | None, retrained: bool) -> str:
    """What a done request did for its ids no registered run trained on (``details.not_trained_on``)."""
    shown = f"{ids[:10]}{' ...' if len(ids) > 10 else ''}"
    which = f"{len(ids)} of its ids {shown}" if retrained else f"any of its ids {shown}"
    of = f"dataset {dataset!r}" if dataset else "its dataset"
    outcome = "nothing to forget for them" if retrained else "nothing was retrained"
    return (
        f"; no registered run trained on {which} (held out or never used): {outcome}, and every later training "
        f"of {of} leaves them out"
    )


def describe(
    entry: dict[str, Any],
    *,
    batch: dict[str, Any] | None = None,
    forgotten: dict[str, Any] | None = None,
    refused: dict[str, Any] | None = None,
) -> str:
    """One line: the request's real state and what it is waiting for or why it ended.

    ``batch``: the open batch as this request sees it (:func:`flows.batching.batch_status`);
    ``forgotten``: its rollback record (``ledger/forgotten/<request>.json``), if it was rolled back;
    ``refused``: the interims not published for it, run -> figures (:func:`_refusals`), if its batch flushed so.
    """
    from flows.artifacts import utc_text
    from flows.rollback import refusal_words

    details = entry.get("details") or {}
    status = entry["status"]
    line = f"request {entry['request_id']}: {status}"
    refused = refused if refused is not None else details.get("interim_refused")
    figures = "; ".join(refusal_words(f"run {name}", r) for name, r in sorted((refused or {}).items()))
    if status == "done" and details.get("batch") in _FLUSHED_BECAUSE:
        line += f" ({_flushed_words(details['batch'], details.get('runs') or {})}"
        if details["batch"] == "rollback_no_earlier_model":  # the words above say why; name the runs only
            line += f": {', '.join(f'run {name}' for name in sorted(refused or {}))})" if refused else ")"
        else:
            line += f": {figures})" if figures and str(details["batch"]).startswith("rollback_") else ")"
    if status == "done" and details.get("not_trained_on"):
        line += _not_trained_words(
            details["not_trained_on"], dataset=entry.get("dataset"), retrained=bool(details.get("runs"))
        )
    if status == "rejected":
        line += f"; reason: {details.get('reason')}"
    elif status == "failed":
        line += f"; {details.get('reason') or details.get('last_error')}"
    elif status == "pending" and details.get("last_error"):
        line += (
            f" (attempt {details.get('attempts')} failed, retried after a back-off); last error: "
            f"{str(details['last_error'])[:300]}"
        )
    elif status == "pending" and batch:
        line += (
            f", batched until {utc_text(batch['batched_until'])} ({batch['flush_rule']} rule; "
            f"deadline {utc_text(batch.get('deadline'))}); `forget --now` flushes it sooner"
        )
        if forgotten and not forgotten.get("runs"):
            # The pass recorded it forgotten with no run rolled back (flows.rollback.publish_interim: no run needed
            # one), so no rollback is served for it and no retrain is due for it; only the flush settles it.
            line += (
                f"; forgotten already since {utc_text(forgotten.get('forgotten_at'))}: no run's served version "
                "holds its ids (an earlier request forgot them, or no run of its data has a trained version yet), "
                "so nothing is rolled back or retrained for it; its batch's flush settles it"
            )
        elif forgotten:
            line += (
                f"; forgotten already since {utc_text(forgotten.get('forgotten_at'))}: every affected run serves a "
                "rolled-back version that never saw the ids, until the batch's exact retrain lands"
            )
    elif status == "pending" and details.get("handed_back"):
        line += f" (handed back, attempt not counted: {details['handed_back'].get('reason')}; the next pass takes it)"
    elif status == "pending":
        line += " (not picked up yet: is `obliviate serve` running for this store?)"
    elif status == "claimed":
        holder = (entry.get("lease") or {}).get("holder") or details.get("holder")
        line += f" (attempt {details.get('attempt')} in progress by {holder})"
    elif status == "cancelled":
        line += f" (withdrawn while {details.get('previous')})"
    if status in ("pending", "claimed") and figures:
        line += (
            f"; not forgotten yet: no rolled-back version was published ({figures}), so its batch is retrained at once"
        )
    if status in ("pending", "claimed") and details.get("interim_error"):
        line += (
            f"; not forgotten yet: no rolled-back version could be published ({str(details['interim_error'])[:300]}), "
            f"so its batch is retrained at once; mend: {details.get('interim_mend')}"
        )
    if status in ("pending", "claimed") and not batch and entry.get("deadline") is not None:
        line += f"; deadline {utc_text(entry['deadline'])}"  # fixed when the request was accepted
    return line


def run_forget(args: Args) -> int:
    # flows.unlearn (Prefect) is imported where a request is made or announced: --status and --cancel do neither.
    from obliviate.data import load_dataset
    from obliviate.errors import ConfigError
    from obliviate.unlearning.service import check_name, parse_ids
    from storage.errors import StorageError
    from storage.ledger import TERMINAL, DeletionLedger
    from storage.objects import ObjectStore
    from storage.registry import RunRegistry

    if not args.wait >= 0:
        raise ConfigError(f"--wait is the most seconds to wait and must be >= 0 (0: do not wait); got {args.wait:g}.")
    request_id = args.status or args.cancel or args.retry
    if request_id:
        check_name(request_id, what="request id")
    ids: tuple[int, ...] | None = None
    if request_id and (args.ids is not None or args.now):
        given = "--ids" if args.ids is not None else "--now"
        raise ConfigError(
            f"{given} makes or flushes requests; --status, --cancel and --retry act on the one request named, so "
            f"they take no {given}. Run them as two commands."
        )
    if not request_id and args.ids is None and not args.now:
        raise ConfigError("forget needs --ids 3,17,42 (or --status / --cancel / --retry REQUEST_ID).")
    deadline_s = _requested_deadline(args.deadline, ids_given=args.ids is not None)
    if not request_id and args.ids is not None:
        # A new request's ids are checked before the store is created or written.
        # The row count submit_deletion checks against too, loaded once per process (mnist5k: 1-2 s a load).
        from flows.unlearn import dataset_rows

        rows = dataset_rows(args.data)
        ids = parse_ids(
            args.ids, dataset_size=len(load_dataset(args.data)) if rows is None else rows, dataset=args.data
        )
    reading = bool(args.status)
    # The rules that read the store are checked before prepare_store creates a missing one (and before --now
    # leaves a flush request): a refused command leaves nothing behind, not even an empty folder.
    store, exists = probe_store(store_url(args))
    if deadline_s is not None:
        _check_within_policy(store, deadline_s, given=str(args.deadline), exists=exists)
    if not exists and ids is not None:
        # Created here, the request would sit in a store no run and no serve know of: a typo would lose it.
        raise ConfigError(
            f"a deletion request is filed in the store that holds the runs trained on its ids, and store {store.url} "
            "does not exist (no bucket or folder there): no run is registered there and no serve would ever apply a "
            "request filed in it. Nothing written. Check --store / $OBLIVIATE_STORE (a mistyped prefix names an "
            "empty store); a store is created by `obliviate train` or `obliviate serve`."
        )
    if not exists and (args.cancel or args.retry):
        raise _unknown_request(request_id, store.url, known=[])
    if not exists and args.now and ids is None:
        print("no request waits in a batch (the store does not exist yet); nothing to flush", file=sys.stderr)
        return EXIT_DONE
    url = prepare_store(store.url, write=not reading)
    ledger = DeletionLedger(ObjectStore(url))
    if request_id and not ledger.exists(request_id):
        raise _unknown_request(request_id, url, known=ledger.request_ids())
    if args.cancel:
        registry = RunRegistry(ledger.store)
        applied = [r for r in registry.run_ids() if args.cancel in (registry.current(r) or _Nothing()).applied_requests]
        print(describe(ledger.cancel(args.cancel, applied_to=applied).as_dict()), file=sys.stderr)
        args.interrupted_note = (
            f"request {args.cancel} is cancelled (recorded in the ledger); a run it rolled back that was not "
            "released yet serves its model again at the next pass. Nothing to resume."
        )
        from flows.rollback import release_refused

        # a withdrawn request forgets nothing: the runs it rolled back serve their model again now, not at the next pass
        for run_id, released in release_refused(ledger.store).items():
            print(f"run {run_id}: released the rollback held for {released}", file=sys.stderr)
        return EXIT_DONE
    if args.retry:
        entry = ledger.retry(args.retry)
        args.interrupted_note = _filed_note(args.retry, "queued again", retried=True)
        print(describe(entry.as_dict()), file=sys.stderr)
        if not args.no_event:  # announce it again; the ledger entry is the same request
            from flows.unlearn import submit_deletion

            stored = entry.request
            submit_deletion(url, stored["ids"], dataset=stored["dataset"], request_id=args.retry)
        if args.wait > 0:
            return _waited(url, args.retry, args.wait, again="rerunning --retry is not needed")
        return EXIT_DONE
    if args.status:
        if args.wait > 0:
            return _waited(url, args.status, args.wait)
        entry = ledger.get(args.status)
        shown = {
            **entry.as_dict(),
            "history": ledger.history(args.status),
            **_waiting_for(url, args.status),
            # runs that applied it by training without its ids; a done request lists them in details.runs too
            "applied_by_training": ledger.trained_runs(args.status),
        }
        print(json.dumps(shown, indent=2, default=str))
        runs = {**shown["applied_by_training"], **(entry.details.get("runs") or {})}
        for run_id, audit in sorted(runs.items()):
            print(f"  {_run_outcome(run_id, audit)}", file=sys.stderr)
        for line in _interrupted_training_lines(entry.details):
            print(f"  {line}", file=sys.stderr)
        refused = _refusals(url, entry.as_dict(), shown["history"])
        print(
            describe(entry.as_dict(), batch=shown["batch"], forgotten=shown["forgotten"], refused=refused),
            file=sys.stderr,
        )
        return EXIT_DONE
    if args.now:  # the next pass flushes the open batch (deadline-aware batching)
        from flows.batching import open_batch, request_flush

        # The batch record lists what it held when the last pass gated it; one cancelled (or settled) since is
        # no longer taken by the pass, so only those still pending are said to wait.
        batched = (open_batch(ObjectStore(url)) or {}).get("requests", [])
        waiting = [request for request in batched if _still_pending(ledger, request)]
        if ids is None and not waiting:
            # Requests no pass has gated yet (serve not running, or not since they arrived) are in no
            # batch but wait all the same: the next pass takes them together, and --now flushes them.
            unbatched = ledger.open_request_ids()
            if not unbatched:
                # a flush request left now would cut short the next batch, whenever it opens
                print("no request waits in a batch; nothing to flush", file=sys.stderr)
                return EXIT_DONE
            request_flush(ObjectStore(url), reason=args.reason or "forget --now")
            print(
                f"{len(unbatched)} request(s) are open but in no batch yet (no pass has run since they arrived): "
                "the next pass (the next event, or serve's next tick) takes them all at once, without waiting "
                f"for a batch: {', '.join(unbatched[:10])}{' ...' if len(unbatched) > 10 else ''}",
                file=sys.stderr,
            )
            return _waited_flush(args, url, [r for r in unbatched if _still_open(ledger, r)])
        request_flush(ObjectStore(url), reason=args.reason or "forget --now")
        if ids is None:
            print(
                f"{len(waiting)} request(s) waiting in the open batch will flush on the next pass (the next event, or "
                f"serve's next tick): {', '.join(waiting[:10])}{' ...' if len(waiting) > 10 else ''}",
                file=sys.stderr,
            )
            return _waited_flush(args, url, waiting)
    assert ids is not None  # refused above when neither --ids nor --now was given
    from flows.unlearn import new_request_id, submit_deletion

    # Named here, not inside submit_deletion, so a failure can say which request to look up or repeat.
    request_id = args.request_id or new_request_id(ids, dataset=args.data)
    no_run_of_data = _no_run_of_data_warning(ObjectStore(url), args.data)
    args.interrupted_note = (
        f"request {request_id} may or may not be recorded: `obliviate forget --status {request_id}` tells. "
        f"Repeating this command with --request-id {request_id} is safe (one request, applied once); without it, "
        "a rerun files a second request for the same ids."
    )
    try:
        result = submit_deletion(
            url,
            list(ids),
            dataset=args.data,
            reason=args.reason,
            request_id=request_id,
            emit=not args.no_event,
            deadline_s=deadline_s,
        )
    except StorageError as err:
        raise type(err)(
            f"{err} Request {request_id} may or may not be recorded. Once the store answers, "
            f"`obliviate forget --status {request_id}` tells; repeating this command with --request-id {request_id} "
            "is safe (one request, applied once)."
        ) from err
    args.interrupted_note = _filed_note(result["request_id"], result["status"])
    if args.no_event and not (not result["new"] and result["status"] in TERMINAL):
        result["note"] = _unannounced_note(ObjectStore(url))
    print(f"request {result['request_id']}: {result['status']}; {result.get('note', '')}", file=sys.stderr)
    if no_run_of_data:
        print(no_run_of_data, file=sys.stderr)
    if args.wait > 0:
        return _waited(
            url, result["request_id"], args.wait, again="do not rerun forget --ids: that files a second request"
        )
    print(json.dumps(result, default=str))
    return EXIT_DONE


def _unannounced_note(store: Any) -> str:
    """What becomes of a request filed with ``--no-event``: the live serve's reconciliation takes it, or none will yet.

    Checked as a request with an event is (:func:`flows.unlearn.served_endpoint`), so the note says whether a serve
    is there to reconcile rather than promising a schedule that may not run.
    """
    from flows.unlearn import served_endpoint

    served, why = served_endpoint(store)
    if served is not None or why.startswith("announced"):
        through = f" (through {served})" if served else ""
        return (
            f"recorded in the ledger; no event sent (--no-event), so the live `obliviate serve` of this store{through} "
            "takes it at its next reconciliation tick."
        )
    return (
        f"recorded in the ledger; no event sent (--no-event), and {why}, so it waits for the next serve's "
        "reconciliation (start `obliviate serve` on this store)."
    )


def _no_run_of_data_warning(store: Any, dataset: str) -> str | None:
    """A warning when no registered run of ``store`` trained on ``dataset``: nothing there applies the request yet.

    Such a request is filed all the same: a run may be trained on the store later, and while the request is
    pending every training of its data leaves its ids out. Where no ``serve`` ever announced itself, a mistyped
    --store looks just like this, and there nothing would ever apply it. Where one did, that serve rejects the
    request at its next pass unless a run of its data registers first (:func:`flows.settle.runs_of`), which is
    what a mistyped --data (default digits) looks like.
    """
    from flows.unlearn import ENDPOINT_KEY
    from storage.registry import RunRegistry

    registry = RunRegistry(store)
    runs = registry.run_ids()
    seen: set[str] = set()
    for run_id in runs:  # one read a run, so stop at the first of its data
        seen.add(registry.spec(run_id).dataset)
        if dataset in seen:
            return None
    datasets = sorted(seen)
    if store.exists(ENDPOINT_KEY):  # a serve has served this store: it takes the request, and rejects it
        if not datasets:
            return (
                f"warning: store {store.url} holds no registered run, so its `obliviate serve` rejects this request "
                f"unless a run of {dataset} registers first (`obliviate train --data {dataset}`)."
            )
        retry = f"--data {datasets[0]}" if len(datasets) == 1 else f"one of --data {', '.join(datasets)}"
        return (
            f"warning: store {store.url} has no registered run of --data {dataset} (its runs trained on "
            f"{', '.join(datasets)}), so its `obliviate serve` rejects this request unless a run of {dataset} "
            f"registers first. If --data was mistyped (the default is digits), file it again with {retry}."
        )
    others = (
        f"its runs ({', '.join(runs[:5])}{' ...' if len(runs) > 5 else ''}) trained on {', '.join(datasets)}"
        if runs
        else ("it holds no registered run")
    )
    return (
        f"warning: store {store.url} has no registered run of --data {dataset} ({others}) and no `obliviate serve` "
        "ever announced itself there, so nothing will apply this request unless a run of that data is trained or "
        "served on this store. Check the URL (--store / $OBLIVIATE_STORE) and --data; if either was mistyped, "
        "file the request again on the right store."
    )


def _interrupted_note(args: Args) -> str | None:
    """What a Ctrl-C leaves, said before the command changes anything (``None``: no request filed yet)."""
    request_id = args.status or args.cancel or args.retry
    if args.status:
        return (
            f"--status only reads the ledger, so request {args.status} is as it was and there is nothing to resume; "
            f"`obliviate forget --status {args.status}` shows it again (add --wait SECONDS to wait for it)."
        )
    if args.cancel:
        return (
            f"the cancel of request {request_id} may or may not be recorded: `obliviate forget --status "
            f"{request_id}` tells (cancelled, or as it was); if it is not cancelled, run --cancel again."
        )
    if args.retry:
        return (
            f"request {request_id} may or may not be queued again: `obliviate forget --status {request_id}` tells "
            "(pending, or still failed); if it is still failed, run --retry again."
        )
    if args.ids is None:  # --now alone
        return (
            "forget --now files no request: it asks the next pass to flush the open batch, and that ask may or may "
            "not be left. Running it again asks again; the requests waiting are as they were."
        )
    return None


def _filed_note(request_id: str, status: str, *, retried: bool = False) -> str:
    """What a Ctrl-C leaves once ``request_id`` is in the ledger: rerunning the command would not resume it."""
    again = (
        "rerunning --retry is not needed"
        if retried
        else "do not rerun forget --ids: that files a second request for the same ids"
    )
    applied = (
        "; `obliviate serve` applies it whether or not this command waits"
        if status in ("pending", "claimed", "queued again")
        else ""
    )
    return (
        f"request {request_id} is recorded in the ledger ({status}) and stays there{applied}. Ctrl-C stopped only "
        f"the waiting; follow the request with `obliviate forget --status {request_id}` (add --wait SECONDS to wait "
        f"again), and {again}."
    )


def _requested_deadline(given: str | None, *, ids_given: bool) -> float | None:
    """``--deadline`` in seconds (``None``: not given, the store's policy decides), checked before anything is written.

    Raises:
        ConfigError: given without ``--ids`` (a deadline is fixed when a request is accepted), not a
            duration, or not > 0.
    """
    from obliviate.errors import ConfigError
    from obliviate.unlearning.batching import parse_option_duration

    if given is None:
        return None
    if not ids_given:
        raise ConfigError(
            f"--deadline dates a new request, so it needs --ids; got --deadline {given!r} without --ids. A request's "
            "deadline is fixed when it is accepted: file a new request with --ids, or drop --deadline."
        )
    try:
        seconds = parse_option_duration("--deadline", given)
    except ConfigError as err:
        raise ConfigError(f"{err} Nothing written.") from err
    if seconds <= 0:
        raise ConfigError(
            f"--deadline is how long after receipt the request must be forgotten, so it must be > 0; got {given!r}. "
            "Give one such as 7d, or leave it out for the store's (serve --deadline, default 30d). Nothing written."
        )
    return seconds


def _duration_text(seconds: float) -> str:
    """``seconds`` as ``--deadline`` spells it: 30d, 12h, 90s."""
    for unit, size in (("w", 604_800.0), ("d", 86_400.0), ("h", 3_600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _unknown_request(request_id: str, url: str, *, known: list[str]) -> Exception:
    """The refusal of ``--status`` / ``--cancel`` / ``--retry`` of a request the ledger at ``url`` lacks."""
    from obliviate.errors import ConfigError

    return ConfigError(
        f"no request {request_id!r} in the ledger of {url}; "
        + (
            f"it holds {len(known)} (e.g. {', '.join(known[:5])})."
            if known
            else "this store has no requests at all: check --store / $OBLIVIATE_STORE (a mistyped prefix "
            "names an empty store)."
        )
    )


def _check_within_policy(store: Any, deadline_s: float, *, given: str, exists: bool = True) -> None:
    """Refuse a ``--deadline`` longer than the store's: the service promises every request its policy's deadline.

    Args:
        store: the store the request is for.
        deadline_s: the deadline asked for, in seconds after receipt.
        given: ``--deadline`` as typed.
        exists: whether the store exists; a missing one has no policy yet, so the default applies (nothing is read).

    Raises:
        ConfigError: ``deadline_s`` exceeds the store's batch policy's ``deadline_s`` (nothing written).
    """
    from obliviate.errors import ConfigError
    from obliviate.unlearning.batching import DEFAULT_DEADLINE_S
    from storage.ledger import policy_deadline_s

    allowed = policy_deadline_s(store) if exists else DEFAULT_DEADLINE_S
    if deadline_s > allowed:
        raise ConfigError(
            f"forget --deadline may shorten the store's deadline, not lengthen it: this store promises every request "
            f"within {_duration_text(allowed)} (serve --deadline); got --deadline {given!r} "
            f"({_duration_text(deadline_s)}). Give {_duration_text(allowed)} or less, or leave --deadline out for the "
            "store's; a longer promise needs serve restarted with a longer --deadline. Nothing written."
        )


def _waiting_for(url: str, request_id: str) -> dict[str, Any]:
    """What a pending request waits in (issue 11): ``batch`` (batched until T) and ``forgotten`` (rolled back)."""
    from flows.batching import batch_status
    from storage.objects import ObjectStore
    from storage.serving import forgotten_key

    store = ObjectStore(url)
    key = forgotten_key(request_id)
    return {"batch": batch_status(store, request_id), "forgotten": store.get_json(key) if store.exists(key) else None}


def _refusals(url: str, entry: dict[str, Any], history: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The interims not published for a request (run -> why, with the figures), as the batch gate noted them.

    A pending request carries the note (``interim_refused``); a settled status replaces the details, so for a
    done request whose batch flushed because of the rollback it is read back from the request's history (the
    latest note).
    """
    from storage.ledger import DeletionLedger
    from storage.objects import ObjectStore

    details = entry.get("details") or {}
    if details.get("interim_refused"):
        return dict(details["interim_refused"])
    if entry.get("status") != "done" or not str(details.get("batch") or "").startswith("rollback_"):
        return None
    if history is None:
        history = DeletionLedger(ObjectStore(url)).history(entry["request_id"])
    for version in reversed(history):
        noted = (version.get("details") or {}).get("interim_refused")
        if noted:
            return dict(noted)
    return None


def _still_open(ledger: Any, request_id: str) -> bool:
    """Whether ``request_id`` is pending or claimed now (an open marker may outlive its request's settling)."""
    from storage.errors import CorruptObject, ObjectNotFound
    from storage.ledger import CLAIMED, PENDING

    try:
        return ledger.current_status(request_id) in (PENDING, CLAIMED)
    except (CorruptObject, ObjectNotFound):
        return False


def _still_pending(ledger: Any, request_id: str) -> bool:
    """Whether the next pass would take ``request_id`` from the open batch (pending now; a damaged status: no)."""
    from storage.errors import CorruptObject
    from storage.ledger import PENDING

    try:
        return ledger.current_status(request_id) == PENDING
    except CorruptObject:
        return False


class _Nothing:
    applied_requests: tuple[str, ...] = ()


#: The longest pause between two looks at an unreachable store while waiting: the wait gives up at most this early.
_OUTAGE_LOOK_EVERY_S = 2.0


def _waited(url: str, request_id: str, timeout_s: float, *, again: str = "") -> int:
    """Wait, print the real state (stderr: one line; stdout: the entry as JSON), return its exit code.

    The request is in the ledger before the wait starts, so a store that stops answering meanwhile is retried
    (its stall notices say so) until the wait ends; if it still does not answer, the command says the request is
    recorded and how to follow it, and exits :data:`EXIT_UNREACHABLE`, not the refusal's code.

    Args:
        again: what not to rerun, said when the wait ends with the store unreachable.
    """
    from flows.request_wait import wait_outcome
    from storage.errors import StorageUnavailable
    from storage.retry import RetryPolicy, retry_unavailable

    ends = time.monotonic() + timeout_s

    def look() -> tuple[dict[str, Any], bool, dict[str, Any]]:
        entry, settled = wait_outcome(url, request_id, timeout_s=max(0.0, ends - time.monotonic()))
        return entry, settled, _waiting_for(url, request_id) if entry["status"] == "pending" else {}

    policy = RetryPolicy(deadline_s=timeout_s, max_wait_s=_OUTAGE_LOOK_EVERY_S)
    try:
        entry, settled, waiting = retry_unavailable(look, policy=policy)
    except StorageUnavailable as err:
        cause = str(err).split(". Check ", 1)[0].rstrip(".")  # its advice ends "retry": rerunning may file again
        print(
            f"storage stayed unreachable until the wait ended ({timeout_s:.0f} s): {cause}. Check that the S3 service "
            f"answers (AWS_ENDPOINT_URL, network). Request {request_id} is "
            "recorded in the ledger and stays there; `obliviate serve` applies it whether or not this command "
            f"waits. Once the store answers, `obliviate forget --status {request_id}` tells its state (add --wait "
            f"SECONDS to wait again){'; ' + again if again else ''}.",
            file=sys.stderr,
        )
        print(json.dumps({"request_id": request_id, "settled": False, "store_unreachable": str(err)}))
        return EXIT_UNREACHABLE
    for run_id, audit in (entry["details"].get("runs") or {}).items():
        print(f"  {_run_outcome(run_id, audit)}", file=sys.stderr)
    for said in _interrupted_training_lines(entry["details"]):
        print(f"  {said}", file=sys.stderr)
    line = describe(entry, **waiting, refused=_refusals(url, entry))  # waiting: {} unless it is pending
    if not settled:
        line = f"{line}; still not settled after {timeout_s:.0f} s (the request stays in the ledger)"
    print(line, file=sys.stderr)
    print(json.dumps({**entry, "settled": settled}, default=str))
    return EXIT_CODES.get(entry["status"], EXIT_TIMEOUT)


#: ``forget --now --wait``: the exit code of the flushed requests together is that of the first outcome in this order
#: that any of them has (what needs the user's hand first); 0 only when every one is done.
FLUSH_EXIT_ORDER = ("failed", "rejected", "claimed", "pending", "cancelled")


def _flush_exit_code(statuses: list[str]) -> int:
    """The exit code of a waited flush: :data:`FLUSH_EXIT_ORDER`'s first outcome present, else done's."""
    for status in FLUSH_EXIT_ORDER:
        if status in statuses:
            return EXIT_CODES[status]
    unknown = [s for s in statuses if s not in EXIT_CODES]
    return EXIT_TIMEOUT if unknown else EXIT_DONE


def _waited_flush(args: Args, url: str, request_ids: list[str]) -> int:
    """``forget --now --wait SECONDS``: wait for the requests the flush takes, as ``--ids ... --wait`` waits for one.

    Each request gets the lines a single wait prints (its runs' outcomes, then its state) on stderr; stdout gets
    ``{"requests": [entry, ...], "settled": bool}``. All share one wait of ``args.wait`` seconds. The exit code is
    :func:`_flush_exit_code`'s; a store that stops answering meanwhile is retried until the wait ends, then
    :data:`EXIT_UNREACHABLE` (the requests and the flush ask stay recorded). Without ``--wait`` nothing is waited for.
    """
    from flows.request_wait import wait_outcome
    from storage.errors import StorageUnavailable
    from storage.retry import RetryPolicy, retry_unavailable

    if args.wait <= 0 or not request_ids:
        return EXIT_DONE
    shown = f"{', '.join(request_ids[:10])}{' ...' if len(request_ids) > 10 else ''}"
    args.interrupted_note = (
        f"the flush is asked (it stays recorded for the next pass) and the {len(request_ids)} request(s) it takes stay "
        "in the ledger; `obliviate serve` applies them whether or not this command waits. Ctrl-C stopped only the "
        "waiting; follow each with `obliviate forget --status ID` (add --wait SECONDS to wait again); running "
        "--now again only asks again."
    )
    print(
        f"waiting up to {args.wait:g} s for the {len(request_ids)} request(s) the flush takes: {shown}", file=sys.stderr
    )
    ends = time.monotonic() + args.wait
    looked: dict[str, tuple[dict[str, Any], bool, dict[str, Any]]] = {}

    def look() -> None:
        # one shared wait: each request gets what is left of it; after an outage the next look resumes where it was
        for request_id in request_ids:
            if request_id in looked:
                continue
            entry, settled = wait_outcome(url, request_id, timeout_s=max(0.0, ends - time.monotonic()))
            looked[request_id] = entry, settled, _waiting_for(url, request_id) if entry["status"] == "pending" else {}

    try:
        retry_unavailable(look, policy=RetryPolicy(deadline_s=args.wait, max_wait_s=_OUTAGE_LOOK_EVERY_S))
    except StorageUnavailable as err:
        cause = str(err).split(". Check ", 1)[0].rstrip(".")
        print(
            f"storage stayed unreachable until the wait ended ({args.wait:.0f} s): {cause}. Check that the S3 service "
            f"answers (AWS_ENDPOINT_URL, network). The flush is asked and the requests ({shown}) are recorded in the "
            "ledger and stay there; `obliviate serve` applies them whether or not this command waits. Once the store "
            "answers, `obliviate forget --status ID` tells each one's state (add --wait SECONDS to wait again).",
            file=sys.stderr,
        )
        print(json.dumps({"requests": request_ids, "settled": False, "store_unreachable": str(err)}))
        return EXIT_UNREACHABLE
    entries = []
    for request_id in request_ids:
        entry, settled, waiting = looked[request_id]
        for run_id, audit in (entry["details"].get("runs") or {}).items():
            print(f"  {_run_outcome(run_id, audit)}", file=sys.stderr)
        for said in _interrupted_training_lines(entry["details"]):
            print(f"  {said}", file=sys.stderr)
        refused = _refusals(url, entry)
        line = describe(entry, **waiting, refused=refused)
        if not settled:
            line = f"{line}; still not settled after {args.wait:.0f} s (the request stays in the ledger)"
        print(line, file=sys.stderr)
        entries.append({**entry, "settled": settled})
    print(json.dumps({"requests": entries, "settled": all(e["settled"] for e in entries)}, default=str))
    return _flush_exit_code([e["status"] for e in entries])


def _speedup_words(audit: dict) -> list[str]:
    """The audit's speed-up over a full retrain in words, as the audit obtained it (``speedup_basis``)."""
    speedup = audit.get("speedup_vs_full_retrain")
    if not isinstance(speedup, (int, float)) or speedup <= 0:
        return []
    if audit.get("speedup_basis"):  # since e183a84: the samples of all blocks over those retrained
        if speedup < 1.005:
            return ["no saving over retraining from scratch (a deletion in block 1 retrains every block)"]
        return [f"about {speedup:.2f}x less training than retraining from scratch (estimated from this retrain)"]
    retrained = audit.get("blocks_retrained") or []
    why = (
        "a deletion in block 1 retrains every block, plus the checks"
        if audit.get("first_affected_block") == 1
        else f"loading, checking and publishing cost more than the {len(retrained)} block(s) retrained saved"
    )
    return [
        f"{speedup:.2f}x faster than retraining from scratch"
        if speedup >= 1
        else f"{1 / speedup:.2f}x slower than retraining from scratch ({why})"
    ]


def _run_outcome(run_id: str, audit: dict) -> str:
    """One run's part of a settled request, in words: versions, blocks, speed-up, accuracy, verification."""
    to_version = audit.get("to_version", audit.get("version"))
    if audit.get("status") == "trained_without_ids":
        return f"run {run_id}: trained without its ids, version {to_version} never saw them"
    if audit.get("status") == "nothing_to_forget":  # a batch of ids forgotten before: it carried no retrain
        version = f", version stays {to_version}" if to_version is not None else ""
        return (
            f"run {run_id}: nothing left to forget (every id it trained on was already forgotten): no retrain{version}"
        )
    parts = [f"run {run_id}: {audit.get('status')}"]
    if audit.get("applied_by") == "training":
        parts[0] += " (accepted while the run trained; unlearned right after its training)"
    if audit.get("from_version") is not None or to_version is not None:
        parts[0] += f" version {audit.get('from_version')} -> {to_version}"
    # one retrain applies every request of a batch: its blocks and ids are the batch's (counted since
    # 082d172; records written before keep the batch's lists)
    listed = audit.get("requests")
    batch = audit.get("batch_requests", len(listed) if isinstance(listed, list) else 0)
    if isinstance(batch, int) and batch > 1:
        deleted = audit.get("deleted_ids")
        ids = audit.get(
            "batch_deleted_ids", len(deleted) if isinstance(listed, list) and isinstance(deleted, list) else None
        )
        held = f", {ids} id{'' if ids == 1 else 's'}" if isinstance(ids, int) else ""
        parts.append(f"one retrain for the {batch} requests of its batch{held}")
    if audit.get("blocks_retrained") is not None:
        parts.append(f"blocks retrained {audit['blocks_retrained']}")
    parts.extend(_speedup_words(audit))
    before, after = audit.get("previous_heldout_accuracy"), audit.get("heldout_accuracy")
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        parts.append(f"held-out accuracy {100 * before:.1f} % -> {100 * after:.1f} %")
    verification = audit.get("verification") or {}
    before, after = verification.get("previous_heldout_top5_accuracy"), verification.get("heldout_top5_accuracy")
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):  # serve --verify records top-5 (SPEC 5)
        naive = verification.get("naive_heldout_top5_accuracy")
        by_naive = f" (naive retrain {100 * naive:.1f} %)" if isinstance(naive, (int, float)) else ""
        parts.append(f"held-out top-5 accuracy {100 * before:.1f} % -> {100 * after:.1f} %{by_naive}")
    if "bit_identical_to_naive" in verification:
        same = "bit-identical to" if verification["bit_identical_to_naive"] else "NOT bit-identical to"
        parts.append(f"{same} a naive retrain")
    if audit.get("error"):
        parts.append(str(audit["error"]))
    return ", ".join(parts)


def _interrupted_training_lines(details: dict[str, Any]) -> list[str]:
    """What settling the request did to trainings that never published (``details.interrupted_trainings``).

    A run interrupted before its first version is no registered run, so its outcome is not among ``runs``: this is
    where a user asking whether the ids are gone from storage reads that its checkpoints holding them were deleted,
    left to a training still running, or could not be read.
    """
    from flows.artifacts import utc_text
    from flows.cli.store import _blocks_text, _megabytes  # store check says the same checkpoints in these words

    erased = details.get("interrupted_trainings") or {}
    lines = []
    for run_id, chains in sorted((erased.get("purged") or {}).items()):
        for chain, what in sorted(chains.items()):
            blocks = [int(b) for b in what.get("blocks") or []]
            count = what.get("ids_count")
            swept_at = what.get("swept_at")
            # A sweep deletes after the request settled (its training died later): say when, or the user reads
            # a request "done" whose checkpoints were still stored until then as if they had gone at settle.
            swept = (
                f" (deleted by the reconcile sweep at {utc_text(swept_at)}, after its training died)"
                if isinstance(swept_at, (int, float))
                else ""
            )
            lines.append(
                f"run {run_id} (an interrupted training, never published), chain {chain}: deleted {len(blocks)} "
                f"checkpoint(s) ({_blocks_text(blocks)}, {_megabytes(int(what.get('bytes') or 0))}) trained on "
                f"{count} of its ids{swept}; the checkpoints before block {what.get('first_block')} "
                "never saw them, and rerunning its `obliviate train` resumes from them"
            )
    for run_id, left in sorted((erased.get("left_to_training") or {}).items()):
        holder = (left or {}).get("holder") or {}
        by = f" ({holder.get('command')}, pid {holder.get('pid')} on {holder.get('host')})" if holder else ""
        lines.append(
            f"run {run_id} (not published): was being trained when the request settled{by}; that training leaves "
            "its ids out before it publishes"
        )
    for run_id, error in sorted((erased.get("unreadable") or {}).items()):
        lines.append(
            f"run {run_id} (an interrupted training, never published): whether its checkpoints hold any of its ids "
            f"is unknown ({error}); `obliviate store check` reports the damage"
        )
    return lines
