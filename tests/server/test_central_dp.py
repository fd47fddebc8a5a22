"""Central DP: noise once on the sum, calibrated to the updates actually received;
epsilon accounted per round with the sampling rate."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Error, Message, MetricRecord, RecordDict

from fedlora.common import messages as keys
from fedlora.common.adapter import from_arrayrecord, to_arrayrecord
from fedlora.common.config import ConfigError, FederationConfig, parse_config
from fedlora.server.aggregation import FedAvg, WeightedSum
from fedlora.server.central_dp import CentralGaussian, NoServerPrivacy, make_server_privacy
from fedlora.server.records import RoundRecorder
from fedlora.server.strategy import FedLoraStrategy
from tests.server.test_strategy import FakeGrid, _task_identity  # noqa: F401  (fixture)

BIG = OrderedDict([("x.lora_A.weight", np.zeros((100, 200), np.float32)),
                   ("x.lora_B.weight", np.zeros((200, 100), np.float32))])


def zero_update(tenant, value=0.0):
    """A well-formed reply whose delta is ``value`` everywhere (zero: the new global is the
    noise alone; 100: a tenant that skipped its client-side clip)."""
    def reply(msg):
        delta = OrderedDict((k, np.full(v.shape, value, np.float32)) for k, v in BIG.items())
        m = {k: 1.0 for k in keys.TRAIN_METRICS}
        m.update({keys.NUM_EXAMPLES: 10, keys.TENANT: tenant})
        return Message(RecordDict({keys.ARRAYS: to_arrayrecord(delta), keys.METRICS: MetricRecord(m)}), reply_to=msg)
    return reply


def declined(msg):
    return Message(Error(code=4030, reason="privacy budget exhausted"), reply_to=msg)


def _run(tmp_path, behaviour, *, sigma=2.0, clip=0.5, rounds=1, seed=0):
    rec = RoundRecorder(tmp_path, save=lambda p, s, r: None)
    privacy = CentralGaussian(noise_multiplier=sigma, clip=clip, delta=1e-5, rng=np.random.default_rng(seed))
    fed = FederationConfig(min_train_nodes=2, round_timeout=2.0, max_weight=1, fraction_evaluate=0.0)
    strategy = FedLoraStrategy(fed, FedAvg(), rec, privacy=privacy)
    result = strategy.start(grid=FakeGrid(behaviour), initial_arrays=to_arrayrecord(BIG), num_rounds=rounds,
                            timeout=5)
    return from_arrayrecord(result.arrays), privacy


def test_noise_is_calibrated_to_the_received_count(tmp_path):
    # Prepare: 5 tenants sampled, 3 decline, 2 send zero deltas; sigma 2, clip 0.5
    behaviour = {1: zero_update(0), 2: zero_update(1), 3: declined, 4: declined, 5: declined}
    # Execute: one round
    final, _ = _run(tmp_path, behaviour)
    # Assert: the mean's noise std is sigma * clip / received = 0.5, not / sampled = 0.2
    values = np.concatenate([v.ravel() for v in final.values()])
    assert values.std() == pytest.approx(2.0 * 0.5 / 2, rel=0.03)
    assert abs(values.mean()) < 0.01
    record = json.loads((tmp_path / "metrics" / "round_001.json").read_text())
    assert record["privacy"]["received"] == 2 and record["privacy"]["sampled"] == 5
    assert record["privacy"]["noise_std_mean"] == pytest.approx(0.5)
    assert record["privacy"]["noise_std_sum"] == pytest.approx(1.0)


def test_epsilon_is_accounted_per_round_with_the_sampling_rate(tmp_path):
    from opacus.accountants import RDPAccountant

    # Prepare: 4 connected tenants, all sampled (rate 1), 3 rounds at sigma 2
    behaviour = {n: zero_update(n) for n in (1, 2, 3, 4)}
    # Execute
    _, privacy = _run(tmp_path, behaviour, rounds=3)
    # Assert: each round's record carries the accountant's epsilon after that many rounds
    for r in (1, 2, 3):
        acc = RDPAccountant()
        acc.history = [(2.0, 1.0, r)]
        record = json.loads((tmp_path / "metrics" / f"round_{r:03d}.json").read_text())
        assert record["privacy"]["sample_rate"] == 1.0
        assert record["privacy"]["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert privacy.epsilon() == pytest.approx(record["privacy"]["epsilon"])


def test_gaussian_mechanism_on_a_sum_has_std_sigma_times_clip():
    # Prepare: a sum of 4 equally weighted updates
    total = OrderedDict([("a", np.full((400, 500), 8.0, np.float32))])
    agg = WeightedSum(total, weight=4.0, count=4)
    mech = CentralGaussian(noise_multiplier=1.5, clip=0.2, delta=1e-5, rng=np.random.default_rng(1))
    # Execute
    noisy = mech.on_server_aggregate(agg, received=4, sampled=4, connected=8)
    # Assert: noise std 0.3 on the sum; weight and count unchanged; rate 4 / 8
    noise = noisy.total["a"] - 8.0
    assert noise.std() == pytest.approx(0.3, rel=0.01)
    assert (noisy.weight, noisy.count) == (4.0, 4)
    assert mech.round_report()["sample_rate"] == 0.5


def test_unequal_weights_are_refused():
    agg = WeightedSum(OrderedDict([("a", np.zeros(3, np.float32))]), weight=20.0, count=2)
    mech = CentralGaussian(noise_multiplier=1.0, clip=1.0, delta=1e-5)
    with pytest.raises(ValueError, match="max-weight = 1"):
        mech.on_server_aggregate(agg, received=2, sampled=2, connected=2)


def test_central_dp_config_needs_unit_weights():
    with pytest.raises(ConfigError, match="federation.max-weight: central DP needs 1"):
        parse_config({"privacy.mode": "central"})
    cfg = parse_config({"privacy.mode": "central", "federation.max-weight": 1})
    assert isinstance(make_server_privacy(cfg.privacy), CentralGaussian)
    assert isinstance(make_server_privacy(parse_config({}).privacy), NoServerPrivacy)


def test_without_privacy_the_sum_is_untouched_and_nothing_is_reported():
    agg = WeightedSum(OrderedDict([("a", np.ones(3, np.float32))]), weight=3.0, count=3)
    mech = NoServerPrivacy()
    assert mech.on_server_aggregate(agg, received=3, sampled=5, connected=5) is agg
    assert mech.round_report() == {}


def test_tenant_clips_its_delta_before_it_leaves(monkeypatch, tmp_path):
    from fedlora.client.privacy import WITHHELD_UNDER_LOCAL_DP
    from fedlora.common.adapter import get_state
    from tests.client.test_ledger import _tenant_app, _train_request
    from tests.client.test_privacy import tiny_lora

    # Prepare: the real ClientApp on a tiny model, central DP with clip 0.01
    model = tiny_lora()
    _, handle = _tenant_app(monkeypatch, tmp_path, model, mode="central", extra={"federation.max-weight": 1},
                            **{"central-clip": 0.01})
    # Execute: one training round
    reply = handle(_train_request(get_state(model)))
    # Assert: the delta that left has L2 norm 0.01 (training moved it further); the reply's local epsilon
    # is 0, the ledger records the release as epsilon = inf (no local DP)
    delta = from_arrayrecord(reply.content.array_records[keys.ARRAYS])
    norm = float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in delta.values())))
    assert norm == pytest.approx(0.01, rel=1e-4)
    metrics = dict(reply.content.metric_records[keys.METRICS])
    assert metrics[keys.DP_EPSILON] == 0.0 and metrics["train-loss"] > 0  # nothing withheld: no local DP
    assert WITHHELD_UNDER_LOCAL_DP <= set(metrics)
    from fedlora.client.ledger import PrivacyLedger

    ledger = PrivacyLedger(tmp_path / "state")
    assert [(e["kind"], e["mechanism"]) for e in ledger.entries()] == [("release", "central")]
    assert ledger.epsilon(delta=1e-5) == float("inf")


def test_server_clips_an_unclipped_update_so_the_noised_sum_moves_by_at_most_the_clip(tmp_path):
    # Prepare: the same noise (same seed) with two honest zero updates plus either a third
    # zero update or an unclipped one of norm 100 * sqrt(40000) = 20000
    honest = {1: zero_update(0), 2: zero_update(1)}
    # Execute
    clean, _ = _run(tmp_path / "clean", {**honest, 3: zero_update(2)}, sigma=1.0, clip=0.5, seed=7)
    attacked, _ = _run(tmp_path / "attacked", {**honest, 3: zero_update(2, value=100.0)}, sigma=1.0, clip=0.5, seed=7)
    # Assert: the mean moved by at most clip / received, i.e. the sum by at most the clip
    moved = np.sqrt(sum(float(np.sum((attacked[k].astype(np.float64) - clean[k]) ** 2)) for k in BIG))
    assert moved * 3 <= 0.5 * (1 + 1e-5)
    assert moved * 3 == pytest.approx(0.5, rel=1e-3)  # it did count, clipped to exactly the clip
