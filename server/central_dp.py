"""Central (tenant-level) differential privacy on the server, as a pluggable mechanism.

The strategy calls ``privacy.on_server_aggregate(weighted_sum, received=..., sampled=...,
connected=...)`` right before the aggregator applies the sum, and records
``privacy.round_report()``; :class:`NoServerPrivacy` (the default) returns the sum
unchanged, so the strategy has no ``if dp`` branch.

:class:`CentralGaussian` is DP-FedAvg's Gaussian mechanism (McMahan et al., 2018) on the
**sum** of deltas, which is all secure aggregation reveals:

* every tenant clips its whole delta to L2 norm ``C`` on the client
  (``fedlora.client.privacy.CentralClip``), before anything leaves the node, and the server clips
  every update it sees to ``C`` again (:meth:`ServerPrivacy.bound_update`), so the bound
  holds whatever a tenant sends. Under secure aggregation the server sees no update: the
  bound then rests on the clients (refused unless ``privacy.trust-clients = true``);
* every tenant weighs 1 (``federation.max-weight = 1``, enforced at config time and
  checked here), so adding or removing one tenant changes the sum by at most ``C``:
  the sensitivity of the sum is ``C`` whatever the number of replies;
* Gaussian noise ``N(0, (sigma * C)^2)`` is added once to the sum; the aggregator then
  divides by the number of updates **actually received**, so the noise on the mean is
  ``sigma * C / received``, matched to the mean's sensitivity ``C / received``. (Scaling
  noise by the *sampled* count, as Flower's wrappers do, under-noises a round in which
  tenants drop out.)
* only data-independent bounds act on individual updates (:meth:`CentralGaussian.bounds`:
  the absolute ``federation.max-update-norm``, never the adaptive ones, which depend on the
  round's median and so on the other tenants);
* epsilon is accounted over rounds by Opacus' RDP accountant with sampling rate
  ``sampled / connected``, the tenants drawn from the OS entropy pool (the run seed is in
  the published config: a draw from it would be predictable, and amplification with it). Flower samples a fixed number of tenants without replacement,
  whereas the accountant assumes Poisson sampling; with ``fraction-train = 1`` (rate 1,
  no amplification) the accounting is exact, below 1 it is the usual DP-FedAvg
  approximation.

Noise comes from the OS entropy pool, never from the run seed.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import numpy as np

from fedlora.server.aggregation import Update, WeightedSum, l2_norm


class ServerPrivacy:
    """The interface, which is also the no-privacy behaviour."""

    name = "none"

    def bound_update(self, update: Update) -> Update:
        """An individual update as the mechanism needs it before the sum (plain transport)."""
        return update

    def bounds(self, bounds):
        """The server's bounds on individual updates (``fedlora.server.bounds.UpdateBounds``) that
        this mechanism's sensitivity allows."""
        return bounds

    def screen(self, screen):
        """The direction screen (``fedlora.server.screen.DirectionScreen``) this mechanism allows."""
        return screen

    def on_server_aggregate(self, agg: WeightedSum, *, received: int, sampled: int, connected: int) -> WeightedSum:
        return agg

    def round_report(self) -> dict[str, Any]:
        """What this round spent, for ``metrics/round_XXX.json`` (empty without privacy)."""
        return {}

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to go on accounting (JSON)."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Take up :meth:`state` of an interrupted run."""


class NoServerPrivacy(ServerPrivacy):
    """No central differential privacy (the default)."""


