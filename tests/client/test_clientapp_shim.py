"""fedlora's ``flwr-clientapp``: hands a task to the tenant worker, or runs Flower's own.

A fake worker (a thread speaking the worker's frames) stands in for the real one, so each
property -- what is handed over, when Flower's command runs instead (with the same
arguments), when it must not (the token may be spent) -- is checked without Flower's
SuperNode. The real hand-over on real SuperNodes is in ``tests/integration/test_deployment.py``.
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest

from fedlora.client import clientapp_shim as shim
from fedlora.client import worker_link as link
from fedlora.client.task_runner import CLIENTAPP_REF, ForeignApp, TaskSpec, check_fab, fab_clientapp

TOKEN = "ab" * 32
FLOWER_ARGS = ["--runtime-api-address", "127.0.0.1:9094", "--token", TOKEN, "--insecure", "--parent-pid", "1"]


class FakeWorker:
    """Answers RUN_TASK requests with a given frame and records what it was sent."""

    def __init__(self, path: Path, kind: int = link.REPLY, body: dict | bytes | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.requests: list[dict] = []
        self.held: list[socket.socket] = []
        self.kind, self.body = kind, body if body is not None else {"status": "completed", "type": "train"}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            _, kind, payload = link.read_frame(conn)
            self.requests.append({"kind": kind, **json.loads(payload)})
            if self.kind == "hold":  # took the task and works on it for ever
                self.held.append(conn)
                continue
            with conn:
                if self.kind is None:  # took the task and died
                    continue
                body = self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()
                link.send_frame(conn, self.kind, body)

    def close(self):
        self.sock.close()


def _recorder(path: Path, out: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {out}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_flower(tmp_path):
    """(fallback, its record, Flower's flwr-clientapp's record): a stand-in for the node's fedlora
    fallback runner, and a fake Flower ``flwr-clientapp`` on PATH; each writes its arguments."""
    fallback = _recorder(tmp_path / "real" / "fedlora-standalone", tmp_path / "fallback-args.txt")
    _recorder(tmp_path / "flower-bin" / "flwr-clientapp", tmp_path / "flower-args.txt")
    return fallback, tmp_path / "fallback-args.txt", tmp_path / "flower-args.txt"


def _run(tmp_path, fake_flower, args, sock_path):
    script = shim.install(tmp_path / "bin", worker_socket=sock_path, fallback=[str(fake_flower[0])])
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{tmp_path / 'flower-bin'}{os.pathsep}"
                                 f"{os.environ.get('PATH', '')}"}
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=30, env=env)


def test_flower_command_line_becomes_the_task_spec():
    # Execute: the command line Flower's SubprocessExecutor builds
    spec = shim.parse_flower_args(FLOWER_ARGS)
    # Assert
    assert spec == {"address": "127.0.0.1:9094", "token": TOKEN, "insecure": True, "root_certificates": None,
                    "parent_pid": 1}


def test_token_file_and_root_certificates_are_taken(tmp_path):
    # Prepare
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "ca.crt").write_text("PEM")
    # Execute
    spec = shim.parse_flower_args(["--runtime-api-address", "127.0.0.1:1", "--token-file", str(tmp_path / "token"),
                                   "--root-certificates", str(tmp_path / "ca.crt")])
    # Assert: TLS to the Runtime API, the file's token without its newline
    assert spec["token"] == TOKEN and spec["insecure"] is False
    assert spec["root_certificates"] == str((tmp_path / "ca.crt").resolve())


@pytest.mark.parametrize("args", [
    ["--token-stdin"],                                                    # the token is on stdin
    FLOWER_ARGS + ["--allow-runtime-dependency-installation"],           # Flower installs dependencies
    FLOWER_ARGS + ["--some-newer-flag"],                                  # a newer Flower's flag
    ["--runtime-api-address", "127.0.0.1:1"],                             # no token at all
    FLOWER_ARGS + ["--root-certificates", "ca.crt"],                      # insecure and TLS at once
])
def test_command_lines_the_worker_does_not_take_go_to_flower(args):
    assert shim.parse_flower_args(args) is None


def test_installed_script_is_private_and_executable(tmp_path, fake_flower):
    # Execute
    script = shim.install(tmp_path / "bin", worker_socket=tmp_path / "w.sock", fallback=[str(fake_flower[0])])
    # Assert
    assert script.name == "flwr-clientapp" and stat.S_IMODE(script.stat().st_mode) == 0o700


def test_task_is_handed_to_the_worker_and_its_success_is_exit_0(tmp_path, fake_flower):
    # Prepare
    worker = FakeWorker(tmp_path / "w" / "w.sock")
    # Execute
    done = _run(tmp_path, fake_flower, FLOWER_ARGS, tmp_path / "w" / "w.sock")
    worker.close()
    # Assert: the address and token reached the worker; Flower's command never ran
    assert done.returncode == 0, done.stderr
    assert worker.requests == [{"kind": link.RUN_TASK, "address": "127.0.0.1:9094", "token": TOKEN,
                                "insecure": True, "root_certificates": None}]
    assert not fake_flower[1].exists() and not fake_flower[2].exists()


@pytest.mark.parametrize("sock", ["none.sock", None])
def test_dead_or_absent_worker_runs_the_nodes_fallback_never_flowers_clientapp(tmp_path, fake_flower, sock):
    # Execute: nothing listens on the socket (a dead worker), or the node has none (--no-worker)
    done = _run(tmp_path, fake_flower, FLOWER_ARGS, tmp_path / sock if sock else None)
    # Assert: the node's own fallback got Flower's arguments; Flower's flwr-clientapp (which would
    # install and import the run's app bundle) was never called
    assert done.returncode == 0, done.stderr
    assert fake_flower[1].read_text().split() == FLOWER_ARGS
    assert not fake_flower[2].exists()
    assert "never the run's app bundle" in done.stderr


def test_command_line_the_worker_does_not_take_goes_to_the_fallback_too(tmp_path, fake_flower):
    # Execute: a token on stdin, which the worker cannot take
    done = _run(tmp_path, fake_flower, ["--runtime-api-address", "127.0.0.1:1", "--token-stdin"],
                tmp_path / "none.sock")
    # Assert
    assert fake_flower[1].read_text().split() == ["--runtime-api-address", "127.0.0.1:1", "--token-stdin"]
    assert not fake_flower[2].exists()


def test_default_fallback_is_this_nodes_fedlora_in_a_fresh_process(tmp_path):
    # Execute
    script = shim.install(tmp_path / "bin", worker_socket=None)
    # Assert: the script names the node's own runner (with the trusted hashes it was given), no Flower command
    text = script.read_text()
    assert "fedlora.client.standalone" in text and "--worker-socket" not in text
    assert shim.fallback_command(("ab" * 32,))[-2:] == [f"--trusted-fab={'ab' * 32}", "--"]


def test_worker_refusing_before_the_token_is_used_runs_the_fallback(tmp_path, fake_flower):
    # Prepare
    worker = FakeWorker(tmp_path / "w" / "w.sock", kind=link.REFUSED, body=b"shutting down")
    # Execute
    done = _run(tmp_path, fake_flower, FLOWER_ARGS, tmp_path / "w" / "w.sock")
    worker.close()
    # Assert
    assert fake_flower[1].read_text().split() == FLOWER_ARGS


@pytest.mark.parametrize("kind,body,says", [
    (link.REPLY, {"status": "failed", "type": "train", "details": "CUDA out of memory"}, "CUDA out of memory"),
    (None, None, "dropped the task"),  # the worker took the task and died
])
def test_task_failing_after_the_hand_over_is_exit_1_and_never_a_second_attempt(tmp_path, fake_flower, kind, body,
                                                                                  says):
    # Prepare
    worker = FakeWorker(tmp_path / "w" / "w.sock", kind=kind, body=body)
    # Execute
    done = _run(tmp_path, fake_flower, FLOWER_ARGS, tmp_path / "w" / "w.sock")
    worker.close()
    # Assert: the token may be spent, so no other command may run
    assert done.returncode == 1 and says in done.stderr
    assert not fake_flower[1].exists() and not fake_flower[2].exists()


def test_waiting_stops_when_the_supernode_is_gone(tmp_path):
    # Prepare: a worker that takes the task and never answers
    sock_path = tmp_path / "w" / "w.sock"
    worker = FakeWorker(sock_path, kind="hold")
    # Execute / Assert
    with pytest.raises(link.WorkerFailed, match="SuperNode is gone"):
        link.run_task(sock_path, {"address": "a", "token": TOKEN}, keep_waiting=lambda: False)
    worker.close()


def _fab(pyproject: str | None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        if pyproject is not None:
            z.writestr("pyproject.toml", pyproject)
        z.writestr("client/client_app.py", "")
    return buf.getvalue()


def test_fedlora_fab_is_served_by_the_worker():
    # Prepare: the project's own pyproject, as `flwr run .` packs it
    fab = _fab((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    # Execute / Assert
    assert fab_clientapp(fab) == CLIENTAPP_REF
    check_fab(fab)


@pytest.mark.parametrize("pyproject", [
    '[tool.flwr.app.components]\nclientapp = "other.app:app"\n',  # another project's ClientApp
    "[project]\nname = 'x'\n",                                     # no ClientApp named
    None,                                                          # no pyproject.toml
])
def test_another_apps_fab_is_refused_with_what_to_do(pyproject):
    with pytest.raises(ForeignApp, match="--trusted-fab"):
        check_fab(_fab(pyproject))


@pytest.mark.parametrize("spec", [{}, {"address": "127.0.0.1:1"}, {"token": TOKEN}, {"address": "", "token": TOKEN}])
def test_task_spec_needs_address_and_token(spec):
    with pytest.raises(ValueError):
        TaskSpec.from_dict(spec)


def test_task_spec_with_certificates_is_tls():
    assert TaskSpec.from_dict({"address": "a:1", "token": TOKEN, "root_certificates": "/c.pem"}).insecure is False


def test_missing_fallback_command_is_a_clear_error(tmp_path):
    # Prepare: no worker, and the command it would fall back to is gone
    script = shim.install(tmp_path / "bin", worker_socket=tmp_path / "none.sock", fallback=[str(tmp_path / "gone")])
    # Execute
    done = subprocess.run([str(script), *FLOWER_ARGS], capture_output=True, text=True, timeout=30)
    # Assert: says what is missing and what to do, no traceback
    assert done.returncode == 127 and f"cannot run {tmp_path / 'gone'}" in done.stderr
    assert "Traceback" not in done.stderr
