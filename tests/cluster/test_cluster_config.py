"""The cluster launcher configs validate offline with Ray's own validation (issue 7)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_cluster_config_passes_ray_validation(name) -> None:
    config = yaml.safe_load((ROOT / name).read_text())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    setup = " ".join(prepared["setup_commands"])
    assert "pip install" in setup and "-e ." in setup  # installs this project on every node
    assert "sys.version_info >= (3, 11)" in setup  # pyproject's requires-python, checked before installing
    for command in prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]:
        if " start " in f" {command} ":  # -n: open files for object transfers; cluster-local had -c (core dumps)
            assert "ulimit -n 65536" in command, command


def test_aws_config_bounds_autoscaling_and_keeps_secrets_out() -> None:
    text = (ROOT / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    worker = config["available_node_types"]["ray.worker.cpu"]
    assert 0 <= worker["min_workers"] <= worker["max_workers"] <= config["max_workers"]
    # Credentials come from the environment: the file names them but never assigns them.
    assert not re.search(r"(?i)aws_secret_access_key\s*[=:]\s*\S", text)
    assert not re.search(r"(?i)aws_access_key_id\s*[=:]\s*\S", text)


def test_validation_rejects_a_broken_config() -> None:
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["max_workers"] = "many"
    with pytest.raises(Exception, match="is not of type 'integer'"):
        validate_config(prepare_config(config))
