"""The LoRA rules on the server: ffa's aggregate is the exact mean of the tenants' products and
never moves A; svd factors the mean product back to rank r with the recorded error of the
truncation, also for tenants of lower rank; each rule's refusals."""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedlora.common import messages as keys
from fedlora.common.adapter import from_arrayrecord, to_arrayrecord
from fedlora.common.config import ConfigError, FederationConfig, parse_config
from fedlora.server.aggregation import FedAvg, Median, Rejected, WeightedSum, validate_update, weight_rule
from fedlora.server.lora_rules import AB, FFA, SVD, rank_r_factors
from fedlora.server.optimizers import make_server_optimizer
from fedlora.server.records import RoundRecorder
from fedlora.server.strategy import FedLoraStrategy
from fedlora.server.transport import Collected, Transport

R, D_IN, D_OUT, ALPHA = 4, 6, 5, 8.0
S = ALPHA / R  # the LoRA scaling alpha / r
MODULES = ("model.m0", "model.m1")


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages are created inside a run; the SuperLink sets this identity in a real one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


def a_name(m: str) -> str:
    return f"{m}.lora_A.weight"


def b_name(m: str) -> str:
    return f"{m}.lora_B.weight"


def global_adapter(seed: int = 0, *, b_scale: float = 0.3) -> "OrderedDict[str, np.ndarray]":
    rng = np.random.default_rng(seed)
    out = OrderedDict()
    for m in MODULES:
        out[a_name(m)] = rng.standard_normal((R, D_IN)).astype(np.float32)
        out[b_name(m)] = (b_scale * rng.standard_normal((D_OUT, R))).astype(np.float32)
    return out


def random_delta(seed: int, *, rank: int = R, only_b: bool = False) -> "OrderedDict[str, np.ndarray]":
    rng = np.random.default_rng(100 + seed)
    out = OrderedDict()
    for m in MODULES:
        if not only_b:
            out[a_name(m)] = (0.2 * rng.standard_normal((rank, D_IN))).astype(np.float32)
        out[b_name(m)] = (0.2 * rng.standard_normal((D_OUT, rank))).astype(np.float32)
    return out


def product(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    return S * (np.asarray(b, np.float64) @ np.asarray(a, np.float64))


def f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64)


