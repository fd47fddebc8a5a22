"""The strategy drops bad replies with their reason and completes the round with the rest."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedlora.common import messages as keys
from fedlora.common.adapter import from_arrayrecord, to_arrayrecord
from fedlora.common.config import FederationConfig
from fedlora.server.aggregation import FedAvg
from fedlora.server.records import RoundRecorder
from fedlora.server.strategy import FedLoraStrategy, NotEnoughTenants

@pytest.fixture(autouse=True)
def _task_identity():
    """Messages are created inside a run; the SuperLink sets this identity in a real one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


GLOBAL = OrderedDict([("x.lora_A.weight", np.zeros((2, 4), np.float32)),
                      ("x.lora_B.weight", np.zeros((4, 2), np.float32))])


class FakeGrid:
    """Answers each message with ``behaviour[node](message)``; the real Grid does this over Flower."""

    def __init__(self, behaviour):
        self.behaviour = behaviour

    def get_node_ids(self):
        return list(self.behaviour)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:  # as Flower's grid does when it pushes a message
            m.metadata.__dict__["_message_id"] = m.object_id
        return [self.behaviour[m.metadata.dst_node_id](m) for m in messages]


def good(value, n=10, tenant=0):
    def reply(msg):
        if msg.metadata.message_type == "evaluate":
            m = {k: 0.5 for k in keys.EVAL_METRICS}
            m.update({keys.NUM_EXAMPLES: 4, keys.TENANT: tenant})
            return Message(RecordDict({keys.METRICS: MetricRecord(m)}), reply_to=msg)
        delta = OrderedDict((k, np.full(v.shape, value, np.float32)) for k, v in GLOBAL.items())
        m = {k: 1.0 for k in keys.TRAIN_METRICS}
        m.update({keys.NUM_EXAMPLES: n, keys.TENANT: tenant})
        return Message(RecordDict({keys.ARRAYS: to_arrayrecord(delta), keys.METRICS: MetricRecord(m)}), reply_to=msg)
    return reply


def bad(kind, tenant):
    def reply(msg):
        if msg.metadata.message_type == "evaluate":
            return good(0.0, tenant=tenant)(msg)
        delta = OrderedDict((k, np.full(v.shape, 100.0, np.float32)) for k, v in GLOBAL.items())
        m = {k: 1.0 for k in keys.TRAIN_METRICS}
        m.update({keys.NUM_EXAMPLES: 10, keys.TENANT: tenant})
        if kind == "nan":
            delta["x.lora_A.weight"][0, 0] = np.nan
        elif kind == "shape":
            delta["x.lora_B.weight"] = np.zeros((4, 3), np.float32)
        elif kind == "extra-tensor":
            delta["model.embed_tokens.weight"] = np.zeros((8, 2), np.float32)
        elif kind == "extra-metric":
            m["first-prompt-length"] = 12.0
        elif kind == "inflated":
            m[keys.NUM_EXAMPLES] = 10**12
        return Message(RecordDict({keys.ARRAYS: to_arrayrecord(delta), keys.METRICS: MetricRecord(m)}), reply_to=msg)
    return reply


def _strategy(tmp_path, **cfg):
    saved = {}
    rec = RoundRecorder(tmp_path, save=lambda p, s, r: saved.__setitem__(r, s))
    fed = FederationConfig(**{"min_train_nodes": 2, "round_timeout": 2.0, **cfg})
    return FedLoraStrategy(fed, FedAvg(), rec, seed=0), saved


@pytest.mark.parametrize("kind, reason", [
    ("nan", "NaN or Inf"), ("shape", "shape (4, 3)"), ("extra-tensor", "unknown ['model.embed_tokens.weight']"),
    ("extra-metric", "extra ['first-prompt-length']"), ("inflated", "out of range"),
])
def test_bad_reply_dropped_round_completes_with_the_rest(tmp_path, kind, reason):
    # Prepare: tenants 0 and 1 send deltas 1 and 3 (10 examples each); tenant 2 misbehaves
    strategy, saved = _strategy(tmp_path)
    grid = FakeGrid({101: good(1.0, tenant=0), 102: good(3.0, tenant=1), 103: bad(kind, tenant=2)})
    # Execute: one full round through Flower's Strategy.start
    result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(GLOBAL), num_rounds=1, timeout=5)
    # Assert: the bad reply is dropped with its reason; the mean of the good ones is applied
    final = from_arrayrecord(result.arrays)
    for v in final.values():
        assert np.all(np.isfinite(v))
        np.testing.assert_allclose(v, 2.0)
    record = json.loads((tmp_path / "metrics" / "round_001.json").read_text())
    assert record["finished"] == ["0", "1"]
    assert len(record["dropped"]) == 1 and record["dropped"][0]["node"] == 103
    assert reason in record["dropped"][0]["reason"]
    assert 1 in saved  # the round's checkpoint was written


