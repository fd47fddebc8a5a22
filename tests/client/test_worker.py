"""The tenant worker and its channel: a forwarded message means what it means in-process.

These tests serve a small ClientApp of known handlers from a worker thread, so each property
(reply and state carried back, errors, a ClientApp that dies mid-request, file modes,
protocol checks) is checked without loading a model. The worker with the real handlers is
checked against the in-process ClientApp in ``tests/integration/test_worker_deployment.py``.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.client import worker_link as link
from fedlora.client.worker import Worker

echo = ClientApp()


@echo.train()
def _train(msg: Message, context: Context) -> Message:
    # doubles the request's value and counts calls in the context state (as SecAgg+ keeps its keys)
    calls = int(context.state.config_records["count"]["n"]) + 1 if "count" in context.state.config_records else 1
    context.state["count"] = ConfigRecord({"n": calls})
    value = float(msg.content.metric_records["in"]["x"])
    return Message(RecordDict({"out": MetricRecord({"y": 2 * value, "calls": calls})}), reply_to=msg)


@echo.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    raise ValueError("holdout missing")


RELEASE = threading.Event()


@echo.query()
def _query(msg: Message, context: Context) -> Message:
    # a long message: holds the worker until the test releases it
    RELEASE.wait(timeout=30)
    return Message(RecordDict({"out": MetricRecord({"done": 1})}), reply_to=msg)


@pytest.fixture
def worker(tmp_path):
    w = Worker(link.socket_path(tmp_path / "state"), app=echo)
    thread = threading.Thread(target=w.serve_forever, daemon=True)
    thread.start()
    yield w
    w.close()
    thread.join(timeout=5)


def _message(kind: str = "train", x: float = 1.5) -> Message:
    return Message(RecordDict({"in": MetricRecord({"x": x})}), message_type=kind, dst_node_id=7)


def _context(state: RecordDict | None = None) -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=state or RecordDict(), run_config={})


def test_forwarded_reply_is_the_handlers_reply(worker):
    # Prepare
    msg = _message(x=1.5)
    # Execute
    reply = link.forward(worker.path, msg, _context())
    # Assert: 2 x 1.5, as a reply to the very message sent
    assert reply.content.metric_records["out"]["y"] == 3.0
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id


def test_context_state_written_by_the_worker_comes_back(worker):
    # Prepare: a context that already holds one call
    context = _context(RecordDict({"count": ConfigRecord({"n": 4})}))
    # Execute
    reply = link.forward(worker.path, _message(), context)
    # Assert: the worker saw 4, wrote 5, and the ClientApp's context now holds 5
    assert reply.content.metric_records["out"]["calls"] == 5
    assert context.state.config_records["count"]["n"] == 5


def test_handler_error_is_raised_with_its_reason_and_the_worker_serves_on(worker):
    # Execute
    with pytest.raises(link.WorkerFailed, match="ValueError: holdout missing"):
        link.forward(worker.path, _message("evaluate"), _context())
    reply = link.forward(worker.path, _message(x=2.0), _context())
    # Assert
    assert reply.content.metric_records["out"]["y"] == 4.0
    assert (worker.failed, worker.served) == (1, 1)


def test_clientapp_dying_mid_request_costs_only_its_reply(worker):
    # Prepare: a ClientApp that sends half a request and dies
    from flwr.common import serde

    body = link.pack_parts(serde.message_to_proto(_message()).SerializeToString(),
                           serde.context_to_proto(_context()).SerializeToString())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(worker.path))
        sock.sendall(link.HEADER.pack(link.MAGIC, link.VERSION, link.HANDLE, len(body)) + body[: len(body) // 2])
    # Execute: the next ClientApp's message
    reply = link.forward(worker.path, _message(x=5.0), _context())
    # Assert
    assert reply.content.metric_records["out"]["y"] == 10.0


def test_socket_is_private_to_the_user(worker):
    # Assert: the socket 0600 in a 0700 directory
    assert stat.S_IMODE(os.stat(worker.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(worker.path.parent).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(worker.path).st_mode)


def test_other_protocol_version_is_refused_as_unavailable(worker):
    # Prepare: a frame of protocol 99
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(worker.path))
        sock.sendall(link.HEADER.pack(link.MAGIC, 99, link.HEALTH, 0))
        # Execute
        version, kind, body = link.read_frame(sock)
    # Assert
    assert (version, kind) == (link.VERSION, link.REFUSED)


def test_health_counts_what_was_served(worker):
    # Prepare
    link.forward(worker.path, _message(), _context())
    # Execute
    record = link.health(worker.path)
    # Assert
    assert (record["pid"], record["served"], record["failed"], record["busy"]) == (os.getpid(), 1, 0, None)
    assert record["last"]["type"] == "train"


def test_no_worker_is_unavailable(tmp_path):
    # Execute / Assert
    with pytest.raises(link.WorkerUnavailable, match="no tenant worker answers"):
        link.forward(tmp_path / "none.sock", _message(), _context())


def test_a_second_worker_on_a_live_socket_is_refused(worker):
    # Execute / Assert
    with pytest.raises(RuntimeError, match="already serves"):
        Worker(worker.path, app=echo)


def test_stale_socket_of_a_dead_worker_is_replaced(tmp_path):
    # Prepare: a socket file nobody serves
    path = link.socket_path(tmp_path)
    path.parent.mkdir(parents=True)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    # Execute
    w = Worker(path, app=echo)
    # Assert
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    w.close()
    assert not path.exists()


def test_socket_path_over_the_os_limit_is_a_clear_error(tmp_path):
    # Execute / Assert
    with pytest.raises(ValueError, match="choose a shorter --state-dir"):
        link.socket_path(tmp_path / ("d" * 120))


@pytest.mark.slow  # imports the handlers' ML stack
def test_clientapp_without_an_answering_worker_handles_the_message_itself(tmp_path):
    # Prepare: the node names a worker socket nobody serves; a query message fedlora has no handler for
    from fedlora.client import client_app

    context = Context(run_id=1, node_id=7, node_config={link.NODE_CONFIG_KEY: str(tmp_path / "w.sock")},
                      state=RecordDict(), run_config={})
    # Execute / Assert: the in-process ClientApp answered (Flower's own error for an unknown handler)
    with pytest.raises(ValueError, match="No query function registered"):
        client_app.handle(_message("query"), context)


def test_forwarding_clientapp_imports_no_torch():
    # Execute: import the ClientApp as Flower does, in a fresh interpreter
    out = subprocess.run([sys.executable, "-c", "import sys, fedlora.client.client_app; print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    # Assert
    assert out.stdout.strip() == "False", out.stderr


def test_health_is_answered_while_a_message_is_handled_and_messages_wait_their_turn(worker):
    # Prepare: a long message in flight, and a second one behind it
    RELEASE.clear()
    replies = []
    long = threading.Thread(target=lambda: replies.append(link.forward(worker.path, _message("query"), _context())))
    long.start()
    deadline = time.monotonic() + 10
    while worker.busy != "query" and time.monotonic() < deadline:
        time.sleep(0.01)
    queued = threading.Thread(target=lambda: replies.append(link.forward(worker.path, _message(x=1.0), _context())))
    queued.start()
    # Execute
    record = link.health(worker.path, timeout=2.0)
    time.sleep(0.2)
    waiting = len(replies)
    RELEASE.set()
    long.join(timeout=10)
    queued.join(timeout=10)
    # Assert: health came back mid-message; the second message waited for the first
    assert record["busy"] == "query" and waiting == 0
    assert len(replies) == 2 and worker.served == 2


def test_malformed_task_is_refused_before_any_token_is_used(worker):
    # Execute: a task hand-over without its Runtime API address
    with pytest.raises(link.WorkerUnavailable, match="refused the task"):
        link.run_task(worker.path, {"token": "ab" * 32})
    # Assert: nothing counted as served or failed
    record = link.health(worker.path)
    assert (record["served"], record["failed"], record["tasks"]) == (0, 0, 0)
