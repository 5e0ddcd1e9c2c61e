"""``obliviate forget``: ask every model that saw some samples to forget them.

The request goes to the store's ledger first, then a Prefect event wakes the ``unlearn``
deployment of ``obliviate serve``. ``--wait`` polls the ledger until the request is settled.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("forget", help="request deletion of sample ids from every registered run")
    parser.add_argument("--store", default="file://./runs", help="file://PATH (default ./runs) or s3://bucket/prefix")
    parser.add_argument("--ids", default=None, help="dataset sample ids, comma separated: 3,17,42")
    parser.add_argument("--data", default="digits", help="the dataset the ids index (as given to train --data)")
    parser.add_argument("--reason", default=None, help="free text kept in the ledger (ticket, legal basis)")
    parser.add_argument("--request-id", default=None, help="idempotency key; repeating it changes nothing")
    parser.add_argument("--no-event", action="store_true", help="only record it; reconciliation will process it")
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for the request to be done or rejected",
    )
    parser.add_argument("--status", default=None, metavar="REQUEST_ID", help="print a request's ledger entry and exit")
    parser.add_argument("--now", action="store_true", help="flush the open batch now instead of waiting for it")
    parser.set_defaults(handler=run_forget)


def run_forget(args: argparse.Namespace) -> int:
    from flows.unlearn import submit_deletion, wait_for_request
    from obliviate.errors import ConfigError
    from storage.ledger import REJECTED, DeletionLedger
    from storage.objects import ObjectStore

    if args.status:
        ledger = DeletionLedger(ObjectStore(args.store))
        from flows.batching import batch_status  # issue 11: "batched until T"

        entry = {**ledger.get(args.status).as_dict(), "history": ledger.history(args.status)}
        entry["batch"] = batch_status(ObjectStore(args.store), args.status)
        print(json.dumps(entry, indent=2, default=str))
        return 0
    if args.now:  # issue 11: the next pass flushes the open batch
        from flows.batching import request_flush

        request_flush(ObjectStore(args.store), reason=args.reason or "forget --now")
        if args.ids is None:
            print("the open batch flushes on the next pass (event or reconcile)", file=sys.stderr)
            return 0
    if args.ids is None:
        raise ConfigError("forget needs --ids 3,17,42 (or --status REQUEST_ID).")
    result = submit_deletion(
        args.store, args.ids, dataset=args.data, reason=args.reason, request_id=args.request_id, emit=not args.no_event
    )
    print(f"request {result['request_id']}: {result['status']}; {result.get('note', '')}", file=sys.stderr)
    if args.wait > 0:
        entry = wait_for_request(args.store, result["request_id"], timeout_s=args.wait)
        runs = entry["details"].get("runs", {})
        for run_id, audit in runs.items():
            print(
                f"  run {run_id}: {audit.get('status')} version {audit.get('from_version')} -> "
                f"{audit.get('to_version', audit.get('version'))}, blocks retrained {audit.get('blocks_retrained')}, "
                f"speed-up {audit.get('speedup_vs_full_retrain')}",
                file=sys.stderr,
            )
        print(json.dumps(entry, default=str))
        return 3 if entry["status"] == REJECTED else 0
    print(json.dumps(result, default=str))
    return 0
