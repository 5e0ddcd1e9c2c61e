"""Pure rules of the unlearning service (SPEC sections 4-5 applied to registered runs).

The service keeps many block-sequenced runs, each trained on a subset of a dataset. A deletion
request names *dataset* sample ids (row indices of the dataset the runs were drawn from); this
module maps them to each run's training positions (the ids :mod:`obliviate.unlearning.trainer` and
:mod:`obliviate.unlearning` work with), checks requests and event payloads, and derives the
deterministic names that make retried work land in the same place.

No storage, Ray or Prefect here: :mod:`storage.registry` and :mod:`storage.ledger` persist what
these functions compute, :mod:`actors.chains` and :mod:`flows.unlearn` run them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from obliviate.checks import is_whole
from obliviate.data import ImageDataset, stratified_split
from obliviate.errors import ConfigError, ObliviateError
from obliviate.unlearning.config import BlockTrainingConfig
from obliviate.unlearning.plan import BlockPlan

if TYPE_CHECKING:  # chain imports torch: the ledger and the store's readers use this module without it
    from obliviate.unlearning.chain import BlockData

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
REQUEST_ID_PATTERN = RUN_ID_PATTERN
_SPLIT_STREAM = 0x5E1F  # keeps the train/held-out split independent of the block split
_HELDOUT_SWAP_STREAM = 0x5E20  # the replacements of erased held-out rows: the split itself does not move


class RequestError(ObliviateError, ValueError):
    """A deletion request or event payload breaks a rule; nothing was changed."""


def check_name(value: Any, *, what: str) -> str:
    """Return ``value`` if it is a usable run or request id, else raise :class:`RequestError`."""
    if not isinstance(value, str) or not RUN_ID_PATTERN.match(value):
        raise RequestError(
            f"rule: a {what} is 1-64 characters of letters, digits, '_', '.', '-' starting with a letter or "
            f"digit; got {value!r}."
        )
    return value


@dataclass(frozen=True)
class RunSpec:
    """What a registered run was trained on: enough to rebuild its data and map deletions.

    Attributes:
        run_id: unique name of the run in its store.
        dataset: source passed to :func:`obliviate.data.load_dataset` (``digits``, ``mnist5k``, a path).
        dataset_fingerprint: fingerprint of the whole dataset at training time.
        train_ids: dataset row ids of the training set, in training-position order: position p of
            the chain (the id :mod:`obliviate.unlearning.trainer` uses) is dataset row ``train_ids[p]``.
        heldout_ids: dataset row ids of the held-out set (accuracy, guardrail, consistency).
        config: the chain's :class:`BlockTrainingConfig`.
        split_seed: seed of the train/held-out split.
        erased_at_planning: the run's dataset ids whose erasure was requested when it was planned
            (:func:`plan_run`'s ``erased_ids``): none of them is held out. Kept so that planning the run
            again with its options draws the very same split, whatever was requested since.
    """

    run_id: str
    dataset: str
    dataset_fingerprint: str
    train_ids: tuple[int, ...]
    heldout_ids: tuple[int, ...]
    config: BlockTrainingConfig
    split_seed: int
    erased_at_planning: tuple[int, ...] = ()
    _position: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_name(self.run_id, what="run id")
        if set(self.train_ids) & set(self.heldout_ids):
            raise ConfigError("a run's training and held-out ids must be disjoint.")
        if set(self.erased_at_planning) & set(self.heldout_ids):
            raise ConfigError(
                "rule: a run's held-out set holds no row whose erasure was requested when it was planned; got "
                f"{sorted(set(self.erased_at_planning) & set(self.heldout_ids))[:5]} in both. Plan the run again."
            )
        object.__setattr__(self, "_position", {int(d): p for p, d in enumerate(self.train_ids)})

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "dataset": self.dataset,
            "dataset_fingerprint": self.dataset_fingerprint,
            "train_ids": list(self.train_ids),
            "heldout_ids": list(self.heldout_ids),
            "config": self.config.to_dict(),
            "split_seed": self.split_seed,
            # only when there were any, so a spec stored before the field compares equal to its re-planning
            **({"erased_at_planning": list(self.erased_at_planning)} if self.erased_at_planning else {}),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunSpec:
        return cls(
            run_id=values["run_id"],
            dataset=values["dataset"],
            dataset_fingerprint=values["dataset_fingerprint"],
            train_ids=tuple(int(i) for i in values["train_ids"]),
            heldout_ids=tuple(int(i) for i in values["heldout_ids"]),
            config=BlockTrainingConfig.from_dict(dict(values["config"])),
            split_seed=int(values["split_seed"]),
            erased_at_planning=tuple(int(i) for i in values.get("erased_at_planning", ())),
        )

    def positions(self, dataset_ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(positions of the ids this run trained on, dataset ids it never trained on)``."""
        held, missing = [], []
        for value in dataset_ids:
            position = self._position.get(int(value))
            if position is None:
                missing.append(int(value))
            else:
                held.append(position)
        return np.asarray(sorted(held), dtype=np.int64), np.asarray(sorted(missing), dtype=np.int64)

    def dataset_ids(self, positions: Iterable[int]) -> list[int]:
        """Dataset row ids of training positions."""
        return sorted(int(self.train_ids[int(p)]) for p in positions)


def default_heldout_size(dataset_size: int) -> int:
    """Held-out samples when none are asked for: 300, or a fifth of a dataset under 1,500 samples."""
    return min(300, dataset_size // 5)


def plan_run(
    *,
    run_id: str,
    dataset: ImageDataset,
    source: str,
    train_size: int | None,
    heldout_size: int | None,
    split_seed: int,
    config: BlockTrainingConfig,
    erased_ids: Iterable[int] = (),
) -> RunSpec:
    """Draw a run's class-stratified train/held-out split and check the config fits the data (SPEC 4).

    No row whose erasure is requested is held out: the held-out set is used for as long as the run serves
    (accuracies, the interim judge, verification), so an erased row drawn into it would be used after its
    erasure. Each one the draw put there changes places with a training row of its class that is not erased
    (:func:`heldout_without`); in the training set, the training leaves it out as it leaves out every erased
    row. The sizes and class proportions stay those asked for.

    Args:
        run_id: the run's name.
        dataset: the loaded dataset.
        source: how to load it again (stored with the run).
        train_size: training samples (default: everything not held out).
        heldout_size: held-out samples (default :func:`default_heldout_size`).
        split_seed: seed of the split (independent of ``config.seed``).
        config: the chain's options; ``image_size``, ``levels`` and ``num_classes`` must match the data.
        erased_ids: dataset ids whose erasure is requested now (every standing deletion request of the
            dataset); stored with the run as ``erased_at_planning``, and given again to re-plan it.

    Raises:
        ConfigError: sizes or a config that do not fit the data, or too few rows that are not erased to fill
            the held-out set.
    """
    if not isinstance(split_seed, int) or isinstance(split_seed, bool) or split_seed < 0:
        raise ConfigError(f"split_seed (--split-seed) must be an integer >= 0; got {split_seed!r}.")
    n = len(dataset)
    heldout_size = default_heldout_size(n) if heldout_size is None else heldout_size
    train_size = n - heldout_size if train_size is None else train_size
    if heldout_size < 1 or train_size < config.num_blocks or train_size + heldout_size > n:
        fits = (
            f"e.g. heldout_size={max(1, n // 5)} and train_size={n - max(1, n // 5)}"
            if n - max(1, n // 5) >= config.num_blocks
            else f"this dataset is too small for {config.num_blocks} blocks: use fewer blocks or more data"
        )
        raise ConfigError(
            f"a run needs 1 <= heldout_size (--heldout-size), num_blocks={config.num_blocks} <= train_size "
            f"(--train-size) and train_size + heldout_size <= {n} (the dataset's size); got train_size={train_size}, "
            f"heldout_size={heldout_size}. Sizes that fit: {fits}."
        )
    height, width = dataset.image_shape
    if (config.image_size, config.image_size) != (height, width) or config.levels != dataset.levels:
        raise ConfigError(
            f"config image_size={config.image_size}, levels={config.levels} do not match the data "
            f"({height}x{width} images, {dataset.levels} levels); set them from the dataset."
        )
    if config.num_classes < dataset.num_classes:
        raise ConfigError(f"config num_classes={config.num_classes} < the data's {dataset.num_classes} classes.")
    train_idx, heldout_idx = stratified_split(
        dataset.labels, sizes=(train_size, heldout_size), rng=np.random.default_rng((split_seed, _SPLIT_STREAM))
    )
    drawn = {int(i) for i in train_idx} | {int(i) for i in heldout_idx}
    erased = sorted({int(i) for i in erased_ids} & drawn)
    train_idx, heldout_idx = heldout_without(
        erased,
        train=train_idx,
        heldout=heldout_idx,
        labels=dataset.labels,
        rng=np.random.default_rng((split_seed, _HELDOUT_SWAP_STREAM)),
    )
    return RunSpec(
        run_id=check_name(run_id, what="run id"),
        dataset=source,
        dataset_fingerprint=dataset.fingerprint,
        train_ids=tuple(int(i) for i in train_idx),
        heldout_ids=tuple(int(i) for i in heldout_idx),
        config=config,
        split_seed=split_seed,
        erased_at_planning=tuple(erased),
    )


def heldout_without(
    erased: Sequence[int], *, train: np.ndarray, heldout: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, heldout)`` with every ``erased`` id of ``heldout`` swapped for a training id that is not erased.

    The replacement is drawn by ``rng`` among the training ids of the same class not erased and not yet drawn
    (any class when that class has none left); it takes the erased id's place, and the erased id takes its place
    in ``train``, so sizes and positions stay, and so do the class counts where the class had a replacement.

    Raises:
        ConfigError: the training ids hold too few rows that are not erased to replace every erased held-out row.
    """
    train, heldout = np.array(train, dtype=np.int64), np.array(heldout, dtype=np.int64)
    excluded = {int(i) for i in erased}
    swap_out = [p for p, i in enumerate(heldout.tolist()) if i in excluded]
    if not swap_out:
        return train, heldout
    taken: set[int] = set()
    for place in swap_out:
        free = [p for p, i in enumerate(train.tolist()) if i not in excluded and p not in taken]
        same = [p for p in free if labels[train[p]] == labels[heldout[place]]]
        if not free:
            raise ConfigError(
                f"rule: no row whose erasure is requested is held out, and {len(swap_out)} of the {len(heldout)} "
                f"held-out rows drawn are erased, with only {len(taken)} training rows not erased to take their "
                "place. Lower --heldout-size, or raise --train-size."
            )
        chosen = int(rng.choice(same or free))
        taken.add(chosen)
        train[chosen], heldout[place] = heldout[place], train[chosen]
    return train, heldout


def block_data(spec: RunSpec, *, dataset: ImageDataset) -> BlockData:
    """The run's :class:`BlockData`, after checking ``dataset`` is the one it was trained on."""
    from obliviate.unlearning.chain import BlockData

    if dataset.fingerprint != spec.dataset_fingerprint:
        raise ConfigError(
            f"run {spec.run_id} was trained on dataset {spec.dataset!r} with fingerprint {spec.dataset_fingerprint}, "
            f"but the data loaded now has {dataset.fingerprint}: the source changed. Point the run at its data."
        )
    return BlockData(
        train=dataset.subset(np.asarray(spec.train_ids, dtype=np.int64)),
        heldout=dataset.subset(np.asarray(spec.heldout_ids, dtype=np.int64)),
    )


def block_holdings(spec: RunSpec, *, plan: BlockPlan) -> list[list[int]]:
    """Dataset sample ids held by each block (block 1 first): what the registry records."""
    return [spec.dataset_ids(plan.block_ids(b)) for b in range(1, plan.num_blocks + 1)]


MAX_SAMPLE_ID = 2**63 - 1  # ids travel as int64 arrays; anything larger cannot index a dataset
_ID_TOKEN = re.compile(r"^[0-9]+$")  # ASCII digits only: no '+5', '1_000', ' 5' or non-ASCII digits


def parse_ids(raw: Any, *, dataset_size: int | None = None, dataset: str = "the dataset") -> tuple[int, ...]:
    """Check the ids of a deletion request at the boundary; return them sorted.

    Accepts a list of non-negative integers (or a string ``"3,17,42"`` from a CLI). Each CLI token
    is plain ASCII digits (Python's ``int`` would also take ``+5``, ``1_000`` and other
    scripts' digits: refused here, so what the user typed is what is deleted); an empty element between
    commas (``3,,4``, ``3,``) is refused too, as it may be an id dropped while typing. Every id fits in
    int64 and, when ``dataset_size`` is known, indexes a row of the dataset (SPEC 5: a deletion
    names training samples by dataset row).

    Raises:
        RequestError: empty, non-integer, negative, too large, out of range or repeated ids.
    """
    if isinstance(raw, str):
        elements = raw.split(",")
        empty = [n for n, element in enumerate(elements, 1) if not element.strip()]
        if raw.strip() and empty:  # "3,,4" or "3,": an id may have been dropped, so nothing is guessed
            raise RequestError(
                f"rule: ids are comma-separated integers like 3,17,42, with an id between every two commas; got "
                f"{'an empty element' if len(empty) == 1 else f'{len(empty)} empty elements'} (element "
                f"{', '.join(map(str, empty[:5]))} of {len(elements)}) in {raw[:80]!r}, so an "
                "id may be missing. Write the missing id, or remove the extra comma"
                + (
                    f": --ids {','.join(e.strip() for e in elements if e.strip())}"
                    if len(empty) < len(elements)
                    else ""
                )
                + "."
            )
        parts = [p for element in elements for p in element.split()]  # spaces separate ids too: "3 17, 42"
        bad_tokens = [p for p in parts if not _ID_TOKEN.match(p)]
        if bad_tokens:
            raise RequestError(
                f"rule: ids are comma-separated integers like 3,17,42 (ASCII digits only, no sign, '_' or "
                f"exponent); got {bad_tokens[:5]!r} in {raw[:80]!r}. Write each id as plain digits, e.g. --ids 3,17,42."
            )
        raw = [int(p) for p in parts]
    if not isinstance(raw, (list, tuple)) or not raw:
        raise RequestError(f"rule: a deletion names a non-empty list of sample ids; got {raw!r}. Give at least one id.")
    bad = [v for v in raw if not is_whole(v) or v < 0]
    if bad:
        raise RequestError(
            f"rule: sample ids are non-negative integers (dataset row indices); got {bad[:5]!r}. Remove them."
        )
    values = sorted(int(v) for v in raw)
    limit = MAX_SAMPLE_ID if dataset_size is None else int(dataset_size) - 1
    too_large = [v for v in values if v > limit]
    if too_large:
        where = "int64" if dataset_size is None else f"{dataset} ({dataset_size} rows: ids 0..{limit})"
        raise RequestError(
            f"rule: a sample id is a row index of {where}; got {too_large[:5]!r}. Remove them; nothing was recorded."
        )
    repeated = sorted({v for v, n in zip(values, np.diff(values, prepend=-1), strict=True) if n == 0})
    if repeated:
        raise RequestError(
            f"rule: each sample id appears once per request; repeated: {repeated[:10]}. Give each id once."
        )
    return tuple(values)


def retry_delay_s(attempt: int, *, first_s: float, max_s: float) -> float:
    """Back-off before retry number ``attempt`` (1-based) of a failed request: doubling, capped."""
    return float(min(max_s, first_s * 2 ** max(0, attempt - 1)))


def request_id_for(ids: Sequence[int], *, dataset: str, salt: str) -> str:
    """A request id derived from its content and a caller-chosen salt (a time stamp, a ticket).

    The content is the *set* of ids: their order and repeats do not change the id (the ids are
    sorted and deduplicated first, which leaves the ids of :func:`parse_ids`' sorted output as they were).

    Args:
        ids: the request's sample ids.
        dataset: the dataset they index.
        salt: anything that tells two requests for the same ids apart.

    Returns:
        ``del-`` and 16 hex digits.
    """
    content = ",".join(str(i) for i in sorted({int(i) for i in ids}))
    digest = hashlib.sha256(f"{dataset}|{content}|{salt}".encode()).hexdigest()
    return f"del-{digest[:16]}"


def parse_event_payload(payload: Any) -> str:
    """The request id a deletion event refers to.

    An event of this form is only a notification: the ledger entry it names holds the request, so
    the only field read is ``request_id``. (The ``unlearn`` flow also takes a payload
    ``{"ids": [...], "dataset": ...}``, which it appends to the ledger first:
    :func:`flows.unlearn.event_request`.)

    Raises:
        RequestError: the payload is not a mapping with a valid ``request_id``; the message says
            which payloads are taken.
    """
    forms = (
        "Send {'request_id': ...} naming a ledger entry written first (`obliviate forget --no-event`, "
        "flows.unlearn.submit_deletion(..., emit=False)), or {'ids': [...], 'dataset': ...}."
    )
    if not isinstance(payload, Mapping):
        raise RequestError(
            f"rule: a deletion event's payload is an object {{'request_id': ...}} or {{'ids': [...], "
            f"'dataset': ...}}; got {type(payload).__name__} {str(payload)[:80]!r}. {forms}"
        )
    if "request_id" not in payload:
        raise RequestError(
            f"rule: a deletion event's payload names the ledger entry in 'request_id', or the ids in 'ids'; got keys "
            f"{sorted(payload)[:8]}. {forms}"
        )
    return check_name(payload["request_id"], what="request id")


def work_token(*, base_version: int, excluded_positions: Iterable[int], policy: str) -> str:
    """Name of the folder an unlearning writes new checkpoints to.

    Depends only on what is computed (base model version, the set of excluded positions, policy), so a
    retried or restarted worker finds the checkpoints a killed one already wrote and resumes. Order and
    repeats of the positions do not matter (they are deduplicated; callers pass a set, whose token is
    unchanged).
    """
    positions = sorted({int(p) for p in excluded_positions})
    digest = hashlib.sha256(f"{base_version}|{policy}|{','.join(str(p) for p in positions)}".encode()).hexdigest()
    return f"u{base_version:06d}-{digest[:12]}"
