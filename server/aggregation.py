"""Aggregation of LoRA deltas, in plain numpy, built around the weighted **sum**.

Every FedAvg-style aggregator needs only ``sum_k w_k * delta_k`` and ``sum_k w_k``.
The plain transport validates each reply here and hands the individual updates over;
secure aggregation reveals nothing but the same sum. Both end in a :class:`WeightedSum`
that :func:`apply_mean` turns into the next global adapter.

Aggregators live in a name -> class registry (:data:`AGGREGATORS`). ``fedavg`` needs only
the sum; the robust ones (``median``, ``trimmed-mean``, ``krum``) need every individual
update (``needs_individual_updates = True``) and are therefore refused at config time
together with secure aggregation (``fedlora.common.config``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import numpy as np

from fedlora.common.messages import REQUIRED_METRICS
from fedlora.common.weighting import tenant_weight

Arrays = Mapping[str, np.ndarray]


class Rejected(ValueError):
    """A reply that must not count, with the reason."""


@dataclass(frozen=True)
class Update:
    """One validated tenant update."""

    delta: "OrderedDict[str, np.ndarray]"
    num_examples: int                 # the tenant's claim
    weight: float                     # its weight in the sum (after the weighting rule and caps)
    metrics: dict[str, float]
    node: int = 0                     # the Flower node it came from
    notes: tuple[str, ...] = field(default=())  # what the server did to it (clipped, capped)

    def with_delta(self, delta, note: str) -> "Update":
        return replace(self, delta=delta, notes=(*self.notes, note))

    def with_weight(self, weight: float, note: str) -> "Update":
        return replace(self, weight=weight, notes=(*self.notes, note))


@dataclass(frozen=True)
class WeightedSum:
    """What aggregation needs — and all secure aggregation reveals."""

    total: "OrderedDict[str, np.ndarray]"  # sum_k w_k * delta_k
    weight: float                          # sum_k w_k
    count: int                             # number of updates summed
    # sum_k w_k ||delta_k||^2 / sum_k w_k, where the server saw the updates and a server
    # optimizer asked for it (fedexp); None otherwise.
    sq_norm_mean: float | None = None


def l2_norm(arrays: Arrays) -> float:
    """L2 norm of all tensors together: one BLAS dot product per tensor (in its dtype, with
    BLAS's blocked accumulation), summed in float64."""
    return math.sqrt(sum(float(np.dot(v.ravel(), v.ravel())) for v in arrays.values()))


def coordinate_median(stacked: np.ndarray) -> np.ndarray:
    """np.median(stacked, axis=0), through one sort along the first axis (several times
    faster than numpy's partition along a short strided axis)."""
    s = np.sort(stacked, axis=0)
    n = s.shape[0]
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / s.dtype.type(2)


def check_metric_keys(metrics: Mapping[str, float], protocol: frozenset[str], *,
                      required: frozenset[str] = REQUIRED_METRICS) -> None:
    """A reply's metric names: the ``required`` ones, and otherwise only names of the ``protocol``
    (a tenant's policy may withhold any other); raises :class:`Rejected`."""
    names = set(metrics)
    extra, missing = sorted(names - protocol), sorted(required - names)
    if extra or missing:
        raise Rejected(f"metric keys differ from the protocol: extra {extra}, missing {missing}")


# What each metric can be: (smallest, largest, whole number). Anything else is a broken or a
# lying tenant; a reply outside these is dropped, never averaged into the run's figures.
METRIC_RANGES: dict[str, tuple[float, float, bool]] = {
    "eval-exact-match": (0.0, 1.0, False), "eval-json-valid": (0.0, 1.0, False),
    "eval-loss": (0.0, math.inf, False), "eval-seconds": (0.0, math.inf, False),
    "train-loss": (0.0, math.inf, False), "train-first-loss": (0.0, math.inf, False),
    "train-steps": (0.0, math.inf, True), "train-tokens": (0.0, math.inf, True),
    "train-seconds": (0.0, math.inf, False), "truncated": (0.0, math.inf, True),
    "dp-epsilon": (0.0, math.inf, False), "tenant-id": (0.0, math.inf, True),
}


def check_metric_values(metrics: Mapping[str, float], *, max_examples: int) -> None:
    """Every metric a finite number in its range (:data:`METRIC_RANGES`), the example count a
    whole number in [1, ``max_examples``]; raises :class:`Rejected` naming the first that is not."""
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise Rejected(f"metric {k!r} is not a finite number: {v!r}")
        if k == "num-examples":
            if int(v) != v or not 1 <= v <= max_examples:
                raise Rejected(f"num-examples {v!r} out of range [1, {max_examples}]")
            continue
        lo, hi, whole = METRIC_RANGES.get(k, (-math.inf, math.inf, False))
        if not lo <= v <= hi or (whole and int(v) != v):
            raise Rejected(f"metric {k!r} = {v!r} is not {'a whole number ' if whole else ''}in [{lo:g}, {hi:g}]")


def validate_update(arrays: Arrays, metrics: Mapping[str, float], *, reference: Arrays,
                    expected_metrics: frozenset[str], max_examples: int,
                    weight_of: Callable[[int, int], float], node: int = 0,
                    check_shapes: Callable[[Arrays, Arrays], None] | None = None) -> Update:
    """Check one reply against the global adapter; raise :class:`Rejected` with the reason.

    Shapes must be the reference's, unless ``check_shapes(arrays, reference)`` is given: it
    then decides, raising :class:`Rejected` (``fedlora.server.lora_rules``: tenants of lower LoRA rank)."""
    check_metric_keys(metrics, expected_metrics)
    check_metric_values(metrics, max_examples=max_examples)
    n = metrics["num-examples"]
    names, ref_names = set(arrays), set(reference)
    if names != ref_names:
        extra, missing = sorted(names - ref_names), sorted(ref_names - names)
        raise Rejected(f"tensor names differ from the adapter: unknown {extra[:3]}, missing {missing[:3]}")
    if check_shapes is not None:
        check_shapes(arrays, reference)
    delta = OrderedDict()
    with np.errstate(over="ignore", invalid="ignore"):  # once per update, not per tensor (it costs microseconds)
        for k, ref in reference.items():
            arr = arrays[k]
            if check_shapes is None and arr.shape != ref.shape:
                raise Rejected(f"tensor {k}: shape {arr.shape} != expected {ref.shape}")
            if arr.dtype != ref.dtype:
                raise Rejected(f"tensor {k}: dtype {arr.dtype} != expected {ref.dtype}")
            # Fast path: a finite sum of squares proves every element finite (a NaN or an inf
            # makes the BLAS dot NaN or inf; squares cannot cancel). Only a non-finite dot — a
            # bad element, or finite elements whose squares overflow — pays for the exact check.
            flat = arr.reshape(-1)
            fast = arr.dtype in (np.float32, np.float64) and np.isfinite(np.dot(flat, flat))
            if not fast and not np.all(np.isfinite(arr)):
                raise Rejected(f"tensor {k}: contains NaN or Inf")
            delta[k] = arr
    return Update(delta=delta, num_examples=int(n), weight=float(weight_of(int(n), node)), metrics=dict(metrics),
                  node=node)


def weight_rule(rule: str, *, max_weight: int, caps: Mapping[int, int] | None = None) -> Callable[[int, int], float]:
    """(claimed example count, node) -> weight, by ``federation.weighting``, ``federation.max-weight``
    and the operator's per-node caps (``federation.example-caps``)."""
    caps = dict(caps or {})
    return lambda n, node=0: float(tenant_weight(min(n, caps.get(node, n)), rule=rule, max_weight=max_weight))


def weighted_sum(updates: list[Update]) -> WeightedSum:
    """sum_k w_k * delta_k, in float32, by pairwise summation over the updates.

    Why float32 and pairwise: the sum has to run at memory bandwidth, and on CPUs numpy's
    float64 arithmetic on float32 inputs (a cast, a multiply, an add per update) measured
    about half the speed of a memcpy of the inputs, while compensated (Kahan) float32
    needs four more passes per update and ran at a quarter. Pairwise summation costs what
    the plain running sum costs — one multiply and at most one add per update — but a
    term passes through at most ``ceil(log2 K)`` additions instead of ``K - 1``.

    How: each tensor is walked in blocks of 2^16 elements; within a block the weighted
    terms ``fl(w_k) * x`` are merged like a binary counter (the sum of 2^j updates' terms
    is added to the previous sum of 2^j), so the ``<= log2 K + 2`` partial sums stay in
    cache and every update is read from memory once. No temporaries per update.

    Error bound (u = 2^-24, float32 round-to-nearest; Higham, *Accuracy and Stability of
    Numerical Algorithms*, 2nd ed., §4.2): a term is rounded once for ``fl(w_k)``, once for
    the product and once per addition on its path, so with ``m = 2 + ceil(log2 K)``

        |computed - exact| <= m*u / (1 - m*u) * sum_k |w_k * delta_k|

    elementwise, unless a partial sum overflows float32 (the result is then inf) or a
    product underflows (each such product adds at most 2^-150 absolute). Integer weights
    below 2^24 are exact in float32 (then ``m = 1 + ceil(log2 K)``), and with integer
    weights and integer-valued deltas whose partial sums stay below 2^24 the sum is exact.
    """
    if not updates:
        raise ValueError("no updates to sum")
    block = 1 << 16  # elements (256 KB): a block's <= log2 K + 2 partial sums stay in cache
    weights = [np.float32(u.weight) for u in updates]
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for k, first in updates[0].delta.items():
        flats = [np.ravel(u.delta[k]) for u in updates]
        n = flats[0].size
        result = np.empty(n, dtype=np.float32)
        free: list[np.ndarray] = []  # block buffers not holding a partial sum
        for s in range(0, n, block):
            m = min(block, n - s)
            stack: list[tuple[int, np.ndarray]] = []  # (level, buffer holding the sum of 2^level terms)
            for x, w in zip(flats, weights):
                buf = free.pop() if free else np.empty(min(block, n), dtype=np.float32)
                np.multiply(x[s:s + m], w, out=buf[:m])
                level = 0
                while stack and stack[-1][0] == level:
                    _, left = stack.pop()
                    np.add(left[:m], buf[:m], out=left[:m])
                    free.append(buf)
                    buf, level = left, level + 1
                stack.append((level, buf))
            _, acc = stack.pop()
            while stack:  # fold the smaller blocks into the larger ones, smallest first
                _, left = stack.pop()
                np.add(left[:m], acc[:m], out=left[:m])
                free.append(acc)
                acc = left
            result[s:s + m] = acc[:m]
            free.append(acc)
        out[k] = result.reshape(first.shape)
    return WeightedSum(out, float(sum(u.weight for u in updates)), len(updates))


def mean_delta(agg: WeightedSum) -> "OrderedDict[str, np.ndarray]":
    if agg.weight <= 0:
        raise ValueError("total weight is zero")
    return OrderedDict((k, v / np.float32(agg.weight)) for k, v in agg.total.items())


def apply_mean(global_state: Arrays, agg: WeightedSum, *, server_lr: float) -> "OrderedDict[str, np.ndarray]":
    """global + server_lr * (weighted mean of deltas); server_lr = 1 is McMahan et al.'s FedAvg."""
    if agg.weight <= 0:
        raise ValueError("total weight is zero")
    scale = server_lr / agg.weight
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for k, v in global_state.items():
        step = np.multiply(agg.total[k], scale)  # one new array, then added into in place
        if np.result_type(v, step) == step.dtype and step.shape == np.shape(v):
            np.add(v, step, out=step)
            out[k] = step.astype(v.dtype, copy=False)
        else:
            out[k] = (v + step).astype(v.dtype)
    return out


# -- aggregators ----------------------------------------------------------------------------
class Aggregator:
    """Turns the round's updates into one :class:`WeightedSum` (whose mean is the step)."""

    name = "base"
    needs_individual_updates = False

    def combine(self, updates: list[Update]) -> tuple[WeightedSum, dict[str, Any]]:
        """The aggregate of individual updates, and what the rule decided (for the record)."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class FedAvg(Aggregator):
    """The weighted mean: needs only the sum, so it also runs under secure aggregation."""

    name = "fedavg"

    def combine(self, updates):
        return weighted_sum(updates), {}


def _stacked(updates: list[Update], k: str) -> np.ndarray:
    return np.stack([u.delta[k] for u in updates])


def _as_sum(mean: "OrderedDict[str, np.ndarray]", updates: list[Update]) -> WeightedSum:
    """A robust mean expressed as a WeightedSum over the updates' total weight."""
    w = float(sum(u.weight for u in updates))
    return WeightedSum(OrderedDict((k, (v.astype(np.float64) * w).astype(np.float32)) for k, v in mean.items()),
                       w, len(updates))


class Median(Aggregator):
    """Coordinate-wise median (Yin et al., 2018), unweighted: each coordinate is decided by
    the middle tenant, so fewer than half of the tenants cannot move it past the honest range."""

    name = "median"
    needs_individual_updates = True

    def combine(self, updates):
        mean = OrderedDict((k, coordinate_median(_stacked(updates, k)).astype(np.float32)) for k in updates[0].delta)
        return _as_sum(mean, updates), {}


class TrimmedMean(Aggregator):
    """Coordinate-wise beta-trimmed mean (Yin et al., 2018), unweighted: per coordinate the
    ``floor(beta * n)`` largest and smallest values are dropped and the rest averaged."""

    name = "trimmed-mean"
    needs_individual_updates = True

    def __init__(self, *, beta: float) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError("trimmed mean needs 0 <= beta < 0.5")
        self.beta = beta

    def describe(self) -> str:
        return f"trimmed-mean (beta {self.beta:g})"

    def combine(self, updates):
        n = len(updates)
        cut = int(math.floor(self.beta * n))
        if n - 2 * cut < 1:
            cut = (n - 1) // 2
        mean = OrderedDict()
        for k in updates[0].delta:
            s = np.sort(_stacked(updates, k), axis=0)
            mean[k] = s[cut:n - cut].mean(axis=0, dtype=np.float64).astype(np.float32)
        return _as_sum(mean, updates), {"trimmed_per_side": cut}


class MultiKrum(Aggregator):
    """Multi-Krum (Blanchard et al., 2017): score each update by the summed squared distance
    to its ``n - f - 2`` nearest others, keep the ``m`` best (``m = 0``: ``n - f``) and take
    their weighted mean. Tolerates ``f`` Byzantine tenants when ``n >= 2f + 3``."""

    name = "krum"
    needs_individual_updates = True

    def __init__(self, *, f: int, m: int) -> None:
        self.f, self.m = f, m

    def describe(self) -> str:
        return f"multi-krum (f {self.f}, m {self.m or 'n - f'})"

    def scores(self, updates: list[Update]) -> np.ndarray:
        n = len(updates)
        gram = np.zeros((n, n), dtype=np.float64)
        for k in updates[0].delta:
            x = _stacked(updates, k).reshape(n, -1).astype(np.float64)
            gram += x @ x.T
        sq = np.diag(gram)
        dist = np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)
        near = max(n - self.f - 2, 1)
        return np.array([np.sort(np.delete(dist[i], i))[:near].sum() for i in range(n)]) if n > 1 else np.zeros(1)

    def combine(self, updates):
        n = len(updates)
        keep = self.m or max(n - self.f, 1)
        keep = min(keep, n)
        picked = sorted(int(i) for i in np.argsort(self.scores(updates), kind="stable")[:keep])
        chosen = [updates[i] for i in picked]
        info = {"selected": [u.node for u in chosen],
                "rejected": [u.node for i, u in enumerate(updates) if i not in picked]}
        if n < 2 * self.f + 3:
            info["warning"] = f"{n} updates: Krum's guarantee needs at least 2f + 3 = {2 * self.f + 3}"
        return weighted_sum(chosen), info


AGGREGATORS: dict[str, type[Aggregator]] = {cls.name: cls for cls in (FedAvg, Median, TrimmedMean, MultiKrum)}


def make_aggregator(cfg) -> Aggregator:
    """The aggregator a :class:`fedlora.common.config.FederationConfig` names."""
    if cfg.aggregator == "trimmed-mean":
        return TrimmedMean(beta=cfg.trim_beta)
    if cfg.aggregator == "krum":
        return MultiKrum(f=cfg.krum_f, m=cfg.krum_m)
    try:
        return AGGREGATORS[cfg.aggregator]()
    except KeyError:
        raise ValueError(f"unknown aggregator {cfg.aggregator!r}; choose one of {', '.join(AGGREGATORS)}") from None
