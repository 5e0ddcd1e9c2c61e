"""Prefect artifacts that read well in the dashboard (``obliviate ui``).

Every artifact has a title line, units in its column headers, the seed's figures beside ours
where the seed reported any (SPEC sections 3 and 5), and links to the full reports in the store.
The builders (``*_rows``, ``*_markdown``, :func:`describe`) are plain functions of the records the
flows already write; :func:`publish_table` / :func:`publish_markdown` hand them to Prefect. Keys
are fixed per kind, so the dashboard lists each kind once with its history as versions.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from storage.errors import ObjectNotFound
from storage.ledger import DeletionLedger
from storage.objects import ObjectStore

if TYPE_CHECKING:
    from obliviate.data import ImageDataset

#: The seed's unlearning speed-up on MNIST (SPEC section 5): DeepObliviate's early-stopped
#: retraining, not the exact retraining our default policy runs.
SEED_SPEEDUP_MNIST = 66.7


def as_url(location: str) -> str:
    """A link target: URLs unchanged, local paths as absolute ``file://`` URLs."""
    return location if "://" in location else Path(location).expanduser().resolve().as_uri()


def describe(*, title: str, lines: Iterable[str] = (), links: Mapping[str, str] | None = None) -> str:
    """Markdown shown above an artifact: ``# title``, one paragraph per line, then the links."""
    parts = [f"# {title}", *[line for line in lines if line]]
    if links:
        parts.append(
            "**Full reports:**\n\n"
            + "\n".join(f"- [{name}]({as_url(url)}) `{as_url(url)}`" for name, url in links.items())
        )
    return "\n\n".join(parts)


def publish_table(
    *,
    key: str,
    title: str,
    rows: Sequence[Mapping[str, Any]],
    lines: Iterable[str] = (),
    links: Mapping[str, str] | None = None,
) -> Any:
    """Create a table artifact; returns its id."""
    from prefect.artifacts import create_table_artifact

    return create_table_artifact(
        key=key, table=[dict(row) for row in rows], description=describe(title=title, lines=lines, links=links)
    )


def publish_markdown(
    *, key: str, title: str, body: str, lines: Iterable[str] = (), links: Mapping[str, str] | None = None
) -> Any:
    """Create a Markdown artifact (title, lines, links, then ``body``); returns its id."""
    from prefect.artifacts import create_markdown_artifact

    return create_markdown_artifact(key=key, markdown=describe(title=title, lines=lines, links=links) + "\n\n" + body)


# --- DRMI reduction (SPEC section 2) ---------------------------------------------------------------


