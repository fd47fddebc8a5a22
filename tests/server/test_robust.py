"""Robust aggregators on hand-computed updates: median, trimmed mean, multi-Krum; and the
registry and the config agree on which need individual updates."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from fedlora.common.config import AGGREGATOR_NAMES, INDIVIDUAL_UPDATE_AGGREGATORS, parse_config
from fedlora.server.aggregation import AGGREGATORS, FedAvg, Median, MultiKrum, TrimmedMean, Update, make_aggregator


def _u(values, weight=1.0, node=0):
    """One update of a single 1 x len(values) tensor."""
    return Update(delta=OrderedDict([("w", np.asarray([values], np.float32))]), num_examples=int(weight),
                  weight=float(weight), metrics={}, node=node)


def _mean(agg):
    return agg.total["w"][0] / agg.weight


def test_median_takes_the_middle_value_per_coordinate():
    # Prepare: coordinate 0: 1, 2, 100 -> 2; coordinate 1: -5, 0, 3 -> 0
    updates = [_u([1, -5]), _u([2, 0]), _u([100, 3])]
    # Execute
    agg, _ = Median().combine(updates)
    # Assert
    np.testing.assert_allclose(_mean(agg), [2.0, 0.0])


def test_median_of_an_even_count_averages_the_middle_two():
    agg, _ = Median().combine([_u([1]), _u([2]), _u([4]), _u([1000])])
    np.testing.assert_allclose(_mean(agg), [3.0])


def test_trimmed_mean_drops_beta_n_at_each_end():
    # Prepare: 5 values, beta 0.2 -> one dropped at each end: mean(2, 3, 4) = 3
    updates = [_u([v]) for v in (1, 2, 3, 4, 1000)]
    # Execute
    agg, info = TrimmedMean(beta=0.2).combine(updates)
    # Assert
    np.testing.assert_allclose(_mean(agg), [3.0])
    assert info["trimmed_per_side"] == 1


def test_trimmed_mean_with_beta_zero_is_the_unweighted_mean():
    agg, _ = TrimmedMean(beta=0.0).combine([_u([1]), _u([2]), _u([6])])
    np.testing.assert_allclose(_mean(agg), [3.0])


def test_krum_scores_are_summed_squared_distances_to_the_nearest():
    # Prepare: points 0, 1, 2 and 10 on a line; n = 4, f = 1 -> n - f - 2 = 1 nearest neighbour
    updates = [_u([0], node=1), _u([1], node=2), _u([2], node=3), _u([10], node=4)]
    # Execute
    scores = MultiKrum(f=1, m=0).scores(updates)
    # Assert: nearest squared distances 1, 1, 1, 64
    np.testing.assert_allclose(scores, [1, 1, 1, 64])


def test_multi_krum_averages_the_m_best_and_leaves_the_outlier_out():
    # Prepare: as above; m = 0 keeps n - f = 3 updates, weighted 1, 1, 2
    updates = [_u([0], 1, node=1), _u([1], 1, node=2), _u([2], 2, node=3), _u([10], 1, node=4)]
    # Execute
    agg, info = MultiKrum(f=1, m=0).combine(updates)
    # Assert: weighted mean (0 + 1 + 4) / 4 = 1.25; node 4 rejected
    np.testing.assert_allclose(_mean(agg), [1.25])
    assert info["selected"] == [1, 2, 3] and info["rejected"] == [4]
    assert "2f + 3" in info["warning"]  # 4 < 5: the guarantee needs more tenants


def test_registry_and_config_agree_on_names_and_individual_updates():
    assert set(AGGREGATORS) == set(AGGREGATOR_NAMES)
    assert {n for n, cls in AGGREGATORS.items() if cls.needs_individual_updates} == INDIVIDUAL_UPDATE_AGGREGATORS
    assert not FedAvg.needs_individual_updates


@pytest.mark.parametrize("name, cls", [("fedavg", FedAvg), ("median", Median), ("trimmed-mean", TrimmedMean),
                                       ("krum", MultiKrum)])
def test_make_aggregator_builds_each_configured_rule(name, cls):
    cfg = parse_config({"federation.aggregator": name, "federation.trim-beta": 0.1, "federation.krum-f": 2})
    agg = make_aggregator(cfg.federation)
    assert isinstance(agg, cls)
    if name == "trimmed-mean":
        assert agg.beta == 0.1
    if name == "krum":
        assert agg.f == 2


@pytest.mark.parametrize("name", sorted(INDIVIDUAL_UPDATE_AGGREGATORS))
def test_robust_aggregators_are_refused_with_secure_aggregation_at_config_time(name):
    from fedlora.common.config import ConfigError

    with pytest.raises(ConfigError, match="needs individual updates"):
        parse_config({"federation.aggregator": name, "secagg.enabled": True})
