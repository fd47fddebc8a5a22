"""The local channel between a tenant's ClientApp processes and its long-running worker.

Flower's SuperNode starts a fresh ClientApp process for every message. On a deployment node
``fedlora deploy supernode`` also starts a *tenant worker* (:mod:`fedlora.client.worker`) that keeps
the base model, the tokenized data and the caches of a round loaded; the ClientApp then only
forwards: it sends the Flower message and its context over a Unix socket and returns the
worker's reply. This module is both ends of that socket and imports no torch, so a
forwarding ClientApp starts in the time it takes to import Flower.

The channel never leaves the host: a Unix socket, created mode 0600 inside a directory of
mode 0700 in the node's state directory, and the worker accepts a connection only from a
process of its own user (``SO_PEERCRED``).

Frames: ``MAGIC`` (4 bytes), protocol version (1 byte), kind (1 byte), payload length
(8 bytes, big-endian), payload. A request carries the Flower ``Message`` and ``Context`` as
protobufs (Flower's own serde); a reply carries the reply ``Message`` and the context's
updated ``state`` (the SecAgg+ stages keep their keys there), or an error text. A
``RUN_TASK`` request (from :mod:`fedlora.client.clientapp_shim`, which stands in for Flower's
``flwr-clientapp``) carries the task's Runtime API address and token as JSON; the worker
pulls and answers the task itself (:mod:`fedlora.client.task_runner`) and replies with its status.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
from pathlib import Path
from typing import Callable

MAGIC = b"FLWK"
VERSION = 1
HEADER = struct.Struct(">4sBBQ")
SOCKET_NAME = "worker.sock"
NODE_CONFIG_KEY = "worker-socket"  # the node config key that names the worker's socket
MAX_PATH = 107  # sun_path holds 108 bytes, the last one NUL

# kinds
HANDLE, HEALTH, REPLY, FAILED, REFUSED, RUN_TASK = 1, 2, 3, 4, 5, 6


class WorkerUnavailable(ConnectionError):
    """No worker answers on the socket (not started, exited, or another protocol version)."""


class WorkerFailed(RuntimeError):
    """The worker handled the message and raised; the text is its error and traceback."""


def socket_path(state_dir: Path | str) -> Path:
    """The worker's socket inside the node's state directory, checked against the OS's limit."""
    path = Path(state_dir).resolve() / "worker" / SOCKET_NAME
    if len(os.fsencode(str(path))) > MAX_PATH:
        raise ValueError(f"the worker socket path {path} is {len(os.fsencode(str(path)))} bytes, over the "
                         f"{MAX_PATH} a Unix socket allows; choose a shorter --state-dir")
    return path


# --------------------------------------------------------------------------- #
# Frames
# --------------------------------------------------------------------------- #
def send_frame(sock: socket.socket, kind: int, payload: bytes) -> None:
    sock.sendall(HEADER.pack(MAGIC, VERSION, kind, len(payload)) + payload)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError(f"the peer closed the socket after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    """(version, kind, payload); raises ConnectionError on a closed or foreign stream."""
    magic, version, kind, size = HEADER.unpack(_read_exact(sock, HEADER.size))
    if magic != MAGIC:
        raise ConnectionError(f"not a fedlora worker frame (magic {magic!r})")
    return version, kind, _read_exact(sock, size)


def pack_parts(*parts: bytes) -> bytes:
    """Length-prefixed parts in one payload."""
    return b"".join(struct.pack(">Q", len(p)) + p for p in parts)


def unpack_parts(payload: bytes) -> list[bytes]:
    parts, at = [], 0
    while at < len(payload):
        (size,) = struct.unpack_from(">Q", payload, at)
        at += 8
        if at + size > len(payload):
            raise ConnectionError("a truncated part in a worker frame")
        parts.append(payload[at:at + size])
        at += size
    return parts


# --------------------------------------------------------------------------- #
# The ClientApp's end
# --------------------------------------------------------------------------- #
def _connect(path: Path | str, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError as err:
        sock.close()
        raise WorkerUnavailable(f"no tenant worker answers on {path}: {err.strerror or err}") from None
    return sock


def _exchange(path: Path | str, kind: int, payload: bytes, timeout: float | None) -> tuple[int, bytes]:
    sock = _connect(path, timeout)
    with sock:
        try:
            send_frame(sock, kind, payload)
            version, reply_kind, body = read_frame(sock)
        except (ConnectionError, OSError) as err:
            raise WorkerFailed(f"the tenant worker on {path} dropped the request: {err}") from None
    if reply_kind == REFUSED or version != VERSION:
        raise WorkerUnavailable(f"the tenant worker on {path} speaks protocol {version}, this ClientApp {VERSION}: "
                                f"{body.decode(errors='replace')}")
    return reply_kind, body


def forward(path: Path | str, message, context):
    """Have the worker handle ``message``; returns the reply Message and sets ``context.state``.

    Raises :class:`WorkerUnavailable` when no worker answers (nothing was handled), and
    :class:`WorkerFailed` when the worker raised or dropped the request mid-way."""
    from flwr.app import Message
    from flwr.common import serde
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    request = pack_parts(serde.message_to_proto(message).SerializeToString(),
                         serde.context_to_proto(context).SerializeToString())
    kind, body = _exchange(path, HANDLE, request, timeout=None)
    if kind == FAILED:
        raise WorkerFailed(body.decode(errors="replace"))
    reply_bytes, state_bytes = unpack_parts(body)
    reply = serde.message_from_proto(ProtoMessage.FromString(reply_bytes))
    context.state = serde.recorddict_from_proto(ProtoRecordDict.FromString(state_bytes))
    if reply.has_error():
        return Message(reply.error, reply_to=message)
    return Message(reply.content, reply_to=message)


def run_task(path: Path | str, spec: dict, *, keep_waiting: Callable[[], bool] = lambda: True,
             connect_timeout: float = 5.0) -> dict:
    """Have the worker run one ClientApp task (``spec``: address, token, insecure,
    root_certificates); returns its result (status, details, type, reply_pushed).

    Raises :class:`WorkerUnavailable` when no worker takes the task (its token is unused), and
    :class:`WorkerFailed` when the worker took it and then failed or went away, or when
    ``keep_waiting()`` turned False while it worked (checked every second)."""
    sock = _connect(path, connect_timeout)
    with sock:
        try:
            send_frame(sock, RUN_TASK, json.dumps(spec).encode())
            while not select.select([sock], [], [], 1.0)[0]:
                if not keep_waiting():
                    raise WorkerFailed("stopped waiting for the tenant worker's task (the SuperNode is gone)")
            sock.settimeout(30.0)  # the reply is on its way: a small frame
            version, kind, body = read_frame(sock)
        except (ConnectionError, OSError) as err:
            raise WorkerFailed(f"the tenant worker on {path} dropped the task: {err}") from None
    if kind == REFUSED or version != VERSION:
        raise WorkerUnavailable(f"the tenant worker on {path} refused the task: {body.decode(errors='replace')}")
    if kind == FAILED:
        raise WorkerFailed(body.decode(errors="replace"))
    return json.loads(body)


def health(path: Path | str, *, timeout: float = 5.0) -> dict:
    """The worker's health record (pid, uptime, requests served and failed, what is loaded)."""
    kind, body = _exchange(path, HEALTH, b"", timeout=timeout)
    return json.loads(body)