def rel(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


class FakeGrid:
    """Answers each training message with its node's delta (and evaluation with fixed metrics)."""

    def __init__(self, deltas: dict[int, dict], examples: dict[int, int]):
        self.deltas, self.examples = deltas, examples

    def get_node_ids(self):
        return list(self.deltas)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            node = msg.metadata.dst_node_id
            m = {k: 1.0 for k in (keys.TRAIN_METRICS if msg.metadata.message_type == "train" else keys.EVAL_METRICS)}
            m.update({keys.NUM_EXAMPLES: self.examples[node], keys.TENANT: node})
            content = {keys.METRICS: MetricRecord(m)}
            if msg.metadata.message_type == "train":
                content[keys.ARRAYS] = to_arrayrecord(self.deltas[node])
            out.append(Message(RecordDict(content), reply_to=msg))
        return out


def run_rounds(tmp_path, rule, deltas, examples, *, rounds=1, initial=None, **fed):
    """(final adapter, saved checkpoints by round, last round record) of ``rounds`` rounds."""
    saved = {}
    rec = RoundRecorder(tmp_path, save=lambda p, s, r: saved.__setitem__(r, {k: v.copy() for k, v in s.items()}))
    # unrelated random deltas: the direction screen would rightly drop some; the math is the point here
    cfg = FederationConfig(**{"min_train_nodes": 1, "round_timeout": 2.0, "outlier_action": "flag", **fed})
    strategy = FedLoraStrategy(cfg, FedAvg(), rec, rule=rule, seed=0)
    start = global_adapter() if initial is None else initial
    result = strategy.start(grid=FakeGrid(deltas, examples), initial_arrays=to_arrayrecord(start),
                            num_rounds=rounds, timeout=5)
    record = json.loads((tmp_path / "metrics" / f"round_{rounds:03d}.json").read_text())
    return from_arrayrecord(result.arrays), saved, record


# -- ffa ---------------------------------------------------------------------------------------
def test_ffa_aggregate_is_the_exact_weighted_mean_of_the_tenants_products(tmp_path):
    # Prepare: one shared A; three tenants' B deltas, weights 10, 30, 60 examples
    glob = global_adapter()
    deltas = {n: random_delta(n, only_b=True) for n in (1, 2, 3)}
    examples = {1: 10, 2: 30, 3: 60}
    # Execute: one round with the ffa rule
    final, _, _ = run_rounds(tmp_path, FFA(), deltas, examples)
    # Assert: s B' A == sum_k w_k s (B + dB_k) A / sum_k w_k, per module, to float32 rounding
    errors = []
    for m in MODULES:
        exact = sum(examples[n] * product(f64(glob[b_name(m)]) + deltas[n][b_name(m)], glob[a_name(m)])
                    for n in deltas) / sum(examples.values())
        errors.append(rel(product(final[b_name(m)], final[a_name(m)]), exact))
    print(f"ffa: relative error of the aggregate against the exact mean of products: {max(errors):.3g}")
    assert max(errors) <= 1e-6


def test_ffa_never_moves_a_in_any_checkpoint(tmp_path):
    # Prepare: tenants whose B deltas differ every round (the same each round is enough here)
    glob = global_adapter()
    deltas = {n: random_delta(n, only_b=True) for n in (1, 2)}
    # Execute: three rounds
    final, saved, _ = run_rounds(tmp_path, FFA(), deltas, {1: 10, 2: 20}, rounds=3)
    # Assert: A is the initial A, byte for byte, in every checkpoint and in the result; B moved
    for state in (*saved.values(), final):
        for m in MODULES:
            assert state[a_name(m)].tobytes() == glob[a_name(m)].tobytes()
            assert not np.array_equal(state[b_name(m)], glob[b_name(m)])
    assert sorted(saved) == [1, 2, 3]


def test_ffa_replies_must_hold_b_alone(tmp_path):
    # Prepare: tenant 1 sends B only; tenant 2 sends A's delta too
    deltas = {1: random_delta(1, only_b=True), 2: random_delta(2)}
    # Execute
    _, _, record = run_rounds(tmp_path, FFA(), deltas, {1: 10, 2: 10})
    # Assert: the reply with A is dropped as naming tensors the reference lacks
    assert [d["node"] for d in record["dropped"]] == [2]
    assert "unknown ['model.m0.lora_A.weight'" in record["dropped"][0]["reason"]
    assert record["aggregated"] and record["aggregation"]["lora_rule"] == "ffa"


class SumOnly(Transport):
    """A transport that reveals only a sum over the whole adapter, as secure aggregation does."""

    name = "sum-only"
    reveals_individual_updates = False

    def __init__(self, total: WeightedSum):
        self.total = total

    def configure(self, server_round, nodes, arrays, config, grid):
        return [], 0

    def collect(self, server_round, replies, *, reference):
        return Collected(total=self.total, metrics={})


def test_ffa_reads_b_alone_from_a_secure_sum_and_the_server_optimizer_steps_b_alone(tmp_path):
    # Prepare: a sum of two updates over every tensor, with junk in A's entries (quantization
    # offsets, or a hostile tenant); fedadam with lr 0.1
    glob = global_adapter()
    total = OrderedDict((k, np.full(v.shape, 7.0 if "lora_A" in k else 2.0, np.float32)) for k, v in glob.items())
    cfg = FederationConfig(min_train_nodes=1, round_timeout=2.0, server_optimizer="fedadam", server_lr=0.1)
    strategy = FedLoraStrategy(cfg, FedAvg(), RoundRecorder(tmp_path, save=lambda *a: None),
                               transport=SumOnly(WeightedSum(total, 2.0, 2)), rule=FFA(), seed=0)
    grid = FakeGrid({1: None}, {1: 1})
    # Execute
    strategy.configure_train(1, to_arrayrecord(glob), ConfigRecord(), grid)
    arrays, _ = strategy.aggregate_train(1, [])
    # Assert: A unchanged; B took fedadam's first step, lr * (0.1 d) / (sqrt(0.01 d^2) + tau) with d = 1
    new = from_arrayrecord(arrays)
    step = 0.1 * 0.1 / (math.sqrt(0.01) + 1e-3)
    for m in MODULES:
        assert new[a_name(m)].tobytes() == glob[a_name(m)].tobytes()
        np.testing.assert_allclose(new[b_name(m)], glob[b_name(m)] + step, rtol=1e-6)
    assert sorted(strategy.optimizer.state_arrays()) == sorted(f"{mo}/{b_name(m)}" for mo in "mv" for m in MODULES)


# -- svd ---------------------------------------------------------------------------------------
def test_svd_of_a_mean_of_rank_r_is_exact(tmp_path):
    # Prepare: two tenants that only move B, so the mean product (B + mean dB) A has rank r
    glob = global_adapter()
    deltas = {n: random_delta(n, only_b=True) for n in (1, 2)}
    for n, d in deltas.items():
        for m in MODULES:
            d[a_name(m)] = np.zeros((R, D_IN), np.float32)
    # Execute
    final, _, record = run_rounds(tmp_path, SVD(scaling=S), deltas, {1: 10, 2: 30})
    # Assert: the recorded truncation error is at rounding level, and s B' A' is the mean product
    agg = record["aggregation"]
    print(f"svd, rank-r mean: recorded error max {agg['svd_error_max']:.3g}")
    assert agg["svd_error_max"] <= 1e-12 and agg["svd_modules"] == 2
    for m in MODULES:
        mean = sum(w * product(f64(glob[b_name(m)]) + deltas[n][b_name(m)], glob[a_name(m)])
                   for n, w in ((1, 0.25), (2, 0.75)))
        assert rel(product(final[b_name(m)], final[a_name(m)]), mean) <= 1e-6  # float32 factors


def dense_mean(glob, deltas, weights, m, ranks=None):
    """sum_k w_k s B_k A_k / sum_k w_k, B_k and A_k rebuilt from each tenant's rank."""
    total = sum(weights.values())
    out = 0.0
    for n, d in deltas.items():
        k = (ranks or {}).get(n, R)
        out = out + weights[n] / total * product(f64(glob[b_name(m)][:, :k]) + d[b_name(m)],
                                                 f64(glob[a_name(m)][:k]) + d[a_name(m)])
    return out


def test_svd_records_the_tail_of_the_singular_values_and_keeps_the_best_rank_r(tmp_path):
    # Prepare: two tenants moving both factors: their mean product has rank up to 2r
    glob = global_adapter()
    deltas = {n: random_delta(n) for n in (1, 2)}
    weights = {1: 20, 2: 60}
    # Execute
    final, _, record = run_rounds(tmp_path, SVD(scaling=S), deltas, weights)
    # Assert: per module, error = sqrt(sum_{i>r} s_i^2 / sum s_i^2) of the dense mean, and s B' A'
    # is U_r S_r V_r^T (Eckart-Young); the record holds the max and the mean over modules
    tails = []
    for m in MODULES:
        mean = dense_mean(glob, deltas, weights, m)
        u, s, vt = np.linalg.svd(mean)
        tails.append(math.sqrt(np.sum(s[R:] ** 2) / np.sum(s ** 2)))
        best = (u[:, :R] * s[:R]) @ vt[:R]
        assert rel(product(final[b_name(m)], final[a_name(m)]), best) <= 1e-6
    agg = record["aggregation"]
    print(f"svd, rank-2r mean: recorded error max {agg['svd_error_max']:.4g}, mean {agg['svd_error_mean']:.4g}")
    assert min(tails) > 1e-3  # a real truncation
    assert agg["svd_error_max"] == pytest.approx(max(tails), rel=1e-9)
    assert agg["svd_error_mean"] == pytest.approx(sum(tails) / 2, rel=1e-9)


def test_svd_server_lr_steps_in_product_space(tmp_path):
    # Prepare: server lr 0.5 and one tenant
    glob = global_adapter()
    deltas = {1: random_delta(1)}
    # Execute
    final, _, _ = run_rounds(tmp_path, SVD(scaling=S, server_lr=0.5), deltas, {1: 10}, server_lr=0.5)
    # Assert: s B' A' is the best rank-r approximation of 0.5 s B A + 0.5 s B_1 A_1
    for m in MODULES:
        target = 0.5 * product(glob[b_name(m)], glob[a_name(m)]) + 0.5 * dense_mean(glob, deltas, {1: 1}, m)
        u, s, vt = np.linalg.svd(target)
        assert rel(product(final[b_name(m)], final[a_name(m)]), (u[:, :R] * s[:R]) @ vt[:R]) <= 1e-6


def test_svd_aggregates_each_tenants_product_at_its_own_rank(tmp_path):
    # Prepare: tenant 1 at rank 4 (= r), tenant 2 at rank 2: its delta is 2 components wide
    glob = global_adapter()
    deltas, ranks, weights = {1: random_delta(1), 2: random_delta(2, rank=2)}, {1: 4, 2: 2}, {1: 10, 2: 30}
    # Execute
    final, _, record = run_rounds(tmp_path, SVD(scaling=S), deltas, weights)
    # Assert: tenant 2's factors are B[:, :2] + dB_2 and A[:2] + dA_2; s B' A' is the mean's best rank r
    assert not record["dropped"]
    assert record["aggregation"]["svd_ranks"] == {"1": 4, "2": 2}
    for m in MODULES:
        u, s, vt = np.linalg.svd(dense_mean(glob, deltas, weights, m, ranks))
        assert rel(product(final[b_name(m)], final[a_name(m)]), (u[:, :R] * s[:R]) @ vt[:R]) <= 1e-6
        assert final[a_name(m)].shape == (R, D_IN) and final[b_name(m)].shape == (D_OUT, R)


def test_svd_restarts_missing_components_from_the_initial_a():
    # Prepare: one rank-2 product; rank r = 4 leaves two components with no direction in T
    glob = global_adapter()
    b1 = glob[b_name("model.m0")][:, :2] + 1.0
    a1 = glob[a_name("model.m0")][:2]
    fill = glob[a_name("model.m0")]
    # Execute
    b, a, s, err = rank_r_factors([b1], [a1], [1.0], scaling=S, rank=R, fill=fill)
    # Assert: exact (error 0 up to rounding); components 3 and 4 are B = 0 with the initial A rows
    assert err <= 1e-12 and s.size == 2
    np.testing.assert_allclose(S * b @ a, product(b1, a1), rtol=1e-12, atol=1e-12)
    assert np.all(b[:, 2:] == 0) and np.array_equal(a[2:], fill[2:].astype(np.float64))
    np.testing.assert_allclose(a[:2] @ a[:2].T, np.eye(2), atol=1e-12)  # A = V_r^T: orthonormal rows


def _validate(delta, rule):
    return validate_update(delta, {**{k: 1.0 for k in keys.TRAIN_METRICS}, keys.NUM_EXAMPLES: 5},
                           reference=global_adapter(), expected_metrics=keys.TRAIN_METRICS, max_examples=100,
                           weight_of=weight_rule("examples", max_weight=100), check_shapes=rule.check_shapes)


@pytest.mark.parametrize("edit, reason", [
    (lambda d: d.update({a_name("model.m0"): np.zeros((5, D_IN), np.float32),
                         b_name("model.m0"): np.zeros((D_OUT, 5), np.float32)}), "rank 5 outside 1..4"),
    (lambda d: d.update({a_name("model.m0"): np.zeros((0, D_IN), np.float32),
                         b_name("model.m0"): np.zeros((D_OUT, 0), np.float32)}), "rank 0 outside 1..4"),
    (lambda d: d.update({b_name("model.m0"): np.zeros((D_OUT, 3), np.float32)}), "are not a rank-k pair"),
    (lambda d: d.update({a_name("model.m0"): np.zeros((2, D_IN + 1), np.float32)}), "are not a rank-k pair"),
    (lambda d: d.update({a_name("model.m1"): np.zeros((3, D_IN), np.float32),
                         b_name("model.m1"): np.zeros((D_OUT, 3), np.float32)}), "ranks differ"),
])
def test_svd_refuses_replies_whose_ranks_do_not_fit(edit, reason):
    # Prepare: a rank-2 delta, then one edit that breaks it
    delta = random_delta(1, rank=2)
    assert _validate(dict(delta), SVD(scaling=S)).delta  # as it is: accepted
    edit(delta)
    # Execute / Assert
    with pytest.raises(Rejected, match=re.escape(reason)):
        _validate(delta, SVD(scaling=S))


def test_ab_and_ffa_refuse_a_lower_rank_reply():
    with pytest.raises(Rejected, match=r"shape \(2, 6\) != expected \(4, 6\)"):
        _validate(random_delta(1, rank=2), AB())


@pytest.mark.parametrize("kwargs, message", [
    ({"transport": SumOnly(None)}, "reveals only their sum; use ffa"),
    ({"aggregator": Median()}, "not with 'median'"),
    ({"optimizer": "fedadam"}, "'fedadam''s moments would mix unrelated directions"),
])
def test_the_strategy_refuses_svd_with_parts_it_cannot_use(tmp_path, kwargs, message):
    cfg = FederationConfig(server_optimizer=kwargs.pop("optimizer", "sgd"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        FedLoraStrategy(cfg, kwargs.pop("aggregator", FedAvg()), RoundRecorder(tmp_path, save=lambda *a: None),
                        rule=SVD(scaling=S), optimizer=make_server_optimizer(cfg), **kwargs)


# -- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("flat, message", [
    ({"federation.lora-rule": "ffa", "adapter.method": "dora"}, "'ffa' works on LoRA's A and B factors"),
    ({"federation.lora-rule": "svd", "secagg.enabled": True}, "secure aggregation reveals only the sum"),
    ({"federation.lora-rule": "svd", "federation.aggregator": "krum"}, "federation.aggregator = 'krum'"),
    ({"federation.lora-rule": "svd", "privacy.mode": "central", "federation.max-weight": 1},
     "central DP noises the sum"),
    ({"federation.lora-rule": "svd", "federation.server-optimizer": "fedyogi"}, "'fedyogi''s moments"),
    ({"simulation.tenant-ranks": "8,4,2,8"}, "need federation.lora-rule = svd (it is 'ab')"),
    ({"federation.lora-rule": "svd", "simulation.tenant-ranks": "8,4"}, "2 rank(s) for 4 tenant(s)"),
    ({"federation.lora-rule": "svd", "simulation.tenant-ranks": "8,4,9,0"}, "rank(s) [9, 0] outside 1..8"),
    ({"federation.lora-rule": "svd", "simulation.tenant-ranks": "8,4,two,8"}, "'two' is not an integer rank"),
])
def test_config_refuses_what_a_rule_cannot_do(flat, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(flat)


def test_config_accepts_ffa_with_secure_aggregation_and_svd_with_ranks():
    ffa = parse_config({"federation.lora-rule": "ffa", "secagg.enabled": True, "federation.server-optimizer": "fedadam"})
    svd = parse_config({"federation.lora-rule": "svd", "simulation.tenants": 2, "simulation.tenant-ranks": "4,2",
                        "privacy.mode": "local"})
    assert ffa.federation.lora_rule == "ffa" and svd.simulation.tenant_ranks == "4,2"
