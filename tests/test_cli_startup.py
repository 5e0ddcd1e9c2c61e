"""Building the ``obliviate`` command line and parsing a command import nothing heavy.

Every command's ``--help``, ``forget --status`` and ``store check`` used to pay 4 s and 700 MB before running: the
command modules imported torch, numba and scipy at module level (for defaults shown in the help). Those libraries
are imported by the handlers that use them; the defaults come from :mod:`obliviate.defaults`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "numba", "scipy", "sklearn", "ray", "prefect", "s3fs")

_PROBE = """
import contextlib, io, json, sys
from flows.cli import build_app, parse_args
build_app()
for argv in {argvs!r}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            parse_args(argv)
        except SystemExit as stop:  # --help prints, then exits 0
            assert stop.code == 0, (argv, stop.code)
print(json.dumps([name for name in {heavy!r} if name in sys.modules]))
"""


def _heavy_loaded_by(argvs: list[list[str]]) -> list[str]:
    code = _PROBE.format(argvs=argvs, heavy=HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_building_the_app_and_parsing_commands_imports_no_heavy_library() -> None:
    argvs = [
        ["forget", "--status", "x"],
        ["store", "check"],
        ["train", "--run-id", "r"],
        ["steal", "--demo"],
        ["reduce", "--plan", "1000"],
        ["target", "train"],
        ["tune", "reduction"],
    ]
    assert _heavy_loaded_by(argvs) == []


def test_every_commands_help_imports_no_heavy_library() -> None:
    import typer

    from flows.cli import build_app

    app = typer.main.get_command(build_app())
    argvs: list[list[str]] = [["--help"]]
    for name, command in app.commands.items():  # type: ignore[attr-defined]
        argvs.append([name, "--help"])
        argvs.extend([name, sub, "--help"] for sub in getattr(command, "commands", {}))
    assert len(argvs) > 12
    assert _heavy_loaded_by(argvs) == []


def test_the_defaults_moved_to_obliviate_defaults_are_still_those_of_their_old_homes() -> None:
    from obliviate import defaults
    from obliviate.extraction.active import ADAPTIVE_FROM_BUDGET, AUDIT_SELECTOR
    from obliviate.extraction.attackers import DEFAULT_ATTACKER, AttackOptions
    from obliviate.extraction.audit import DEFAULT_SEEDS
    from obliviate.extraction.selectors import DEFAULT_SELECTOR
    from obliviate.unlearning import DEFAULT_RECIPE as package_recipe
    from obliviate.unlearning.config import DEFAULT_RECIPE

    assert DEFAULT_RECIPE is defaults.DEFAULT_RECIPE is package_recipe
    assert dict(DEFAULT_RECIPE) == {
        "num_blocks": 6,
        "local_epochs": 3,
        "batch_size": 32,
        "optimizer": "adam",
        "learning_rate": 1e-2,
        "schedule": "cosine",
        "min_lr_fraction": 0.3,
    }
    assert (AUDIT_SELECTOR, ADAPTIVE_FROM_BUDGET, DEFAULT_SELECTOR, DEFAULT_ATTACKER, DEFAULT_SEEDS) == (
        "auto",
        150,
        "cluster_centers",
        "semi_supervised_ensemble",
        2,
    )
    attack = AttackOptions()
    assert (attack.max_steps, attack.rounds, attack.consistency_steps, attack.round_steps) == (1200, 2, 1200, 600)
    assert (attack.max_steps, attack.rounds, attack.consistency_steps, attack.round_steps) == (
        defaults.ATTACK_MAX_STEPS,
        defaults.ATTACK_ROUNDS,
        defaults.ATTACK_CONSISTENCY_STEPS,
        defaults.ATTACK_ROUND_STEPS,
    )


def test_steal_and_train_parse_to_the_library_defaults() -> None:
    from flows.cli import parse_args
    from obliviate.extraction.attackers import AttackOptions
    from obliviate.unlearning.config import DEFAULT_RECIPE

    steal = parse_args(["steal", "--demo"])
    attack = AttackOptions()
    assert (steal.attack_steps, steal.rounds, steal.consistency_steps, steal.round_steps) == (
        attack.max_steps,
        attack.rounds,
        attack.consistency_steps,
        attack.round_steps,
    )
    train = parse_args(["train", "--run-id", "r"])
    assert (train.blocks, train.epochs, train.batch_size, train.lr, train.optimizer, train.schedule) == (
        DEFAULT_RECIPE["num_blocks"],
        DEFAULT_RECIPE["local_epochs"],
        DEFAULT_RECIPE["batch_size"],
        DEFAULT_RECIPE["learning_rate"],
        DEFAULT_RECIPE["optimizer"],
        DEFAULT_RECIPE["schedule"],
    )
