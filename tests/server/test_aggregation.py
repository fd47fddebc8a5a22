"""Aggregation around the weighted sum: exact on hand-computed values; validation refuses bad replies."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from fedlora.common.messages import TRAIN_METRICS
from fedlora.server.aggregation import Rejected, Update, apply_mean, validate_update, weight_rule, weighted_sum

REF = OrderedDict([("a.lora_A.weight", np.zeros((2, 3), np.float32)), ("a.lora_B.weight", np.zeros((3, 2), np.float32))])


def _metrics(n=10, **extra):
    m = {k: 1.0 for k in TRAIN_METRICS}
    m.update({"num-examples": n, "tenant-id": 0}, **extra)
    return m


def _update(value, n, cap=1000):
    delta = OrderedDict((k, np.full(v.shape, value, np.float32)) for k, v in REF.items())
    return validate_update(delta, _metrics(n), reference=REF, expected_metrics=TRAIN_METRICS,
                           max_examples=10_000, weight_of=weight_rule("examples", max_weight=cap))


def test_fedavg_is_the_example_weighted_mean_of_deltas():
    # Prepare: deltas 1, 2, 4 with 10, 30, 60 examples -> (10 + 60 + 240) / 100 = 3.1
    updates = [_update(1.0, 10), _update(2.0, 30), _update(4.0, 60)]
    glob = OrderedDict((k, np.full(v.shape, 0.5, np.float32)) for k, v in REF.items())
    # Execute
    agg = weighted_sum(updates)
    new = apply_mean(glob, agg, server_lr=1.0)
    # Assert
    assert agg.weight == 100 and agg.count == 3
    np.testing.assert_allclose(agg.total["a.lora_A.weight"], 310.0)
    np.testing.assert_allclose(new["a.lora_B.weight"], 0.5 + 3.1, rtol=1e-6)


def test_weight_cap_limits_one_tenant():
    # 10 examples vs a claimed 5000 capped at 100: mean = (1*10 + 5*100) / 110
    updates = [_update(1.0, 10, cap=100), _update(5.0, 5000, cap=100)]
    agg = weighted_sum(updates)
    np.testing.assert_allclose(agg.total["a.lora_A.weight"] / agg.weight, 510 / 110, rtol=1e-6)


def test_server_learning_rate_scales_the_step():
    new = apply_mean(REF, weighted_sum([_update(2.0, 10)]), server_lr=0.5)
    np.testing.assert_allclose(new["a.lora_A.weight"], 1.0)


@pytest.mark.parametrize("mutate, reason", [
    (lambda d, m: d.__setitem__("a.lora_A.weight", np.full((2, 3), np.nan, np.float32)), "NaN or Inf"),
    (lambda d, m: d.__setitem__("a.lora_A.weight", np.zeros((3, 3), np.float32)), "shape"),
    (lambda d, m: d.__setitem__("a.lora_A.weight", np.zeros((2, 3), np.float64)), "dtype"),
    (lambda d, m: d.__setitem__("model.embed_tokens.weight", np.zeros((2, 3), np.float32)), "unknown"),
    (lambda d, m: d.pop("a.lora_B.weight"), "missing"),
    (lambda d, m: m.__setitem__("secret", 1.0), "extra ['secret']"),
    (lambda d, m: m.pop("tenant-id"), "missing ['tenant-id']"),
    (lambda d, m: m.__setitem__("train-text", 1.0), "extra ['train-text']"),
    (lambda d, m: m.__setitem__("num-examples", 10**9), "out of range"),
    (lambda d, m: m.__setitem__("num-examples", 0), "out of range"),
    (lambda d, m: m.__setitem__("train-loss", float("inf")), "not a finite number"),
])
def test_bad_reply_is_rejected_with_reason(mutate, reason):
    delta = OrderedDict((k, v.copy()) for k, v in REF.items())
    metrics = _metrics()
    mutate(delta, metrics)
    with pytest.raises(Rejected, match=reason.replace("[", r"\[").replace("]", r"\]")):
        validate_update(delta, metrics, reference=REF, expected_metrics=TRAIN_METRICS,
                        max_examples=100_000, weight_of=weight_rule("examples", max_weight=1000))


def test_update_keeps_count_and_capped_weight():
    u = _update(0.0, 500, cap=64)
    assert isinstance(u, Update) and u.num_examples == 500 and u.weight == 64


def _raw(delta, weight):
    """An update as weighted_sum sees it, without validation (sizes beyond REF's)."""
    return Update(delta=delta, num_examples=1, weight=weight, metrics={})


@pytest.mark.parametrize("count", [1, 2, 7, 50])
def test_weighted_sum_is_within_its_documented_bound_of_the_exact_sum(count):
    # Prepare: random deltas of mixed sign and magnitude, non-integer weights; one tensor
    # longer than a summation block (2^15 elements), one shorter.
    from fractions import Fraction

    rng = np.random.default_rng(count)
    sizes = {"a": (1 << 15) + 37, "b": 5}
    updates = [_raw(OrderedDict((k, (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4, n)).astype(np.float32))
                                for k, n in sizes.items()), float(rng.uniform(0.1, 300)))
               for _ in range(count)]
    # Execute
    got = weighted_sum(updates).total
    # Assert: |got - exact| <= m u / (1 - m u) * sum |w x|, m = 2 + ceil(log2 K), u = 2^-24,
    # on a sample of coordinates (exact rational arithmetic), including both ends of the block
    m = 2 + int(np.ceil(np.log2(count)))
    gamma = m * 2.0**-24 / (1 - m * 2.0**-24)
    for k, idx in (("a", [0, 1, 4095, (1 << 15) - 1, 1 << 15, (1 << 15) + 36, *rng.integers(0, 1 << 15, 40)]),
                   ("b", range(5))):
        for i in idx:
            exact = sum(Fraction(u.weight) * Fraction(float(u.delta[k][i])) for u in updates)
            scale = sum(abs(Fraction(u.weight) * Fraction(float(u.delta[k][i]))) for u in updates)
            assert abs(Fraction(float(got[k][i])) - exact) <= Fraction(gamma) * scale, (k, i)


