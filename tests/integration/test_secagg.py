"""End to end through Flower's simulation engine with secure aggregation on: 3 tenants,
2 rounds, the real apps; the quality bar of the plain federation still holds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedlora.simulations.cli.launcher import free_port

pytestmark = pytest.mark.slow


def test_secure_simulation_learns_and_reports_secure_aggregation(tmp_path):
    # Prepare: the plain integration test's settings, plus secagg.enabled
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedlora.simulations.cli", "simulate", "--run-dir", str(run_dir),
           "--port", str(free_port()), "--control-port", str(free_port()),
           "--set", "simulation.tenants=3", "--set", "federation.rounds=2",
           "--set", "train.local-steps=30", "--set", "data.train-size=96", "--set", "data.holdout-size=16",
           "--set", "eval.probe-size=8", "--set", "run.baselines=false", "--set", "secagg.enabled=true",
           "--set", "federation.fraction-evaluate=0.0",  # the quality bar is the final adapter's (comparison.json)
           "--set", "dpo.enabled=false", "--set", "publish.enabled=false"]
    # Execute
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    # Assert: every round was a secure round that all three tenants finished
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rounds = [json.loads((run_dir / f"metrics/round_00{k}.json").read_text()) for k in (1, 2)]
    for r in rounds:
        assert r["secagg"]["enabled"] is True and r["secagg"]["finished"] == 3 and r["secagg"]["failure"] is None
        assert sorted(r["finished"]) == ["0", "1", "2"] and not r["dropped"] and r["aggregated"]
        assert all("num-examples" not in m for m in r["train"].values())  # weights stayed inside the sum
    # The quality bar of the plain federation
    table = {row["model"]: row for row in json.loads((run_dir / "comparison.json").read_text())}
    assert table["federated"]["mean_exact_match"] >= table["untuned base"]["mean_exact_match"] + 0.2
    assert table["federated"]["mean_loss"] < table["untuned base"]["mean_loss"]
    # The report says so
    report = (run_dir / "report.md").read_text()
    assert "## Secure aggregation" in report and "On (SecAgg+)" in report
