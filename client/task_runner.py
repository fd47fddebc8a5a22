"""One Flower ClientApp task, run inside the tenant worker instead of a fresh ``flwr-clientapp``.

Flower 1.42's SuperNode hands every message to a new ``flwr-clientapp`` process: it imports
Flower's SuperNode CLI (seconds), pulls the message over the node's Runtime API with a
one-task token, loads the app from the FAB, replies, and exits. On a node started with
``fedlora deploy supernode`` that command is :mod:`fedlora.client.clientapp_shim`, which gives the
task's Runtime API address and token to the tenant worker; the worker then does here what
``flwr-clientapp`` would do, with Flower's own functions (``push_message`` and
``push_task_output`` of ``flwr.supernode.runtime.run_clientapp``; its ``pull_task_input``
with a shorter retry, see :func:`pull_task_input`) and the same ClientApp the FAB names, so
nothing new is spawned and nothing is imported again:

1. a Runtime API client with the task's token, and the task's heartbeat;
2. the task input (message, context, run, FAB) -- the one-shot activation of the token;
3. the FAB must name fedlora's ClientApp (``fedlora.client.client_app:app``): the handlers that run
   are this node's installed ones (:mod:`fedlora.client.handlers`, behind the ``packed_arrays`` mod),
   never the bundle's code; a FAB of another app gets an error reply, unless the node trusts its
   SHA-256 (``--trusted-fab``, :mod:`fedlora.client.standalone` only);
4. the reply (or an error reply, as ``flwr-clientapp`` makes it), then the task's final
   status and context.

Unlike ``flwr-clientapp`` nothing here exits the process or installs signal handlers, and a
run stopped by its operator (the heartbeat answers "no longer running") only marks the task
cancelled: the message in hand is finished, its reply is not pushed.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import tomllib
import zipfile
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("fedlora.worker")
CLIENTAPP_REF = "fedlora.client.client_app:app"  # what the FAB's pyproject must name for the worker to serve it


@dataclass(frozen=True)
class TaskSpec:
    """What ``flwr-clientapp`` is started with: where the node's Runtime API is, and the task's token."""

    address: str
    token: str
    insecure: bool = True
    root_certificates: str | None = None  # a PEM file's path (TLS to the Runtime API)

    @classmethod
    def from_dict(cls, d: dict) -> "TaskSpec":
        address, token = d.get("address"), d.get("token")
        if not isinstance(address, str) or not address or not isinstance(token, str) or not token:
            raise ValueError("a task needs its Runtime API address and token")
        certs = d.get("root_certificates")
        return cls(address, token, bool(d.get("insecure", certs is None)), str(certs) if certs else None)


@dataclass
class TaskResult:
    status: str             # Flower's SubStatus: completed | failed | stopped
    details: str = ""
    message_type: str = "?"
    reply_pushed: bool = False
    phases: dict = field(default_factory=dict)  # seconds: pull, turn (waiting for it), handle, push

    def as_dict(self) -> dict:
        return {"status": self.status, "details": self.details, "type": self.message_type,
                "reply_pushed": self.reply_pushed}

    def phase_line(self) -> str:
        """``pull 0.41 s, turn 0.00 s, handle 8.93 s, push 0.12 s``: where the task's time went."""
        return ", ".join(f"{k} {v:.2f} s" for k, v in self.phases.items())


class ForeignApp(RuntimeError):
    """The run's FAB names another ClientApp than fedlora's."""


def fab_clientapp(fab_content: bytes) -> str | None:
    """The ClientApp reference in a FAB's ``pyproject.toml`` (None when it has none)."""
    with zipfile.ZipFile(io.BytesIO(fab_content)) as fab:
        with fab.open("pyproject.toml") as f:
            project = tomllib.load(f)
    return project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp")


def check_fab(fab_content: bytes) -> None:
    """Raises :class:`ForeignApp` unless the FAB names fedlora's ClientApp."""
    try:
        ref = repr(fab_clientapp(fab_content))
    except (KeyError, zipfile.BadZipFile, tomllib.TOMLDecodeError) as err:
        ref = f"no readable pyproject.toml ({err})"
    if ref != repr(CLIENTAPP_REF):
        raise ForeignApp(f"this node runs its own fedlora ClientApp ({CLIENTAPP_REF}), never an app bundle's code; "
                         f"the run's FAB names {ref}. To run that bundle, its operator lists its SHA-256 with "
                         "`fedlora deploy supernode --trusted-fab SHA256`")


def fab_sha256(fab_content: bytes) -> str:
    """The hash a node's ``--trusted-fab`` names: SHA-256 of the bundle's bytes (computed here,
    not the hash the server states)."""
    import hashlib

    return hashlib.sha256(fab_content).hexdigest()


def trusted_app(fab, run) -> Callable:
    """The ClientApp of a bundle the node trusts by hash, installed and loaded by Flower's own
    functions, as ``flwr-clientapp`` does (no runtime dependency installation)."""
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn

    install_from_fab(fab.content, skip_prompt=True)
    return get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
        run.fab_id, run.fab_version, fab.hash_str)