def test_client_error_reply_is_dropped(tmp_path):
    from flwr.app import Error

    strategy, _ = _strategy(tmp_path)
    grid = FakeGrid({1: good(2.0, tenant=0), 3: good(2.0, tenant=1),
                     2: lambda m: Message(Error(code=0, reason="out of memory"), reply_to=m)})
    result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(GLOBAL), num_rounds=1, timeout=5)
    np.testing.assert_allclose(from_arrayrecord(result.arrays)["x.lora_A.weight"], 2.0)
    record = json.loads((tmp_path / "metrics" / "round_001.json").read_text())
    assert "out of memory" in record["dropped"][0]["reason"]


def test_a_round_with_fewer_valid_updates_than_min_train_nodes_is_not_aggregated(tmp_path):
    # Prepare: min-train-nodes 2; two tenants sampled, one reply an error: one valid update
    from flwr.app import Error

    strategy, _ = _strategy(tmp_path)
    grid = FakeGrid({1: good(2.0), 2: lambda m: Message(Error(code=0, reason="out of memory"), reply_to=m)})
    # Execute
    result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(GLOBAL), num_rounds=1, timeout=5)
    # Assert: no round moved the global adapter (Flower returns none); the record says so
    assert len(result.arrays) == 0
    record = json.loads((tmp_path / "metrics" / "round_001.json").read_text())
    assert record["aggregated"] is False
    assert record["aggregation"]["not_aggregated"] == "1 valid update(s), fewer than federation.min-train-nodes = 2"


def test_superlink_error_reply_is_filed_under_the_dead_tenant(tmp_path):
    # Prepare: the SuperLink answers for a dead node; such a reply's source is the SuperLink
    from flwr.app import Error

    def dead(m):
        reply = Message(Error(code=0, reason="Node Unavailable"), reply_to=m)
        reply.metadata.__dict__["_src_node_id"] = 1  # the SuperLink made it
        return reply

    strategy, _ = _strategy(tmp_path)
    grid = FakeGrid({11: good(2.0, tenant=0), 12: good(2.0, tenant=1), 13: dead})
    # Execute
    strategy.start(grid=grid, initial_arrays=to_arrayrecord(GLOBAL), num_rounds=1, timeout=5)
    # Assert
    record = json.loads((tmp_path / "metrics" / "round_001.json").read_text())
    assert [d["node"] for d in record["dropped"]] == [13, 13]  # train and evaluate
    assert "Node Unavailable" in record["dropped"][0]["reason"]


def test_no_valid_reply_keeps_global_adapter(tmp_path):
    strategy, saved = _strategy(tmp_path)
    grid = FakeGrid({1: bad("nan", 0), 2: bad("shape", 1)})
    result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(GLOBAL), num_rounds=1, timeout=5)
    assert len(result.arrays) == 0 or np.all(from_arrayrecord(result.arrays)["x.lora_A.weight"] == 0)
    assert saved == {}


def test_sampling_fraction_with_minimum(tmp_path):
    strategy, _ = _strategy(tmp_path, fraction_train=0.1, min_train_nodes=3)
    grid = FakeGrid({n: good(1.0, tenant=n) for n in range(1, 21)})
    msgs = list(strategy.configure_train(1, to_arrayrecord(GLOBAL), ConfigRecord(), grid))
    assert len(msgs) == 3  # 10 % of 20 = 2, raised to the minimum


def test_sampling_waits_only_up_to_the_timeout(tmp_path):
    strategy, _ = _strategy(tmp_path, min_train_nodes=3, round_timeout=1.0)
    with pytest.raises(NotEnoughTenants, match="only 1 tenant"):
        list(strategy.configure_train(1, to_arrayrecord(GLOBAL), ConfigRecord(), FakeGrid({1: good(1.0)})))


def test_bytes_are_counted(tmp_path):
    strategy, _ = _strategy(tmp_path)
    grid = FakeGrid({1: good(1.0, tenant=0), 2: good(1.0, tenant=1)})
    strategy.start(grid=grid, initial_arrays=to_arrayrecord(GLOBAL), num_rounds=1, timeout=5)
    record = json.loads((tmp_path / "metrics" / "round_001.json").read_text())
    adapter_bytes = to_arrayrecord(GLOBAL).count_bytes()
    assert record["bytes_down"] == 4 * adapter_bytes  # train + evaluate to 2 tenants
    assert record["bytes_up"] == 2 * adapter_bytes


