"""``serve --stop-rule`` and ``--min-points``: DeepObliviate's switches of SPEC section 5, typed, handed to every
unlearning and recorded where ε is (the version's audit and the request's ledger record)."""

from __future__ import annotations

import pytest

from actors.chains import ChainWorker
from flows.cli import main
from obliviate.defaults import DEFAULT_MIN_POINTS, DEFAULT_STOP_RULE
from storage import ObjectStore
from storage.ledger import DeletionLedger
from storage.registry import RunRegistry


def test_the_defaults_are_the_librarys():
    from obliviate.unlearning.deepobliviate import DeepObliviateOptions, StopRule

    options = DeepObliviateOptions()
    assert options.stop_rule is StopRule(DEFAULT_STOP_RULE) is StopRule.RESIDUAL_RATIO
    assert options.min_points == DEFAULT_MIN_POINTS == 5


def test_help_names_both_switches_with_their_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--stop-rule {residual_ratio,ratio,slope}" in text and f"(default {DEFAULT_STOP_RULE})" in text
    assert "--min-points MIN_POINTS" in text and f"(default {DEFAULT_MIN_POINTS})" in text


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (["--stop-rule", "ratio"], "--stop-rule is a switch of DeepObliviate's stop rule, so it needs --policy "),
        (["--min-points", "6"], "got --min-points 6 with --policy exact. Add --policy deepobliviate, or drop"),
        (["--policy", "deepobliviate", "--min-points", "2"], "must be at least 3 (three parameters are fitted); got 2"),
    ],
)
def test_serve_refuses_a_switch_it_cannot_use_before_touching_the_store(tmp_path, capsys, options, said):
    assert main(["serve", "--store", f"file://{tmp_path}/runs", *options]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_an_unknown_rule_is_refused_naming_the_rules(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["serve", "--store", f"file://{tmp_path}/runs", "--policy", "deepobliviate", "--stop-rule", "steep"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--stop-rule" in err and "'steep'" in err and "'residual_ratio', 'ratio', 'slope'" in err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--policy", "deepobliviate", "--stop-rule", "slope", "--min-points", "7"], ("slope", 7)),
        (["--policy", "deepobliviate"], (DEFAULT_STOP_RULE, DEFAULT_MIN_POINTS)),
    ],
)
def test_serve_puts_the_switches_into_its_service_options(serve, store_url, prefect_api_url, options, expected):
    """The deployments serve registers on the Prefect server carry the switches to every run they start."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    serve(store_url, *options)
    announced = ObjectStore(store_url).get_json("service/endpoint.json")["deployments"]
    with temporary_settings(updates={PREFECT_API_URL: prefect_api_url}), get_client(sync_client=True) as client:
        deployments = [client.read_deployment(UUID(deployment_id)) for deployment_id in announced]
        flows = {client.read_flow(d.flow_id).name: d.parameters for d in deployments}
    assert set(flows) == {"unlearn", "reconcile"}  # --audit-cron off: no audit deployment
    for parameters in flows.values():
        assert parameters["policy"] == "deepobliviate" and parameters["store"] == ObjectStore(store_url).url
        assert (parameters["stop_rule"], parameters["min_points"]) == expected


def test_every_run_serve_starts_gets_the_switches(tmp_path):
    from flows.deployments import ServiceOptions, build_deployments, flow_parameters

    options = ServiceOptions(
        store=f"file://{tmp_path}/s", policy="deepobliviate", stop_rule="ratio", min_points=4, audit_cron=None
    )
    assert flow_parameters(options)["stop_rule"] == "ratio" and flow_parameters(options)["min_points"] == 4
    unlearn, reconcile = build_deployments(options)  # runner dispatch; warm dispatch uses flow_parameters
    for deployment in (unlearn, reconcile):
        assert (deployment.parameters["stop_rule"], deployment.parameters["min_points"]) == ("ratio", 4)


@pytest.fixture
def trained(store_url, tiny_run):
    from flows.train import run_spec

    spec = run_spec(run_id="r1", split_seed=0, **tiny_run(blocks=4, train_size=200, heldout_size=80))
    ChainWorker(store_url).train(spec)
    return store_url, spec


@pytest.mark.slow
def test_a_pass_hands_the_switches_to_the_worker_and_records_them_with_epsilon(trained, prefect_api_url, ray_address):
    """reconcile (serve's cron and watcher) -> the pass -> a pooled Ray worker: the version and the ledger say which.

    What the worker used is what it recorded: the version's audit and options, and the request's ledger entry.
    """
    from flows.reconcile import reconcile_flow
    from flows.unlearn import submit_deletion

    store_url, spec = trained
    request = submit_deletion(store_url, spec["train_ids"][:1], dataset="digits", emit=False)["request_id"]
    result = reconcile_flow(store_url, policy="deepobliviate", epsilon=0.3, stop_rule="ratio", min_points=3)
    assert result["settled"] == {request: "done"}
    assert result["fanout"]["runs"] == 1  # done by the Ray fan-out, not in this process
    audit = DeletionLedger(ObjectStore(store_url)).get(request).details["runs"]["r1"]
    assert (audit["epsilon"], audit["stop_rule"], audit["min_points"]) == (0.3, "ratio", 3), audit
    registry = RunRegistry(ObjectStore(store_url))
    current = registry.current("r1")
    assert current.version == 2
    metadata = registry.manifest(current).metadata
    assert metadata["audit"]["policy"] == "deepobliviate"
    assert (metadata["audit"]["stop_rule"], metadata["audit"]["min_points"]) == ("ratio", 3)
    assert metadata["record"]["options"]["stop_rule"] == "ratio" and metadata["record"]["options"]["min_points"] == 3


def test_the_worker_refuses_a_rule_it_does_not_know(trained):
    from obliviate.errors import ConfigError

    store_url, spec = trained
    with pytest.raises(ConfigError, match="stop_rule must be one of"):
        ChainWorker(store_url).unlearn("r1", {"x": spec["train_ids"][:1]}, policy="deepobliviate", stop_rule="steep")
