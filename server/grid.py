"""A Grid that collects replies promptly.

Flower 1.42's ``Grid.send_and_receive`` (the SuperLink-backed grid every ServerApp gets)
pulls replies and then sleeps 3 s before pulling again, so each exchange of a round waits
1.5 s on average, and up to 3 s, after its last reply arrived: with a train and an
evaluate exchange per round (five with secure aggregation) that wait dominates a round on
a small model. :class:`PromptGrid` delegates everything to the grid it wraps and only
re-implements ``send_and_receive`` with the same push / pull calls and a short pull
interval. Pulling is one cheap request to the SuperLink. A reply whose objects are still
being uploaded is asked for again after 50 ms, not Flower's 1 s
(:func:`common.flower_pull.shorten_pull_retries`, applied when the grid is made), and
at most every 0.25 s after that.

It also packs the ArrayRecords of every message it pushes into one Array each, and unpacks
those of every reply (:mod:`common.packing`): Flower moves each Array as its own object, and
an adapter's hundreds of small tensors cost seconds of round trips on the Deployment Engine.
A reply whose packed bytes do not add up is passed on packed, so the strategy drops it for
its unexpected tensor name."""

from __future__ import annotations

import time
from typing import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from common.flower_pull import shorten_pull_retries
from common.packing import pack_content, unpack_content

PULL_INTERVAL_S = 0.1


class PromptGrid(Grid):
    def __init__(self, grid: Grid, *, interval: float = PULL_INTERVAL_S) -> None:
        self._grid = grid
        self._interval = interval
        shorten_pull_retries()

    # -- delegated unchanged
    def set_run(self, run):
        return self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    # -- packed arrays on the wire
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages, cache = list(messages), {}
        for m in messages:
            if m.has_content():
                m.content = pack_content(m.content, cache)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        for m in replies:
            if m.has_content():
                try:
                    m.content = unpack_content(m.content)
                except ValueError:
                    pass  # stays packed: the strategy refuses the unknown tensor and records why
        return replies

    # -- and the pull interval
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull replies every ``interval`` s until every message has
        one or ``timeout`` s have passed (``None``: wait for all), as ``Grid`` specifies."""
        messages = list(messages)
        if not messages:  # e.g. an evaluation that rides on the next round's training messages
            return []
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self._interval)
        return replies