def _spread(node):
    """A tenant whose delta depends on the round and the node, so every round differs."""
    def reply(msg):
        rnd = int(msg.content.config_records[keys.CONFIG][keys.ROUND])
        return good(float(node % 7 + rnd), n=10 + node, tenant=node)(msg)
    return reply


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(tmp_path):
    # Prepare: six tenants, half sampled per round (the sampling RNG matters)
    behaviour = {n: _spread(n) for n in range(1, 7)}
    full, _ = _strategy(tmp_path / "full", fraction_train=0.5)
    first, _ = _strategy(tmp_path / "part", fraction_train=0.5)
    # Execute: 3 rounds at once; 2 rounds, then a fresh strategy resumed after round 2
    want = full.start(grid=FakeGrid(behaviour), initial_arrays=to_arrayrecord(GLOBAL), num_rounds=3, timeout=5)
    part = first.start(grid=FakeGrid(behaviour), initial_arrays=to_arrayrecord(GLOBAL), num_rounds=2, timeout=5)
    second, _ = _strategy(tmp_path / "part", fraction_train=0.5)
    second.resume(2, first.recorder.rounds[-1].server_state)
    got = second.start(grid=FakeGrid(behaviour), initial_arrays=part.arrays, num_rounds=1, timeout=5)
    # Assert: the same final adapter, bit for bit, and round 3 sampled the same tenants
    for k, v in from_arrayrecord(want.arrays).items():
        assert np.array_equal(from_arrayrecord(got.arrays)[k], v)
    r3 = [json.loads((tmp_path / d / "metrics" / "round_003.json").read_text()) for d in ("full", "part")]
    assert r3[0]["sampled"] == r3[1]["sampled"] and r3[1]["round"] == 3


def test_the_configured_server_optimizer_takes_the_step(tmp_path):
    # Prepare: two tenants whose mean delta is 1 every round; sgd and fedavgm (momentum 0.5)
    grid = FakeGrid({1: good(1.0, tenant=0), 2: good(1.0, tenant=1)})
    sgd, _ = _strategy(tmp_path / "sgd")
    avgm, _ = _strategy(tmp_path / "avgm", server_optimizer="fedavgm", server_beta1=0.5)
    # Execute: two rounds each
    finals = {name: from_arrayrecord(s.start(grid=grid, initial_arrays=to_arrayrecord(GLOBAL), num_rounds=2,
                                             timeout=5).arrays) for name, s in (("sgd", sgd), ("avgm", avgm))}
    # Assert: sgd 0 + 1 + 1 = 2; fedavgm m1 = 1, m2 = 0.5 * 1 + 1 = 1.5, so 0 + 1 + 1.5 = 2.5
    for k in GLOBAL:
        assert np.all(finals["sgd"][k] == 2.0) and np.all(finals["avgm"][k] == 2.5)
    record = json.loads((tmp_path / "avgm" / "metrics" / "round_002.json").read_text())
    assert record["aggregation"]["server_optimizer"] == "fedavgm (server lr 1, beta1 0.5)"
    assert record["server_state"]["optimizer"] == {
        "name": "fedavgm", "file": "checkpoints/round_002/server_optimizer.safetensors"}
    sgd_record = json.loads((tmp_path / "sgd" / "metrics" / "round_002.json").read_text())
    assert sgd_record["server_state"]["optimizer"] == {"name": "sgd", "file": None}
    assert not list((tmp_path / "sgd").rglob("*.safetensors"))  # sgd has no moments to save
    assert (tmp_path / "avgm" / "checkpoints" / "round_001" / "server_optimizer.safetensors").is_file()


def test_fedexp_through_the_strategy_takes_the_extrapolated_step(tmp_path):
    # Prepare: two tenants of equal weight sending deltas +1 and +3 everywhere (12 elements each)
    grid = FakeGrid({1: good(1.0, tenant=0), 2: good(3.0, tenant=1)})
    strategy, _ = _strategy(tmp_path, server_optimizer="fedexp", server_tau=0.0)
    # Execute: one round
    final = from_arrayrecord(strategy.start(grid=grid, initial_arrays=to_arrayrecord(GLOBAL), num_rounds=1,
                                            timeout=5).arrays)
    # Assert: mean ||delta||^2 = (12 + 108) / 2 = 60, ||d||^2 = 12 * 4 = 48: eta = 60 / 96 < 1 -> 1, so x = 2
    for k in GLOBAL:
        assert np.all(final[k] == 2.0)
    record = json.loads((tmp_path / "metrics" / "round_001.json").read_text())
    assert record["aggregation"]["fedexp_eta"] == 1.0


