"""PromptGrid: Flower's send_and_receive contract with a short pull interval."""

from __future__ import annotations

import time

import pytest
from types import SimpleNamespace

from fedlora.server.grid import PromptGrid


def _msg():
    return SimpleNamespace(has_content=lambda: False, metadata=SimpleNamespace(message_type="train"))


class _FakeGrid:
    """Replies to message i become available at pull number ``ready[i]`` (never if None)."""

    def __init__(self, ready):
        self.ready = ready
        self.pulls = 0

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        out = []
        for mid in list(ids):
            at = self.ready[int(mid[1:])]
            if at is not None and self.pulls >= at:
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid), has_content=lambda: False))
        return out

    def get_node_ids(self):
        return [1, 2]


def test_collects_every_reply_and_stops_pulling_when_done():
    fake = _FakeGrid([1, 3])
    replies = PromptGrid(fake, interval=0.01).send_and_receive([_msg(), _msg()], timeout=5)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert fake.pulls == 3  # no pull after the last reply arrived


def test_timeout_returns_the_replies_that_arrived():
    fake = _FakeGrid([1, None])
    start = time.monotonic()
    replies = PromptGrid(fake, interval=0.01).send_and_receive([_msg(), _msg()], timeout=0.2)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 0.2 <= time.monotonic() - start < 2.0


class _Sleeps:
    """Records the grid's waits instead of sleeping."""

    def __init__(self):
        self.waits = []

    def __call__(self, seconds):
        self.waits.append(round(seconds, 3))


def test_the_wait_doubles_to_the_cap_while_pulls_bring_nothing_and_resets_after_a_reply(monkeypatch):
    # Prepare: the first reply at pull 6, the second at pull 8
    sleeps = _Sleeps()
    monkeypatch.setattr("fedlora.server.grid.time.sleep", sleeps)
    fake = _FakeGrid([6, 8])
    # Execute
    PromptGrid(fake, interval=0.1, idle_cap=0.4).send_and_receive([_msg(), _msg()], timeout=60)
    # Assert: after pulls 1-5 (nothing) 0.1, 0.2, 0.4 and the cap twice; after pull 6 (a reply) 0.1,
    # and after pull 7 (nothing) 0.1 again, the start of a new doubling
    assert sleeps.waits == [0.1, 0.2, 0.4, 0.4, 0.4, 0.1, 0.1]
    assert fake.pulls == 8


def test_the_simulation_engines_grid_is_pulled_at_the_short_interval(monkeypatch):
    # Prepare: Flower's in-process grid (its state is never touched here)
    from flwr.superlink.grid import InMemoryGrid

    sleeps = _Sleeps()
    monkeypatch.setattr("fedlora.server.grid.time.sleep", sleeps)
    fake = _FakeGrid([4, 4])

    class _InProcess(InMemoryGrid):
        def __init__(self):
            pass

        push_messages, pull_messages = fake.push_messages, fake.pull_messages

    # Execute
    PromptGrid(_InProcess(), interval=0.1).send_and_receive([_msg(), _msg()], timeout=60)
    # Assert
    assert sleeps.waits == [0.1, 0.1, 0.1]


def test_each_exchange_logs_when_its_push_began_and_when_its_replies_were_in(monkeypatch):
    # Prepare
    from fedlora.server.grid import parse_exchange_line

    lines = []
    monkeypatch.setattr("fedlora.server.grid.log", lambda level, fmt, *args: lines.append(fmt % args))
    monkeypatch.setattr("fedlora.server.grid.time.sleep", lambda s: None)
    before = time.time()
    # Execute
    PromptGrid(_FakeGrid([1, None]), interval=0.1).send_and_receive([_msg(), _msg()], timeout=0.05)
    # Assert: one line; the push began within this test, to the millisecond; one of two replies
    (line,) = lines
    got = parse_exchange_line("1796279935.405 INFO :      " + line)
    assert got["messages"] == 2 and got["type"] == "train" and got["replies"] == 1
    assert before - 0.001 <= got["pushed_at"] <= time.time()
    assert got["pushed_at"] + got["push_seconds"] <= got["last_reply_at"] + 0.01


def test_a_line_that_is_not_an_exchange_is_not_parsed():
    from fedlora.server.grid import parse_exchange_line

    assert parse_exchange_line("INFO :      Round 1: 3 of 3 tenants sampled") is None


def test_delegates_the_rest():
    assert list(PromptGrid(_FakeGrid([])).get_node_ids()) == [1, 2]


@pytest.fixture
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


class _Wire:
    """A grid that keeps what was pushed and answers each message with a given reply content."""

    def __init__(self, reply_content):
        self.pushed, self.reply_content = [], reply_content

    def push_messages(self, messages):
        self.pushed = list(messages)
        return [f"m{i}" for i, _ in enumerate(self.pushed)]

    def pull_messages(self, ids):
        from flwr.app import Message

        return [Message(self.reply_content, reply_to=m) for m in self.pushed]


def _adapter_content():
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    arrays = ArrayRecord({f"t{i}": Array(np.full((2, 3), i, np.float32)) for i in range(4)})
    return RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})


def _messages(content, n):
    from flwr.app import Message

    return [Message(content, message_type="train", dst_node_id=1 + i) for i in range(n)]


def test_pushed_arrays_travel_as_one_packed_array_and_replies_come_back_unpacked(task_identity):
    # Prepare
    from fedlora.common.packing import PACKED_KEY, pack_content

    content = _adapter_content()
    wire = _Wire(pack_content(content))
    # Execute
    replies = PromptGrid(wire, interval=0.01).send_and_receive(_messages(content, 2), timeout=5)
    # Assert: each pushed message holds one packed Array; each reply holds the 4 tensors again
    assert [list(m.content.array_records["arrays"]) for m in wire.pushed] == [[PACKED_KEY]] * 2
    assert all(m.content.config_records["config"]["server-round"] == 1 for m in wire.pushed)
    for r in replies:
        assert {k: a.data for k, a in r.content.array_records["arrays"].items()} == \
            {k: a.data for k, a in content.array_records["arrays"].items()}


def test_the_global_adapter_sent_to_many_tenants_is_packed_once(task_identity):
    # Prepare
    content = _adapter_content()
    wire = _Wire(content)
    # Execute
    PromptGrid(wire, interval=0.01).send_and_receive(_messages(content, 3), timeout=5)
    # Assert: the three messages share one packed record
    assert len({id(m.content.array_records["arrays"]) for m in wire.pushed}) == 1


def test_a_malformed_packed_reply_stays_packed_for_the_strategy_to_refuse(task_identity):
    # Prepare: a reply whose packed bytes are cut short
    from flwr.app import Array, ArrayRecord, RecordDict

    from fedlora.common.packing import PACKED_KEY, PACKED_STYPE, pack_record

    good = pack_record(_adapter_content().array_records["arrays"])[PACKED_KEY].data
    cut = ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(good) - 4,), stype=PACKED_STYPE, data=good[:-4])})
    wire = _Wire(RecordDict({"arrays": cut}))
    # Execute
    replies = PromptGrid(wire, interval=0.01).send_and_receive(_messages(_adapter_content(), 1), timeout=5)
    # Assert
    assert list(replies[0].content.array_records["arrays"]) == [PACKED_KEY]
