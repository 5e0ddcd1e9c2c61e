"""The scheduled extraction audit's probabilities switch (SPEC section 3): ``audit_flow(target_output=...)``.

``obliviate steal --target-output probabilities`` audited an API that returns class probabilities, but the
``extraction-audit`` deployment that ``serve`` schedules only ever asked for labels: a platform whose service
returns probabilities could not say so. The flow, its deployment and ``serve --target-output`` take it now.
"""

from __future__ import annotations

import pytest

from actors.chains import ChainWorker
from flows.cli import main, parse_args
from flows.train import run_spec
from obliviate.errors import ConfigError
from storage import ObjectStore

#: steal_flow's rule for the value (flows.audit.check_audit_settings), which the scheduled audit reuses.
RULE = (
    "target_output (--target-output) must be 'labels' (the default: SPEC section 3's label-only oracle) or "
    "'probabilities' (for a target whose API returns class probabilities); got 'soft'."
)
#: `steal --target-output`'s refusal (flows.cli.steal.target_output), which `serve --target-output` reuses.
CLI_RULE = (
    "what the target answers is 'labels' (the default: SPEC section 3's label-only oracle) or 'probabilities' "
    "(for a target whose API returns class probabilities); got 'soft'. Give --target-output labels or "
    "--target-output probabilities."
)


@pytest.mark.slow
def test_a_scheduled_audit_asking_for_probabilities_records_the_mode_and_spends_its_budget(
    store_url, prefect_api_url, ray_address, tiny_run
):
    from flows.audit import audit_flow

    ChainWorker(store_url).train(
        run_spec(run_id="p", **tiny_run(blocks=3, train_size=300, heldout_size=100, split_seed=0))
    )
    grid = {"budgets": [10], "selectors": ["random"], "attackers": ["basic"], "steps": 20}
    reports = audit_flow(store=store_url, target_output="probabilities", **grid)
    assert reports["p"]["status"] == "audited" and reports["p"]["target_output"] == "probabilities"
    report = ObjectStore(store_url).get_json(f"runs/p/audits/v{reports['p']['version']:06d}/report.json")
    assert report["config"]["target_output"] == "probabilities"
    assert len(report["cells"]) == 1
    for cell in report["cells"]:
        assert cell["target_output"] == "probabilities"
        assert cell["queries_used"] == cell["budget"] == sum(cell["class_histogram"]) == 10


def test_the_scheduled_audit_refuses_an_unknown_target_output_with_steals_rule_before_any_work(
    tmp_path, prefect_api_url
):
    from flows.audit import audit_flow

    store = tmp_path / "store"
    with pytest.raises(ConfigError) as refused:
        audit_flow(store=f"file://{store}", target_output="soft")
    assert RULE in str(refused.value)
    assert not store.exists()  # not even the store was opened


def test_the_audit_deployment_carries_the_target_output_serve_was_given(tmp_path):
    from flows.deployments import ServiceOptions, build_deployments

    url = f"file://{tmp_path}/s"
    *_, audit = build_deployments(ServiceOptions(store=url, audit_target_output="probabilities"))
    assert audit.flow_name == "extraction-audit" and audit.parameters["target_output"] == "probabilities"
    *_, audit = build_deployments(ServiceOptions(store=url))
    assert audit.parameters["target_output"] == "labels"  # SPEC section 3's default
    with pytest.raises(ConfigError, match=r"--target-output is what the target answers: .*; got 'soft'"):
        ServiceOptions(store=url, audit_target_output="soft")


def test_serve_takes_the_audits_target_output_as_steal_does(tmp_path, capsys):
    url = f"file://{tmp_path}/runs"
    assert parse_args(["serve", "--store", url, "--target-output", "probabilities"]).audit_target_output == (
        "probabilities"
    )
    with pytest.raises(SystemExit) as stopped:  # a value the option's parser refuses: a usage error, exit 2
        main(["serve", "--store", url, "--target-output", "soft"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert CLI_RULE in " ".join(err.split()) and "Traceback" not in err
    assert main(["serve", "--store", url, "--target-output", "probabilities", "--audit-cron", "off"]) == 2
    err = capsys.readouterr().err
    assert "--target-output is what the scheduled extraction audit asks for, so it needs the audit" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()
