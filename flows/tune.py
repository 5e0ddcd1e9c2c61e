"""Ray Tune sweeps over the trade-offs users choose (issue 7).

* ``unlearning``: (B, ε) grid; each trial sets DeepObliviate's speed-up over naive retraining
  against its consistency with the naive model; the report marks the Pareto front.
* ``reduction``: (k, bins, gray, aggregate) grid; each trial buys k DRMI-chosen labels at that MI
  resolution, colour-to-gray mode and greedy fold, and reports the substitute's accuracy and agreement
  against the queries spent. ``gray`` and ``aggregate`` may be left out of the grid: a trial then uses
  ``reduce``'s defaults (luma, sum).

Every trial writes its result to object storage (``file://`` or ``s3://``) under
``tune/<sweep>/trials/``; the sweep then reads them back from storage, so the report shows only
what landed, and writes ``results.json``, ``table.md`` and ``plot.png`` next to them. Tune's own
experiment state goes to local disk for ``file://`` stores and to the same bucket for ``s3://``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flows._logging_filter import logger_filter
from flows.runtime import ensure_ray, environment_set
from obliviate.defaults import DEFAULT_AGGREGATE, DEFAULT_GRAY
from obliviate.errors import ConfigError, named_choice
from obliviate.sweeps import pareto_front
from storage import ObjectStore
from storage.objects import check_shared


@dataclass(frozen=True)
class SweepReport:
    """Where a finished sweep's artefacts lie and what it found."""

    name: str
    trials: list[dict[str, Any]]
    front: list[int]
    results_uri: str
    table_uri: str
    plot_uri: str
    errors: int


