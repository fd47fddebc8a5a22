"""Aggregation around the weighted sum: exact on hand-computed values; validation refuses bad replies."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from common.messages import TRAIN_METRICS
from server.aggregation import Rejected, Update, apply_mean, validate_update, weight_rule, weighted_sum

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
    (lambda d, m: m.pop("train-loss"), "missing ['train-loss']"),
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
