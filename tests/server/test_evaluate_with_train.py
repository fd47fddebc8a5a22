"""``federation.evaluate-with-train``: each round's adapter is evaluated at the start of the
next round's training message, one exchange per round fewer, and every round's record ends
with the evaluation of its own adapter, as it does with a separate evaluation."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Error, Message, MetricRecord, RecordDict

from fedlora.common import messages as keys
from fedlora.common.adapter import from_arrayrecord, to_arrayrecord
from fedlora.common.config import FederationConfig
from fedlora.server.aggregation import FedAvg
from fedlora.server.records import RoundRecorder
from fedlora.server.strategy import FedLoraStrategy

GLOBAL = OrderedDict([("x.lora_A.weight", np.zeros((2, 4), np.float32)),
                      ("x.lora_B.weight", np.zeros((4, 2), np.float32))])


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


def _evaluation(msg: Message, tenant: int) -> dict:
    """An evaluation whose loss is the value of the adapter it was sent: which adapter was
    evaluated can be read back from the record."""
    sent = from_arrayrecord(msg.content.array_records[keys.ARRAYS])
    m = {k: 0.5 for k in keys.EVAL_METRICS}
    m.update({keys.NUM_EXAMPLES: 4, keys.TENANT: tenant, "eval-loss": float(sent["x.lora_A.weight"][0, 0])})
    return m


def tenant(t: int, *, evaluates: bool = True):
    """Delta 1 every round; evaluates what it is sent, also when a training message asks it to."""
    def reply(msg: Message) -> Message:
        if msg.metadata.message_type == "evaluate":
            return Message(RecordDict({keys.METRICS: MetricRecord(_evaluation(msg, t))}), reply_to=msg)
        delta = OrderedDict((k, np.ones(v.shape, np.float32)) for k, v in GLOBAL.items())
        m = {k: 1.0 for k in keys.TRAIN_METRICS}
        m.update({keys.NUM_EXAMPLES: 10, keys.TENANT: t})
        content = RecordDict({keys.ARRAYS: to_arrayrecord(delta), keys.METRICS: MetricRecord(m)})
        if evaluates and msg.content.config_records[keys.CONFIG].get(keys.EVALUATE_FIRST, False):
            content[keys.EVALUATION] = MetricRecord(_evaluation(msg, t))
        return Message(content, reply_to=msg)
    return reply


class CountingGrid:
    def __init__(self, behaviour):
        self.behaviour, self.sent = behaviour, []

    def get_node_ids(self):
        return list(self.behaviour)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            config = m.content.config_records[keys.CONFIG]
            self.sent.append((int(config[keys.ROUND]), m.metadata.message_type,
                              bool(config.get(keys.EVALUATE_FIRST, False))))
        return [self.behaviour[m.metadata.dst_node_id](m) for m in messages]


def _run(tmp_path, grid, *, rounds=3, done=0, until=None, state=None, start=GLOBAL, **cfg):
    """Rounds ``done + 1`` to ``until`` (default: all) of a ``rounds``-round run."""
    rec = RoundRecorder(tmp_path, save=lambda p, s, r: None)
    if done:
        from fedlora.common.records import read_rounds

        rec.resume_from(read_rounds(tmp_path))
    fed = FederationConfig(**{"min_train_nodes": 2, "round_timeout": 2.0, "rounds": rounds, **cfg})
    strategy = FedLoraStrategy(fed, FedAvg(), rec, seed=0)
    if done:
        strategy.resume(done, state)
    result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(start), num_rounds=(until or rounds) - done,
                            timeout=5)
    return strategy, result


def _record(tmp_path, n):
    return json.loads((tmp_path / "metrics" / f"round_{n:03d}.json").read_text())


def test_one_exchange_per_round_and_the_last_rounds_evaluation_on_its_own(tmp_path):
    # Prepare
    grid = CountingGrid({1: tenant(0), 2: tenant(1)})
    # Execute: three rounds
    _run(tmp_path, grid, evaluate_with_train=True)
    # Assert: training messages of rounds 2 and 3 ask for the evaluation; one evaluation, after round 3
    assert grid.sent == [(1, "train", False)] * 2 + [(2, "train", True)] * 2 + [(3, "train", True)] * 2 \
        + [(3, "evaluate", False)] * 2


def test_every_round_record_holds_the_evaluation_of_its_own_adapter(tmp_path):
    # Prepare: the mean delta is 1 and sgd's step is 1, so round k's adapter is k everywhere
    fused, separate = tmp_path / "fused", tmp_path / "separate"
    # Execute: the same run both ways
    _run(fused, CountingGrid({1: tenant(0), 2: tenant(1)}), evaluate_with_train=True)
    _run(separate, CountingGrid({1: tenant(0), 2: tenant(1)}))
    # Assert: round k's evaluation saw adapter k (its loss is the adapter's value), both ways alike
    for k in (1, 2, 3):
        got = _record(fused, k)["eval"]
        assert {t: m["eval-loss"] for t, m in got.items()} == {"0": float(k), "1": float(k)}
        assert got == _record(separate, k)["eval"]


def test_a_training_reply_without_the_evaluation_is_recorded_against_the_round_it_evaluates(tmp_path):
    # Prepare: tenant 1 trains but sends no evaluation; tenant 2's round-2 training fails
    def fails_in_round_2(msg):
        if int(msg.content.config_records[keys.CONFIG][keys.ROUND]) == 2 and msg.metadata.message_type == "train":
            return Message(Error(code=0, reason="out of memory"), reply_to=msg)
        return tenant(2)(msg)

    grid = CountingGrid({1: tenant(0), 2: tenant(1, evaluates=False), 3: fails_in_round_2})
    # Execute
    _run(tmp_path, grid, rounds=2, evaluate_with_train=True)
    # Assert: round 1's record keeps tenant 0's evaluation and says why the others have none
    r1 = _record(tmp_path, 1)
    assert list(r1["eval"]) == ["0"]
    reasons = {d["node"]: d["reason"] for d in r1["dropped"]}
    assert "carries none" in reasons[2] and "out of memory" in reasons[3]
    assert reasons[2].startswith("evaluation: ") and reasons[3].startswith("evaluation: ")


def test_a_resumed_run_evaluates_the_last_complete_round_with_its_first_training(tmp_path):
    # Prepare: two of three rounds, then stopped: round 2's record has no evaluation yet
    strategy, result = _run(tmp_path, CountingGrid({1: tenant(0), 2: tenant(1)}), until=2, evaluate_with_train=True)
    assert _record(tmp_path, 2)["eval"] == {}
    # Execute: resume for round 3
    grid = CountingGrid({1: tenant(0), 2: tenant(1)})
    _run(tmp_path, grid, done=2, state=strategy.recorder.rounds[-1].server_state,
         start=from_arrayrecord(result.arrays), evaluate_with_train=True)
    # Assert: the resumed round's training evaluated round 2's adapter into round 2's record
    assert grid.sent[0] == (3, "train", True)
    assert {t: m["eval-loss"] for t, m in _record(tmp_path, 2)["eval"].items()} == {"0": 2.0, "1": 2.0}
    assert {t: m["eval-loss"] for t, m in _record(tmp_path, 3)["eval"].items()} == {"0": 3.0, "1": 3.0}


def test_no_evaluation_is_asked_for_when_none_is_configured(tmp_path):
    # Prepare
    grid = CountingGrid({1: tenant(0), 2: tenant(1)})
    # Execute
    _run(tmp_path, grid, rounds=2, evaluate_with_train=True, fraction_evaluate=0.0)
    # Assert
    assert grid.sent == [(1, "train", False)] * 2 + [(2, "train", False)] * 2
    assert _record(tmp_path, 1)["eval"] == {} and _record(tmp_path, 1)["dropped"] == []
