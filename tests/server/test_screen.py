"""The direction screen: an update pointing away from the round's consensus is dropped (flagged
only under central DP or with outlier-action = flag), on coordinates sampled with a secret key."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from fedlora.common.config import FederationConfig, parse_config
from fedlora.server.aggregation import FedAvg, Update
from fedlora.server.records import RoundRecorder
from fedlora.server.screen import DirectionScreen, _gather, sample
from fedlora.server.server_app import make_strategy
from fedlora.server.strategy import FedLoraStrategy
from fedlora.server.transport import Collected


def _u(values, node: int) -> Update:
    a = np.asarray(values[:2], np.float32).reshape(1, 2)
    b = np.asarray(values[2:], np.float32).reshape(2, 1)
    return Update(OrderedDict([("m.lora_A.weight", a), ("m.lora_B.weight", b)]), num_examples=10, weight=1.0,
                  metrics={}, node=node)


HONEST = [_u([1.0, 0.2, 0.5, 0.1], 1), _u([0.8, 0.1, 0.6, 0.0], 2), _u([1.2, 0.0, 0.4, 0.2], 3),
          _u([0.9, 0.3, 0.5, 0.1], 4)]
FLIPPED = _u([-1.0, -0.15, -0.5, -0.1], 5)  # sign-flipped at about the honest norm: under every norm bound


def _strategy(tmp_path, fed: FederationConfig | None = None, **kw) -> FedLoraStrategy:
    recorder = RoundRecorder(tmp_path, save=lambda *a: None)
    recorder.start_round(1, sampled=[u.node for u in [*HONEST, FLIPPED]], connected=5)
    s = FedLoraStrategy(fed or FederationConfig(norm_multiplier=3.0), FedAvg(), recorder, **kw)
    s._global = OrderedDict([("m.lora_A.weight", np.zeros((1, 2), np.float32)),
                             ("m.lora_B.weight", np.zeros((2, 1), np.float32))])
    return s


def test_sampled_coordinates_are_read_across_tensors_without_concatenating():
    # Prepare: tensors of 2, 3 and 1 elements: flat coordinates 0-1, 2-4 and 5
    delta = OrderedDict([("a", np.array([10.0, 11.0])), ("b", np.array([[12.0, 13.0, 14.0]])), ("c", np.array([15.0]))])
    # Execute / Assert: flat indices 1, 2, 2, 5 -> 11, 12, 12, 15; None -> every coordinate
    assert _gather(delta, np.array([1, 2, 2, 5])).tolist() == [11.0, 12.0, 12.0, 15.0]
    assert _gather(delta, None).tolist() == [10.0, 11.0, 12.0, 13.0, 14.0, 15.0]


def test_a_sample_of_many_runs_reads_the_same_values_as_the_concatenated_tensors():
    # Prepare: tensors of 6144 and 600 elements; 4,096 coordinates in 64 runs of 64 (some overlap)
    from fedlora.server.screen import _index

    rng = np.random.default_rng(1)
    delta = OrderedDict([("a", rng.normal(size=(12, 512))), ("b", rng.normal(size=(600,)))])
    flat = np.concatenate([v.ravel() for v in delta.values()])
    # Execute
    index, total = _index(delta, 4096, b"k", 3)
    # Assert
    assert total == 6744 and index.size == 4096 and np.all(np.diff(index) >= 0) and index.max() < total
    assert np.array_equal(_gather(delta, index), flat[index])


def test_the_sample_depends_on_the_key_and_the_round_and_is_the_same_for_both():
    # Prepare: updates of 1,000 coordinates, 64 sampled
    rng = np.random.default_rng(0)
    ups = [Update(OrderedDict([("x", rng.normal(size=1000).astype(np.float32))]), 1, 1.0, {}, node=n) for n in (1, 2, 3)]
    # Execute
    first = sample(ups, coordinates=64, key=b"k1", server_round=1)
    again = sample(ups, coordinates=64, key=b"k1", server_round=1)
    other_round = sample(ups, coordinates=64, key=b"k1", server_round=2)
    other_key = sample(ups, coordinates=64, key=b"k2", server_round=1)
    # Assert
    assert first.coordinates == 64 and first.total == 1000
    assert np.array_equal(first.index, again.index) and first.cosines == again.cosines
    assert not np.array_equal(first.index, other_round.index) and not np.array_equal(first.index, other_key.index)
    assert sample(ups, coordinates=0, key=b"k1", server_round=1).coordinates == 1000


def test_a_sign_flip_under_every_norm_bound_is_dropped_and_the_honest_mean_stays(tmp_path):
    # Prepare: the default screen (drop; cosine < 0 or < 0.5 x the median cosine)
    strategy = _strategy(tmp_path)
    # Execute
    summed, audits, info = strategy._aggregate(Collected(updates=[*HONEST, FLIPPED]), 1)
    # Assert: the flipped update's cosine to the median (0.9, 0.2, 0.5, 0.1) is negative: dropped;
    # the sum is the four honest ones' (3.9, 0.6, 2.0, 0.4) over weight 4
    assert audits[5].action == "dropped" and "direction: cosine -" in audits[5].why and audits[5].weight_share == 0
    assert not any(audits[n].outlier for n in (1, 2, 3, 4))
    assert summed.weight == 4.0 and summed.count == 4
    np.testing.assert_allclose(summed.total["m.lora_A.weight"].ravel(), [3.9, 0.6], rtol=1e-6)
    np.testing.assert_allclose(summed.total["m.lora_B.weight"].ravel(), [2.0, 0.4], rtol=1e-6)
    assert info["screen"].endswith("dropped") and info["audit_coordinates"] == "4 of 4"


def test_with_outlier_action_flag_it_is_aggregated_and_flagged(tmp_path):
    strategy = _strategy(tmp_path, FederationConfig(norm_multiplier=3.0, outlier_action="flag"))
    summed, audits, _ = strategy._aggregate(Collected(updates=[*HONEST, FLIPPED]), 1)
    assert audits[5].action == "accepted" and audits[5].outlier and summed.count == 5


def test_under_central_dp_the_screen_only_flags(tmp_path):
    # Prepare: the shipped central-DP scenario with outlier-action = drop
    from fedlora.simulations.scenario import load_scenario

    cfg = parse_config({**load_scenario("central_dp"), "federation.outlier-action": "drop"})
    recorder = RoundRecorder(tmp_path, save=lambda *a: None)
    recorder.start_round(1, sampled=list(range(1, 6)), connected=5)
    strategy = make_strategy(cfg, recorder)
    strategy._global = _strategy(tmp_path)._global
    # Execute
    summed, audits, info = strategy._aggregate(Collected(updates=[*HONEST, FLIPPED]), 1)
    # Assert: kept in the sum (the sensitivity the accountant assumes), but flagged
    assert summed.count == 5 and audits[5].outlier and audits[5].action == "accepted"
    assert info["screen"].endswith("flagged")


def test_with_fewer_than_three_updates_there_is_no_consensus_and_nothing_is_dropped(tmp_path):
    summed, audits, _ = _strategy(tmp_path)._aggregate(Collected(updates=[HONEST[0], FLIPPED]), 1)
    assert summed.count == 2 and not any(a.outlier for a in audits.values())


def test_the_key_is_drawn_per_run_and_survives_a_resume(tmp_path):
    # Prepare: two strategies, one resumed from the other's state
    first, second = _strategy(tmp_path / "a"), _strategy(tmp_path / "b")
    # Execute
    second.resume(1, first.resume_state())
    # Assert
    assert first._audit_key != _strategy(tmp_path / "c")._audit_key
    assert second._audit_key == first._audit_key


@pytest.mark.parametrize("action", ["drop", "flag", "none"])
def test_the_outlier_action_is_checked(action):
    if action == "none":
        with pytest.raises(Exception, match="outlier-action"):
            parse_config({"federation.outlier-action": action})
    else:
        assert parse_config({"federation.outlier-action": action}).federation.outlier_action == action
