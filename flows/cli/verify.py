"""``obliviate verify``: prove by replay that a published model never trained on deleted ids (SPEC 6).

Checks that stored M_0 is the recipe's seeded initial model (always, whatever ``--blocks``),
re-trains the chosen blocks from their stored predecessors, checks bit-identity with the stored
checkpoints (model, optimizer state and schedule position), the lineage hashes, and that no id of
an applied request remains in any block's id list. Exit code 0: passed; 4: failed (a damaged or lost
checkpoint, manifest, spec or version pointer included: recorded in a report like any failure); 5: inconclusive
(another CPU capability or torch build: bit-identity is only promised on the lineage's environment).
A damaged pruned record (read for a past ``--version``, to know whether its checkpoints were deleted on
purpose) changes no exit code: the proof does not rest on it. It is named in a note with its mend, and a
checkpoint found missing says that whether it was deleted on purpose is unknown (exit 4 then).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from flows.cli._store import StoreOption, prepare_store, store_url
from flows.cli._types import Args, flag, integer, option, parsed
from obliviate.errors import ConfigError


def verify_command(
    ctx: typer.Context,
    store: StoreOption = None,
    run: Annotated[str, option("--run", help="the run id, or a sharded run's name (each shard is verified)")] = ...,
    version: Annotated[
        int | None, option("--version", parser=integer, help="a published version (default: the current one)")
    ] = None,
    blocks: Annotated[
        str,
        option("--blocks", help="all (default), retrained (from the earliest deletion on) or one block number"),
    ] = "all",
    ray_address: Annotated[
        str | None,
        option(
            "--ray-address",
            help="Ray cluster that replays a sharded run's shards side by side (default RAY_ADDRESS, else a local "
            "runtime)",
        ),
    ] = None,
    no_prefect: Annotated[bool, flag("--no-prefect", help="run without Prefect (no artifact)")] = False,
    in_process: Annotated[
        bool,
        flag(
            "--in-process",
            help="replay a sharded run's shards one after another in this process, without Ray (a small run on a "
            "small machine: no Ray start)",
        ),
    ] = False,
) -> Args:
    return parsed(ctx, run_verify)


def register(app: typer.Typer) -> None:
    help = "check M_0 is the seeded initial model, re-train blocks from stored checkpoints, check bit-identity"
    app.command("verify", help=help, short_help=help)(verify_command)


def run_verify(args: Args) -> int:
    from flows.verify import NothingRetrained, check_choices, check_request, initial_model_words, runs_to_verify

    check_choices(version=args.version, blocks=args.blocks)  # their syntax: before the store is opened
    if args.in_process and args.ray_address:
        raise ConfigError(
            f"--in-process replays the shards in this process, --ray-address {args.ray_address} on a Ray cluster; "
            "give one of them."
        )
    # Read-only rule: a store that does not exist holds nothing to verify. The run, version and
    # blocks are checked here too, so a typo is answered before a Prefect server starts.
    url = prepare_store(store_url(args), write=False)
    runs = runs_to_verify(url, args.run, version=args.version)  # a sharded run: every shard
    _refuse_unpublished(url, args.run, runs)
    untouched = []  # shards no deletion reached: verified with no block replayed
    for run_id in runs:
        try:
            check_request(url, run_id, version=args.version, blocks=args.blocks)
        except NothingRetrained:
            if len(runs) == 1:
                raise
            untouched.append(run_id)
    if untouched and len(untouched) == len(runs):
        raise ConfigError(
            f"--blocks retrained replays the blocks retrained after a deletion, but no shard of {args.run} "
            f"({', '.join(runs)}) has a deletion applied, so no block was retrained. Use --blocks all (or a block "
            "number) to replay their training."
        )
    prepare_store(url, write=True)  # the result goes to the store's ledger: prove it can, before replaying
    sharded = len(runs) > 1  # its shards are replayed side by side on Ray, one CPU each (or here: --in-process)
    on_ray = sharded and not args.in_process
    if on_ray:
        from flows.runtime import check_ray_address

        check_ray_address(args.ray_address or os.environ.get("RAY_ADDRESS"))  # a typo: before anything starts
    if args.no_prefect:
        from flows.verify import verify_run, verify_shards

        if sharded:
            if on_ray:
                from flows.runtime import ensure_ray

                ensure_ray(address=args.ray_address)
            results = verify_shards(url, runs, in_process=not on_ray, version=args.version, blocks=args.blocks)
        else:
            results = [verify_run(url, runs[0], version=args.version, blocks=args.blocks)]
    else:
        from flows.runtime import apply_prefect_defaults, prefect_api, prefect_api_and_ray
        from flows.verify import verify_flow, verify_shards_flow

        apply_prefect_defaults()
        if on_ray:
            with prefect_api_and_ray(ray_address=args.ray_address):
                results = verify_shards_flow(
                    store=url, run_id=args.run, shards=runs, version=args.version, blocks=args.blocks
                )
        elif sharded:
            with prefect_api():
                results = verify_shards_flow(
                    store=url, run_id=args.run, shards=runs, version=args.version, blocks=args.blocks, in_process=True
                )
        else:
            with prefect_api():
                results = [verify_flow(store=url, run_id=runs[0], version=args.version, blocks=args.blocks)]
    for result in results:
        identical = sum(result["bit_identical"].values())
        not_replayed = result.get("blocks_not_replayed") or []
        unreplayable = f"; {len(not_replayed)} block(s) could not be replayed (below)" if not_replayed else ""
        if result.get("records_unreadable"):
            replayed = "no block replayed: a record it needs cannot be read (below)"
        elif result["run_id"] in untouched:
            replayed = "no deletion applied to this shard, so no block was retrained or replayed"
        else:
            replayed = f"{identical}/{len(result['bit_identical'])} replayed blocks bit-identical{unreplayable}"
        print(
            f"verify {result['run_id']} v{result['version']}: {result['status']}; {replayed}"
            f"{initial_model_words(result)}",
            file=sys.stderr,
        )
        for problem in result["problems"]:
            print(f"  {problem}", file=sys.stderr)
        for note in result.get("notes", []):  # a damaged record the result does not rest on: no change of exit code
            print(f"  note: {note}", file=sys.stderr)
        print(_served_note(url, result["run_id"], int(result["version"])), file=sys.stderr, end="")
        print(f"  report: {result['report']}", file=sys.stderr)
    statuses = {result["status"] for result in results}
    status = "passed" if statuses == {"passed"} else "failed" if "failed" in statuses else "inconclusive"
    if len(results) == 1:
        print(json.dumps(results[0], default=str))
    else:
        print(f"verify {args.run} ({len(results)} shards): {status}", file=sys.stderr)
        print(json.dumps({"run_id": args.run, "status": status, "shards": results}, default=str))
    return {"passed": 0, "failed": 4}.get(status, 5)


def _served_note(url: str, run_id: str, version: int) -> str:
    """A line when the version verified is not the one served: it proves that version, not today's model."""
    from storage import ObjectStore
    from storage.errors import CorruptObject, ObjectNotFound
    from storage.registry import ModelVersion, RunRegistry

    registry = RunRegistry(ObjectStore(url))
    try:
        current = registry.current(run_id)
    except (CorruptObject, ObjectNotFound):
        versions = registry.store.pointer_versions(registry.pointer_key(run_id))
        if versions and versions[-1] == version:
            return ""  # the verified version's own pointer: its damage is the verdict, said above
        return (
            f"  note: the pointer of run {run_id}'s current version (v{versions[-1] if versions else '?'}) cannot be "
            f"read, so whether v{version} is the version served is unknown (`obliviate store check` names the damage)\n"
        )
    if current is None or current.version == version:
        return ""
    try:
        pointer = registry.store.read_pointer_version(registry.pointer_key(run_id), version)
    except (CorruptObject, ObjectNotFound):
        return ""  # the verified version's own pointer: its damage is the verdict, said above
    verified = ModelVersion.from_pointer(run_id, pointer)
    later = [r for r in current.applied_requests if r not in verified.applied_requests]
    held = f"; it predates request(s) {', '.join(later[:5])} and still holds their ids" if later else ""
    return f"  note: v{version} is not the version served (v{current.version}){held}\n"


