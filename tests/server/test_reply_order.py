"""Sums that do not depend on the order replies arrive in, nor on the node ids a restarted
simulation gives the tenants: the same replies give the same bytes, and a resumed run the
uninterrupted run's."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedlora.common import messages as keys
from fedlora.common.adapter import from_arrayrecord, to_arrayrecord
from tests.server.test_strategy import GLOBAL, FakeGrid, _strategy, good


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages are created inside a run; the SuperLink sets this identity in a real one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


class ShuffledGrid(FakeGrid):
    """Hands the replies back in a given order of the nodes, as arrivals may come."""

    def __init__(self, behaviour, order):
        super().__init__(behaviour)
        self.order = order

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        rank = {n: i for i, n in enumerate(self.order)}
        return sorted(replies, key=lambda r: rank[r.metadata.src_node_id])


def _noisy(seed, tenant):
    rng = np.random.default_rng(seed)

    def reply(msg):
        if msg.metadata.message_type == "evaluate":
            return good(0.0, tenant=tenant)(msg)
        delta = OrderedDict((k, (rng.normal(0, 1e-3, v.shape) * 10.0 ** rng.integers(0, 5, v.shape)).astype(np.float32))
                            for k, v in GLOBAL.items())  # magnitudes far apart: float32 sums that depend on order
        m = {k: 1.0 for k in keys.TRAIN_METRICS} | {keys.NUM_EXAMPLES: 7 + tenant, keys.TENANT: tenant}
        reply = Message(RecordDict({keys.ARRAYS: to_arrayrecord(delta), keys.METRICS: MetricRecord(m)}), reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        return reply
    return reply


def test_the_aggregate_is_the_same_bytes_whatever_order_the_replies_arrive_in(tmp_path):
    # Prepare: four tenants with deltas of very different magnitudes, every order of their replies,
    # and the tenants on other node ids (as a resumed run's simulation gives them)
    from itertools import permutations

    results = set()
    for i, (order, nodes) in enumerate([(o, [11, 12, 13, 14]) for o in permutations([11, 12, 13, 14])]
                                       + [([27, 25, 26, 28], [28, 25, 27, 26])]):
        behaviour = {n: _noisy(t, tenant=t) for t, n in enumerate(nodes)}
        strategy, _ = _strategy(tmp_path / str(i), norm_multiplier=0.0)
        # Execute
        result = strategy.start(grid=ShuffledGrid(behaviour, order), initial_arrays=to_arrayrecord(GLOBAL),
                                num_rounds=1, timeout=2, evaluate_config=ConfigRecord())
        arrays = from_arrayrecord(result.arrays)
        results.add(b"".join(v.tobytes() for v in arrays.values()))
    # Assert: 24 arrival orders and other node ids, one result
    assert len(results) == 1


def _noisy_by_round(tenant):
    """:func:`_noisy`, drawn afresh from (tenant, round): a restarted tenant sends what it would have."""
    def reply(msg):
        if msg.metadata.message_type == "evaluate":
            return good(0.0, tenant=tenant)(msg)
        server_round = int(msg.content.config_records[keys.CONFIG][keys.ROUND])
        return _noisy(tenant * 1000 + server_round, tenant)(msg)
    return reply


def test_a_resumed_run_under_other_arrivals_and_node_ids_ends_with_the_same_bytes(tmp_path):
    # Prepare: four tenants with order-sensitive deltas; the uninterrupted run's replies arrive in
    # one order, the interrupted run's in another, and after the resume on other node ids (as a
    # restarted simulation gives them) in a third
    first_nodes, later_nodes = [11, 12, 13, 14], [24, 21, 23, 22]
    before = {n: _noisy_by_round(t) for t, n in enumerate(first_nodes)}
    after = {n: _noisy_by_round(t) for t, n in enumerate(later_nodes)}
    full, _ = _strategy(tmp_path / "full", norm_multiplier=0.0)
    first, _ = _strategy(tmp_path / "part", norm_multiplier=0.0)
    full._audit_key = first._audit_key  # one run: the key is the run's (its resume state carries it)
    # Execute: 3 rounds at once; 2 rounds, then a fresh strategy resumed after round 2
    want = full.start(grid=ShuffledGrid(before, [14, 12, 11, 13]), initial_arrays=to_arrayrecord(GLOBAL),
                      num_rounds=3, timeout=2, evaluate_config=ConfigRecord())
    part = first.start(grid=ShuffledGrid(before, [13, 11, 14, 12]), initial_arrays=to_arrayrecord(GLOBAL),
                       num_rounds=2, timeout=2, evaluate_config=ConfigRecord())
    second, _ = _strategy(tmp_path / "part", norm_multiplier=0.0)
    second.resume(2, first.recorder.rounds[-1].server_state)
    got = second.start(grid=ShuffledGrid(after, [22, 24, 21, 23]), initial_arrays=part.arrays, num_rounds=1,
                       timeout=2, evaluate_config=ConfigRecord())
    # Assert: bit for bit
    want_arrays, got_arrays = from_arrayrecord(want.arrays), from_arrayrecord(got.arrays)
    assert all(np.array_equal(got_arrays[k], v) for k, v in want_arrays.items())
