"""A Grid that collects replies promptly.

Flower 1.42's ``Grid.send_and_receive`` (the SuperLink-backed grid every ServerApp gets)
pulls replies and then sleeps 3 s before pulling again, so each exchange of a round waits
1.5 s on average, and up to 3 s, after its last reply arrived: with a train and an
evaluate exchange per round (five with secure aggregation) that wait dominates a round on
a small model. :class:`PromptGrid` delegates everything to the grid it wraps and only
re-implements ``send_and_receive`` with the same push / pull calls and a short pull
interval. Pulling is one cheap request to the SuperLink. A reply whose objects are still
being uploaded is asked for again after 50 ms, not Flower's 1 s
(:func:`fedlora.common.flower_pull.shorten_pull_retries`, applied when the grid is made), and
at most every 0.25 s after that.

On the Deployment Engine each pull is a request the SuperLink serves (through its SQL state,
about 10 ms of its CPU), and replies come only once the tenants' work is done: while pulls
bring nothing, the wait doubles from 0.1 s up to ``IDLE_PULL_CAP_S``, and goes back to 0.1 s
as soon as one brings a reply (the others of the exchange usually follow within seconds).
That is about 3 pulls a second instead of 10 while tenants train, for at most 0.4 s more
before the first reply is seen. In simulation a pull is a call on the process's own state,
so the grid keeps pulling every 0.1 s.

Each exchange logs one line (:data:`EXCHANGE_LINE`): how many messages of which type, when
the push began (UTC) and how long it took, and within how long the replies were pulled.

It also packs the ArrayRecords of every message it pushes into one Array each, and unpacks
those of every reply (:mod:`fedlora.common.packing`): Flower moves each Array as its own object, and
an adapter's hundreds of small tensors cost seconds of round trips on the Deployment Engine.
A reply whose packed bytes do not add up is passed on packed, so the strategy drops it for
its unexpected tensor name."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from logging import INFO
from typing import Iterable

from flwr.app import Message
from flwr.common import log
from flwr.serverapp import Grid

from fedlora.common.flower_pull import shorten_pull_retries
from fedlora.common.packing import pack_content, unpack_content

PULL_INTERVAL_S = 0.1
IDLE_PULL_CAP_S = 0.4  # the longest wait between pulls while none brings a reply (Deployment Engine)


def _in_process(grid: Grid) -> bool:
    """The simulation engine's grid: its pulls are calls on this process's own state."""
    try:
        from flwr.superlink.grid import InMemoryGrid
    except ImportError:  # another Flower: treat every grid as remote
        return False
    return isinstance(grid, InMemoryGrid)


class PromptGrid(Grid):
    def __init__(self, grid: Grid, *, interval: float = PULL_INTERVAL_S, idle_cap: float | None = None) -> None:
        """``idle_cap``: the longest wait between pulls that bring nothing (None: ``IDLE_PULL_CAP_S``,
        or ``interval`` for the simulation engine's grid)."""
        self._grid = grid
        self._interval = interval
        self._idle_cap = max(interval, (interval if _in_process(grid) else IDLE_PULL_CAP_S)
                             if idle_cap is None else idle_cap)
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
        """Push ``messages``, then pull replies until every message has one or ``timeout`` s have
        passed (``None``: wait for all), as ``Grid`` specifies; every ``interval`` s after a pull
        that brought a reply, doubling up to ``idle_cap`` s while pulls bring none."""
        messages = list(messages)
        if not messages:  # e.g. an evaluation that rides on the next round's training messages
            return []
        pushed_at, start = time.time(), time.monotonic()
        pending = set(self.push_messages(messages))
        push_seconds = time.monotonic() - start
        deadline = None if timeout is None else start + timeout
        replies: list[Message] = []
        wait = self._interval
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            wait = self._interval if got else wait
            time.sleep(wait)
            if not got:
                wait = min(wait * 2, self._idle_cap)
        log(INFO, EXCHANGE_LINE, len(messages), messages[0].metadata.message_type, utc_stamp(pushed_at),
            push_seconds, len(replies), len(messages), time.monotonic() - start)
        return replies


EXCHANGE_LINE = "fedlora: pushed %d %s message(s) at %s in %.2f s; %d of %d replies within %.2f s"
_EXCHANGE = re.compile(r"fedlora: pushed (\d+) (\S+) message\(s\) at (\S+) in ([\d.]+) s; "
                       r"(\d+) of \d+ replies within ([\d.]+) s")


def utc_stamp(epoch: float) -> str:
    """``2026-12-03T08:35:12.412Z``: a wall-clock time in the logs, to the millisecond."""
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_exchange_line(line: str) -> dict | None:
    """The numbers of one :data:`EXCHANGE_LINE` in ``line`` (epoch seconds for the push), or None."""
    m = _EXCHANGE.search(line)
    if m is None:
        return None
    n, kind, at, push, replies, within = m.groups()
    pushed_at = datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
    return {"messages": int(n), "type": kind, "pushed_at": pushed_at, "push_seconds": float(push),
            "replies": int(replies), "last_reply_at": pushed_at + float(within)}
