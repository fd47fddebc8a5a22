"""Server-side bounds on individual updates, and the per-tenant audit of a round.

Only the plain transport shows the server individual updates; there, before anything is
summed:

* **weight**: no tenant weighs more than ``federation.weight-multiplier`` x the round's
  median weight (besides ``federation.max-weight`` and the weighting rule, applied at
  validation); a tenant over it is capped;
* **norm**: each delta's L2 norm is held to the tighter of ``federation.max-update-norm``
  (absolute) and ``federation.norm-multiplier`` x the round's median norm (adaptive); an
  update over it is dropped or scaled down to it (``federation.bound-policy``).

The median is over the round's validated updates, so the adaptive bounds hold while fewer
than half of a round's tenants collude; the absolute bound holds regardless.

:func:`audit` then records, per tenant: its norm as received, its cosine similarity to the
aggregate and to the round's coordinate-wise median update, its share of the weight, what
was done to it, and whether the outlier rule flags it (README, "A federation survives its
worst tenant").
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlora.common.records import TenantAudit
from fedlora.server.aggregation import Update, coordinate_median, l2_norm


@dataclass
class Bounded:
    """The updates that go on to the aggregator, and what the bounds did."""

    kept: list[Update]
    norms: dict[int, float]            # node -> L2 norm as received
    actions: dict[int, tuple[str, str]]  # node -> (accepted|clipped|dropped, why)
    norm_bound: float                  # 0: none in force
    weight_bound: float                # 0: none in force


class UpdateBounds:
    """Weight and norm bounds on a round's individual updates."""

    def __init__(self, *, max_norm: float = 0.0, norm_multiplier: float = 0.0, policy: str = "drop",
                 weight_multiplier: float = 0.0) -> None:
        if policy not in ("drop", "clip"):
            raise ValueError(f"bound policy {policy!r}: choose drop or clip")
        self.max_norm, self.norm_multiplier = max_norm, norm_multiplier
        self.policy, self.weight_multiplier = policy, weight_multiplier

    @classmethod
    def from_config(cls, fed) -> "UpdateBounds":
        return cls(max_norm=fed.max_update_norm, norm_multiplier=fed.norm_multiplier, policy=fed.bound_policy,
                   weight_multiplier=fed.weight_multiplier)

    def describe(self) -> str:
        parts = []
        if self.max_norm:
            parts.append(f"L2 norm <= {self.max_norm:g}")
        if self.norm_multiplier:
            parts.append(f"L2 norm <= {self.norm_multiplier:g} x the round's median")
        if parts:
            parts[-1] += f" ({self.policy})"
        if self.weight_multiplier:
            parts.append(f"weight <= {self.weight_multiplier:g} x the round's median (capped)")
        return "; ".join(parts) or "none"

    def norm_bound(self, norms: list[float]) -> float:
        """The tighter of the absolute and the adaptive bound (0: none). A median norm of 0 (half
        the round sent nothing) gives no adaptive bound, and never switches the absolute one off."""
        bounds = []
        if self.max_norm:
            bounds.append(self.max_norm)
        if self.norm_multiplier and norms and statistics.median(norms) > 0:
            bounds.append(self.norm_multiplier * statistics.median(norms))
        return min(bounds) if bounds else 0.0

    def apply(self, updates: list[Update]) -> Bounded:
        norms = {u.node: l2_norm(u.delta) for u in updates}
        actions: dict[int, tuple[str, str]] = {u.node: ("accepted", "") for u in updates}
        weight_bound = (self.weight_multiplier * statistics.median(u.weight for u in updates)
                        if self.weight_multiplier and updates else 0.0)
        bound = self.norm_bound(list(norms.values()))
        kept = []
        for u in updates:
            if weight_bound and u.weight > weight_bound:
                u = u.with_weight(weight_bound, f"weight {u.weight:g} capped at {weight_bound:g}")
                actions[u.node] = ("capped", u.notes[-1])
            norm = norms[u.node]
            if bound and norm > bound:
                why = f"L2 norm {norm:.4g} over the bound {bound:.4g}"
                if self.policy == "drop":
                    actions[u.node] = ("dropped", why)
                    continue
                u = u.with_delta(_scaled(u.delta, bound / norm), f"clipped: {why}")
                actions[u.node] = ("clipped", why)
            kept.append(u)
        return Bounded(kept, norms, actions, bound, weight_bound)


def _scaled(delta, factor: float) -> "OrderedDict[str, np.ndarray]":
    return OrderedDict((k, (v * np.float32(factor)).astype(v.dtype)) for k, v in delta.items())


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = math.sqrt(float(a @ a)), math.sqrt(float(b @ b))
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0


def _flat(delta) -> np.ndarray:
    return np.concatenate([v.ravel() for v in delta.values()])


def audit(received: list[Update], bounded: Bounded, kept: list[Update], aggregate_mean, *,
          outlier_cosine: float, outlier_cosine_ratio: float = 0.0,
          excluded: dict[int, str] | None = None) -> dict[int, TenantAudit]:
    """Per-tenant audit of one round: ``received`` as validated, ``kept`` as summed.

    Outlier rule: a tenant is flagged when a bound acted on it (dropped, clipped, weight
    capped), when the aggregator left it out (``excluded``), or, with three or more
    updates, when the cosine similarity of its update to the coordinate-wise median of the
    round's received updates is below ``outlier_cosine`` or below ``outlier_cosine_ratio``
    x the round's median of those cosines (an update that agrees with the consensus much
    less than the others do)."""
    excluded = excluded or {}
    flats = {u.node: _flat(u.delta) for u in received}
    # The reference is the coordinate-wise median of what was received: fewer than half of
    # the tenants cannot move it far, so an attacker does not drag the honest ones' score.
    reference = coordinate_median(np.stack(list(flats.values()))) if flats else None
    agg = _flat(aggregate_mean) if aggregate_mean is not None else None
    total_weight = sum(u.weight for u in kept if u.node not in excluded) or 1.0
    weights = {u.node: u.weight for u in kept}
    cosines = {n: _cosine(x, reference) if len(flats) > 2 else 1.0 for n, x in flats.items()}
    typical = statistics.median(cosines.values()) if cosines else 1.0
    out = {}
    for u in received:
        x = flats[u.node]
        loo = cosines[u.node]
        action, why = bounded.actions.get(u.node, ("accepted", ""))
        if u.node in excluded:
            action, why = "excluded", excluded[u.node]
        reasons = [why] if action != "accepted" else []
        if loo < outlier_cosine:
            reasons.append(f"cosine {loo:.2f} to the round's median update is below {outlier_cosine:g}")
        elif outlier_cosine_ratio and typical > 0 and loo < outlier_cosine_ratio * typical:
            reasons.append(f"cosine {loo:.2f} to the round's median update is below {outlier_cosine_ratio:g} x "
                           f"the round's median cosine {typical:.2f}")
        w = weights.get(u.node, 0.0) if action not in ("dropped", "excluded") else 0.0
        out[u.node] = TenantAudit(
            norm=round(bounded.norms.get(u.node, 0.0), 6), cosine=round(_cosine(x, agg), 4) if agg is not None else 0.0,
            cosine_median=round(loo, 4), weight_share=round(w / total_weight, 4), weight=w,
            claimed_examples=u.num_examples, action=action, bound=round(bounded.norm_bound, 6),
            outlier=bool(reasons), why="; ".join(reasons))
    return out


def bounds_info(bounds: UpdateBounds, bounded: Bounded) -> dict[str, Any]:
    return {"bounds": bounds.describe(), "norm_bound": bounded.norm_bound, "weight_bound": bounded.weight_bound}
