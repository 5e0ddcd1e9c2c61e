"""SPEC section 3's probabilities switch, end to end: a target that answers class probabilities.

The attacker's target answers ``(n, C)`` probabilities instead of labels: every image still costs one
query, the query log records the mode, each attacker trains on the probabilities as soft targets
(checked by what it learns: the substitute's KL divergence to the target's probabilities on the bought
images falls well below a label-trained one's under the same seed, which fails if the rows were
collapsed to their argmax), adaptive and Jacobian selection keep spending exactly their budget, and
``obliviate steal --target-output probabilities`` writes a report whose threat model names the mode.
A server that answers labels only refuses probabilities in one sentence, before any work.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from obliviate.errors import ConfigError
from obliviate.extraction.attackers import ATTACKERS, AttackOptions, train_substitute
from obliviate.extraction.audit import run_cell
from obliviate.extraction.selectors import Pool, acquire
from obliviate.extraction.substitute import TrainConfig
from obliviate.extraction.target import (
    LocalTorchBackend,
    OutputMode,
    Target,
    TargetRequestError,
    open_backend,
    save_checkpoint,
)
from obliviate.models import images_to_tensor

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

#: Short training: the attackers differ in what they learn from, not in how long they train. pseudo_label's
#: threshold is low enough that the small target's pool images get pseudo-labels (the one-hot path beside soft rows).
TINY = AttackOptions(
    basic_steps=60,
    min_steps=60,
    steps_per_image=0.0,
    max_steps=60,
    round_steps=150,  # pseudo_label's fresh student learns from the round alone: 40 steps leave it untrained
    rounds=1,
    threshold=0.5,
    eval_every=20,
    consistency_steps=30,
    members=2,
)
BOUGHT = 30


@pytest.fixture(scope="module")
def probabilities_target(target_model):
    """The conftest's small target (60 steps on 300 images: soft answers), asked for probabilities."""
    return LocalTorchBackend(target_model)