def reduction_rows(restarts: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The best restarts, lowest H first, with units in the headers."""
    return [
        {
            "rank": i + 1,
            "start vertex": int(r["start"]),
            "H after greedy (nats)": round(float(r["h_greedy"]), 4),
            "H after swaps (nats)": round(float(r["h"]), 4),
            "swaps": int(r["swaps"]),
        }
        for i, r in enumerate(restarts)
    ]


def reduction_title(summary: Mapping[str, Any]) -> str:
    return f"DRMI reduction: the {summary['k']} of {summary['n']} images of {summary['data']} with the least MI"


def reduction_lines(summary: Mapping[str, Any]) -> list[str]:
    histogram = summary.get("class_histogram") or []
    return [
        (
            f"**H = {summary['h']:.4f} nats**: mutual information summed over every pair of the chosen images "
            f"(lower is better), the best of {summary['restarts']} restarts (start vertex {summary['best_start']}); "
            "the 10 best restarts below."
        ),
        (
            f"{summary['bins']} gray-level bins, {'normalised' if summary['normalize'] else 'raw'} MI, greedy fold "
            f"{summary['aggregate']}, colour to gray by {summary.get('gray', 'luma')}, seed {summary['seed']}. "
            "The seed reported no H to compare with."
        ),
        "Images per class in the subset: " + ", ".join(f"{c}: {count}" for c, count in enumerate(histogram))
        if histogram
        else "",
        (
            f"Time: tiles {summary['tile_seconds']:.1f} s ({summary['tiles_computed']} of {summary['tiles_total']} "
            f"computed, {summary['tiles_reused']} reused), restarts {summary['restart_seconds']:.1f} s, "
            f"{summary['workers']} Ray worker(s)."
        ),
    ]


#: A reduction's picture (:func:`subset_plot`), next to its ``subset.npy``.
SUBSET_PLOT = "subset.png"
#: The most chosen images :func:`subset_plot` draws: beyond a 10 x 10 grid they are too small to see.
SUBSET_PLOT_IMAGES = 100


def subset_plot_images(*, labels: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """The chosen images :func:`subset_plot` draws, in its order: the subset sorted by class (stable), all of it up
    to :data:`SUBSET_PLOT_IMAGES` images, else that many evenly spaced over it, so each class keeps its share."""
    chosen = np.asarray(subset, dtype=np.int64)
    by_class = chosen[np.argsort(labels[chosen], kind="stable")]
    if len(by_class) <= SUBSET_PLOT_IMAGES:
        return by_class
    return by_class[np.linspace(0, len(by_class) - 1, SUBSET_PLOT_IMAGES).round().astype(np.int64)]


def subset_plot(*, pool: ImageDataset, subset: np.ndarray, restart_h: Sequence[float], title: str) -> bytes:
    """PNG bytes of a reduction's ``subset.png``: the chosen images, their classes against the pool's, H per restart.

    The left panel shows the chosen images sorted by class, each with its class in the corner: all of them up to
    :data:`SUBSET_PLOT_IMAGES`, else that many evenly spaced (:func:`subset_plot_images`). The middle panel compares
    each class's share of the subset with its share of the pool: raw MI favours low-entropy images (MI(u, v) <=
    min(H(u), H(v))), which shows as one class far above its pool share (SPEC section 2). The right panel is H of
    every restart, best first, so how much the start vertex matters is seen.
    ``title`` is the figure's title and the PNG's ``Description`` text chunk.

    Args:
        pool: the images the subset was chosen from, with their labels.
        subset: indices of the chosen images into the pool.
        restart_h: the objective H of each restart.
        title: what the figure shows, in words.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    images, labels, levels = pool.images, pool.labels, pool.levels
    chosen = np.asarray(subset, dtype=np.int64)
    by_class = subset_plot_images(labels=labels, subset=chosen)
    columns = math.ceil(math.sqrt(len(by_class)))
    rows = math.ceil(len(by_class) / columns)
    height, width = images.shape[1:]
    corners = [
        (1 + (place // columns) * (height + 1), 1 + (place % columns) * (width + 1)) for place in range(rows * columns)
    ]
    grid = np.full((rows * (height + 1) + 1, columns * (width + 1) + 1), np.nan)  # NaN: the gaps, drawn blank
    for (top, left), index in zip(corners, by_class):
        grid[top : top + height, left : left + width] = images[index]

    fig, (pictures, shares, restarts) = plt.subplots(
        1, 3, figsize=(14, 4.6), gridspec_kw={"width_ratios": [1.15, 1, 1]}
    )
    pictures.imshow(np.ma.masked_invalid(grid), cmap="gray", vmin=0, vmax=levels - 1, interpolation="nearest")
    pictures.set_facecolor("white")
    for (top, left), index in zip(corners, by_class):
        pictures.text(left, top, str(int(labels[index])), color="#ffcc00", fontsize=6, va="top", ha="left")
    shown = "" if len(by_class) == len(chosen) else f" ({len(by_class)} of {len(chosen)}, evenly spaced)"
    pictures.set_title(f"the chosen images by class{shown}", fontsize=10)
    pictures.set_xticks([])
    pictures.set_yticks([])

    classes = np.arange(int(labels.max()) + 1 if len(labels) else 1)
    subset_share = 100 * np.bincount(labels[chosen], minlength=len(classes)) / max(1, len(chosen))
    pool_share = 100 * np.bincount(labels, minlength=len(classes)) / max(1, len(labels))
    shares.bar(classes - 0.2, subset_share, width=0.4, label=f"subset ({len(chosen)} images)")
    shares.bar(classes + 0.2, pool_share, width=0.4, color="0.65", label=f"pool ({len(labels)} images)")
    shares.set_xlabel("class")
    shares.set_ylabel("share of images %")
    shares.set_title("class shares: subset vs pool", fontsize=10)
    if len(classes) <= 20:
        shares.set_xticks(classes)
    shares.legend(fontsize=8)
    shares.grid(axis="y", alpha=0.3)

    ordered = np.sort(np.asarray(restart_h, dtype=np.float64))
    restarts.plot(np.arange(1, len(ordered) + 1), ordered, marker="." if len(ordered) <= 200 else None)
    if len(ordered):
        restarts.plot([1], ordered[:1], "r*", ms=10, label=f"best: H = {ordered[0]:.4f}")
        restarts.legend(fontsize=8)
    restarts.xaxis.set_major_locator(MaxNLocator(integer=True))
    restarts.set_xlabel("restart, best first")
    restarts.set_ylabel("H (lower is better)")
    restarts.set_title(f"H of each of the {len(ordered)} restarts", fontsize=10)
    restarts.grid(alpha=0.3)

    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Description": title})
    plt.close(fig)
    return buffer.getvalue()


# --- Unlearning record and deletion ledger entry (SPEC sections 5 and 6) ----------------------------


def _pct(value: Any) -> str:
    return f"{100 * float(value):.2f}" if isinstance(value, int | float) else "–"


def _num(value: Any, fmt: str = ".2f") -> str:
    return format(float(value), fmt) if isinstance(value, int | float) else "–"


def utc_text(stamp: Any) -> str:
    """A Unix time as people read it (``2026-12-01 00:53:39 UTC``); ``–`` when there is none."""
    if not isinstance(stamp, int | float):
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(stamp)))


