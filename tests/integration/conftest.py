"""One uninterrupted tiny simulation shared by the integration modules that need it: the
end-to-end test inspects its artifacts, the kill -9 test compares its resumed adapter with
this run's, byte for byte (same settings, same seed). Running it once saves a whole run."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedlora.simulations.cli.launcher import free_port

# 3 tenants, 3 rounds of 30 steps on the embedded base; DPO, merge and publish have their own tests.
TINY = ["--set", "simulation.tenants=3", "--set", "federation.rounds=3", "--set", "train.local-steps=30",
        "--set", "data.train-size=96", "--set", "data.holdout-size=16", "--set", "eval.probe-size=8",
        "--set", "run.baselines=false", "--set", "dpo.enabled=false", "--set", "publish.enabled=false"]


def simulate_cmd(*args: str, port: int | None = None) -> list[str]:
    """``fedlora simulate`` on free ports (or the given SuperLink port)."""
    return [sys.executable, "-m", "fedlora.simulations.cli", "simulate", "--port", str(port or free_port()),
            "--control-port", str(free_port()), *args]


@dataclass(frozen=True)
class TinyRun:
    run_dir: Path
    port: int
    proc: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    """The uninterrupted run with :data:`TINY` settings (fails the tests that use it if it failed)."""
    port = free_port()
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    proc = subprocess.run(simulate_cmd("--run-dir", str(run_dir), *TINY, port=port), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return TinyRun(run_dir=run_dir, port=port, proc=proc)
