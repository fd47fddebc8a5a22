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
aggregate and to the round's coordinate-wise median update (on the screen's sampled
coordinates, :mod:`fedlora.server.screen`), its share of the weight, what was done to it, and
whether it was flagged (README, "A federation survives its worst tenant").
"""

from __future__ import annotations

import statistics
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlora.common.records import TenantAudit
from fedlora.server.aggregation import Update, l2_norm
from fedlora.server.screen import Sample


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


def audit(received: list[Update], bounded: Bounded, kept: list[Update], aggregate, *, view: Sample,
          outliers: dict[int, str], excluded: dict[int, str] | None = None) -> dict[int, TenantAudit]:
    """Per-tenant audit of one round: ``received`` as validated, ``kept`` as summed, ``aggregate``
    their sum (or mean: the cosine is the same), ``view`` their sampled coordinates
    (:func:`fedlora.server.screen.sample`) and ``outliers`` what the direction screen found
    (:class:`fedlora.server.screen.DirectionScreen`).

    A tenant is flagged when a bound acted on it (dropped, clipped, weight capped), when the
    aggregator left it out (``excluded``), or when the screen found its direction disagrees
    with the round's median update (dropped too under ``federation.outlier-action = drop``)."""
    excluded = excluded or {}
    to_aggregate = view.cosine_to(aggregate)
    total_weight = sum(u.weight for u in kept if u.node not in excluded) or 1.0
    weights = {u.node: u.weight for u in kept}
    out = {}
    for u in received:
        action, why = bounded.actions.get(u.node, ("accepted", ""))
        if u.node in excluded:
            action, why = "excluded", excluded[u.node]
        reasons = [why] if action != "accepted" else []
        if u.node in outliers and outliers[u.node] not in why:
            reasons.append(outliers[u.node])
        w = weights.get(u.node, 0.0) if action not in ("dropped", "excluded") else 0.0
        out[u.node] = TenantAudit(
            norm=round(bounded.norms.get(u.node, 0.0), 6), cosine=round(to_aggregate.get(u.node, 0.0), 4),
            cosine_median=round(view.cosines.get(u.node, 1.0), 4), weight_share=round(w / total_weight, 4), weight=w,
            claimed_examples=u.num_examples, action=action, bound=round(bounded.norm_bound, 6),
            outlier=bool(reasons), why="; ".join(reasons))
    return out


def bounds_info(bounds: UpdateBounds, bounded: Bounded) -> dict[str, Any]:
    return {"bounds": bounds.describe(), "norm_bound": bounded.norm_bound, "weight_bound": bounded.weight_bound}


def screen_out(bounded: Bounded, outliers: dict[int, str]) -> list[int]:
    """Drop the screen's ``outliers`` from ``bounded`` (those a bound had not dropped already);
    the nodes newly dropped."""
    newly = [n for n in outliers if bounded.actions.get(n, ("", ""))[0] != "dropped"]
    for node in newly:
        bounded.actions[node] = ("dropped", f"direction: {outliers[node]}")
    bounded.kept = [u for u in bounded.kept if u.node not in outliers]
    return newly