def _heartbeat_fn(client, cancelled: threading.Event) -> Callable[[], bool]:
    """Flower's task heartbeat, except that a stopped task sets ``cancelled`` instead of
    raising SIGINT in the process (which here would stop the whole worker)."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def beat() -> bool:
        try:
            res = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (503, 504):
                return False
            cancelled.set()  # the token is no longer valid: the task is gone
            return True
        if not res.success:
            cancelled.set()
        return True

    return beat


def pull_task_input(client, cancelled: threading.Event | None = None):
    """Flower's ``run_clientapp.pull_task_input``, except for the wait between tries of a message
    object that has not arrived yet: Flower's starts at 1 s (its ``PULL_INITIAL_BACKOFF``).

    The SuperNode starts the task as soon as a message is announced, while its objects are
    still coming from the SuperLink, so the first pull of a just-announced message often
    misses; a fresh ``flwr-clientapp`` spends seconds importing before it asks, the worker
    asks at once, and would then wait a whole second. Here it asks again after 50 ms,
    doubling up to 0.25 s (:func:`fedlora.common.flower_pull.retry_schedule`: Flower's own time limit,
    and tries enough that only it ends the wait); and it stops asking once
    ``cancelled`` is set (the task's run was stopped or failed: its objects never come)."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf, make_pull_object_fn_protobuf)
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.common.flower_pull import retry_schedule

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    pull_one = make_pull_object_fn_protobuf(client.PullObject, node, context.run_id)

    def pull(object_id: str) -> bytes:
        if cancelled is not None and cancelled.is_set():
            raise ObjectPullError(object_id, "the task's run is no longer running")
        return pull_one(object_id)

    message = pull_and_inflate_object_from_tree(
        tree, pull,
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, **retry_schedule())
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower: a deflated message lacks its own id
    return message, context, run, fab


def run_task(spec: TaskSpec, app: Callable, *, one_at_a_time: threading.Lock | None = None,
             trusted_fabs: frozenset[str] = frozenset()) -> TaskResult:
    """Run one ClientApp task against the SuperNode's Runtime API; never raises.

    ``app(message, context) -> reply`` handles the message (the worker passes fedlora's
    handlers behind the ``packed_arrays`` mod); ``one_at_a_time`` is held while it does, so
    the worker handles one message at a time. Pulling and pushing are outside it, as in
    Flower's process per task: a task whose run died while its message was still arriving
    (its objects never come) holds up no other task, and gives up at its heartbeat's next
    "not running" (within about 30 s). A FAB whose SHA-256 is in ``trusted_fabs`` runs its own
    ClientApp (:func:`trusted_app`); any other must name fedlora's, and ``app`` runs."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=spec.address, insecure=spec.insecure,
        root_certificates=None if spec.insecure else spec.root_certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(spec.token)],
        retry_invoker=retry)
    cancelled = threading.Event()
    heartbeat = HeartbeatSender(_heartbeat_fn(client, cancelled))
    result = TaskResult(SubStatus.FAILED, "ClientApp task failed due to unknown reason")
    message = context = reply = None
    lock = one_at_a_time or threading.Lock()
    clock, phases = time.perf_counter, result.phases
    try:
        heartbeat.start()
        try:
            t = clock()
            message, context, _run, fab = pull_task_input(client, cancelled)
            phases["pull"] = clock() - t
            result.message_type = message.metadata.message_type
            handler = app
            if fab_sha256(fab.content) in trusted_fabs:
                handler = trusted_app(fab, _run)
            else:
                check_fab(fab.content)
            t = clock()
            with lock:
                phases["turn"], t = clock() - t, clock()
                if cancelled.is_set():
                    raise RuntimeError("the task's run stopped while it waited for its turn")
                reply = handler(message, context)
                phases["handle"] = clock() - t
            result.status, result.details = SubStatus.COMPLETED, ""
        except Exception as err:  # noqa: BLE001 - as flwr-clientapp: the error becomes the reply
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(err, ForeignApp) else \
                ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reason = str(err) if isinstance(err, ForeignApp) else f"{type(err)}:<'{err}'>"
            log.error("a %s task failed: %s", result.message_type, reason,
                      exc_info=not isinstance(err, ForeignApp) and not cancelled.is_set())
            result.status, result.details = SubStatus.FAILED, reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        if cancelled.is_set():
            result.status, result.details = SubStatus.STOPPED, "the task's run stopped before its reply was pushed"
        elif reply is not None and context is not None:
            try:
                t = clock()
                push_message(client, reply, context)
                phases["push"] = clock() - t
                result.reply_pushed = True
            except Exception as err:  # noqa: BLE001
                log.error("pushing the %s reply failed: %s", result.message_type, err)
                result.status, result.details = SubStatus.FAILED, f"the reply could not be pushed: {err}"
    finally:
        retry.max_tries = 1  # as flwr-clientapp's exit: the final status is one attempt
        push_task_output(client=client, context=context, sub_status=result.status, details=result.details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    return result