def _refuse_unpublished(url: str, asked: str, runs: list[str]) -> None:
    """Refuse a ``--run`` with no published version, naming a few runs the store has (a typo is seen at once).

    Raises:
        ConfigError: a run of ``runs`` has no published version.
    """
    from storage import ObjectStore
    from storage.registry import RunRegistry
    from storage.serving import sharded_runs

    store = ObjectStore(url)
    registry = RunRegistry(store)

    def published(run_id: str) -> bool:
        # its pointer's versions listed, none read: a damaged current version is verify's finding, not a refusal
        return bool(store.pointer_versions(registry.pointer_key(run_id)))

    missing = [run_id for run_id in runs if not published(run_id)]
    if not missing:
        return
    groups = sharded_runs(store)
    shards = {member for members in groups.values() for member in members}
    known = sorted(groups) + [r for r in registry.run_ids() if r not in shards and published(r)]
    holds = (
        f"it holds {len(known)} published run(s): {', '.join(known[:5])}{' ...' if len(known) > 5 else ''}. Check --run"
        if known
        else "it holds no published run at all: check --store / $OBLIVIATE_STORE (a mistyped prefix names an empty "
        "store)"
    )
    what = f"run {asked!r}" if missing == [asked] else f"shard(s) {', '.join(missing)} of run {asked!r}"
    raise ConfigError(f"{what} has no published version in {url}; {holds}, or train it first.")
