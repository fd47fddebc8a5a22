"""A ClientApp task run inside the worker: what it pulls, what it pushes, and that a stuck
task holds up no other.

A fake Runtime API stands in for the SuperNode's (the real protobuf requests and responses,
served from memory), so each property is checked without Flower's processes; the same code
on real SuperNodes is in ``tests/integration/test_deployment.py``.
"""

from __future__ import annotations

import io
import threading
import time
import zipfile

import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.constant import ErrorCode
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto import fab_pb2, message_pb2, run_pb2, runtime_pb2
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

from fedlora.client import task_runner

FEDLORA_FAB = '[tool.flwr.app.components]\nclientapp = "fedlora.client.client_app:app"\n'


def _fab(pyproject: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pyproject.toml", pyproject)
    return buf.getvalue()


class FakeRuntime:
    """One task on a SuperNode's Runtime API: its message, context and FAB, and what came back."""

    def __init__(self, *, value: float = 1.5, fab: str = FEDLORA_FAB, arrived: bool = True):
        self.message = Message(RecordDict({"in": MetricRecord({"x": value})}), dst_node_id=7, message_type="train")
        self.message.metadata.__dict__["_message_id"] = self.message.object_id
        self.objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(self.message).items()}
        self.context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
        self.fab = _fab(fab)
        self.arrived = threading.Event()  # the message's objects have reached the SuperNode
        if arrived:
            self.arrived.set()
        self.running = True
        self.pushed: list[bytes] = []
        self.reply: Message | None = None
        self.output: runtime_pb2.PushTaskOutputRequest | None = None

    # the Runtime API calls the task makes
    def PullTaskInput(self, _):
        return runtime_pb2.PullTaskInputResponse(
            context=context_to_proto(self.context), task_id=1,
            run=run_pb2.Run(run_id=1, fab_id="fedlora/fedlora", fab_version="0.1.0", fab_hash="h"),
            fab=fab_pb2.Fab(hash_str="h", content=self.fab))

    def PullMessages(self, _):
        return runtime_pb2.PullAppMessagesResponse(
            messages_list=[message_to_proto(remove_content_from_message(self.message))],
            message_object_trees=[get_object_tree(self.message)])

    def PullObject(self, req):
        ok = self.arrived.is_set()
        return message_pb2.PullObjectResponse(object_found=True, object_available=ok,
                                              object_content=self.objects[req.object_id] if ok else b"")

    def ConfirmMessageReceived(self, _):
        return message_pb2.ConfirmMessageReceivedResponse()

    def PushMessages(self, req):
        self.reply = message_from_proto(req.messages_list[0])
        return runtime_pb2.PushAppMessagesResponse(objects_to_push=[], session_id="s")

    def PushObject(self, req):
        self.pushed.append(req.object_id)
        return message_pb2.PushObjectResponse(stored=True)

    def PushTaskOutput(self, req):
        self.output = req
        return runtime_pb2.PushTaskOutputResponse()

    def SendTaskHeartbeat(self, _):
        return runtime_pb2.SendTaskHeartbeatResponse(success=self.running)

    def close(self):
        pass


@pytest.fixture
def runtimes(monkeypatch):
    """Tasks by address; heartbeats every ~0.3 s instead of Flower's ~24 s."""
    import flwr.supercore.heartbeat as hb
    from flwr.supercore.runtime import RuntimeHttpClient

    by_address: dict[str, FakeRuntime] = {}
    monkeypatch.setattr(RuntimeHttpClient, "from_server_address",
                        classmethod(lambda cls, server_address, **_: by_address[server_address]))
    monkeypatch.setattr(hb, "HEARTBEAT_DEFAULT_INTERVAL", 0.4)
    monkeypatch.setattr(hb, "HEARTBEAT_CALL_TIMEOUT", 0.1)
    return by_address


def doubler(msg: Message, context: Context) -> Message:
    context.state["seen"] = ConfigRecord({"n": 1})
    return Message(RecordDict({"out": MetricRecord({"y": 2 * float(msg.content.metric_records["in"]["x"])})}),
                   reply_to=msg)


def _spec(address: str) -> task_runner.TaskSpec:
    return task_runner.TaskSpec(address=address, token="ab" * 32)


def test_task_reply_and_context_are_pushed(runtimes):
    # Prepare
    rt = runtimes["a"] = FakeRuntime(value=1.5)
    # Execute
    result = task_runner.run_task(_spec("a"), doubler)
    # Assert: the reply answers the message; the context's new state goes back with the status
    assert (result.status, result.message_type, result.reply_pushed) == ("completed", "train", True)
    assert rt.reply.metadata.reply_to_message_id == rt.message.metadata.message_id
    assert rt.output.sub_status == "completed"
    assert context_from_proto(rt.output.context).state.config_records["seen"]["n"] == 1


def test_another_apps_fab_gets_an_error_reply_and_the_handlers_never_run(runtimes):
    # Prepare
    rt = runtimes["a"] = FakeRuntime(fab='[tool.flwr.app.components]\nclientapp = "other:app"\n')
    called = []
    # Execute
    result = task_runner.run_task(_spec("a"), lambda m, c: called.append(m))
    # Assert
    assert result.status == "failed" and not called
    assert rt.reply.error.code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION and "--trusted-fab" in rt.reply.error.reason


def test_handler_error_is_the_replys_error(runtimes):
    # Prepare
    rt = runtimes["a"] = FakeRuntime()

    def broken(msg, context):
        raise ValueError("holdout missing")

    # Execute
    result = task_runner.run_task(_spec("a"), broken)
    # Assert: as flwr-clientapp reports it
    assert result.status == "failed" and rt.output.sub_status == "failed"
    assert rt.reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION and "holdout missing" in rt.reply.error.reason


def test_task_whose_message_never_arrives_holds_up_no_other_and_gives_up_when_its_run_stops(runtimes):
    # Prepare: task a's run died while its message was on its way; task b is fine
    stuck = runtimes["a"] = FakeRuntime(arrived=False)
    fine = runtimes["b"] = FakeRuntime(value=2.0)
    lock, results = threading.Lock(), {}
    first = threading.Thread(target=lambda: results.setdefault("a", task_runner.run_task(_spec("a"), doubler,
                                                                                         one_at_a_time=lock)))
    first.start()
    time.sleep(0.3)
    # Execute: b runs while a is still pulling
    results["b"] = task_runner.run_task(_spec("b"), doubler, one_at_a_time=lock)
    still_pulling = first.is_alive()
    stuck.running = False  # the SuperNode finishes a's task: its heartbeat now says so
    first.join(timeout=15)
    # Assert
    assert results["b"].status == "completed" and fine.reply is not None
    assert still_pulling and not first.is_alive()
    assert results["a"].status == "stopped" and stuck.reply is None


def test_run_stopped_while_handling_keeps_the_reply(runtimes):
    # Prepare: the run stops while its message is handled
    rt = runtimes["a"] = FakeRuntime()

    def slow(msg, context):
        rt.running = False
        time.sleep(1.5)  # a few heartbeats
        return doubler(msg, context)

    # Execute
    result = task_runner.run_task(_spec("a"), slow)
    # Assert: the message is finished, its reply not pushed, the task reported stopped
    assert result.status == "stopped" and rt.reply is None and rt.output.sub_status == "stopped"