class SweepFailed(Exception):
    """No trial of the sweep finished: every one failed, so no report was written.

    A sweep whose trials all errored wrote ``results.json``, ``table.md`` and ``plot.png`` with no
    trial in them, which read like a finished sweep that found nothing.
    """

    def __init__(self, name: str, failed: int, first_error: str, prefix_uri: str) -> None:
        super().__init__(
            f"sweep {name}: all {failed} trials failed, so no report was written (nothing under {prefix_uri} "
            f"reads as a result); the first trial's error: {first_error}. Fix it and run the same command again."
        )


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGUSR1) stopped the sweep before every trial ran; no report was written.

    Ray Tune catches the first SIGINT itself and returns from ``fit()`` as if the sweep had
    finished; this turns that back into an interruption.
    """

    def __init__(self, name: str, finished: int, planned: int, trials_uri: str) -> None:
        super().__init__(
            f"sweep {name} was interrupted after {finished} of {planned} trials; no report was written "
            f"(the finished trials are under {trials_uri}; the same command, --name included, runs it again)."
        )


def unlearning_trainable(config: dict[str, Any]) -> None:
    """One (B, ε) trial; runs inside a Tune worker. Data is loaded there (it ships in a package)."""
    from ray import tune

    from obliviate.data import load_dataset, stratified_split
    from obliviate.sweeps import unlearning_trial
    from obliviate.unlearning.chain import BlockData
    from obliviate.unlearning.config import DEFAULT_RECIPE, BlockTrainingConfig

    _check_store_shared(config, _trial_label("unlearning", config))
    data = load_dataset(config["data"])
    train_idx, heldout_idx = stratified_split(
        data.labels, sizes=(config["train_size"], config["heldout_size"]), rng=np.random.default_rng(config["seed"])
    )
    block_data = BlockData(train=data.subset(train_idx), heldout=data.subset(heldout_idx))
    # The recipe `obliviate train` uses: the sweep tunes (B, epsilon) for the model a user trains.
    # BlockTrainingConfig's bare defaults (SGD 0.05, momentum 0.9) left LeNet-5 at chance on digits.
    recipe = {key: DEFAULT_RECIPE[key] for key in ("optimizer", "learning_rate", "batch_size", "min_lr_fraction")}
    base = BlockTrainingConfig(
        model=config["model"],
        image_size=data.image_shape[0],
        levels=data.levels,
        local_epochs=config["local_epochs"],
        schedule=config["schedule"],
        seed=config["seed"],
        accuracy_every=10_000,
        **recipe,
    )
    result = unlearning_trial(
        num_blocks=config["num_blocks"],
        epsilon=config["epsilon"],
        config=base,
        data=block_data,
        num_deleted=config["num_deleted"],
        seed=config["seed"],
    )
    _store_trial(config, _trial_label("unlearning", config), result)
    tune.report({key: value for key, value in result.items() if isinstance(value, (int, float, bool))})


def reduction_trainable(config: dict[str, Any]) -> None:
    """One (k, bins, gray, aggregate) trial: train the target, reduce the pool, buy labels, train a substitute."""
    from ray import tune

    from obliviate.data import load_dataset
    from obliviate.extraction.audit import audit_split, train_target
    from obliviate.extraction.substitute import TrainConfig, accuracy, predict_labels
    from obliviate.extraction.target import LocalTorchBackend
    from obliviate.sweeps import reduction_trial

    _check_store_shared(config, _trial_label("reduction", config))
    gray = config.get("gray", DEFAULT_GRAY)
    aggregate = config.get("aggregate", DEFAULT_AGGREGATE)
    # The whole trial sees the images in this gray mode (as `reduce --gray` does): target, pool and test alike.
    data = load_dataset(config["data"], gray=gray)
    train = TrainConfig(arch=config["model"], steps=config["steps"])
    target_model, meta = train_target(data, train_size=config["target_size"], config=train, seed=config["seed"])
    pool_idx, test_idx = audit_split(
        data,
        exclude=meta["train_indices"],
        pool_size=config["pool_size"],
        test_size=config["test_size"],
        seed=config["seed"],
    )
    result = reduction_trial(
        k=config["k"],
        bins=config["bins"],
        pool_images=data.images[pool_idx],
        levels=data.levels,
        backend=LocalTorchBackend(target_model, levels=data.levels),
        test_images=data.images[test_idx],
        test_labels=data.labels[test_idx],
        train=train,
        num_starts=config["num_starts"],
        seed=config["seed"],
        aggregate=aggregate,
    )
    result.update(gray=gray, aggregate=aggregate)
    # A target near chance answers with noise: a substitute "agrees" with it while learning nothing.
    result["target_accuracy"] = accuracy(
        predicted=predict_labels(target_model, images=data.images[test_idx], levels=data.levels),
        truth=data.labels[test_idx],
    )
    result["chance_accuracy"] = 1.0 / data.num_classes
    _store_trial(config, _trial_label("reduction", config), result)
    # str too: run_sweep counts a trial finished once it reported every grid key, gray and aggregate among them.
    tune.report({key: value for key, value in result.items() if isinstance(value, (int, float, bool, str))})


def check_trial_grid(kind: str, *, grid: dict[str, list[Any]], constants: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` for a grid point no trial could run, before Ray Tune starts any.

    A trial that fails at run time is recorded as an error and the sweep goes on; a value that
    breaks a rule would only fail every trial it is in, so it is refused up front.
    """
    from obliviate.data import GrayMode, load_dataset
    from obliviate.models import MODEL_BUILDERS
    from obliviate.reduction.drmi import Aggregate
    from obliviate.reduction.mi import check_bins
    from obliviate.unlearning.config import BlockTrainingConfig

    if constants.get("model") not in MODEL_BUILDERS:
        raise ConfigError(f"unknown model {constants.get('model')!r}: choose one of {', '.join(MODEL_BUILDERS)}.")
    if not isinstance(constants.get("seed"), int) or constants["seed"] < 0:
        raise ConfigError(
            f"the seed (--seed) must be an integer >= 0 (numpy seeds the split with it); got {constants.get('seed')!r}."
        )
    data = load_dataset(constants["data"])  # every trial loads it: a bad --data fails here, once
    parts = ("train_size", "heldout_size") if kind == "unlearning" else ("target_size", "pool_size", "test_size")
    _check_sizes_fit(data.name, len(data), {part: int(constants[part]) for part in parts})
    if kind == "unlearning":
        train_size = constants["train_size"]
        for blocks in grid.get("num_blocks", []):
            BlockTrainingConfig(
                model=constants["model"],
                num_blocks=blocks,
                local_epochs=constants["local_epochs"],
                schedule=constants["schedule"],
            )
            if blocks > train_size:
                raise ConfigError(
                    f"every B (--blocks) must be at most the trial's training samples, train_size={train_size} "
                    f"(a sample per block); got {blocks}. Lower --blocks or raise --train-size."
                )
        outside = [epsilon for epsilon in grid.get("epsilon", []) if not (math.isfinite(epsilon) and epsilon > 0)]
        if outside:
            raise ConfigError(
                f"every epsilon (--epsilons, the stop rule's threshold) must be finite and > 0; got {outside}. "
                "Pass thresholds such as --epsilons 0.1,0.05."
            )
        if not 1 <= constants["num_deleted"] < train_size:
            raise ConfigError(
                f"the samples deleted per trial (--deleted) must be in 1..train_size-1={train_size - 1}; "
                f"got {constants['num_deleted']}. Pass another --deleted, or raise --train-size."
            )
    else:
        for bins in grid.get("bins", []):
            check_bins(levels=data.levels, bins=bins)
        for gray in _setting_values(grid, constants, "gray"):
            named_choice(GrayMode, value=gray, what="gray (--gray)", means="how colour images become gray")
        for aggregate in _setting_values(grid, constants, "aggregate"):
            named_choice(
                Aggregate, value=aggregate, what="aggregate (--aggregate)", means="greedy initialisation's fold"
            )
        pool_size = constants["pool_size"]
        outside = [k for k in grid.get("k", []) if not 2 <= k < pool_size]
        if outside:
            raise ConfigError(
                f"every k (--ks) must satisfy 2 <= k < pool_size={pool_size}; got {outside}. "
                "Pass values in that range such as --ks 50,150,300, or raise --pool-size."
            )
        if constants["steps"] < 1:
            raise ConfigError(
                f"steps (--steps, the target's and each substitute's gradient steps) must be >= 1; got {constants['steps']}."
            )
        if not 1 <= constants["num_starts"] <= pool_size:
            raise ConfigError(
                f"num_starts (--starts, seeded DRMI restarts, each from a pool image) must be in 1..pool_size={pool_size}; "
                f"got {constants['num_starts']}."
            )