class CentralGaussian(ServerPrivacy):
    """Gaussian noise once on the sum of clipped, equally weighted deltas; RDP accounting."""

    name = "central"

    def __init__(self, *, noise_multiplier: float, clip: float, delta: float,
                 rng: np.random.Generator | None = None) -> None:
        if noise_multiplier <= 0 or clip <= 0:
            raise ValueError("central DP needs noise_multiplier > 0 and clip > 0")
        from opacus.accountants import RDPAccountant

        self.noise_multiplier = noise_multiplier
        self.clip = clip
        self.delta = delta
        self.rng = rng if rng is not None else np.random.default_rng()  # OS entropy
        self.accountant = RDPAccountant()
        self._report: dict[str, Any] = {}

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on the sum (sensitivity ``clip`` times sigma)."""
        return self.noise_multiplier * self.clip

    def bounds(self, bounds):
        """Only data-independent bounds: the adaptive ones (x the round's median norm or weight)
        would let one tenant added or removed drop or re-admit *other* tenants, moving the sum by
        more than ``clip``. The absolute norm bound stays; the clip is the adaptive bound's job."""
        from fedlora.server.bounds import UpdateBounds

        return UpdateBounds(max_norm=bounds.max_norm, policy=bounds.policy)

    def screen(self, screen):
        """Flagging only: which updates the screen drops depends on the others' updates, so one
        tenant added or removed could drop or re-admit another (as with the adaptive bounds)."""
        return screen.flag_only()

    def bound_update(self, update: Update) -> Update:
        """Clip the whole delta to L2 norm ``clip`` (the sensitivity the noise is sized for)."""
        norm = l2_norm(update.delta)
        if norm <= self.clip:
            return update
        scale = np.float32(self.clip / norm * (1 - 1e-6))  # float32 rounding stays inside the clip
        return update.with_delta(OrderedDict((k, (v * scale).astype(v.dtype)) for k, v in update.delta.items()),
                                 f"central DP: L2 norm {norm:.4g} clipped to {self.clip:g} by the server")

    def epsilon(self) -> float:
        return float(self.accountant.get_epsilon(delta=self.delta)) if self.accountant.history else 0.0

    def on_server_aggregate(self, agg: WeightedSum, *, received: int, sampled: int, connected: int) -> WeightedSum:
        if not math.isclose(agg.weight, agg.count):
            raise ValueError(f"central DP needs every tenant to weigh 1 (total weight {agg.weight} for {agg.count} "
                             "updates): set federation.max-weight = 1")
        if agg.count != received:
            raise ValueError(f"the sum holds {agg.count} updates but {received} were received")
        if not 0 < sampled <= connected:
            raise ValueError(f"sampled {sampled} of {connected} connected tenants is not a valid sampling rate")
        noisy = OrderedDict(
            (k, (v.astype(np.float64) + self.rng.normal(0.0, self.noise_std, size=v.shape)).astype(v.dtype))
            for k, v in agg.total.items())
        rate = sampled / connected
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=rate)
        self._report = {
            "mechanism": self.name, "noise_multiplier": self.noise_multiplier, "clip": self.clip,
            "received": received, "sampled": sampled, "sample_rate": rate,
            "noise_std_sum": self.noise_std, "noise_std_mean": self.noise_std / received,
            "delta": self.delta, "epsilon": self.epsilon(),
            "assumptions": "each delta clipped to the clip (by the server where it sees updates, else by the "
                           "tenants), every tenant weighs 1, only data-independent bounds, tenants drawn from OS "
                           "randomness at the sample rate (a fixed-size draw; the accountant assumes Poisson)",
        }
        return WeightedSum(noisy, agg.weight, agg.count)

    def round_report(self) -> dict[str, Any]:
        report, self._report = self._report, {}
        return report

    def state(self) -> dict[str, Any]:
        return {"accountant_history": [list(h) for h in self.accountant.history]}

    def restore(self, state: dict[str, Any]) -> None:
        self.accountant.history = [tuple(h) for h in state.get("accountant_history", [])]


def make_server_privacy(cfg) -> ServerPrivacy:
    """The server-side mechanism for a :class:`fedlora.common.config.PrivacyConfig`."""
    if cfg.mode == "central":
        return CentralGaussian(noise_multiplier=cfg.central_noise_multiplier, clip=cfg.central_clip, delta=cfg.delta)
    return NoServerPrivacy()