def unlearning_rows(runs: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per affected run of a request: versions, work done, speed-up beside the seed's, accuracy."""
    rows = []
    for run_id, audit in sorted(runs.items()):
        check = audit.get("verification") or {}
        retrained = audit.get("blocks_retrained")
        rows.append(
            {
                "run": run_id,
                "status": audit.get("status", "–"),
                "version": f"{audit.get('from_version', '–')} → {audit.get('to_version', audit.get('version', '–'))}",
                "ids forgotten": len(audit.get("deleted_ids") or []),
                "blocks retrained": len(retrained) if isinstance(retrained, list) else "–",
                "retrain (s)": _num(audit.get("retrain_seconds")),
                "wall (s)": _num(audit.get("wall_seconds")),
                "speed-up (×)": _num(audit.get("speedup_vs_full_retrain")),
                "B/(B−d+1) (×)": _num(audit.get("theoretical_speedup")),
                "seed's speed-up, MNIST (×)": SEED_SPEEDUP_MNIST,
                "held-out acc before → after (%)": (
                    f"{_pct(audit.get('previous_heldout_accuracy'))} → {_pct(audit.get('heldout_accuracy'))}"
                ),
                "agreement with naive retrain (noise floor) (%)": (
                    f"{_pct(check.get('consistency_with_naive'))} ({_pct(check.get('noise_floor_consistency'))})"
                    if check
                    else "–"
                ),
            }
        )
    return rows


def unlearning_lines(entry: Mapping[str, Any]) -> list[str]:
    runs = (entry.get("details") or {}).get("runs") or {}
    policies = sorted({str(a.get("policy")) for a in runs.values() if a.get("policy")})
    return [
        (
            f"{len(entry.get('ids') or [])} id(s) of `{entry.get('dataset')}` forgotten from {len(runs)} run(s); "
            f"policy {', '.join(policies) or '–'}; status **{entry.get('status')}**."
        ),
        (
            "Speed-up: training time of the whole chain over the time spent retraining; B/(B−d+1) is exact "
            f"retraining's bound from the first affected block d. The seed's {SEED_SPEEDUP_MNIST}× (MNIST) is "
            "DeepObliviate's early-stopped retraining, not exact retraining. Agreement with a naive retrain is "
            "shown when the request was verified (`--verify`), beside its noise floor (the original model)."
        ),
    ]


def _first_ids(ids: Sequence[Any]) -> str:
    """Ids as a table cell: the first 20, then how many in all."""
    shown = [int(i) for i in ids]
    return ", ".join(map(str, shown[:20])) + (f" … ({len(shown)} in all)" if len(shown) > 20 else "")


def ledger_markdown(entry: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> str:
    """The ledger entry as Markdown: the request, then its status history (a table, times in UTC)."""
    shown = _first_ids(entry.get("ids") or [])
    details = entry.get("details") or {}
    requested = entry.get("requested_at")
    settled = details.get("finished_at")
    took = (
        f"{settled - requested:.1f}" if isinstance(settled, int | float) and isinstance(requested, int | float) else "–"
    )
    lines = [
        "| field | value |",
        "|---|---|",
        f"| request | `{entry.get('request_id')}` |",
        f"| status | **{entry.get('status')}** |",
        f"| dataset | `{entry.get('dataset')}` |",
        f"| ids | {shown or '–'} |",
        f"| reason | {entry.get('reason') or '–'} |",
        f"| requested at | {utc_text(requested)} |",
        f"| settled at | {utc_text(settled)} |",
        f"| request to settled (s) | {took} |",
        f"| runs changed | {', '.join(sorted(details.get('runs') or {})) or '–'} |",
    ]
    if details.get("not_trained_on"):
        # A request done with no run changed reads as "forgot nothing" unless the table says why (3786ebe).
        held = _first_ids(details["not_trained_on"])
        lines.append(f"| ids no run trained on (left out of every later training) | {held} |")
    if details.get("reason"):
        lines.append(f"| rejected because | {details['reason']} |")
    lines += ["", "## Status history", "", "| version | status | at (UTC) |", "|---|---|---|"]
    lines += [f"| {h['version']} | {h['status']} | {utc_text(h.get('at'))} |" for h in history]
    return "\n".join(lines)


#: A pass that settled at most this many requests also gets one Markdown artifact per request (its
#: status history) and one unlearning record per request; a bigger pass gets its tables only.
PER_REQUEST_ARTIFACTS_UP_TO = 5
#: Rows per deletion-pass table artifact: a pass of N requests makes ceil(N / this) of them.
PASS_TABLE_ROWS = 500


def pass_rows(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per settled request of a pass: status, what it asked, when it settled, why it was refused."""
    rows = []
    for entry in entries:
        details = entry.get("details") or {}
        reason = details.get("reason") or details.get("last_error") or ""
        rows.append(
            {
                "request": entry.get("request_id"),
                "status": entry.get("status"),
                "dataset": entry.get("dataset"),
                "ids": len(entry.get("ids") or []),
                "ids no run trained on": len(details.get("not_trained_on") or []),
                "runs changed": ", ".join(sorted(details.get("runs") or {})) or "–",
                "requested at (UTC)": utc_text(entry.get("requested_at")),
                "settled at (UTC)": utc_text(details.get("finished_at") or entry.get("updated_at")),
                "why (rejected / failed)": str(reason)[:300] or "–",
            }
        )
    return rows


def _pass_runs(
    entries: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, dict[str, Any]], dict[str, int], dict[str, int]]:
    """The distinct run audits of a pass's requests, one per run and new version; how many requests each
    served and how many ids it forgot (the batch's count where the audit has one, else its requests' ids).

    Named by run id; a run the pass changed twice (a retry pass) names its second version ``run (vN)``.
    """
    runs: dict[str, dict[str, Any]] = {}
    served: dict[str, int] = {}
    ids: dict[str, set[int]] = {}
    batch_ids: dict[str, int] = {}
    for entry in entries:
        for run_id, audit in sorted(((entry.get("details") or {}).get("runs") or {}).items()):
            name = run_id
            if name in runs and _version(runs[name]) != _version(audit):
                name = f"{run_id} (v{_version(audit)})"
            runs.setdefault(name, {**audit, "run_id": run_id})
            served[name] = served.get(name, 0) + 1
            ids.setdefault(name, set()).update(int(i) for i in audit.get("deleted_ids") or [])
            if isinstance(audit.get("batch_deleted_ids"), int):
                batch_ids[name] = max(batch_ids.get(name, 0), int(audit["batch_deleted_ids"]))
    forgotten = {name: max(len(ids.get(name, ())), batch_ids.get(name, 0)) for name in runs}
    return runs, served, forgotten


def _version(audit: Mapping[str, Any]) -> Any:
    return audit.get("to_version", audit.get("version"))


def publish_request_artifacts(store: ObjectStore, ledger: DeletionLedger, request_ids: Iterable[str]) -> None:
    """The dashboard artifacts of one pass's settled requests; their number follows the pass, not its requests.

    A pass that settled at most :data:`PER_REQUEST_ARTIFACTS_UP_TO` requests publishes, per request,
    its ``deletion-ledger`` entry (Markdown with its status history) and, when runs changed, its
    ``unlearning-record`` (a table, one row per run). A bigger pass publishes ``deletion-pass``
    tables (one row per request: status, dataset, ids, runs changed, times, why refused;
    :data:`PASS_TABLE_ROWS` rows each) and one ``unlearning-record`` table (one row per run version
    the pass made, with how many of its requests it served). Each request's ledger entry is read
    once, each new version's manifest once.
    """
    ids = sorted(dict.fromkeys(request_ids))
    if not ids:
        return
    entries: list[dict[str, Any]] = []
    for request_id in ids:
        status = ledger.get(request_id)
        entries.append({**status.as_dict(), "updated_at": status.updated_at})
    manifests: dict[tuple[str, int], str | None] = {}

    def manifest_links(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
        links: dict[str, str] = {}
        for name, audit in sorted(runs.items()):
            run_id, version = str(audit.get("run_id") or name), _version(audit)
            if not isinstance(version, int):
                continue
            if (run_id, version) not in manifests:
                try:
                    manifest = store.read_pointer_version(f"runs/{run_id}/current", version).target["manifest"]
                    manifests[(run_id, version)] = store.uri(manifest)
                except (ObjectNotFound, KeyError, OSError):
                    manifests[(run_id, version)] = None  # a link is a convenience: leave it out rather than fail
            url = manifests[(run_id, version)]
            if url:
                links[f"{run_id} v{version} manifest"] = url
        return links

    if len(entries) <= PER_REQUEST_ARTIFACTS_UP_TO:
        for entry in entries:
            request_id = str(entry["request_id"])
            runs = (entry.get("details") or {}).get("runs") or {}
            links = {
                "ledger entry": store.uri(f"ledger/requests/{request_id}.json"),
                "status history": store.uri(f"ledger/status/{request_id}"),
                **manifest_links(runs),
            }
            publish_markdown(
                key="deletion-ledger",
                title=f"Deletion request {request_id}: {entry['status']}",
                body=ledger_markdown(entry, ledger.history(request_id)),
                links=links,
            )
            if runs:
                publish_table(
                    key="unlearning-record",
                    title=f"Unlearning record of request {request_id}",
                    rows=unlearning_rows(runs),
                    lines=unlearning_lines(entry),
                    links=links,
                )
        return
    counts: dict[str, int] = {}
    for entry in entries:
        counts[str(entry.get("status"))] = counts.get(str(entry.get("status")), 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    rows = pass_rows(entries)
    parts = -(-len(rows) // PASS_TABLE_ROWS)
    for part in range(parts):
        first = part * PASS_TABLE_ROWS
        chunk = rows[first : first + PASS_TABLE_ROWS]
        where = f", rows {first + 1}–{first + len(chunk)}" if parts > 1 else ""
        publish_table(
            key="deletion-pass",
            title=f"Deletion pass: {len(rows)} requests settled ({summary}{where})",
            rows=chunk,
            lines=[
                "One row per request. `obliviate forget --status <request>` prints a request's whole ledger entry "
                + "with its status history."
            ],
            links={"ledger entries": store.uri("ledger/requests"), "status histories": store.uri("ledger/status")},
        )
    runs, served, forgotten = _pass_runs(entries)
    if runs:
        table = unlearning_rows(runs)
        for row in table:
            row["ids forgotten"] = forgotten[str(row["run"])]
            row["requests served"] = served[str(row["run"])]
        publish_table(
            key="unlearning-record",
            title=f"Unlearning record of a pass: {len(runs)} run version(s) for {len(rows)} requests",
            rows=table,
            lines=unlearning_lines({"ids": [], "details": {"runs": runs}, "status": summary})[1:],
            links=manifest_links(runs),
        )