def _setting_values(grid: dict[str, list[Any]], constants: dict[str, Any], key: str) -> list[Any]:
    """The values a sweep gives ``key``: its grid's, or the one of its constants."""
    if key in grid:
        return list(grid[key])
    return [constants[key]] if key in constants else []


def check_workers(workers: int) -> None:
    """Trials run at once: at least one."""
    if workers < 1:
        raise ConfigError(f"workers (--workers, trials at once, one CPU each) must be >= 1; got {workers}.")


def check_sweep_name(name: str) -> None:
    """A sweep's name is one folder of the store and of Tune's state: plain characters, no path.

    ``--name ../../escape`` made Ray write its experiment state outside the store before the
    store's key check refused the name.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", "..") or name.startswith(".tmp-"):
        raise ConfigError(
            f"a sweep name (--name) is letters, digits, '-', '_' and '.', not '.' or '..' (it names one folder of the "
            f"store, under tune/); got {name!r}. Choose a plain name such as 'unlearning-b40'."
        )


def _check_sizes_fit(dataset: str, available: int, sizes: dict[str, int]) -> None:
    """Each trial splits the dataset into these disjoint parts: each must hold an image, all must fit."""
    options = ", ".join(f"--{name.replace('_', '-')}" for name in sizes)
    empty = [f"{name} {size}" for name, size in sizes.items() if size < 1]
    if empty:
        raise ConfigError(
            f"every part of a trial's split must hold at least 1 image; got {', '.join(empty)} ({options})."
        )
    if sum(sizes.values()) > available:
        shown = " + ".join(f"{name} {size}" for name, size in sizes.items())
        total = sum(sizes.values())
        fits = " ".join(
            f"--{name.replace('_', '-')} {max(1, size * available // total)}" for name, size in sizes.items()
        )
        raise ConfigError(
            f"a trial splits the {available} images of {dataset} into disjoint parts, so {shown} = {total} "
            f"does not fit; lower them ({options}), e.g. in the same proportions: {fits}."
        )


def run_sweep(
    kind: str,
    *,
    store_url: str,
    grid: dict[str, list[Any]],
    constants: dict[str, Any],
    workers: int,
    name: str | None = None,
) -> SweepReport:
    """Run a grid sweep with Ray Tune and write its report to storage.

    Args:
        kind: ``unlearning`` or ``reduction``.
        store_url: where trials and the report are written.
        grid: the swept parameters and their values.
        constants: every other trial parameter.
        workers: trials run at once (one CPU each).
        name: sweep name (default: kind and a timestamp).
    """
    from ray import tune

    trainables = {"unlearning": unlearning_trainable, "reduction": reduction_trainable}
    if kind not in trainables:
        raise ConfigError(f"sweep kind must be one of {', '.join(trainables)}; got {kind!r}.")
    check_workers(workers)
    if name is not None:
        check_sweep_name(name)
    check_trial_grid(kind, grid=grid, constants=constants)
    store = ObjectStore(store_url)
    name = name or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    prefix = f"tune/{name}"
    settings = {"kind": kind, "grid": grid, "constants": constants}
    _claim_name(store, prefix, name, settings, record=False)  # a name taken by other settings: refused before Ray
    # A cluster that does not answer is refused before the name records anything: a sweep that never ran
    # must not lock its name to the settings it was refused with.
    ensure_ray()
    _claim_name(store, prefix, name, settings)
    param_space = {**constants, **{key: tune.grid_search(list(values)) for key, values in grid.items()}}
    param_space.update({"store_url": store.url, "prefix": prefix})
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    tuner = tune.Tuner(
        tune.with_resources(trainables[kind], {"cpu": 1}),
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=workers),
        run_config=tune.RunConfig(
            name=name,
            storage_path=_tune_storage_path(store),
            verbose=0,
            callbacks=[CSVLoggerCallback(), JsonLoggerCallback()],  # Tune's own logs, without TensorBoard's
        ),
    )
    with logger_filter(_TUNE_RESUME_LOGGERS, _TunesResumeAdvice()), _no_tensorboard_logger():
        results = tuner.fit()
    planned = math.prod(len(values) for values in grid.values())
    # On SIGINT (or SIGUSR1) Tune stops its running trials, marks them TERMINATED like finished ones and
    # returns: a trial finished only if it failed or reported its grid point (each reports once, at its end).
    outcomes = [results[i] for i in range(len(results))]
    finished = sum(r.error is not None or all(key in (r.metrics or {}) for key in grid) for r in outcomes)
    if finished < planned:
        raise SweepInterrupted(name, finished, planned, store.uri(f"{prefix}/trials"))
    # A trial names itself from its whole config (reduction_trainable), so its label here is read the same way.
    labels = {f"{prefix}/trials/{_trial_label(kind, {**constants, **point})}.json" for point in _grid_points(grid)}
    trials = [store.get_json(key) for key in sorted(store.list(f"{prefix}/trials")) if key in labels]
    if not trials:
        first = next((r.error for r in outcomes if r.error is not None), None)
        raise SweepFailed(name, len(outcomes), _first_line(first), store.uri(prefix))
    if kind == "unlearning":
        front = pareto_front(trials, maximize=("speedup", "consistency")) if trials else []
    else:
        front = (
            pareto_front(
                [{"neg_queries": -t["queries"], "agreement": t["agreement"]} for t in trials],
                maximize=("neg_queries", "agreement"),
            )
            if trials
            else []
        )
    store.put_json(
        f"{prefix}/results.json",
        {
            "kind": kind,
            "grid": grid,
            "constants": constants,
            "trials": trials,
            "pareto_front": front,
            "errors": len(results.errors),
        },
    )
    store.put_bytes(f"{prefix}/table.md", _table(kind, trials, front).encode())
    store.put_bytes(f"{prefix}/plot.png", _plot(kind, trials, front))
    return SweepReport(
        name=name,
        trials=trials,
        front=front,
        results_uri=store.uri(f"{prefix}/results.json"),
        table_uri=store.uri(f"{prefix}/table.md"),
        plot_uri=store.uri(f"{prefix}/plot.png"),
        errors=len(results.errors),
    )


def _first_line(error: BaseException | None) -> str:
    """A trial's error as one line: Ray wraps it in a RayTaskError whose text starts with a traceback."""
    if error is None:
        return "none recorded (see Tune's state)"
    cause = getattr(error, "cause", None) or error
    text = f"{type(cause).__name__}: {cause}".strip()
    return text.splitlines()[-1] if "Traceback" in text else text.splitlines()[0]


