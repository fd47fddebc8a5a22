"""Server-side bounds on individual updates (norm: absolute and adaptive, drop or clip;
weight: adaptive cap), weighting rules, and the per-tenant audit's outlier rule."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from fedlora.common.weighting import tenant_weight
from fedlora.server.aggregation import Update, l2_norm, weighted_sum
from fedlora.server.bounds import UpdateBounds, audit
from fedlora.server.screen import DirectionScreen, sample


def _u(vec, weight=1.0, node=0, n=None):
    return Update(delta=OrderedDict([("w", np.asarray(vec, np.float32))]), num_examples=int(n or weight),
                  weight=float(weight), metrics={}, node=node)


HONEST = [_u([3, 4], node=1), _u([0, 5], node=2), _u([4, 3], node=3)]  # norms 5, 5, 5



def _audit(updates, bounded, mean, screen):
    """The audit as the strategy runs it, with ``screen`` flagging (every coordinate sampled)."""
    view = sample(updates, coordinates=0, key=b"k", server_round=1)
    return audit(updates, bounded, bounded.kept, mean, view=view, outliers=screen.outliers(view))

def test_adaptive_bound_drops_an_update_over_multiplier_times_the_median():
    # Prepare: a fourth update of norm 500 (x100); median of (5, 5, 5, 500) = 5, bound 3 x 5 = 15
    updates = [*HONEST, _u([300, 400], node=4)]
    # Execute
    out = UpdateBounds(norm_multiplier=3.0, policy="drop").apply(updates)
    # Assert
    assert out.norm_bound == pytest.approx(15.0)
    assert [u.node for u in out.kept] == [1, 2, 3]
    assert out.actions[4][0] == "dropped" and "500" in out.actions[4][1]
    assert out.norms[4] == pytest.approx(500.0)


def test_clip_policy_scales_the_update_down_to_the_bound():
    out = UpdateBounds(norm_multiplier=3.0, policy="clip").apply([*HONEST, _u([300, 400], node=4)])
    clipped = out.kept[-1]
    assert out.actions[4][0] == "clipped"
    assert l2_norm(clipped.delta) == pytest.approx(15.0, rel=1e-6)
    np.testing.assert_allclose(clipped.delta["w"], [9.0, 12.0], rtol=1e-6)  # same direction


def test_absolute_bound_holds_even_when_most_updates_are_large():
    # Prepare: three of four updates of norm 50: the adaptive bound (150) would pass them all
    updates = [_u([30, 40], node=i) for i in (1, 2, 3)] + [_u([3, 4], node=4)]
    # Execute
    out = UpdateBounds(max_norm=10.0, norm_multiplier=3.0, policy="drop").apply(updates)
    # Assert: the tighter (absolute) bound applies
    assert out.norm_bound == 10.0 and [u.node for u in out.kept] == [4]


def test_no_bounds_accept_everything():
    out = UpdateBounds().apply([*HONEST, _u([300, 400], node=4)])
    assert out.norm_bound == 0.0 and len(out.kept) == 4
    assert all(a == "accepted" for a, _ in out.actions.values())


def test_weight_cap_is_a_multiple_of_the_median_weight():
    # Prepare: honest weights 64, 64, 64; one claims 1024; median 64, multiplier 2 -> cap 128
    updates = [_u([1, 0], 64, node=i) for i in (1, 2, 3)] + [_u([1, 0], 1024, node=4)]
    # Execute
    out = UpdateBounds(weight_multiplier=2.0).apply(updates)
    # Assert: its share of the sum is 128 / (3 x 64 + 128) = 0.4, not 1024 / 1216 = 0.84
    assert out.weight_bound == 128.0 and out.kept[-1].weight == 128.0
    assert out.actions[4][0] == "capped"
    assert weighted_sum(out.kept).weight == 320.0


@pytest.mark.parametrize("rule, n, cap, want", [
    ("examples", 500, 1024, 500), ("examples", 5000, 1024, 1024),
    ("sqrt-examples", 4096, 1024, 64), ("sqrt-examples", 2, 1024, 1), ("sqrt-examples", 10**6, 100, 100),
    ("uniform", 100_000, 1024, 1),
])
def test_weighting_rules(rule, n, cap, want):
    assert tenant_weight(n, rule=rule, max_weight=cap) == want


def test_audit_flags_a_sign_flipped_update_and_not_the_honest_ones():
    # Prepare: three similar honest updates and one pointing the other way (within the bound)
    honest = [_u([1.0, 0.1], node=1), _u([1.0, -0.1], node=2), _u([0.9, 0.0], node=3)]
    flipped = _u([-1.0, 0.0], node=4)
    updates = [*honest, flipped]
    bounds = UpdateBounds(norm_multiplier=3.0)
    bounded = bounds.apply(updates)
    agg = weighted_sum(bounded.kept)
    mean = OrderedDict((k, v / agg.weight) for k, v in agg.total.items())
    # Execute
    report = _audit(updates, bounded, mean, DirectionScreen(ratio=0.0, action="flag"))
    # Assert: the coordinate-wise median is (0.95, 0): node 4's cosine to it is -1 (flagged);
    # the honest ones' is near 1 (not flagged)
    assert report[4].outlier and report[4].cosine_median == pytest.approx(-1.0, abs=1e-6)
    assert report[1].cosine_median == pytest.approx(0.995, abs=1e-3)
    assert not any(report[n].outlier for n in (1, 2, 3))
    assert sum(a.weight_share for a in report.values()) == pytest.approx(1.0)


def test_audit_records_dropped_updates_with_no_weight():
    updates = [*HONEST, _u([300, 400], node=4)]
    bounded = UpdateBounds(norm_multiplier=3.0).apply(updates)
    agg = weighted_sum(bounded.kept)
    report = _audit(updates, bounded, OrderedDict((k, v / agg.weight) for k, v in agg.total.items()),
                    DirectionScreen(ratio=0.0, action="flag"))
    assert report[4].action == "dropped" and report[4].weight_share == 0.0 and report[4].outlier
    assert report[4].norm == pytest.approx(500.0) and report[4].bound == pytest.approx(15.0)
    assert report[1].weight_share == pytest.approx(1 / 3, abs=1e-3)


def test_operator_cap_overrides_a_nodes_own_claim():
    from fedlora.server.aggregation import weight_rule

    # Prepare: node 7 is capped at 64 examples by the operator; node 8 has no cap
    weight_of = weight_rule("examples", max_weight=1024, caps={7: 64})
    # Execute / Assert: node 7's claim of 100000 counts 64; node 8's 500 counts 500
    assert weight_of(100_000, 7) == 64 and weight_of(500, 8) == 500 and weight_of(10, 7) == 10


def test_example_caps_are_parsed_and_bad_entries_named():
    from fedlora.common.config import ConfigError, parse_config
    from fedlora.common.weighting import parse_caps

    assert parse_caps("12:4096, 7:64") == {12: 4096, 7: 64}
    with pytest.raises(ConfigError, match="'7=64' is not NODE-ID:MAX-EXAMPLES"):
        parse_config({"federation.example-caps": "12:4096,7=64"})


def test_audit_flags_an_update_that_agrees_with_the_consensus_far_less_than_the_others():
    # Prepare: three updates near (1, 0) and one at 80 degrees from them (cosine ~0.17, > 0)
    updates = [_u([1.0, 0.05], node=1), _u([1.0, -0.05], node=2), _u([1.0, 0.0], node=3), _u([0.17, 0.98], node=4)]
    bounded = UpdateBounds().apply(updates)
    agg = weighted_sum(bounded.kept)
    mean = OrderedDict((k, v / agg.weight) for k, v in agg.total.items())
    # Execute: the absolute rule alone, then with the ratio rule (0.5 x the round's median cosine ~1)
    alone = _audit(updates, bounded, mean, DirectionScreen(ratio=0.0, action="flag"))
    ratio = _audit(updates, bounded, mean, DirectionScreen(ratio=0.5, action="flag"))
    # Assert
    assert not alone[4].outlier
    assert ratio[4].outlier and "x the round's median cosine" in ratio[4].why
    assert not any(ratio[n].outlier for n in (1, 2, 3))


def test_a_round_of_mostly_zero_updates_keeps_the_absolute_bound():
    # Prepare: three zero updates make the median norm 0; the fourth has norm 500, the absolute bound is 10
    updates = [_u([0, 0], node=1), _u([0, 0], node=2), _u([0, 0], node=3), _u([300, 400], node=4)]
    # Execute
    out = UpdateBounds(max_norm=10.0, norm_multiplier=3.0, policy="drop").apply(updates)
    # Assert: no adaptive bound from a zero median, and the absolute one still drops the norm-500 update
    assert out.norm_bound == pytest.approx(10.0)
    assert out.actions[4][0] == "dropped" and [u.node for u in out.kept] == [1, 2, 3]
