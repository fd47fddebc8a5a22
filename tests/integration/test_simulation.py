"""End to end through Flower's simulation engine: 3 tenants, 3 rounds, the real apps."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # shares the tiny run with test_resume (tests/conftest.py SHARED_FIXTURE)


def _superlinks_on(port: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "flower-superlink" in line and f"--port {port}" in line]


def test_simulation_learns_and_leaves_artifacts(tiny_run):
    # Prepare + Execute: the shared tiny run (tests/integration/conftest.py; 3 tenants, 3 rounds)
    run_dir, port, proc = tiny_run.run_dir, tiny_run.port, tiny_run.proc
    # Assert: the run completed and said where the report is
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"report written to {run_dir / 'report.md'}" in proc.stdout
    for path in ["config.json", "run_config.toml", "federation.json", "comparison.json", "report.md",
                 "metrics/round_001.json", "metrics/round_003.json", "checkpoints/round_003/adapter_model.safetensors",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                 "plots/tenants_per_round.png", "plots/bytes_per_round.png"]:
        assert (run_dir / path).is_file(), path
    rounds = [json.loads((run_dir / f"metrics/round_00{k}.json").read_text()) for k in (1, 2, 3)]
    assert all(sorted(r["finished"]) == ["0", "1", "2"] and not r["dropped"] for r in rounds)
    # The metric improves: the federated adapter beats the untuned base on the holdouts
    table = {row["model"]: row for row in json.loads((run_dir / "comparison.json").read_text())}
    assert table["federated"]["mean_exact_match"] >= table["untuned base"]["mean_exact_match"] + 0.2
    assert table["federated"]["mean_loss"] < table["untuned base"]["mean_loss"]
    # The last round's holdout loss (after three aggregations) is below round 1's
    loss = [sum(m["eval-loss"] for m in r["eval"].values()) / len(r["eval"]) for r in rounds]
    assert loss[2] < loss[0]
    # The final adapter loads with plain PEFT in a fresh process
    code = ("import sys; from transformers import AutoModelForCausalLM; from peft import PeftModel;"
            "from fedlora.common.model import embedded_base_dir;"
            "m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(embedded_base_dir())), sys.argv[1]);"
            "print(type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(run_dir / "adapter")], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().endswith("PeftModelForCausalLM")
    # Nothing left running
    assert _superlinks_on(port) == []


def test_the_simulations_superlink_ran_in_a_network_of_its_own(tiny_run):
    import os

    from fedlora.simulations.cli.private_net import NETNS_FILE, unavailable

    if unavailable() is not None:
        pytest.skip(unavailable())
    theirs = (tiny_run.run_dir / "flower" / NETNS_FILE).read_text()
    assert theirs.startswith("net:[") and theirs != os.readlink("/proc/self/ns/net")
