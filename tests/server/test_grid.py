"""PromptGrid: Flower's send_and_receive contract with a short pull interval."""

from __future__ import annotations

import time
from types import SimpleNamespace

from server.grid import PromptGrid


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
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid)))
        return out

    def get_node_ids(self):
        return [1, 2]


def test_collects_every_reply_and_stops_pulling_when_done():
    fake = _FakeGrid([1, 3])
    replies = PromptGrid(fake, interval=0.01).send_and_receive([object(), object()], timeout=5)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert fake.pulls == 3  # no pull after the last reply arrived


def test_timeout_returns_the_replies_that_arrived():
    fake = _FakeGrid([1, None])
    start = time.monotonic()
    replies = PromptGrid(fake, interval=0.01).send_and_receive([object(), object()], timeout=0.2)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 0.2 <= time.monotonic() - start < 2.0


def test_delegates_the_rest():
    assert list(PromptGrid(_FakeGrid([])).get_node_ids()) == [1, 2]
