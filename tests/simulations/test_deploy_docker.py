"""docker/: what can be checked without a Docker engine.

The compose file parses and wires one SuperLink, its ServerApp executor, two tenants and
the operator's one-shot client with TLS and node auth; every flag the images pass exists in
this Flower (and in ``fedlora deploy supernode``); every file a Dockerfile copies exists;
the images build from any base (``BASE``) with the public ones as defaults, and the build
stage's inputs (torch wheel, pip's CA bundle) never reach an image; the scripts parse.
The images are built and run by ``tests/integration/test_docker.py`` (opt-in).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedlora.simulations.cli.deployment import flower_env

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


def test_compose_has_one_superlink_an_executor_two_tenants_and_an_operator(compose):
    assert set(compose["services"]) == {"superlink", "serverapp", "fleet-proxy", "register", "tenant-a", "tenant-b",
                                        "operator"}
    assert compose["services"]["operator"]["profiles"] == ["operator"]  # `up` leaves it out; `run --rm operator`


def test_superlink_runs_with_tls_node_auth_sqlite_and_no_runtime_installs(compose):
    flags = _flags(compose["services"]["superlink"]["command"])
    assert {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth", "--database",
            "--disable-runtime-dependency-installation"} <= flags
    assert "--insecure" not in flags


@pytest.mark.slow
def test_superlink_and_executor_flags_exist_in_flower(compose):
    assert _flags(compose["services"]["superlink"]["command"]) <= _help_flags("flower-superlink")
    assert _flags(compose["services"]["serverapp"]["command"]) <= _help_flags("flower-superexec")


def _code_flags(script: Path) -> set[str]:
    code = "\n".join(line for line in script.read_text().splitlines() if not line.lstrip().startswith("#"))
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", code))


@pytest.mark.slow
def test_supernode_script_runs_fedlora_deploy_supernode_with_existing_flags():
    script = DOCKER / "scripts" / "supernode.sh"
    assert "exec fedlora deploy supernode" in script.read_text()
    flags = _code_flags(script)
    assert {"--superlink", "--ca", "--key", "--data", "--tenant-id", "--state-dir", "--lora-rank", "--no-worker"} <= flags
    out = subprocess.run([str(BIN / "fedlora"), "deploy", "supernode", "--help"], capture_output=True, text=True,
                         timeout=60).stdout
    assert flags <= set(re.findall(r"(--[a-z][a-z0-9-]+)", out))


def test_supernode_script_passes_the_lora_rank_only_when_set(tmp_path):
    fake = tmp_path / "fedlora"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "SUPERLINK": "superlink:9093", "TENANT_ID": "1"}
    script = str(DOCKER / "scripts" / "supernode.sh")
    plain = subprocess.run(["sh", script], capture_output=True, text=True, env=env).stdout.split()
    ranked = subprocess.run(["sh", script], capture_output=True, text=True, env={**env, "LORA_RANK": "4"}).stdout.split()
    assert plain == ["deploy", "supernode", "--superlink", "superlink:9093", "--ca", "/certs/ca.crt",
                     "--key", "/keys/node", "--data", "/data/train.jsonl", "--tenant-id", "1", "--state-dir", "/state"]
    assert ranked == plain + ["--lora-rank", "4"]
    cold = subprocess.run(["sh", script], capture_output=True, text=True, env={**env, "NO_WORKER": "1"}).stdout.split()
    assert cold == plain + ["--no-worker"]


def test_each_tenant_mounts_its_own_key_data_and_writable_state(compose):
    for name in ("tenant-a", "tenant-b"):
        service = compose["services"][name]
        assert {f"./secrets/keys/{name}:/keys/node:ro", f"./data/{name}:/data:ro",
                f"./state/{name}:/state"} <= set(service["volumes"])
        assert service["init"] is True  # SIGTERM reaches `fedlora deploy supernode`; children are reaped
    assert "./state/superlink:/state" in compose["services"]["superlink"]["volumes"]


def test_the_ca_key_and_tenant_private_keys_are_mounted_only_where_needed(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            assert "ca.key" not in volume and volume.split(":")[0] != "./secrets/certs", (name, volume)
            if volume.startswith("./secrets/keys/") and not volume.split(":")[0].endswith(".pub"):
                assert name == volume.split(":")[0].rsplit("/", 1)[1] and volume.endswith(":ro"), (name, volume)


def test_the_tenants_reach_only_the_fleet_proxy(compose):
    services = compose["services"]
    nets = {name: set(s.get("networks", [])) for name, s in services.items()}
    assert compose["networks"]["internal"] == {"internal": True}  # no way out of it
    assert nets["tenant-a"] == nets["tenant-b"] == {"fleet"} and nets["superlink"] == {"internal"}
    assert nets["fleet-proxy"] == {"internal", "fleet"}
    assert all(nets[n] == {"internal"} for n in ("serverapp", "register", "operator"))
    assert [n for n, s in services.items() if s.get("ports")] == ["fleet-proxy"]  # the one published port
    assert services["tenant-a"]["environment"]["SUPERLINK"] == "fleet-proxy:9093"


def test_every_service_turns_telemetry_and_update_checks_off(compose):
    for name, service in compose["services"].items():
        if name == "fleet-proxy":
            continue  # nginx: no Flower in it, nothing that calls home
        env = service["environment"]
        assert (env["FLWR_TELEMETRY_ENABLED"], env["FLWR_DISABLE_UPDATE_CHECK"]) == ("0", "1"), name


def test_dockerfiles_referenced_by_compose_exist(compose):
    for service in compose["services"].values():
        if "build" in service:
            assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).is_file()


DOCKERFILES = sorted(p.name for p in DOCKER.glob("*.Dockerfile"))


def _stages(dockerfile: str) -> list[tuple[str, list[str]]]:
    """(FROM line, the lines up to the next FROM) for each stage of the Dockerfile."""
    stages: list[tuple[str, list[str]]] = []
    for line in (DOCKER / dockerfile).read_text().splitlines():
        if line.startswith("FROM "):
            stages.append((line, []))
        elif stages:
            stages[-1][1].append(line)
    return stages


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_copied_path_exists(dockerfile):
    sources = []
    for line in (DOCKER / dockerfile).read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += [s for s in line.split()[1:-1] if not s.startswith("--")]
    assert sources and all((ROOT / s).exists() for s in sources), sources


@pytest.mark.parametrize("dockerfile, default", [("apps.Dockerfile", "python:3.11-slim"),
                                                 ("superlink.Dockerfile", "python:3.11-slim"),
                                                 ("supernode.Dockerfile", "nvidia/cuda:")])
def test_images_build_from_any_base_with_the_public_one_as_default(dockerfile, default):
    text = (DOCKER / dockerfile).read_text()
    assert re.search(rf"^ARG BASE={re.escape(default)}", text, flags=re.M)
    assert _stages(dockerfile)[0][0] == "FROM ${BASE} AS runtime"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_build_inputs_and_credentials_never_reach_an_image(dockerfile):
    stages = _stages(dockerfile)
    final = stages[-1][1]
    # the final stage copies from the build stage only, or a committed config file (the proxy's nginx.conf)
    assert all("--from=build" in line or line.split()[1].endswith(".conf") for line in final
               if line.startswith("COPY ")), final
    for header, lines in stages:
        copies = " ".join(line for line in lines if line.startswith("COPY "))
        assert "secrets" not in copies and ".key" not in copies
        if "build-context" in copies:
            assert header.endswith(" AS build"), header


def test_apps_and_supernode_share_their_build_stages():
    """Same text up to the last stage: with the same build args the second build reuses the first's layers."""
    def shared(dockerfile: str) -> list[str]:
        return [line for header, lines in _stages(dockerfile)[:-1] for line in [header, *lines]]

    assert shared("apps.Dockerfile") == shared("supernode.Dockerfile")


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerignore_lets_every_copied_path_through(dockerfile):
    allowed = [line[1:].rstrip("/") for line in (DOCKER / f"{dockerfile}.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for line in (DOCKER / dockerfile).read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for src in line.split()[1:-1]:
                assert any(src == a or src.startswith(a + "/") for a in allowed), src


@pytest.mark.parametrize("script", sorted(p.name for p in (DOCKER / "scripts").glob("*.sh")))
def test_scripts_parse_and_are_executable(script):
    path = DOCKER / "scripts" / script
    assert subprocess.run(["sh", "-n", str(path)], capture_output=True).returncode == 0
    if path.read_text().startswith("#!"):  # the others are sourced
        assert path.stat().st_mode & 0o111


def test_build_script_parses_and_explains_itself_without_an_engine():
    script = DOCKER / "build-local.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("usage: docker/build-local.sh")
    bad = subprocess.run([str(script), "--rounds", "x"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--rounds takes a positive integer" in bad.stderr


def test_build_script_says_how_to_start_an_engine_when_none_answers(tmp_path):
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\nexit 1\n")  # `docker info` fails
    fake.chmod(0o755)
    out = subprocess.run([str(DOCKER / "build-local.sh"), "--build-only"], capture_output=True, text=True,
                         timeout=30, env={"PATH": f"{tmp_path}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 2 and "no Docker engine answers" in out.stderr and "dockerd" in out.stderr


def test_build_script_hard_codes_no_local_paths():
    text = (DOCKER / "build-local.sh").read_text()
    assert "find-links" in text and "pip_config" in text  # found at run time
    assert not re.search(r"/opt/|/work/|/home/", text)
