"""``steal --attack-steps`` below the attackers' own schedule (probe 113): ``--attack-steps 100`` left ``augmented`` at
chance (8-21 % agreement against 76 % at the default) and neither the log nor steal.md said the cap had cut its
training. Now the log warns before the cells run, and steal.md and steal.json say it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_the_threshold_is_the_attackers_own_least_schedule() -> None:
    from obliviate.extraction.attackers import AttackOptions, step_cap_shortfall

    floor = AttackOptions().min_steps
    assert floor == 400  # min_steps + 2 per bought image, at most 1200 (AttackOptions)
    note = step_cap_shortfall(attackers=["basic", "augmented"], budgets=[40, 20], attack_steps=100)
    assert note is not None
    assert note.startswith(
        "--attack-steps 100 is below 400, the fewest supervised steps the attacker augmented trains "
    )
    assert "here 440 at 20 queries, 480 at 40 queries" in note and "trained at most 100 steps" in note
    both = step_cap_shortfall(attackers=["augmented", "semi_supervised"], budgets=[20], attack_steps=100)
    assert both is not None and "the attackers augmented, semi_supervised train at any budget" in both
    assert "basic" not in note  # basic trains --steps, which --attack-steps does not cap
    assert step_cap_shortfall(attackers=["augmented"], budgets=[20], attack_steps=floor) is None
    assert step_cap_shortfall(attackers=["basic"], budgets=[20], attack_steps=10) is None


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_steal_says_the_cap_cut_the_attackers_in_its_log_and_report(prefect_and_ray, target_checkpoint, tmp_path):
    out = tmp_path / "report"
    grid = ["--budgets", "10", "--attackers", "augmented", "--selectors", "random", "--seeds", "1", "--eps", "0.3"]
    sizes = ["--pool-size", "60", "--test-size", "30", "--attack-steps", "20", "--num-cpus", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "steal", "--target", str(target_checkpoint), "--out", str(out), *grid]
        + sizes,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    said = "--attack-steps 20 is below 400, the fewest supervised steps the attacker augmented trains at any budget"
    assert f"attackers cut short: {said}" in " ".join(done.stderr.split()), done.stderr[-3000:]
    md = (out / "steal.md").read_text()
    assert f"**Attackers cut short:** {said}" in md, md[:2000]
    assert json.loads((out / "steal.json").read_text())["attackers_cut_short"].startswith(said)