def test_weighted_sum_is_exact_for_integer_weights_and_values():
    # Prepare: 33 updates (not a power of two) of small integers, integer weights;
    # every partial sum is an integer far below 2^24, so float32 holds it exactly.
    rng = np.random.default_rng(1)
    deltas = [rng.integers(-100, 101, (3, 40000)).astype(np.float32) for _ in range(33)]
    weights = [int(w) for w in rng.integers(1, 50, 33)]
    # Execute
    agg = weighted_sum([_raw(OrderedDict(x=d), float(w)) for d, w in zip(deltas, weights)])
    # Assert: equal to the integer sum, shape and dtype kept
    want = sum(w * d.astype(np.int64) for d, w in zip(deltas, weights))
    assert agg.total["x"].dtype == np.float32 and agg.total["x"].shape == (3, 40000)
    np.testing.assert_array_equal(agg.total["x"], want.astype(np.float32))
    assert agg.weight == sum(weights) and agg.count == 33


@pytest.mark.parametrize("where", [0, 1, 4097, 99_999])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_non_finite_element_anywhere_is_rejected(where, bad):
    ref = OrderedDict(x=np.zeros(100_000, np.float32))
    delta = OrderedDict(x=np.ones(100_000, np.float32))
    delta["x"][where] = bad
    with pytest.raises(Rejected, match="NaN or Inf"):
        validate_update(delta, _metrics(), reference=ref, expected_metrics=TRAIN_METRICS,
                        max_examples=100, weight_of=weight_rule("examples", max_weight=1000))


def test_huge_finite_values_are_accepted_although_their_squares_overflow():
    ref = OrderedDict(x=np.zeros(4, np.float32))
    delta = OrderedDict(x=np.array([3e38, -3e38, 1e30, 0], np.float32))
    u = validate_update(delta, _metrics(), reference=ref, expected_metrics=TRAIN_METRICS,
                        max_examples=100, weight_of=weight_rule("examples", max_weight=1000))
    assert u.delta["x"] is delta["x"]