class _TunesResumeAdvice(logging.Filter):
    """Tune's own lines on an interruption, which contradict obliviate's.

    After Ctrl-C Tune logged "Resume experiment with: Tuner.restore(...)" (obliviate resumes by running the
    same command) and, per stopped trial, "Failed to fetch metrics ... FileNotFoundError" (obliviate reads
    the trials from the store, not Tune's files). Tune's other lines pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Resume experiment with:" not in message and "Failed to fetch metrics for" not in message


def _no_tensorboard_logger() -> contextlib.AbstractContextManager[None]:
    """Tune adds no logger of its own while the block runs: the sweep passes the CSV and JSON ones it keeps.

    Tune adds a TensorBoard logger wherever tensorboardX imports (ray[tune] installs it) and then prints "To visualize
    your results with TensorBoard, run: `tensorboard --logdir /tmp/ray/session_.../driver_artifacts`": a folder the
    command deletes when it succeeds (:func:`flows.cli.run`), for a program this project does not install. The
    sweep's report is its ``table.md`` and ``plot.png``. Tune reads ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS`` when
    ``fit`` starts; the value found before is put back after it.
    """
    return environment_set({"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"})


#: The loggers those lines come from (ray.tune.tune and ray.tune.analysis.experiment_analysis, Ray 2.60).
_TUNE_RESUME_LOGGERS = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")


def _claim_name(store: ObjectStore, prefix: str, name: str, settings: dict[str, Any], *, record: bool = True) -> None:
    """Record the sweep's settings under its name; a name that holds a sweep of other settings is refused.

    ``record=False`` only checks: nothing is written.

    A rerun under the same name with other options mixed the old trials into the new report (a grid of
    B=[3] reported a stale B=2 trial of another train size). As ``train --run-id`` does, a name keeps
    one set of settings: rerunning it with the same options runs the sweep again (after Ctrl-C, say);
    other options need another name.
    """
    settings = json.loads(json.dumps(settings))  # as stored: tuples read back as lists
    key = f"{prefix}/sweep.json"
    if store.exists(key):
        recorded = store.get_json(key)
        if recorded.get("kind") == "reduction":
            # Recorded before gray and aggregate were settings: its trials ran at reduce's defaults.
            recorded["grid"] = {"gray": [DEFAULT_GRAY], "aggregate": [DEFAULT_AGGREGATE], **recorded.get("grid", {})}
        differ = (
            []
            if recorded.get("kind") == settings["kind"]
            else [f"kind {recorded.get('kind')!r} -> {settings['kind']!r}"]
        )
        for part in ("grid", "constants"):
            before, now = recorded.get(part, {}), settings[part]
            differ += [
                f"{field} {before.get(field)!r} -> {now.get(field)!r}"
                for field in sorted(set(before) | set(now))
                if before.get(field) != now.get(field)
            ]
        if differ:
            raise ConfigError(
                f"sweep name {name!r} (--name) already holds a sweep with other settings ({'; '.join(differ)}), and its "
                f"report would mix both; choose another --name, or delete {store.uri(prefix)} to replace it."
            )
    elif store.list(prefix):
        raise ConfigError(
            f"sweep name {name!r} (--name) already holds trials of a sweep whose settings were not recorded, and its "
            f"report would mix them with this one's; choose another --name, or delete {store.uri(prefix)} to replace it."
        )
    elif record:
        store.put_json(key, settings)


def _grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def _trial_label(kind: str, point: dict[str, Any]) -> str:
    """The name a trial's result is stored under: its grid point.

    A reduction trial at ``reduce``'s defaults (gray luma, aggregate sum) keeps the name it had before
    those were settings; another gray mode adds ``-gray<mode>``, the max fold ``-gmax`` (as reduce's folder).
    """
    if kind == "unlearning":
        return f"B{point['num_blocks']}-eps{point['epsilon']:g}"
    gray = point.get("gray", DEFAULT_GRAY)
    aggregate = point.get("aggregate", DEFAULT_AGGREGATE)
    return (
        f"k{point['k']}-bins{point['bins']}"
        + ("" if gray == DEFAULT_GRAY else f"-gray{gray}")
        + ("" if aggregate == DEFAULT_AGGREGATE else f"-g{aggregate}")
    )


def _check_store_shared(config: dict[str, Any], label: str) -> None:
    """Refuse, before a trial's work, a store that is not the sweep's: the sweep records its settings before any trial.

    Raises:
        StoreNotShared: the sweep's settings are not in the store as this trial's process reads it (its node has
            another folder at a ``file://`` URL, or reaches another S3 endpoint or bucket), so its result would be
            written where the sweep never reads it.
    """
    check_shared(
        ObjectStore(config["store_url"]),
        f"{config['prefix']}/sweep.json",
        described="the sweep's settings",
        written_in="the tune command recorded them in before starting its trials",
        what=f"trial {label}",
    )


def _store_trial(config: dict[str, Any], label: str, result: dict[str, Any]) -> None:
    ObjectStore(config["store_url"]).put_json(f"{config['prefix']}/trials/{label}.json", result)


def _tune_storage_path(store: ObjectStore) -> str:
    if store.is_local:
        path = Path(store.url.removeprefix("file://")) / "tune-state"
        path.mkdir(parents=True, exist_ok=True)
        return str(path)
    return store.uri("tune-state")


def _table(kind: str, trials: list[dict[str, Any]], front: list[int]) -> str:
    if kind == "unlearning":
        header = "| B | ε | speed-up | consistency | noise floor | accuracy | naive accuracy | stopped early | fell back | Pareto |\n|---|---|---|---|---|---|---|---|---|---|\n"
        rows = [
            f"| {t['num_blocks']} | {t['epsilon']:g} | {t['speedup']:.2f}× | {t['consistency']:.3f} | "
            f"{t['noise_floor_consistency']:.3f} | {t['accuracy']:.3f} | {t['naive_accuracy']:.3f} | "
            f"{'yes' if t['stopped_early'] else 'no'} | {'yes' if t['guardrail_fell_back'] else 'no'} | {'★' if i in front else ''} |"
            for i, t in enumerate(trials)
        ]
    else:
        header = (
            "| k (queries) | bins | gray | aggregate | accuracy | agreement | mean entropy | Pareto |\n"
            "|---|---|---|---|---|---|---|---|\n"
        )
        rows = [
            f"| {t['queries']} | {t['bins']} | {t.get('gray', DEFAULT_GRAY)} | {t.get('aggregate', DEFAULT_AGGREGATE)} | "
            f"{t['accuracy']:.3f} | {t['agreement']:.3f} | {t['mean_entropy']:.2f} | {'★' if i in front else ''} |"
            for i, t in enumerate(trials)
        ]
    return header + "\n".join(rows) + "\n"


def _plot(kind: str, trials: list[dict[str, Any]], front: list[int]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if kind == "unlearning":
        for t in trials:
            ax.scatter(t["speedup"], t["consistency"], color="tab:blue")
            ax.annotate(f"B={t['num_blocks']}, ε={t['epsilon']:g}", (t["speedup"], t["consistency"]), fontsize=7)
        if front:
            pts = sorted((trials[i]["speedup"], trials[i]["consistency"]) for i in front)
            ax.plot(*zip(*pts), color="tab:red", label="Pareto front")
        if trials:
            ax.axhline(
                float(np.mean([t["noise_floor_consistency"] for t in trials])),
                color="grey",
                ls="--",
                label="noise floor (original vs naive)",
            )
        ax.set_xlabel("speed-up over naive retraining (CPU time)")
        ax.set_ylabel("consistency with naive retrain")
        ax.set_title("DeepObliviate: speed-up vs consistency")
    else:
        # One line per (bins, gray, aggregate); gray and aggregate are named only when the sweep varies them.
        settings = {(t["bins"], t.get("gray", DEFAULT_GRAY), t.get("aggregate", DEFAULT_AGGREGATE)) for t in trials}
        grays = {gray for _, gray, _ in settings}
        folds = {fold for _, _, fold in settings}
        for bins, gray, fold in sorted(settings):
            pts = sorted(
                (t["queries"], t["accuracy"])
                for t in trials
                if (t["bins"], t.get("gray", DEFAULT_GRAY), t.get("aggregate", DEFAULT_AGGREGATE)) == (bins, gray, fold)
            )
            label = f"DRMI at {bins} bins"
            label += f", {gray} gray" if len(grays) > 1 else ""
            label += f", {fold} fold" if len(folds) > 1 else ""
            ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xlabel("label queries (k)")
        ax.set_ylabel("substitute accuracy")
        ax.set_title("Reduction sweep: substitute accuracy vs queries")
    if trials:
        ax.legend(fontsize=8)
    else:
        ax.text(
            0.5, 0.5, "no trial finished (see the sweep's errors)", ha="center", va="center", transform=ax.transAxes
        )
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def describe(report: SweepReport) -> str:
    """A short human summary for the CLI."""
    lines = [f"sweep {report.name}: {len(report.trials)} trials, {report.errors} errors"]
    lines.append(f"results: {report.results_uri}")
    lines.append(f"table:   {report.table_uri}")
    lines.append(f"plot:    {report.plot_uri}")
    if report.front:
        lines.append("Pareto front (no trial does better on both):")
        lines.extend(f"  {_front_point(report.trials[i])}" for i in report.front)
    untrained = untrained_trials(report.trials)
    if untrained:
        seen = ", ".join(f"{100 * t['naive_accuracy']:.1f} %" for t in untrained[:4])
        lines.append(
            f"warning: {len(untrained)} of {len(report.trials)} trials trained a naive model near chance "
            f"(held-out accuracy {seen}; chance "
            f"{100 * untrained[0]['chance_accuracy']:.0f} %): those settings do not train, so their speed-up and "
            "consistency say nothing. Raise --local-epochs or --train-size."
        )
    untrained = untrained_targets(report.trials)
    if untrained:
        seen = ", ".join(f"{100 * t['target_accuracy']:.1f} %" for t in untrained[:4])
        lines.append(
            f"warning: {len(untrained)} of {len(report.trials)} trials trained a target near chance (test accuracy "
            f"{seen}; chance {100 * untrained[0]['chance_accuracy']:.0f} %): a substitute agrees with its noise, so "
            "their agreement says nothing. Raise --steps or --target-size."
        )
    return "\n".join(lines)


def _front_point(trial: dict[str, Any]) -> str:
    if "speedup" in trial:
        speedup = trial["speedup"]
        pace = (
            f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower" if speedup > 0 else "no faster"
        )
        return (
            f"B={trial['num_blocks']}, ε={trial['epsilon']:g}: {pace} than naive retraining, "
            f"consistency {trial['consistency']:.3f} (noise floor {trial['noise_floor_consistency']:.3f}), "
            f"held-out accuracy {100 * trial['accuracy']:.1f} %"
        )
    target = f" (target {100 * trial['target_accuracy']:.1f} %)" if trial.get("target_accuracy") is not None else ""
    # Trials stored before gray and aggregate were settings do not name them (they ran at luma, sum).
    settings = "".join(f", {key} {trial[key]}" for key in ("gray", "aggregate") if key in trial)
    return (
        f"k={trial['queries']}, {trial['bins']} bins{settings}: substitute accuracy {100 * trial['accuracy']:.1f} %, "
        f"agreement {100 * trial['agreement']:.1f} %{target}"
    )


def untrained_trials(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Unlearning trials whose naive retrain stayed within 1.5x chance accuracy: nothing was learned."""
    return _near_chance(trials, "naive_accuracy")


def untrained_targets(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Reduction trials whose target stayed within 1.5x chance accuracy: agreement with it means nothing."""
    return _near_chance(trials, "target_accuracy")


def _near_chance(trials: list[dict[str, Any]], accuracy: str) -> list[dict[str, Any]]:
    return [
        t
        for t in trials
        if t.get(accuracy) is not None and t.get("chance_accuracy") and t[accuracy] < 1.5 * t["chance_accuracy"]
    ]
