"""The model-extraction audit: one (attacker, selector, budget, seed) cell, and the report over cells.

SPEC sections 3 and 3b. A cell spends ``budget`` label queries chosen by a selector, lets an
attacker (:mod:`obliviate.extraction.attackers`) train a substitute on the answers and the
unlabeled rest of the pool, and measures

* accuracy of the substitute on a held-out test set (true labels),
* agreement with the target on that test set (the fairer figure: the target's own accuracy
  caps the first),
* transferability of FGSM / I-FGSM examples crafted on the substitute, at each eps, from test
  inputs the target classifies correctly,
* what was bought: the class histogram of the queried labels and the mean image entropy of
  the queried images, next to the pool's (the failure mode of raw-MI DRMI is visible here).

The target is seen twice: the attacker's budgeted :class:`~obliviate.extraction.target.Target` and an
evaluation oracle (``budget=None``) that only the metrics use. The attacker's view answers labels
(the default) or class probabilities (SPEC section 3's switch: each image costs one query either
way, and the attackers train on the probabilities as soft targets); agreement, accuracy,
transferability and the class histograms are measured on classes (a probability row's argmax).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import cast

import numpy as np
import torch

from obliviate.data import ImageDataset, stratified_split
from obliviate.defaults import DEFAULT_SEEDS  # noqa: F401 (re-exported from its old home)
from obliviate.errors import ConfigError
from obliviate.extraction.attackers import AttackOptions, train_substitute
from obliviate.extraction.selectors import Pool, acquire, image_entropy
from obliviate.extraction.substitute import (
    TrainConfig,
    accuracy,
    agreement,
    hard_labels,
    predict_labels,
    train_classifier,
    transferability,
)
from obliviate.extraction.target import Target

#: The seed's table (SPEC section 3): MNIST, LeNet-5 target, accuracy / transferability in %.
SEED_BUDGETS = (50, 150, 200, 300, 600)
# DEFAULT_SEEDS (seeds per (selector, budget) of a default audit) is held, with why, in obliviate.defaults.
SEED_TABLE: dict[str, dict[str, tuple[float, ...]]] = {
    "drmi": {
        "accuracy": (82.27, 92.13, 93.27, 94.34, 96.49),
        "transferability": (66.06, 68.32, 69.15, 69.80, 71.98),
    },
    "practical": {"accuracy": (65, 81.2, 85, 87, 90), "transferability": (19, 27, 28, 33, 39)},
    "prada": {"accuracy": (75, 89, 90, 91, 94), "transferability": ()},  # the seed reports none
}
#: The FGSM radius of the seed's transferability figures (SEED_TABLE's "transferability").
SEED_TRANSFER_EPS = 0.3
#: The seed's DRMI columns of a report, named with what they measure (the transfer column is at one radius only).
SEED_COLUMNS = ("seed DRMI acc %", f"seed DRMI transfer ε={SEED_TRANSFER_EPS:g} %")


@dataclass(frozen=True)
class CellResult:
    """Metrics of one (attacker, selector, budget, seed) cell. Rates are fractions in ``[0, 1]``."""

    selector: str
    budget: int
    seed: int
    queries: int
    accuracy: float
    agreement: float
    transfer: dict[str, float]
    class_histogram: list[int]
    mean_entropy: float
    synthetic: int
    seconds: float
    substitute: str
    attacker: str = "basic"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def run_cell(
    *,
    selector: str,
    budget: int,
    seed: int,
    pool: Pool,
    attacker: Target,
    oracle: Target,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    train: TrainConfig = TrainConfig(),
    eps: Sequence[float] = (0.3,),
    iterative: bool = False,
    num_classes: int = 10,
    oracle_test_labels: np.ndarray | None = None,
    attack: str = "basic",
    attack_options: AttackOptions | None = None,
) -> CellResult:
    """Run one audit cell (SPEC sections 3 and 3b).

    Args:
        selector: a name registered in :data:`obliviate.extraction.selectors.SELECTORS`.
        budget: queries the attacker may spend (``attacker.budget`` must allow it).
        seed: seeds the selector's generator and the substitute's initialisation.
        pool: the attacker's unlabeled pool.
        attacker: the budgeted view of the target: label-only (the default), or answering class probabilities
            (its ``output``), which the attacker then trains on.
        oracle: an unbudgeted view used only for measuring (agreement, transferability), on classes.
        test_images: ``(m, H, W)`` uint8 held-out images, disjoint from pool and target training.
        test_labels: their true labels.
        train: substitute architecture and training.
        eps: FGSM radii on ``[0, 1]`` inputs.
        iterative: I-FGSM instead of FGSM.
        num_classes: classes of the task.
        oracle_test_labels: the target's labels on the test set, if already known.
        attack: the attacker that trains the substitute (:data:`obliviate.extraction.attackers.ATTACKERS`).
        attack_options: its options (default: ``AttackOptions`` with ``train``'s architecture and,
            for ``basic``, ``train``'s steps).
    """
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    bought = acquire(selector, pool=pool, k=budget, rng=rng, target=attacker, train=train)
    options = attack_options or AttackOptions(arch=train.arch, basic_steps=train.steps)
    unbought = np.ones(pool.n, bool)
    unbought[bought.pool_indices[bought.pool_indices >= 0]] = False
    trained = train_substitute(
        attack,
        images=bought.images,
        labels=bought.labels,
        unlabeled=pool.images[unbought],
        options=options,
        seed=seed,
        num_classes=num_classes,
        levels=pool.levels,
    )
    substitute = trained.model
    sub_labels = predict_labels(substitute, images=test_images, levels=pool.levels)

    def target_classes(images: np.ndarray) -> np.ndarray:
        return hard_labels(oracle.query(images))  # the metrics compare classes, whatever the oracle answers

    target_labels = target_classes(test_images) if oracle_test_labels is None else oracle_test_labels
    transfer = {
        f"{e:g}": transferability(
            substitute,
            target_predict=target_classes,
            images=test_images,
            labels=test_labels,
            eps=e,
            iterative=iterative,
            levels=pool.levels,
        )
        for e in eps
    }
    return CellResult(
        selector=selector,
        budget=budget,
        seed=seed,
        queries=bought.queries,
        accuracy=accuracy(predicted=sub_labels, truth=test_labels),
        agreement=agreement(substitute_labels=sub_labels, target_labels=target_labels),
        transfer=transfer,
        class_histogram=np.bincount(hard_labels(bought.labels), minlength=num_classes).tolist(),
        mean_entropy=float(image_entropy(bought.images, levels=pool.levels).mean()),
        synthetic=int((bought.pool_indices < 0).sum()),
        seconds=time.perf_counter() - start,
        substitute=options.arch,
        attacker=attack,
        extra={"training": trained.info},
    )


@dataclass(frozen=True)
class SummaryRow:
    """Mean and standard deviation over seeds of one (attacker, selector, budget)."""

    selector: str
    budget: int
    runs: int
    accuracy_mean: float
    accuracy_std: float
    agreement_mean: float
    agreement_std: float
    transfer_mean: dict[str, float]
    transfer_std: dict[str, float]
    class_histogram: list[float]
    mean_entropy: float
    attacker: str = "basic"
    seconds_mean: float = float("nan")

    @property
    def label(self) -> str:
        """``attacker / selector``, how reports name a curve."""
        return f"{self.attacker} / {self.selector}"


def summarize(cells: Sequence[CellResult | dict]) -> list[SummaryRow]:
    """Group cells by (attacker, selector, budget) and average over seeds (population std, ddof=0)."""
    dicts = [c.to_dict() if isinstance(c, CellResult) else c for c in cells]
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for c in dicts:
        groups.setdefault((c.get("attacker", "basic"), c["selector"], int(c["budget"])), []).append(c)
    names = list(dict.fromkeys((d.get("attacker", "basic"), d["selector"]) for d in dicts))
    rows = []
    for (atk, sel, budget), members in sorted(groups.items(), key=lambda kv: (names.index(kv[0][:2]), kv[0][2])):
        acc = np.array([m["accuracy"] for m in members])
        agr = np.array([m["agreement"] for m in members])
        eps_keys = list(members[0]["transfer"])
        tr = {e: np.array([m["transfer"][e] for m in members]) for e in eps_keys}
        rows.append(
            SummaryRow(
                selector=sel,
                budget=budget,
                runs=len(members),
                accuracy_mean=float(acc.mean()),
                accuracy_std=float(acc.std()),
                agreement_mean=float(agr.mean()),
                agreement_std=float(agr.std()),
                transfer_mean={e: float(np.nanmean(v)) for e, v in tr.items()},
                transfer_std={e: float(np.nanstd(v)) for e, v in tr.items()},
                class_histogram=np.mean([m["class_histogram"] for m in members], axis=0).round(2).tolist(),
                mean_entropy=float(np.mean([m["mean_entropy"] for m in members])),
                attacker=atk,
                seconds_mean=float(np.mean([m["seconds"] for m in members])),
            )
        )
    return rows


def markdown_report(
    rows: Sequence[SummaryRow],
    *,
    pool_histogram: Sequence[int] | None = None,
    pool_entropy: float | None = None,
) -> str:
    """A Markdown report: the metrics table (percent, mean ± std over seeds, :func:`rate_cell`) with the
    seed's DRMI numbers beside it, then what each selector bought (class histogram, mean entropy) next to
    the pool's."""
    eps_keys = list(rows[0].transfer_mean) if rows else []
    head = ["attacker", "selector", "budget", "runs", "accuracy %", "agreement %"] + [
        f"transfer ε={e} %" for e in eps_keys
    ]
    head += ["seconds / cell", *SEED_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        seed_acc, seed_tr = seed_reference(r.budget)
        cells = [
            r.attacker,
            r.selector,
            str(r.budget),
            str(r.runs),
            rate_cell(r.accuracy_mean, r.accuracy_std, runs=r.runs),
            rate_cell(r.agreement_mean, r.agreement_std, runs=r.runs),
        ]
        cells += [rate_cell(r.transfer_mean[e], r.transfer_std[e], runs=r.runs) for e in eps_keys]
        cells += [f"{r.seconds_mean:.1f}", _fmt(seed_acc), _fmt(seed_tr)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        (
            "What each selector bought (class histogram of the queried labels, mean over seeds; "
            "mean gray-level entropy of the queried images, nats):"
        ),
        "",
    ]
    lines.append("| selector | budget | class histogram 0..9 | mean entropy |")
    lines.append("|---|---|---|---|")
    if pool_histogram is not None:
        lines.append(
            f"| pool | {int(np.sum(pool_histogram))} | {' '.join(str(int(v)) for v in pool_histogram)} | "
            f"{_fmt(pool_entropy, digits=3)} |"
        )
    seen = set()
    for r in rows:
        if (r.selector, r.budget) in seen:
            continue  # what was bought depends on the selector, not on the attacker
        seen.add((r.selector, r.budget))
        hist = " ".join(f"{v:g}" for v in r.class_histogram)
        lines.append(f"| {r.selector} | {r.budget} | {hist} | {r.mean_entropy:.3f} |")
    return "\n".join(lines) + "\n"


def rate_cell(mean: float, std: float, *, runs: int) -> str:
    """A rate (a fraction) as a report's table cell in percent: ``mean ± std`` over ``runs`` seeds.

    From a single seed it is the value alone: ``± 0.00`` would claim that the rate does not vary
    with the seed, when one seed cannot say.
    """
    value = f"{100 * mean:.2f}"
    return value if runs < 2 else f"{value} ± {100 * std:.2f}"


def rates_said(rows: Sequence[SummaryRow]) -> str:
    """The report's sentence on what its rates are: a mean ± std, or one seed's value (see :func:`rate_cell`)."""
    if rows and all(r.runs < 2 for r in rows):
        return "Rates are percent, from one seed per cell (no spread: `--seeds N` measures a mean ± std)"
    return "Rates are percent, mean ± std over seeds"


def seed_reference(budget: int) -> tuple[float | None, float | None]:
    """The seed's DRMI accuracy and transferability (percent) at ``budget``, if it reported one."""
    if budget not in SEED_BUDGETS:
        return None, None
    i = SEED_BUDGETS.index(budget)
    return SEED_TABLE["drmi"]["accuracy"][i], SEED_TABLE["drmi"]["transferability"][i]


def _fmt(value: float | None, *, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def check_pool_fits_target(*, pool: ImageDataset, target_meta: dict) -> None:
    """Refuse a pool the target cannot be queried with (other image sides or gray levels), or whose
    labels it cannot answer (a label outside the target's classes ``0..num_classes-1``: every answer
    would score wrong, and the report's accuracy, transfer columns and histograms would be garbage).

    ``target_meta`` is what the target declares (checkpoint ``meta`` or the server's ``GET /info``);
    a figure it does not declare is not checked.

    Raises:
        ConfigError: the pool's image side or gray levels differ from the target's, or a label of the
            pool lies outside the target's classes.
    """
    side, levels = target_meta.get("image_size"), target_meta.get("levels")
    trained_on = target_meta.get("dataset")
    fix = (
        f"pass the pool the target was trained on (--pool {trained_on})" if trained_on else "pass a pool like its data"
    )
    if side is not None and pool.image_shape[:2] != (int(side), int(side)):
        raise ConfigError(
            f"the target takes {side}x{side} images, but pool {pool.name!r} holds "
            f"{pool.image_shape[0]}x{pool.image_shape[1]} images; {fix}."
        )
    if levels is not None and int(levels) != pool.levels:
        raise ConfigError(
            f"the target reads images of {levels} gray levels, but pool {pool.name!r} has {pool.levels}; {fix}."
        )
    classes = target_meta.get("num_classes")
    if classes is not None and len(pool):
        low, high = int(pool.labels.min()), int(pool.labels.max())
        if low < 0 or high >= int(classes):
            outside = int(((pool.labels < 0) | (pool.labels >= int(classes))).sum())
            raise ConfigError(
                f"the target answers classes 0..{int(classes) - 1}, but pool {pool.name!r} has labels {low}..{high} "
                f"({outside} of its {len(pool)} images outside them): accuracy and transferability would be "
                f"measured against labels the target cannot give. {fix[0].upper()}{fix[1:]}, or relabel it to "
                f"0..{int(classes) - 1}."
            )


def target_training_indices(*, pool: ImageDataset, target_meta: dict) -> tuple[list[int], str | None]:
    """The images that trained the target, to keep out of the attacker's pool and test set (SPEC 3b).

    The ids the target declares it forgot (``forgotten_indices``: a run server's ``GET /info``, a scheduled
    audit's checkpoint) are left out too: they are data subjects' erased rows, which a deletion service must
    not go on querying and training substitutes with, not images "outside the training set".

    Returns:
        The indices into ``pool`` (empty when the target does not declare them, or declares them
        for other data), and a warning saying why none could be excluded, else ``None``.
    """
    declared = [*target_meta.get("train_indices", []), *target_meta.get("forgotten_indices", [])]
    exclude = sorted({int(i) for i in declared})
    if not exclude:
        return [], "the target did not say which images trained it: the pool may overlap its training data."
    if target_meta.get("dataset_fingerprint") not in (None, pool.fingerprint):
        return [], (
            f"the target was trained on data with fingerprint {target_meta.get('dataset_fingerprint')}, not "
            f"{pool.fingerprint}; its training indices were not excluded from the pool."
        )
    return exclude, None


def forgotten_rows(*, pool: ImageDataset, target_meta: dict) -> int:
    """How many rows of ``pool`` :func:`target_training_indices` leaves out only because the target forgot them
    (declared in ``forgotten_indices``, not in ``train_indices``); 0 when the target declares other data."""
    if target_meta.get("dataset_fingerprint") not in (None, pool.fingerprint):
        return 0
    trained = {int(i) for i in target_meta.get("train_indices", [])}
    forgotten = {int(i) for i in target_meta.get("forgotten_indices", [])} - trained
    return sum(1 for i in forgotten if 0 <= i < len(pool))


#: The bench's split (``bench/extraction.py``, ``SIZES``): :func:`draw_split` of mnist5k into target
#: training, attacker pool and test set, in this order; split ``s`` is drawn with seed ``s``.
BENCH_DATASET = "mnist5k"
BENCH_SPLIT_SIZES = (2000, 2000, 1000)
#: Images that train a target by default (``obliviate target train``, ``steal --demo``): the bench's 2,000.
DEFAULT_TARGET_TRAIN_SIZE = BENCH_SPLIT_SIZES[0]


def default_target_train_size(dataset_size: int) -> int:
    """The bench's 2,000 training images when the dataset also holds the bench's pool and test set
    (mnist5k's 5,000 images exactly), else a third of it (599 of digits' 1,797)."""
    # Not min(2000, n // 3): that gave mnist5k 1,666 training images, another split than the bench's.
    return DEFAULT_TARGET_TRAIN_SIZE if dataset_size >= sum(BENCH_SPLIT_SIZES) else dataset_size // 3


def is_bench_split(*, dataset: str, train_size: int, pool_size: int, test_size: int) -> bool:
    """Whether :func:`draw_split` with these sizes on ``dataset`` draws the bench's split (any seed)."""
    return dataset == BENCH_DATASET and (train_size, pool_size, test_size) == BENCH_SPLIT_SIZES


def fit_split(*, available: int, pool_size: int, test_size: int) -> tuple[int, int]:
    """Pool and test sizes no larger than asked that fit in ``available`` images, split 2 : 1 when short."""
    pool = min(pool_size, 2 * available // 3)
    return pool, min(test_size, available - pool)


def check_split_fits(*, available: int, pool_size: int, test_size: int, dataset: str) -> None:
    """Refuse a pool and test set larger than the images left outside the target's training set.

    Raises:
        ConfigError: ``pool_size + test_size`` exceeds ``available``; the message suggests sizes
            that fit, in the audit's 2 : 1 proportion.
    """
    if pool_size + test_size > available:
        fit_pool, fit_test = fit_split(available=available, pool_size=available, test_size=available)
        raise ConfigError(
            f"the pool and test set are drawn from the {available} images of {dataset} that did not train the "
            f"target, so pool_size + test_size must be at most {available}; got {pool_size} + {test_size} = "
            f"{pool_size + test_size}. Lower them (--pool-size, --test-size), e.g. {fit_pool} and {fit_test}."
        )


def train_target(
    data: ImageDataset,
    *,
    train_size: int,
    config: TrainConfig,
    seed: int,
) -> tuple[torch.nn.Module, dict]:
    """Train a target classifier on a stratified, seeded part of ``data``.

    Returns:
        the model and checkpoint metadata (``train_indices`` among them, so an audit can draw
        its pool from the rest).
    """
    if not 1 <= train_size < len(data):
        raise ConfigError(f"train_size must be in 1..{len(data) - 1} (leave images for the pool); got {train_size}.")
    train_idx, _, _ = draw_split(data.labels, train_size=train_size, pool_size=0, test_size=0, seed=seed)
    model = train_classifier(
        images=data.images[train_idx],
        labels=data.labels[train_idx],
        config=config,
        seed=seed,
        num_classes=data.num_classes,
        levels=data.levels,
    )
    meta = {
        "num_classes": data.num_classes,
        "image_size": data.image_shape[0],
        "levels": data.levels,
        "dataset": data.name,
        "dataset_fingerprint": data.fingerprint,
        "train_indices": sorted(int(i) for i in train_idx),
        "train_steps": config.steps,
        "seed": seed,
        # How to redraw the split: draw_split(labels, train_size=..., seed=split_seed) (same as the bench).
        "split_seed": seed,
        "train_size": train_size,
    }
    return model, meta


def draw_split(
    labels: np.ndarray, *, train_size: int, pool_size: int, test_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one split of the audit: disjoint stratified (target training, attacker pool, test) indices.

    ``obliviate target train``, ``obliviate steal`` and ``bench/extraction.py`` all draw with this
    function, so "split s" names the same images everywhere. The training part depends only on
    ``(seed, train_size)``, not on the pool and test sizes, so a target trained with
    ``pool_size = test_size = 0`` meets the same pool and test set later.
    """
    return cast(
        tuple[np.ndarray, np.ndarray, np.ndarray],
        stratified_split(labels, sizes=(train_size, pool_size, test_size), rng=np.random.default_rng(seed)),
    )


def audit_split(
    data: ImageDataset,
    *,
    exclude: Sequence[int],
    pool_size: int,
    test_size: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded pool and test indices drawn from ``data`` minus ``exclude`` (the target's
    training indices), so the attacker's pool and the test set never overlap its training data."""
    keep = np.setdiff1d(np.arange(len(data)), np.asarray(list(exclude), dtype=np.int64))
    check_split_fits(available=len(keep), pool_size=pool_size, test_size=test_size, dataset=data.name)
    pool_part, test_part = stratified_split(
        data.labels[keep], sizes=(pool_size, test_size), rng=np.random.default_rng(seed)
    )
    return keep[pool_part], keep[test_part]
