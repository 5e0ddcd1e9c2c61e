"""``obliviate store check [--repair]``: verify a store, rebuild damaged checkpoints, collect orphans.

Checks every committed object's checksum and every run's version lineage
(:func:`storage.check.check_store`). ``--repair`` rebuilds damaged chain checkpoints by
deterministic replay from their predecessor (:mod:`flows.repair`), reports what cannot be
rebuilt with the runs and versions that need it, and deletes orphans (attempts that lost a
publish race or crashed) once no kept version refers to them and no attempt may still publish or
resume them. ``--keep-versions N`` is retention: with ``--repair`` the versions of each run older
than its newest N are pruned and what only they used is deleted; without it, what would be is
said. Exit code 0: healthy (after repair); 1: damage remains; 2: the store could not be checked.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from flows.cli._store import StoreOption, prepare_store, store_url
from flows.cli._types import Args, flag, new_app, number, option, parsed
from obliviate.errors import ConfigError


def check_command(
    ctx: typer.Context,
    store: StoreOption = None,
    repair: Annotated[bool, flag("--repair", help="rebuild damaged checkpoints, collect orphans")] = False,
    orphan_age: Annotated[
        float,
        option(
            "--orphan-age",
            parser=number,
            metavar="SECONDS",
            help="collect only orphans older than this (default 600; at least 60 while a serve, a train, a deletion pass "
            "or a forget writes the store)",
        ),
    ] = 600.0,
    keep_versions: Annotated[
        str | None,
        option(
            "--keep-versions",
            metavar="N",
            help="retention: with --repair, prune the versions of each run older than its newest N (the current one "
            "and what it derives from are always kept) and delete the checkpoints and manifests only they used; "
            "without --repair, say what would be deleted (default: keep every version)",
        ),
    ] = None,
) -> Args:
    return parsed(ctx, run_store_check, store_action="check")


def register(app: typer.Typer) -> None:
    actions = new_app(subcommand_metavar="ACTION")
    help = "verify checksums and lineage; --repair rebuilds and collects orphans"
    actions.command("check", help=help, short_help=help)(check_command)
    help = "check a store's integrity; --repair rebuilds and collects"
    app.add_typer(actions, name="store", help=help, short_help=help)


def run_store_check(args: Args) -> int:
    from flows.repair import check_and_repair, is_checkpoint

    if not args.orphan_age >= 0:
        raise ConfigError(
            f"--orphan-age is the least age (seconds) of an orphan to collect and must be >= 0; got {args.orphan_age:g}."
        )
    keep = _keep_versions(args.keep_versions)
    url = prepare_store(store_url(args), write=args.repair)
    report = check_and_repair(url, repair=args.repair, min_orphan_age_s=args.orphan_age, keep_versions=keep)
    print(
        f"store {report.url}: {report.objects_checked} objects and {report.pointers_checked} pointer versions checked "
        f"in {report.seconds:.1f} s; {len(report.corrupt)} damaged, {len(report.lineage)} lineage problem(s), "
        f"{len(report.orphans)} orphan(s)"
        + (
            f", {len(report.deleted_ids_held)} chain(s) holding ids of settled deletions (SPEC 5)"
            if report.deleted_ids_held
            else ""
        ),
        file=sys.stderr,
    )
    if report.objects_checked == 0 and report.pointers_checked == 0 and not report.nested and not report.orphans:
        # an S3 prefix needs no folder, so a mistyped one is a valid, empty store (not one where a crash left bytes)
        print(f"  note: the store holds nothing; check --store if you expected data at {report.url}", file=sys.stderr)
    for item in report.repaired:
        print(f"  repaired {item['key']}: {item['how']}", file=sys.stderr)
    for item in report.unrecoverable:
        print(f"  UNRECOVERABLE {item['key']}: {item['error'].rstrip('.')}; {_needed_by(item)}", file=sys.stderr)
    for item in report.corrupt if not args.repair else []:
        print(f"  damaged {item['key']} ({_how_to_mend(item)}); {_needed_by(item)}: {item['error']}", file=sys.stderr)
    for problem in report.lineage:
        version = "" if problem["version"] is None else f" version {problem['version']}"
        mend = "; `store check --repair` rebuilds it by replay" if is_checkpoint(problem.get("key", "")) else ""
        print(f"  lineage of run {problem['run']}{version}: {problem['problem']}{mend}", file=sys.stderr)
    for item in report.superseded:
        print(f"  superseded versions left: {item['problem']}", file=sys.stderr)
    if report.purged is not None and report.purged["objects"]:
        runs = {r: run for r, run in report.purged["runs"].items() if run["versions"] or run["objects"]}
        print(
            f"  purged {report.purged['objects']} object(s), {_megabytes(report.purged['bytes'])}, of versions "
            f"superseded by deletions in run(s) {sorted(runs)} (SPEC 5); their pointer versions stay (history)",
            file=sys.stderr,
        )
    for item in report.erased:
        print(f"  deleted (SPEC 5): {_held_text(item)}", file=sys.stderr)
    for item in report.deleted_ids_held:
        print(
            f"  SPEC 5: {_held_text(item)}: no stored checkpoint trained on a deleted id may remain; --repair deletes "
            f"them from block {item['first_block']} on (the checkpoints before it never saw the ids"
            f"{', and a rerun of `obliviate train` resumes from them' if not item['published'] else ''})",
            file=sys.stderr,
        )
    for item in report.unfinished_trainings:
        print(f"  {_unfinished_text(item)}", file=sys.stderr)
    interrupted = [n for n in report.orphans if n in report.uncommitted or n.rsplit("/", 1)[-1].startswith(".tmp-")]
    if interrupted and not args.repair:
        more = f" (+{len(interrupted) - 5} more)" if len(interrupted) > 5 else ""
        print(
            f"  {len(interrupted)} interrupted write(s) (bytes a crash or a full disk left before their commit "
            f"record; nothing reads them, a rerun writes them again; among the orphans): "
            f"{', '.join(interrupted[:5])}{more}",
            file=sys.stderr,
        )
    if report.orphans_held_back:
        print(f"  orphans: {report.orphans_held_back}", file=sys.stderr)
    elif report.orphans and not args.repair:
        more = f" (+{len(report.orphans) - 5} more)" if len(report.orphans) > 5 else ""
        print(
            f"  orphans (garbage, not damage; --repair deletes them): {', '.join(report.orphans[:5])}{more}",
            file=sys.stderr,
        )
    elif report.collected:
        print(f"  collected {len(report.collected)} orphan(s)", file=sys.stderr)
    for folder in report.nested:
        print(
            f"  skipped nested store {folder} (a store of its own: check it with --store {report.url}/"
            f"{folder.rstrip('/')})",
            file=sys.stderr,
        )
    if report.foreign:
        more = f" (+{len(report.foreign) - 5} more)" if len(report.foreign) > 5 else ""
        print(
            f"  {len(report.foreign)} file(s) not written by obliviate left alone (not checked, never collected): "
            f"{', '.join(report.foreign[:5])}{more}",
            file=sys.stderr,
        )
    if report.pruned is not None:
        _say_pruned(report.pruned)
    print(json.dumps(report.as_dict(), default=str))
    return 0 if report.healthy else 1


def _keep_versions(value: str | None) -> int | None:
    """``--keep-versions``: a whole number >= 1, or ``None`` (keep everything)."""
    if value is None:
        return None
    try:
        keep = int(value)
    except ValueError:
        keep = 0
    if keep < 1 or str(keep) != value.strip():
        raise ConfigError(
            f"--keep-versions is how many of each run's newest versions keep their checkpoints and must be a whole "
            f"number >= 1 (the current version is always kept); got {value!r}. Pass e.g. --keep-versions 3."
        )
    return keep


def _say_pruned(pruned: dict) -> None:
    """What retention deleted (or would delete), per run, and what it means for ``verify``."""
    verb = "deleted" if pruned["deleted"] else "would delete (add --repair to do it)"
    runs = {run: r for run, r in pruned["runs"].items() if r["versions"] or r["objects"] or r["held"]}
    print(
        f"  retention (--keep-versions {pruned['keep_versions']}): {verb} {pruned['objects']} object(s), "
        f"{_megabytes(pruned['bytes'])}, of {sum(len(r['versions']) for r in runs.values())} version(s) "
        f"of {len(runs)} run(s)",
        file=sys.stderr,
    )
    for run_id, run in sorted(runs.items()):
        versions = run["versions"]
        shown = ", ".join(map(str, versions[:10])) + (f" (+{len(versions) - 10} more)" if len(versions) > 10 else "")
        held = f"; {run['held']} kept for work in flight (collected later)" if run["held"] else ""
        what = f"versions {shown} pruned" if versions else "finishing an earlier pruning"
        print(
            f"  run {run_id}: {what}, {run['objects']} object(s), {_megabytes(run['bytes'])}{held}; "
            "their pointer versions stay (history), but they can no longer be served, rolled back to or replayed "
            "by `obliviate verify --version`",
            file=sys.stderr,
        )
    for run_id, error in sorted(pruned.get("skipped", {}).items()):
        print(f"  run {run_id}: not pruned, its versions could not be read ({error})", file=sys.stderr)


def _held_text(item: dict) -> str:
    """A training chain's checkpoints that hold ids of settled deletion requests, in words."""
    unlearning = item.get("kind") == "unlearning"
    if item["published"]:
        what = (
            "(an unlearning chain no version uses: a retrain that stopped, lost its publish or was redone)"
            if unlearning
            else "(a training chain no version uses)"
        )
    elif item["registered"]:
        what = "(registered, never published: an interrupted training)"
    else:
        what = "(not registered: an interrupted first training)"
    blocks = item["blocks"]
    requests = item["requests"]
    shown = ", ".join(requests[:3]) + (f" (+{len(requests) - 3} more)" if len(requests) > 3 else "")
    unknown = (
        ""
        if item["exclusions_known"]
        else " (what this unlearning chain left out is not recorded: taken as what its base version had deleted)"
        if unlearning
        else " (what this older chain left out is not recorded: taken as nothing)"
    )
    return (
        f"run {item['run']} {what}, chain {item['chain']}: {len(blocks)} checkpoint(s) ({_blocks_text(blocks)}, "
        f"{_megabytes(item['bytes'])}) trained on {item['ids_count']} id(s) of settled deletion "
        f"request(s) {shown}, the first in block {item['first_block']}{unknown}"
    )


