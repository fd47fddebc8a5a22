"""Flower's own CLI on the project: ``flwr run APP``, ``flwr ls``, ``flwr log``, ``flwr stop``.

The connections are the ones ``fedlora flwr-config`` writes into a private ``FLWR_HOME``:
``fedlora-sim`` (Flower's local simulation: ``flwr`` starts a detached ``flower-superlink
--simulation`` on moved ports) and ``fedlora`` (a :class:`LocalFederation` SuperLink with TLS
and node authentication). The first simulated run is a bare ``flwr run .``: no data.dir, no
run.dir. Every process Flower starts inherits a tag from the ``flwr`` environment (the local
SuperLink too), so the module ends all of them by tag, even when a test fails; the last test
proves none is left.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from fedlora.simulations.cli.deployment import flower_env
from fedlora.simulations.cli.local_federation import LocalFederation, Tenant
from fedlora.simulations.cli import flower_app
from fedlora.simulations.cli.flwr_config import offline_env
from fedlora.simulations.cli.launcher import BIN, TAG_ENV, free_port, kill_tagged, new_tag, tagged_pids, watchdog
from fedlora.simulations.cli.main import main

pytestmark = pytest.mark.slow

BASE = os.environ.get("FEDLORA_TEST_BASE", "embedded")
# 2 tenants (one per SuperNode), 1 round of 2 local steps on a few rows
TINY = (f'model.base="{BASE}" federation.rounds=1 train.local-steps=2 train.batch-size=4 train.threads=1 '
        "data.train-size=16 data.holdout-size=4 eval.max-new-tokens=8 eval.batch-size=4 "
        "federation.round-timeout=300.0")
LONG = TINY.replace("federation.rounds=1", "federation.rounds=50").replace("local-steps=2", "local-steps=400")


REPO = Path(__file__).resolve().parents[2]  # the source tree: its pyproject.toml is a Flower app too


class Flwr:
    """``flwr ...`` with one environment (its FLWR_HOME, the tag), submitting the app in ``app``."""

    def __init__(self, env: dict[str, str], app: Path) -> None:
        self.env, self.app = env, app

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        out = subprocess.run([str(BIN / "flwr"), *args], cwd=self.app, env=self.env, capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
        assert out.returncode == 0, (f"flwr {' '.join(args)} exited {out.returncode}:\n"
                                     f"{out.stdout[-3000:]}{out.stderr[-3000:]}")
        return out

    def run(self, *args: str, timeout: float = 600) -> tuple[int, str]:
        out = self("run", ".", *args, timeout=timeout)  # cwd is the app
        return int(re.search(r"Successfully started run (\d+)", out.stdout).group(1)), out.stdout

    def status(self, connection: str, run_id: int) -> str:
        out = self("ls", connection, "--run-id", str(run_id), "--format", "json").stdout
        return _json(out)["runs"][0]["status"]

    def wait_status(self, connection: str, run_id: int, want, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while (status := self.status(connection, run_id)) not in want and time.monotonic() < deadline:
            time.sleep(1)
        return status


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """A private FLWR_HOME with the connections ``fedlora flwr-config`` writes, local SuperLink ports moved."""
    root = tmp_path_factory.mktemp("flwr-cli")
    home = root / "flwr-home"
    assert main(["flwr-config", "--flwr-home", str(home), "--num-supernodes", "2", "--cpus-per-tenant", "1"]) == 0
    app = flower_app.app_dir()
    tag = new_tag()
    env = {**os.environ, **offline_env(home), "FEDLORA_HOME": str(root / "fedlora-home"), TAG_ENV: tag,
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    with watchdog(tag):  # the detached local SuperLink and all it starts die with this module (or pytest)
        flwr = Flwr(env, app)
        for attempt in range(3):  # flwr gives the local SuperLink 15 s to start; a loaded machine may need two
            try:
                flwr("ls", "fedlora-sim")
                break
            except AssertionError:
                if attempt == 2:
                    raise
        yield {"flwr": flwr, "tag": tag, "fedlora_home": root / "fedlora-home"}


@pytest.fixture(scope="module")
def first_run(sim):
    """A bare ``flwr run APP fedlora-sim``: data.dir and run.dir empty."""
    run_id, out = sim["flwr"].run("fedlora-sim", "--run-config", TINY, "--stream")
    dirs = list((sim["fedlora_home"] / "runs").glob(f"*-{run_id}"))
    return {"id": run_id, "out": out, "dirs": dirs}


def test_bare_flwr_run_writes_the_final_adapter_under_the_fedlora_home(first_run, sim):
    # Assert: one run directory named by the run id, with the final adapter and round 1's record
    assert len(first_run["dirs"]) == 1, first_run["out"][-3000:]
    run_dir = first_run["dirs"][0]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "FEDERATION_DONE").is_file()
    record = json.loads((run_dir / "metrics" / "round_001.json").read_text())
    assert record["finished"] == ["0", "1"] and record["aggregated"]
    assert json.loads((run_dir / "config.json").read_text())["run.dir"] == str(run_dir)
    assert f"fedlora: run {first_run['id']} writes to {run_dir}" in first_run["out"]


def test_bare_flwr_run_has_one_synthetic_tenant_per_supernode(first_run, sim):
    tenants = sorted(p.name for p in (sim["fedlora_home"] / "synthetic").glob("*/tenant_*"))
    assert tenants == ["tenant_000", "tenant_001"]


def test_flwr_ls_shows_the_run_completed(first_run, sim):
    # Execute
    out = sim["flwr"]("ls", "fedlora-sim", "--format", "json").stdout
    # Assert
    runs = {r["run-id"]: r for r in _json(out)["runs"]}
    assert runs[str(first_run["id"])]["status"] == "finished:completed"
    assert runs[str(first_run["id"])]["fab-name"] == "fedlora"


def test_flwr_log_shows_the_runs_log(first_run, sim):
    out = sim["flwr"]("log", str(first_run["id"]), "fedlora-sim", "--show").stdout
    assert f"fedlora: run {first_run['id']} writes to {first_run['dirs'][0]}" in out
    assert "[ROUND 1/1]" in out


def test_flwr_stop_stops_a_long_run(first_run, sim):
    flwr = sim["flwr"]
    # Prepare: a long run, submitted without --stream, training
    run_id, _ = flwr.run("fedlora-sim", "--run-config", LONG)
    assert flwr.wait_status("fedlora-sim", run_id, {"running"}, timeout=120) == "running"
    # Execute
    flwr("stop", str(run_id), "fedlora-sim")
    # Assert: the run is stopped, its simulation process ends, no final adapter
    assert flwr.wait_status("fedlora-sim", run_id, {"finished:stopped"}, timeout=60) == "finished:stopped"
    deadline = time.monotonic() + 90
    while _processes(sim["tag"], b"flwr-simulation") and time.monotonic() < deadline:
        time.sleep(1)
    assert _processes(sim["tag"], b"flwr-simulation") == []
    assert not list((sim["fedlora_home"] / "runs").glob(f"*-{run_id}/FEDERATION_DONE"))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, sim):
    """``flwr run . fedlora`` in the source tree against a LocalFederation (TLS + node auth) with two tenant SuperNodes."""
    from fedlora.simulations.synthetic import write_tenants

    kill_tagged(sim["tag"])  # the local simulation is done: its CPUs go to the deployment
    root = tmp_path_factory.mktemp("flwr-cli-deployment")
    write_tenants(root / "data", num_tenants=2, train_size=16, holdout_size=4, preference_size=0, seed=0)
    with LocalFederation(root / "federation") as fed:
        for t in range(2):
            fed.start_node(Tenant(f"tenant-{t}", t, root / "data" / f"tenant_{t:03d}" / "train.jsonl"))
        fed.wait_online(2)
        flwr = Flwr(flower_env(fed.cli_home, fed.tag), REPO)
        run_dir = root / "run"
        run_id, out = flwr.run("fedlora", "--run-config",
                               f'{TINY} federation.fraction-evaluate=0.0 run.dir="{run_dir}"', "--stream")
        yield {"fed": fed, "flwr": flwr, "id": run_id, "out": out, "dir": run_dir}


def test_flwr_run_against_a_deployment_superlink(deployment):
    run_dir = deployment["dir"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file(), deployment["out"][-3000:]
    record = json.loads((run_dir / "metrics" / "round_001.json").read_text())
    assert record["finished"] == ["0", "1"] and record["aggregated"]


def test_flwr_ls_and_log_on_the_deployment_run(deployment):
    flwr, run_id = deployment["flwr"], deployment["id"]
    assert flwr.status("fedlora", run_id) == "finished:completed"
    out = flwr("log", str(run_id), "fedlora", "--show").stdout
    assert f"fedlora: run {run_id} writes to {deployment['dir']}" in out


def test_flwr_stop_of_a_deployment_run_leaves_the_tenant_workers_serving(deployment):
    # Prepare: a long run on the deployment, its first train message in a worker's hands
    from fedlora.client.worker_link import health, socket_path

    flwr, fed = deployment["flwr"], deployment["fed"]
    sockets = [socket_path(fed.state_dir / f"node-tenant-{t}") for t in range(2)]
    before = [health(s)["pid"] for s in sockets]
    run_id, _ = flwr.run("fedlora", "--run-config", LONG.replace("local-steps=400", "local-steps=60")
                         + f' run.dir="{deployment["dir"]}-stopped"')
    deadline = time.monotonic() + 180
    while not any(health(s)["busy"] for s in sockets) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert any(health(s)["busy"] for s in sockets), "no worker took the run's message"
    # Execute
    flwr("stop", str(run_id), "fedlora")
    # Assert: the run is stopped; each worker finishes the message in hand and serves on, the
    # same process (a stopped task must not stop the worker, as Flower's own heartbeat would)
    assert flwr.wait_status("fedlora", run_id, {"finished:stopped"}, timeout=60) == "finished:stopped"
    deadline = time.monotonic() + 180
    while any(health(s)["busy"] for s in sockets) and time.monotonic() < deadline:
        time.sleep(0.5)
    after = [health(s) for s in sockets]
    assert [h["pid"] for h in after] == before and not any(h["busy"] for h in after), after


def test_no_process_is_left_behind(sim, deployment):
    # Execute: what the fixtures do at the end of the module (also when a test failed)
    deployment["fed"].close()
    kill_tagged(sim["tag"])
    # Assert: no SuperLink (the detached local one included), SuperNode, ServerApp, Ray or ClientApp process
    assert tagged_pids(deployment["fed"].tag) == []
    assert tagged_pids(sim["tag"]) == []


def _processes(tag: str, name: bytes) -> list[int]:
    found = []
    for pid in tagged_pids(tag):
        try:
            if name in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def _json(out: str):
    """The JSON object in ``flwr ... --format json`` output (other lines may come before it)."""
    return json.JSONDecoder().raw_decode(out[out.index("{"):])[0]
