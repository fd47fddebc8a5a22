"""docker/build-local.sh end to end: the four images from a local base, the compose
federation (SuperLink, ServerApp executor, Fleet proxy, two tenants, TLS, SuperNode
authentication), one round, the final adapter, a tenant reaching only the Fleet API, and
everything torn down again.

Opt in: ``FEDLORA_DOCKER_TESTS=1 pytest -m docker tests/integration/test_docker.py``. It
needs a Docker engine (``docker info`` answers) and takes minutes (a first build tens of
minutes); without the variable, or without an engine, it is skipped before anything runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docker" / "build-local.sh"
OPT_IN = "FEDLORA_DOCKER_TESTS"


def _skip_reason() -> str | None:
    if os.environ.get(OPT_IN) != "1":
        return f"opt-in: set {OPT_IN}=1 (builds three Docker images and runs a federation round)"
    if shutil.which("docker") is None:
        return "no docker command on PATH"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
        return "no Docker engine answers (`docker info` failed): start dockerd"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


@pytest.fixture(scope="module")
def docker_round():
    """One run of the script: its output and the run directory it left."""
    name = f"pytest-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run([str(SCRIPT), "--run-name", name, "--timeout", "2400"], capture_output=True, text=True,
                          timeout=3600, cwd=ROOT, stdin=subprocess.DEVNULL)
    return proc, ROOT / "docker" / "runs" / name


@pytest.mark.timeout(3700)
def test_one_round_with_two_tenants_leaves_a_final_adapter(docker_round):
    proc, run_dir = docker_round
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    done = json.loads((run_dir / "FEDERATION_DONE").read_text())
    adapter = run_dir / done["adapter"]
    assert adapter.is_dir() and any(adapter.iterdir())
    round_1 = json.loads((run_dir / "metrics" / "round_001.json").read_text())
    assert sorted(round_1["finished"]) == ["0", "1"] and round_1["aggregated"]
    assert set(round_1["train"]) == {"0", "1"}
    assert "fedlora-supernode" in proc.stdout and "round 1: sampled" in proc.stdout


@pytest.mark.timeout(120)
def test_a_tenant_container_reaches_only_the_fleet_api(docker_round):
    proc, _ = docker_round
    # the script probes from tenant-a: Control and Runtime routes 403 at the proxy, Fleet passed,
    # the SuperLink itself not even resolvable from the tenants' network
    assert "control plane from tenant-a: closed" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.timeout(120)
def test_nothing_of_the_federation_keeps_running(docker_round):
    out = subprocess.run(["docker", "ps", "-aq", "--filter", "label=com.docker.compose.project=fedlora"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == ""
