"""A tenant node's supervisor: the worker comes up before the SuperNode, is restarted when it
dies, and nothing of the node outlives a stop, the SuperNode's exit or a SIGKILLed supervisor.

A sleeping Python process stands in for ``flower-supernode`` (the supervisor treats it as an
opaque child); the worker is the real one, started without preloading the ML stack.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora.client import worker_link

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _start_node(tmp_path: Path, supernode_seconds: float = 120.0) -> tuple[subprocess.Popen, Path, Path]:
    socket = worker_link.socket_path(tmp_path / "state")
    marker = tmp_path / "supernode.pid"
    fake = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep({supernode_seconds})"
    node = subprocess.Popen([sys.executable, "-m", "fedlora.simulations.cli.tenant_node", "--socket", str(socket),
                             "--no-preload", "--", sys.executable, "-c", fake],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait(lambda: marker.is_file() and marker.read_text(), what="the SuperNode stand-in")
    return node, socket, marker


def _wait(predicate, *, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _pids(socket: Path, marker: Path) -> tuple[int, int]:
    return worker_link.health(socket)["pid"], int(marker.read_text())


def test_worker_answers_before_the_supernode_starts(tmp_path):
    # Prepare / Execute
    node, socket, marker = _start_node(tmp_path)
    try:
        health = worker_link.health(socket)
        # Assert: by the time the SuperNode runs, its worker answers and has served nothing
        assert (health["served"], health["failed"], health["busy"]) == (0, 0, None)
    finally:
        node.kill()


def test_sigterm_stops_supernode_and_worker(tmp_path):
    # Prepare
    node, socket, marker = _start_node(tmp_path)
    worker, supernode = _pids(socket, marker)
    # Execute
    node.send_signal(signal.SIGTERM)
    node.wait(timeout=60)
    # Assert
    _wait(lambda: not _alive(worker) and not _alive(supernode), what="both children to exit", timeout=30)
    assert not socket.exists()


def test_sigkilled_supervisor_leaves_nothing(tmp_path):
    # Prepare
    node, socket, marker = _start_node(tmp_path)
    worker, supernode = _pids(socket, marker)
    # Execute: the supervisor dies without any chance to clean up
    node.kill()
    node.wait(timeout=30)
    # Assert: the kernel's parent-death signal ends both children
    _wait(lambda: not _alive(worker) and not _alive(supernode), what="both children to exit", timeout=30)


def test_supernode_exit_ends_the_node_with_its_code(tmp_path):
    # Prepare: a SuperNode that exits with code 3
    socket = worker_link.socket_path(tmp_path / "state")
    # Execute
    out = subprocess.run([sys.executable, "-m", "fedlora.simulations.cli.tenant_node", "--socket", str(socket), "--no-preload",
                          "--", sys.executable, "-c", "raise SystemExit(3)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    # Assert
    assert out.returncode == 3, out.stderr
    assert not socket.exists()


def test_dead_worker_is_restarted(tmp_path):
    # Prepare
    node, socket, marker = _start_node(tmp_path)
    try:
        first, _ = _pids(socket, marker)
        # Execute
        os.kill(first, signal.SIGKILL)
        # Assert: a new worker answers on the same socket
        second = _wait(lambda: _other_worker(socket, first), what="a restarted worker")
        assert second != first
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=60)


def _other_worker(socket: Path, old: int) -> int | None:
    try:
        pid = worker_link.health(socket, timeout=1.0)["pid"]
    except (worker_link.WorkerUnavailable, worker_link.WorkerFailed, json.JSONDecodeError):
        return None
    return pid if pid != old else None


def test_supernode_finds_fedlora_clientapp_first_and_never_flowers(tmp_path):
    # Prepare: a PATH whose flwr-clientapp is a known stand-in for Flower's
    from fedlora.simulations.cli.tenant_node import TenantNode

    flower_bin = tmp_path / "flower-bin"
    flower_bin.mkdir()
    (flower_bin / "flwr-clientapp").write_text("#!/bin/sh\n")
    (flower_bin / "flwr-clientapp").chmod(0o755)
    socket = worker_link.socket_path(tmp_path / "state")
    node = TenantNode(["true"], socket, env={"PATH": f"{flower_bin}{os.pathsep}/usr/bin"}, trusted_fabs=("ab" * 32,))
    # Execute
    env = node.supernode_env()
    # Assert: the node's script is what the SuperExec finds; its fallback is the node's own fedlora
    # (with the trusted hashes), never the PATH's flwr-clientapp
    first = env["PATH"].split(os.pathsep)[0]
    script = Path(first) / "flwr-clientapp"
    assert first == str(socket.parent / "bin") and script.is_file()
    text = script.read_text()
    assert f"--worker-socket={socket}" in text
    assert "--fallback=fedlora.client.standalone" in text and f"--fallback=--trusted-fab={'ab' * 32}" in text
    assert str(flower_bin) not in text
    assert env["PATH"].split(os.pathsep)[1:] == [str(flower_bin), "/usr/bin"]


def test_node_without_a_worker_still_installs_the_clientapp(tmp_path):
    from fedlora.simulations.cli.tenant_node import TenantNode

    node = TenantNode(["true"], None, env={"PATH": "/usr/bin"}, bin_dir=tmp_path / "bin")
    env = node.supernode_env()
    assert env["PATH"].split(os.pathsep)[0] == str(tmp_path / "bin")
    assert "--worker-socket" not in (tmp_path / "bin" / "flwr-clientapp").read_text()


def test_process_isolation_gets_the_nodes_own_executor_holding_the_secret(tmp_path):
    # Prepare: a SuperNode command under process isolation, and one that runs its tasks itself
    from fedlora.simulations.cli.tenant_node import TenantNode, executor_command

    secret = tmp_path / "state" / "superexec.secret"
    isolated = ["flower-supernode", "--port", "9123", "--isolation", "process", "--superexec-auth-secret-file",
                str(secret)]
    # Execute
    node = TenantNode(isolated, None, bin_dir=tmp_path / "bin")
    cmd = node.executor_command()
    # Assert: flower-superexec on the node's loopback Runtime API with the secret, made private on first use
    assert cmd[0].endswith("flower-superexec") and cmd[cmd.index("--runtime-api-address") + 1] == "127.0.0.1:9123"
    assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == str(secret)
    assert secret.is_file() and (secret.stat().st_mode & 0o777) == 0o600
    assert executor_command(["flower-supernode", "--port", "9123", "--isolation", "subprocess"], 1) is None
