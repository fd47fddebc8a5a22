"""docker/: what can be checked without a Docker engine.

The compose file parses and wires one SuperLink, its ServerApp executor and two tenants
with TLS and node auth; every flag the images pass exists in this Flower; every file a
Dockerfile copies exists; the shell scripts parse.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from simulations.cli.deployment import flower_env

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _help_flags(program: str) -> set[str]:
    out = subprocess.run([str(BIN / program), "--help"], capture_output=True, text=True, timeout=60,
                         env=flower_env(Path("/nonexistent-flwr-home"))).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", out))


def _flags(args: list[str]) -> set[str]:
    return {a.split("=")[0] for a in args if a.startswith("--")}


def test_compose_has_one_superlink_an_executor_and_two_tenants(compose):
    assert set(compose["services"]) == {"superlink", "serverapp", "register", "tenant-a", "tenant-b"}


def test_superlink_runs_with_tls_node_auth_sqlite_and_no_runtime_installs(compose):
    flags = _flags(compose["services"]["superlink"]["command"])
    assert {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth", "--database",
            "--disable-runtime-dependency-installation"} <= flags
    assert "--insecure" not in flags


@pytest.mark.slow
def test_superlink_and_executor_flags_exist_in_flower(compose):
    assert _flags(compose["services"]["superlink"]["command"]) <= _help_flags("flower-superlink")
    assert _flags(compose["services"]["serverapp"]["command"]) <= _help_flags("flower-superexec")


@pytest.mark.slow
def test_supernode_script_flags_exist_in_flower():
    script = (DOCKER / "scripts" / "supernode.sh").read_text()
    flags = set(re.findall(r"^\s*(--[a-z][a-z0-9-]+)", script, flags=re.M))
    assert {"--root-certificates", "--auth-supernode-private-key", "--node-config"} <= flags
    assert flags <= _help_flags("flower-supernode")


def test_each_tenant_mounts_its_own_key_and_data(compose):
    mounts = {name: compose["services"][name]["volumes"] for name in ("tenant-a", "tenant-b")}
    assert "./secrets/keys/tenant-a:/keys/node:ro" in mounts["tenant-a"]
    assert "./secrets/keys/tenant-b:/keys/node:ro" in mounts["tenant-b"]
    assert "./data/tenant-a:/data:ro" in mounts["tenant-a"] and "./data/tenant-b:/data:ro" in mounts["tenant-b"]


def test_every_service_turns_telemetry_and_update_checks_off(compose):
    for name, service in compose["services"].items():
        env = service["environment"]
        assert (env["FLWR_TELEMETRY_ENABLED"], env["FLWR_DISABLE_UPDATE_CHECK"]) == ("0", "1"), name


def test_dockerfiles_referenced_by_compose_exist(compose):
    for service in compose["services"].values():
        if "build" in service:
            assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).is_file()


@pytest.mark.parametrize("dockerfile", sorted(p.name for p in DOCKER.glob("*.Dockerfile")))
def test_every_copied_path_exists(dockerfile):
    sources = []
    for line in (DOCKER / dockerfile).read_text().splitlines():
        if line.startswith("COPY "):
            sources += [s for s in line.split()[1:-1] if not s.startswith("--")]
    assert all((ROOT / s).exists() for s in sources), sources


@pytest.mark.parametrize("script", sorted(p.name for p in (DOCKER / "scripts").glob("*.sh")))
def test_scripts_parse_and_are_executable(script):
    path = DOCKER / "scripts" / script
    assert subprocess.run(["sh", "-n", str(path)], capture_output=True).returncode == 0
    assert path.stat().st_mode & 0o111
