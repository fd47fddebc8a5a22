"""Aggregation of LoRA deltas, in plain numpy, built around the weighted **sum**.

Every FedAvg-style aggregator needs only ``sum_k w_k * delta_k`` and ``sum_k w_k``.
Plain transport computes that sum here from validated replies; secure aggregation
reveals nothing but the same sum — both feed :meth:`Aggregator.apply`. Aggregators that
need individual updates (median, trimmed mean, Krum) would declare
``needs_individual_updates = True`` and are refused at config time when the server may
only see sums.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

import numpy as np

Arrays = Mapping[str, np.ndarray]


class Rejected(ValueError):
    """A reply that must not count, with the reason."""


@dataclass(frozen=True)
class Update:
    """One validated tenant update."""

    delta: "OrderedDict[str, np.ndarray]"
    num_examples: int
    weight: float
    metrics: dict[str, float]


@dataclass(frozen=True)
class WeightedSum:
    """What aggregation needs — and all secure aggregation reveals."""

    total: "OrderedDict[str, np.ndarray]"  # sum_k w_k * delta_k
    weight: float                          # sum_k w_k
    count: int                             # number of updates summed


def fedavg_weight(num_examples: int, *, max_weight: int) -> float:
    """A tenant's FedAvg weight: its example count, capped."""
    return float(min(num_examples, max_weight))


def validate_update(arrays: Arrays, metrics: Mapping[str, float], *, reference: Arrays,
                    expected_metrics: frozenset[str], max_examples: int, max_weight: int) -> Update:
    """Check one reply against the global adapter; raise :class:`Rejected` with the reason."""
    keys = set(metrics)
    if keys != expected_metrics:
        extra, missing = sorted(keys - expected_metrics), sorted(expected_metrics - keys)
        raise Rejected(f"metric keys differ from the protocol: extra {extra}, missing {missing}")
    for k, v in metrics.items():
        if not isinstance(v, (int, float)) or not np.isfinite(v):
            raise Rejected(f"metric {k!r} is not a finite number: {v!r}")
    n = metrics["num-examples"]
    if int(n) != n or not 1 <= n <= max_examples:
        raise Rejected(f"num-examples {n!r} out of range [1, {max_examples}]")
    names, ref_names = set(arrays), set(reference)
    if names != ref_names:
        extra, missing = sorted(names - ref_names), sorted(ref_names - names)
        raise Rejected(f"tensor names differ from the adapter: unknown {extra[:3]}, missing {missing[:3]}")
    delta = OrderedDict()
    for k, ref in reference.items():
        arr = arrays[k]
        if arr.shape != ref.shape:
            raise Rejected(f"tensor {k}: shape {arr.shape} != expected {ref.shape}")
        if arr.dtype != ref.dtype:
            raise Rejected(f"tensor {k}: dtype {arr.dtype} != expected {ref.dtype}")
        if not np.all(np.isfinite(arr)):
            raise Rejected(f"tensor {k}: contains NaN or Inf")
        delta[k] = arr
    return Update(delta=delta, num_examples=int(n), weight=fedavg_weight(int(n), max_weight=max_weight),
                  metrics=dict(metrics))


def weighted_sum(updates: list[Update]) -> WeightedSum:
    """sum_k w_k * delta_k in float64, then float32."""
    if not updates:
        raise ValueError("no updates to sum")
    names = list(updates[0].delta)
    total = OrderedDict((k, np.zeros(updates[0].delta[k].shape, dtype=np.float64)) for k in names)
    for u in updates:
        for k in names:
            total[k] += u.weight * u.delta[k].astype(np.float64)
    return WeightedSum(OrderedDict((k, v.astype(np.float32)) for k, v in total.items()),
                       float(sum(u.weight for u in updates)), len(updates))


class Aggregator:
    """Turns a weighted sum of deltas into a new global adapter."""

    name = "base"
    needs_individual_updates = False

    def __init__(self, *, server_lr: float = 1.0) -> None:
        self.server_lr = server_lr

    def apply(self, global_state: Arrays, agg: WeightedSum) -> "OrderedDict[str, np.ndarray]":
        raise NotImplementedError


class FedAvg(Aggregator):
    """global + server_lr * (weighted mean of deltas); server_lr = 1 is McMahan et al.'s FedAvg."""

    name = "fedavg"

    def apply(self, global_state: Arrays, agg: WeightedSum) -> "OrderedDict[str, np.ndarray]":
        if agg.weight <= 0:
            raise ValueError("total weight is zero")
        scale = self.server_lr / agg.weight
        return OrderedDict((k, (v + scale * agg.total[k]).astype(v.dtype)) for k, v in global_state.items())


AGGREGATORS: dict[str, type[Aggregator]] = {cls.name: cls for cls in (FedAvg,)}


def make_aggregator(name: str, *, server_lr: float) -> Aggregator:
    try:
        return AGGREGATORS[name](server_lr=server_lr)
    except KeyError:
        raise ValueError(f"unknown aggregator {name!r}; choose one of {', '.join(AGGREGATORS)}") from None