def _unfinished_text(item: dict) -> str:
    """An unfinished training (a run with no version) and its size, in words."""
    blocks = item["blocks"]
    what = "registered, never published" if item["registered"] else "not registered"
    now = (
        "being trained now"
        + (
            f"; it holds {item['holds_deleted_ids']} deleted id(s), which it leaves out before it publishes"
            if item.get("holds_deleted_ids")
            else ""
        )
        if item["training_now"]
        else "rerun `obliviate train` with its options to resume it from its stored checkpoints"
    )
    unreadable = f"; what it holds is unknown: {item['unreadable']}" if item.get("unreadable") else ""
    return (
        f"unfinished training: run {item['run']} ({what}), chain {item['chain']}, {len(blocks)} checkpoint(s) "
        f"({_blocks_text(blocks)}), {_megabytes(item['bytes'])}: {now}{unreadable}"
    )


def _blocks_text(blocks: list[int]) -> str:
    """``block 0``, ``blocks 1-2``, ``blocks 0, 2``: stored blocks as people read them."""
    if len(blocks) == 1:
        return f"block {blocks[0]}"
    if blocks == list(range(blocks[0], blocks[-1] + 1)):
        return f"blocks {blocks[0]}-{blocks[-1]}"
    return "blocks " + ", ".join(str(b) for b in blocks)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _how_to_mend(item: dict) -> str:
    """What mends a damaged object, in words: replay, the command that wrote it, or a backup."""
    from storage.tiles import MI_TILES  # here, not at the top: storage.tiles imports numba

    if item.get("repairable_by_replay"):
        return "rebuildable with --repair"
    if item.get("part_of"):
        return "rewritten by running the command that wrote the result again (the same `obliviate reduce`)"
    if item["key"].startswith(f"{MI_TILES}/"):
        return "an MI matrix cache: --repair deletes it, the next `obliviate reduce` of that data computes it again"
    if item["key"].startswith("ledger/"):
        return "not rebuildable: a ledger record; restore it from a backup"
    return "not rebuildable by store check: restore it from a backup"


def _needed_by(item: dict) -> str:
    """Which published versions need a damaged object, in words."""
    from storage.tiles import MI_TILES  # here, not at the top: storage.tiles imports numba

    if item.get("part_of"):
        return f"part of result {item['part_of']}"
    if item["key"].startswith(f"{MI_TILES}/"):
        return "no model version needs it"
    versions = sorted({(str(n["run"]), int(n["version"])) for n in item.get("needed_by") or []})
    if not versions:
        return "no published version needs it"
    return "needed by " + ", ".join(f"run {run} version {version}" for run, version in versions)