def _kl_to_target(model: torch.nn.Module, images: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean KL(target || substitute) over ``images``: what a substitute trained on the probabilities minimises."""
    p = torch.as_tensor(probabilities, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        log_q = torch.log_softmax(model(images_to_tensor(images)).double(), dim=1)
    return float((p * (torch.log(p.clamp_min(1e-12)) - log_q)).sum(dim=1).mean())


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("attack", list(ATTACKERS))
def test_each_attacker_trains_on_the_probabilities_and_repeats_under_a_seed(attack, probabilities_target, pool_images):
    target = Target(probabilities_target, budget=BOUGHT, output="probabilities")
    probabilities = target.query(pool_images[:BOUGHT])
    assert probabilities.shape == (BOUGHT, 10) and target.used == BOUGHT
    assert probabilities.max(axis=1).mean() < 0.95  # soft answers: collapsing them to labels loses something
    common = {"images": pool_images[:BOUGHT], "unlabeled": pool_images[BOUGHT:], "options": TINY}
    soft = train_substitute(attack, labels=probabilities, seed=3, **common)
    again = train_substitute(attack, labels=probabilities, seed=3, **common)
    other_seed = train_substitute(attack, labels=probabilities, seed=4, **common)
    collapsed = train_substitute(attack, labels=probabilities.argmax(axis=1), seed=3, **common)
    assert _same_weights(soft.model, again.model) and soft.info == again.info
    assert not _same_weights(soft.model, other_seed.model)
    # The same images, seed and steps: only the targets differ. Measured: basic 0.03 vs 2.05, augmented 1.07 vs
    # 1.38, pseudo_label 0.14 vs 1.38, semi_supervised 0.55 vs 1.02, the ensemble 0.34 vs 0.76.
    kl_soft = _kl_to_target(soft.model, pool_images[:BOUGHT], probabilities)
    kl_collapsed = _kl_to_target(collapsed.model, pool_images[:BOUGHT], probabilities)
    assert kl_soft < 0.85 * kl_collapsed, (kl_soft, kl_collapsed)
    if attack == "pseudo_label":  # the pool's pseudo-labels joined the soft rows (as one-hot rows)
        assert soft.info["rounds"] and soft.info["rounds"][0]["pseudo_labels"] > 0, soft.info


def test_pseudo_labels_beside_soft_rows_weigh_as_hard_labels(probabilities_target, pool_images):
    """One-hot rows are the same targets as their classes: an attacker given one-hot probabilities trains exactly
    as one given the labels, pseudo-label rounds and FixMatch included (the soft path adds no other change)."""
    answers = Target(probabilities_target, budget=None, output="probabilities").query(pool_images[:BOUGHT])
    labels = answers.argmax(axis=1)
    one_hot = np.eye(10, dtype=np.float32)[labels]
    common = {"images": pool_images[:BOUGHT], "unlabeled": pool_images[BOUGHT:], "options": TINY, "seed": 5}
    for attack in ("pseudo_label", "semi_supervised"):
        from_labels = train_substitute(attack, labels=labels, **common).model
        from_rows = train_substitute(attack, labels=one_hot, **common).model
        for a, b in zip(from_labels.state_dict().values(), from_rows.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attack", list(ATTACKERS))
def test_each_attacker_spends_exactly_its_budget_in_a_cell_with_probabilities(
    attack, probabilities_target, pool_images, mnist, split
):
    test_images, test_labels = mnist.images[split[2]], mnist.labels[split[2]]

    def cell(seed: int):
        attacker = Target(probabilities_target, budget=20, output=OutputMode.PROBABILITIES)
        oracle = Target(probabilities_target, budget=None)
        result = run_cell(
            selector="random",
            budget=20,
            seed=seed,
            pool=Pool(pool_images),
            attacker=attacker,
            oracle=oracle,
            test_images=test_images,
            test_labels=test_labels,
            train=TrainConfig(steps=20),
            eps=(0.3,),
            attack=attack,
            attack_options=TINY,
        )
        return result, attacker

    first, attacker = cell(3)
    assert attacker.used == first.queries == 20  # counted on the target, one query per image
    assert [(r.size, r.output) for r in attacker.log] == [(20, OutputMode.PROBABILITIES)]
    assert sum(first.class_histogram) == 20  # bought classes are the rows' argmax
    second, _ = cell(3)
    assert replace(first, seconds=0.0) == replace(second, seconds=0.0)
    assert 0.0 <= first.agreement <= 1.0 and 0.0 <= first.accuracy <= 1.0


@pytest.mark.parametrize("name", ["adaptive", "jacobian", "auto"])
def test_querying_selectors_buy_exactly_k_probability_rows(name, probabilities_target, pool_images):
    def bought(seed: int):
        target = Target(probabilities_target, budget=40, output="probabilities")
        pool = Pool(pool_images)
        got = acquire(
            name, pool=pool, k=40, rng=np.random.default_rng(seed), target=target, train=TrainConfig(steps=20)
        )
        return got, target

    got, target = bought(0)
    assert got.queries == target.used == len(got.images) == 40
    assert {r.output for r in target.log} == {OutputMode.PROBABILITIES}
    if name in ("adaptive", "jacobian"):
        assert len(target.log) > 1  # rounds: each trains a substitute on the probability rows bought so far
    truth = probabilities_target.predict(got.images, output=OutputMode.PROBABILITIES)
    np.testing.assert_allclose(got.labels, truth, rtol=1e-5, atol=1e-6)  # the rows the target answered
    again, _ = bought(0)
    np.testing.assert_array_equal(got.pool_indices, again.pool_indices)
    np.testing.assert_array_equal(got.images, again.images)


def test_a_target_answering_logits_or_other_widths_for_probabilities_is_refused_in_words(pool_images):
    class Answering:
        def __init__(self, rows):
            self.rows = rows

        def predict(self, images, *, output):
            return np.asarray(self.rows, np.float32)

    logits = [[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]]
    target = Target(Answering(logits), budget=5, output="probabilities")
    with pytest.raises(TargetRequestError, match="not probabilities .* may be answering logits"):
        target.query(pool_images[:2])
    assert target.used == 0
    with pytest.raises(TargetRequestError, match="the target has 10 classes, so each row of probabilities must hold"):
        Target(Answering([[0.5, 0.5], [1.0, 0.0]]), budget=5, output="probabilities", num_classes=10).query(
            pool_images[:2]
        )
    with pytest.raises(ConfigError, match=r"'labels' .* or 'probabilities' .*; got 'soft'"):
        Target(Answering(logits), budget=5, output="soft")


def test_the_cell_record_and_query_log_name_the_mode(tmp_path, target_model, pool_images, mnist, split):
    from actors.extraction import AuditWorker

    checkpoint = tmp_path / "target.pt"
    save_checkpoint(checkpoint, model=target_model, arch="lenet5", meta={"num_classes": 10, "image_size": 28})
    test_images = mnist.images[split[2]][:40]
    worker = AuditWorker(
        target=str(checkpoint),
        pool=Pool(pool_images),
        test_images=test_images,
        test_labels=mnist.labels[split[2]][:40],
        oracle_test_labels=Target(LocalTorchBackend(target_model), budget=None).query(test_images),
        output="probabilities",
    )
    record = worker.run_cell(
        selector="random", budget=12, seed=0, train=TrainConfig(steps=5, batch_size=8), eps=(0.3,), iterative=False
    )
    assert (record["target_output"], record["queries_used"], record["query_calls"]) == ("probabilities", 12, 1)
    with pytest.raises(ConfigError, match=r"target_output \(--target-output\) is what the target answers"):
        AuditWorker(**{**worker_args(checkpoint, pool_images, test_images), "output": "logits"})


def worker_args(checkpoint, pool_images, test_images) -> dict:
    return {
        "target": str(checkpoint),
        "pool": Pool(pool_images),
        "test_images": test_images,
        "test_labels": np.zeros(len(test_images), np.int64),
        "oracle_test_labels": np.zeros(len(test_images), np.int64),
    }


# -------------------- HTTP targets


def test_a_label_only_server_refuses_probabilities_in_one_sentence_before_any_query(target_model, pool_images):
    from flows.model_server import TargetServer

    with TargetServer(target_model, info={"num_classes": 10}, allow_probabilities=False) as server:
        with pytest.raises(TargetRequestError) as refused:
            open_backend(server.url, retries=0, wait_s=0, output=OutputMode.PROBABILITIES)
        said = str(refused.value)
        assert said == (
            f"the target at {server.url} answers labels only: it refused a request for class probabilities (HTTP 403: "
            "this target answers labels only). Audit it with --target-output labels (the default), or serve it with "
            "probabilities allowed (`obliviate target serve --probabilities`; TargetServer(allow_probabilities=True))."
        )
        backend, _ = open_backend(server.url, retries=0, wait_s=0)  # labels: the default still opens
        target = Target(backend, budget=10, output="probabilities")
        with pytest.raises(TargetRequestError, match="answers labels only: it refused a request for class"):
            target.query(pool_images[:2])  # a server that stops allowing them mid-audit: the same sentence
        assert target.used == 0 and server.requests == 0


def test_a_server_allowing_probabilities_answers_them_counted_like_labels(target_model, pool_images):
    from flows.model_server import TargetServer

    with TargetServer(target_model, info={"num_classes": 10}, allow_probabilities=True) as server:
        backend, _ = open_backend(server.url, retries=0, wait_s=0, output="probabilities")
        target = Target(backend, budget=8, output="probabilities", num_classes=10)
        remote = target.query(pool_images[:8])
    local = LocalTorchBackend(target_model).predict(pool_images[:8], output=OutputMode.PROBABILITIES)
    np.testing.assert_allclose(remote, local, rtol=1e-6, atol=1e-7)
    assert target.used == 8 and [r.output for r in target.log] == [OutputMode.PROBABILITIES]


# -------------------- the command line


def test_cli_steal_refuses_an_unknown_target_output_with_the_rule(target_checkpoint, tmp_path, capsys):
    from flows.audit import check_audit_settings
    from flows.cli import main

    out = tmp_path / "report"
    with pytest.raises(SystemExit) as stopped:  # a value the option's parser refuses: a usage error, exit 2
        main(["steal", "--target", str(target_checkpoint), "--target-output", "soft", "--out", str(out)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert (
        "Invalid value for '--target-output': what the target answers is 'labels' (the default: SPEC section 3's "
        "label-only oracle) or 'probabilities' (for a target whose API returns class probabilities); got 'soft'. "
        "Give --target-output labels or --target-output probabilities." in err
    ), err
    assert "Traceback" not in err and not out.exists()
    # The flow's own API says it in the flow's and the command line's names.
    settings = {"pool_size": 100, "test_size": 80, "steps": 1, "attack_steps": 1, "rounds": 0, "round_steps": 1}
    settings |= {"consistency_steps": 0, "drmi_starts": None, "timeout_s": 1.0, "retries": 0}
    with pytest.raises(ConfigError, match=r"target_output \(--target-output\) must be 'labels' .*; got 'soft'\."):
        check_audit_settings(**settings, target_output="soft")


def test_cli_steal_with_probabilities_against_a_label_only_server_says_so_before_any_work(
    target_checkpoint, tmp_path, capsys
):
    from flows.cli import main
    from flows.model_server import TargetServer
    from obliviate.extraction.target import load_checkpoint

    model, meta = load_checkpoint(target_checkpoint)
    out = tmp_path / "report"
    with TargetServer(model, info=meta, allow_probabilities=False) as server:
        code = main(["steal", "--target", server.url, "--target-output", "probabilities", "--out", str(out)])
        requests = server.requests
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"the target at {server.url} answers labels only: it refused a request for class probabilities" in err
    assert "Audit it with --target-output labels (the default)" in err and "Traceback" not in err
    assert requests == 0 and not out.exists()


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_cli_steal_with_probabilities_writes_a_report_naming_the_mode(
    prefect_and_ray, target_checkpoint, tmp_path, capsys
):
    from flows.cli import main

    out = tmp_path / "report"
    grid = ["--budgets", "20", "--attackers", "basic,semi_supervised", "--selectors", "random", "--seeds", "1"]
    sizes = ["--pool-size", "120", "--test-size", "100", "--steps", "15", "--attack-steps", "20", "--eps", "0.3"]
    small = ["--rounds", "1", "--round-steps", "10", "--consistency-steps", "10"]
    command = ["steal", "--target", str(target_checkpoint), "--target-output", "probabilities", "--out", str(out)]
    assert main([*command, *grid, *sizes, *small]) == 0, capsys.readouterr().err[-3000:]
    md = (out / "steal.md").read_text()
    assert "Pool: 120 images; queries answered with class probabilities (--target-output probabilities)." in md
    assert (
        "Threat model: the attacker sees the target only through queries the target answers with class "
        "probabilities (its whole softmax row per image, which the attackers train on), counted against the budget"
        in md
    )
    assert "besides the bought probabilities:" in md and "label-only" not in md
    doc = json.loads((out / "steal.json").read_text())
    assert doc["config"]["target_output"] == "probabilities"
    for cell in doc["cells"]:
        assert cell["target_output"] == "probabilities"
        assert cell["queries_used"] == cell["budget"] == sum(cell["class_histogram"]) == 20