def test_fedexp_is_refused_over_a_transport_that_reveals_only_the_sum(tmp_path):
    # Prepare: a transport like secure aggregation's
    from fedlora.common.config import ConfigError
    from fedlora.server.transport import PlainTransport

    class SumOnly(PlainTransport):
        name = "sum-only"
        reveals_individual_updates = False

    rec = RoundRecorder(tmp_path, save=lambda p, s, r: None)
    # Execute / Assert
    with pytest.raises(ConfigError, match="'fedexp' needs each update's norm"):
        FedLoraStrategy(FederationConfig(server_optimizer="fedexp"), FedAvg(), rec,
                        transport=SumOnly(max_examples=10, weight_of=lambda n, node=0: float(n)))


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_a_resumed_run_restores_the_optimizer_moments_exactly(tmp_path, name):
    # Prepare: as the resume test above, with an adaptive server optimizer
    from fedlora.server.run import optimizer_moments

    behaviour = {n: _spread(n) for n in range(1, 7)}
    opt = {"fraction_train": 0.5, "server_optimizer": name, "server_lr": 0.1}
    full, _ = _strategy(tmp_path / "full", **opt)
    first, _ = _strategy(tmp_path / "part", **opt)
    want = full.start(grid=FakeGrid(behaviour), initial_arrays=to_arrayrecord(GLOBAL), num_rounds=3, timeout=5)
    part = first.start(grid=FakeGrid(behaviour), initial_arrays=to_arrayrecord(GLOBAL), num_rounds=2, timeout=5)
    # Execute: a fresh strategy, its moments read back from the file round 2's record names
    state = json.loads((tmp_path / "part" / "metrics" / "round_002.json").read_text())["server_state"]
    moments = optimizer_moments(tmp_path / "part", state, name)
    second, _ = _strategy(tmp_path / "part", **opt)
    second.resume(2, state, optimizer_arrays=moments)
    got = second.start(grid=FakeGrid(behaviour), initial_arrays=part.arrays, num_rounds=1, timeout=5)
    # Assert: the moments are m/ and v/ per tensor, and the final adapter is the same, bit for bit
    assert sorted(moments) == sorted(f"{m}/{k}" for m in "mv" for k in GLOBAL)
    for k, v in from_arrayrecord(want.arrays).items():
        assert np.array_equal(from_arrayrecord(got.arrays)[k], v), k
    without, _ = _strategy(tmp_path / "again", **opt)  # the same resume with fresh moments ends elsewhere
    without.resume(2, {**state, "optimizer": {"name": name, "file": None}})
    other = without.start(grid=FakeGrid(behaviour), initial_arrays=part.arrays, num_rounds=1, timeout=5)
    assert not np.array_equal(from_arrayrecord(other.arrays)["x.lora_A.weight"],
                              from_arrayrecord(want.arrays)["x.lora_A.weight"])


def test_a_resume_with_another_server_optimizer_is_refused(tmp_path):
    # Prepare: a run recorded with fedadam
    from fedlora.server.run import ResumeError, optimizer_moments

    first, _ = _strategy(tmp_path, server_optimizer="fedadam", server_lr=0.1)
    first.start(grid=FakeGrid({1: good(1.0, tenant=0), 2: good(2.0, tenant=1)}),
                initial_arrays=to_arrayrecord(GLOBAL), num_rounds=1, timeout=5)
    state = first.recorder.rounds[-1].server_state
    # Execute / Assert: one line naming both optimizers, from the run directory and from the strategy
    with pytest.raises(ResumeError, match="trained with federation.server-optimizer = 'fedadam', not 'fedyogi'") as err:
        optimizer_moments(tmp_path, state, "fedyogi")
    assert "\n" not in str(err.value)
    second, _ = _strategy(tmp_path, server_optimizer="sgd")
    with pytest.raises(ValueError, match="resume it with 'fedadam' or start a new run"):
        second.resume(1, state)


def test_a_tenant_dropped_by_a_bound_trained_but_did_not_finish(tmp_path):
    # Prepare: three tenants send delta 1, a fourth 100x that; the adaptive bound (3 x median) drops it
    from fedlora.server.bounds import UpdateBounds

    rec = RoundRecorder(tmp_path, save=lambda p, s, r: None)
    strategy = FedLoraStrategy(FederationConfig(min_train_nodes=2, round_timeout=2.0), FedAvg(), rec, seed=0,
                               bounds=UpdateBounds(norm_multiplier=3.0))
    grid = FakeGrid({101: good(1.0, tenant=0), 102: good(1.0, tenant=1), 103: good(1.0, tenant=2),
                     104: good(100.0, tenant=3)})
    # Execute
    strategy.start(grid=grid, initial_arrays=to_arrayrecord(GLOBAL), num_rounds=1, timeout=5)
    # Assert: not among the finished, dropped with the bound's reason, its training metrics kept
    record = json.loads((tmp_path / "metrics" / "round_001.json").read_text())
    assert record["finished"] == ["0", "1", "2"]
    assert [d["node"] for d in record["dropped"]] == [104] and "server bound" in record["dropped"][0]["reason"]
    assert "3" in record["train"]
