"""How LoRA's two factors are federated: one *LoRA rule* per run (``federation.lora-rule``).

A LoRA module adds ``s B A`` to its weight (B: ``out x r``, A: ``r x in``, ``s = alpha / r``).
Averaging the tenants' A and B separately does not average what they learnt:
``mean_k(B_k) mean_k(A_k) != mean_k(B_k A_k)``. The strategy calls its rule at four points:
what a reply must hold (:meth:`LoraRule.reference`, :meth:`LoraRule.check_shapes`), how
individual updates combine (:meth:`LoraRule.combine`) or a transport's sum is read
(:meth:`LoraRule.restrict`), and how the result becomes the next global adapter
(:meth:`LoraRule.step`). Rules, in a name -> class registry (:data:`RULES`):

* ``ab`` (:class:`AB`): FedAvg of the A and B deltas separately, through the aggregator and
  the server optimizer: fedlora's behaviour before rules existed, bit for bit.
* ``ffa`` (:class:`FFA`): FFA-LoRA (Sun et al., ICLR 2024). Every tenant starts from the
  global adapter, whose A is the seeded initialisation the server built and broadcasts; A is
  frozen, only B trains and only B's delta is sent. With one A for all,
  ``mean_k(B_k) A = mean_k(B_k A)``: the aggregate is exactly the mean of the tenants'
  products. The rule is linear in the updates, so every aggregator, secure aggregation,
  central DP and every server optimizer run on the B tensors alone (the optimizer's moments
  are B's); A is copied through untouched, bit-identical to the initial A in every checkpoint.
* ``svd`` (:class:`SVD`): FlexLoRA (Bai et al., NeurIPS 2024). The server rebuilds each
  tenant's factors (global + delta), forms the weighted mean of their products
  ``T = sum_k w_k s B_k A_k / sum_k w_k`` per module and factors it back to rank r by a
  truncated SVD, re-broadcasting both factors (in SVD order, so a rank-``r_k`` tenant takes
  the first ``r_k`` components). It needs individual updates (plain transport, fedavg) and
  ignores the server optimizer's moments: with ``federation.server-lr = eta`` the step is
  taken in product space, ``T = (1 - eta) s B A + eta * mean_k s B_k A_k`` (eta = 1 is
  FlexLoRA); any optimizer but ``sgd`` is refused at config time, because SVD factors are
  re-derived every round (their basis rotates and their signs may flip), so moments kept
  per factor element across rounds would mix unrelated directions.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Mapping

import numpy as np

from fedlora.common import messages as keys
from fedlora.common.lora import is_a, pad, pairs
from fedlora.server.aggregation import Aggregator, Arrays, Rejected, Update, WeightedSum

State = "OrderedDict[str, np.ndarray]"


class LoraRule:
    """The interface, which is also ``ab``: every tensor's delta averaged on its own."""

    name = "ab"
    needs_individual_updates = False

    def describe(self) -> str:
        return f"{self.name} (A and B averaged separately)"

    def problems(self, *, aggregator: Aggregator, reveals_individual_updates: bool, optimizer_name: str) -> list[str]:
        """Why the rule cannot run with these parts (the strategy raises them as a ConfigError)."""
        return []

    def reference(self, global_state: Arrays) -> Arrays:
        """The tensors every reply must hold (names, shapes and dtypes)."""
        return global_state

    check_shapes = None  # (arrays, reference) -> None or Rejected; None: exactly the reference's shapes

    def combine(self, aggregator: Aggregator, updates: list[Update], global_state: Arrays
                ) -> tuple[WeightedSum, dict[str, Any]]:
        """The round's aggregate of individual updates, and what was decided (for the record)."""
        return aggregator.combine(updates)

    def restrict(self, summed: WeightedSum) -> WeightedSum:
        """A transport's sum (secure aggregation), as this rule reads it."""
        return summed

    def comparable(self, updates: list[Update], global_state: Arrays) -> list[Update]:
        """The updates as the audit compares them (of one shape)."""
        return updates

    def step(self, optimizer, global_state: Arrays, summed: WeightedSum) -> State:
        """The next global adapter."""
        return optimizer.step(global_state, summed)

    def round_metrics(self) -> dict[str, float]:
        """What the rule measured in the last round, for the round's training metrics."""
        return {}


class AB(LoraRule):
    """``ab``: the A and B deltas averaged separately (the default)."""


class FFA(LoraRule):
    """``ffa``: A frozen at the shared seeded initialisation; B alone is federated (exact)."""

    name = "ffa"

    def describe(self) -> str:
        return "ffa (A frozen at the shared initialisation, B federated: the mean of the products, exactly)"

    def reference(self, global_state):
        return OrderedDict((k, v) for k, v in global_state.items() if not is_a(k))

    def restrict(self, summed):
        # A sum over the whole adapter (a transport packing every tensor) is read for B only:
        # the tenants' A deltas are zero, and whatever a sum says about A is not used.
        total = OrderedDict((k, v) for k, v in summed.total.items() if not is_a(k))
        return summed if len(total) == len(summed.total) else WeightedSum(total, summed.weight, summed.count)

    def step(self, optimizer, global_state, summed):
        new_b = optimizer.step(self.reference(global_state), summed)
        return OrderedDict((k, v if is_a(k) else new_b[k]) for k, v in global_state.items())


class SVD(LoraRule):
    """``svd``: the weighted mean of the tenants' products, factored back to rank r (FlexLoRA).

    New factors: ``B = U_r S_r / s`` and ``A = V_r^T`` (so ``s B A = U_r S_r V_r^T``, the best
    rank-r approximation of T, Eckart-Young). The singular values go to B and A keeps
    orthonormal rows, near the scale of LoRA's own initialisation of A (rows of norm about
    0.6): a component with a small singular value still learns (a balanced split ``sqrt(S)``
    into both factors would shrink A with it and slow that component down). Where T has fewer than r directions, the missing components restart
    as LoRA starts one: B = 0 and A the initial adapter's row. Tenants may train lower ranks
    (:meth:`check_shapes`); each one's local factors are ``B[:, :r_k] + dB_k`` and
    ``A[:r_k] + dA_k`` with the same scaling s (the tenant's alpha is alpha r_k / r).
    """

    name = "svd"
    needs_individual_updates = True

    def __init__(self, *, scaling: float, server_lr: float = 1.0, initial: Arrays | None = None) -> None:
        if scaling <= 0:
            raise ValueError("svd needs a positive LoRA scaling alpha / r")
        self.scaling, self.server_lr = float(scaling), float(server_lr)
        self.initial = initial  # the seeded initial adapter: rows for components T lacks
        self._pending: tuple[WeightedSum, State] | None = None
        self._metrics: dict[str, float] = {}

    def describe(self) -> str:
        return (f"svd (FlexLoRA: the weighted mean of the tenants' products, rank-r truncated SVD; scaling "
                f"{self.scaling:g}, server lr {self.server_lr:g} in product space)")

    def problems(self, *, aggregator, reveals_individual_updates, optimizer_name):
        out = []
        if not reveals_individual_updates:
            out.append("federation.lora-rule: 'svd' multiplies each tenant's factors, but the transport reveals "
                       "only their sum; use ffa or turn secure aggregation off")
        if aggregator.name != "fedavg":
            out.append(f"federation.lora-rule: 'svd' averages the products itself; not with {aggregator.name!r}")
        if optimizer_name != "sgd":
            out.append(f"federation.server-optimizer: 'svd' re-derives its factors every round, so "
                       f"{optimizer_name!r}'s moments would mix unrelated directions; use sgd")
        return out

    def check_shapes(self, arrays: Arrays, reference: Arrays) -> None:
        """Every module at one rank r_k (1 <= r_k <= r) with the reference's in and out sizes;
        any other tensor exactly as the reference."""
        ranks: dict[int, str] = {}
        modules = pairs(reference)
        paired = {n for ab in modules.values() for n in ab}
        for a, b in modules.values():
            (r, d_in), (d_out, _) = reference[a].shape, reference[b].shape
            sa, sb = np.shape(arrays[a]), np.shape(arrays[b])
            if len(sa) != 2 or len(sb) != 2 or sa[1] != d_in or sb[0] != d_out or sa[0] != sb[1]:
                raise Rejected(f"tensors {a} {sa} and {b} {sb} are not a rank-k pair of ({d_out}, k) x (k, {d_in})")
            if not 1 <= sa[0] <= r:
                raise Rejected(f"tensor {a}: rank {sa[0]} outside 1..{r}")
            ranks.setdefault(sa[0], a)
        if len(ranks) > 1:
            (r1, n1), (r2, n2) = sorted(ranks.items())[:2]
            raise Rejected(f"ranks differ across the update's tensors: {r1} ({n1}) and {r2} ({n2})")
        for k in reference:
            if k not in paired and np.shape(arrays[k]) != reference[k].shape:
                raise Rejected(f"tensor {k}: shape {np.shape(arrays[k])} != expected {reference[k].shape}")

    def combine(self, aggregator, updates, global_state):
        t = time.perf_counter()
        weights = np.array([u.weight for u in updates], dtype=np.float64)
        total_w = float(weights.sum())
        if total_w <= 0:
            raise ValueError("total weight is zero")
        mix = weights / total_w
        eta = self.server_lr
        new: State = OrderedDict()
        errors: list[float] = []
        modules = pairs(global_state)
        for a_name, b_name in modules.values():
            b_g, a_g = global_state[b_name], global_state[a_name]
            bs, as_, ws = [], [], []
            if eta != 1.0:  # the step in product space: (1 - eta) of the global product stays
                bs.append(b_g)
                as_.append(a_g)
                ws.append(1.0 - eta)
            for u, m in zip(updates, mix):
                k = u.delta[a_name].shape[0]
                bs.append(b_g[:, :k].astype(np.float64) + u.delta[b_name])
                as_.append(a_g[:k].astype(np.float64) + u.delta[a_name])
                ws.append(eta * m)
            fill = None if self.initial is None else self.initial[a_name]
            b_new, a_new, _, err = rank_r_factors(bs, as_, ws, scaling=self.scaling, rank=a_g.shape[0], fill=fill)
            new[a_name], new[b_name] = a_new.astype(a_g.dtype), b_new.astype(b_g.dtype)
            errors.append(err)
        for k, g in global_state.items():  # tensors outside any pair: the weighted mean delta, as ab
            if k not in new:
                mean = sum(m * u.delta[k].astype(np.float64) for u, m in zip(updates, mix))
                new[k] = (g + eta * mean).astype(g.dtype)
        new = OrderedDict((k, new[k]) for k in global_state)
        summed = WeightedSum(OrderedDict((k, ((new[k].astype(np.float64) - g) * total_w).astype(np.float32))
                                         for k, g in global_state.items()), total_w, len(updates))
        self._pending = (summed, new)
        first_a = next(iter(modules.values()))[0] if modules else None
        self._metrics = {"svd-error-max": float(max(errors, default=0.0)),
                         "svd-error-mean": float(np.mean(errors)) if errors else 0.0}
        info = {"svd_error_max": self._metrics["svd-error-max"], "svd_error_mean": self._metrics["svd-error-mean"],
                "svd_modules": len(errors), "svd_seconds": round(time.perf_counter() - t, 6),
                # by tenant id, as every record names tenants (the node id is Flower's, not the operator's)
                "svd_ranks": {str(int(u.metrics.get(keys.TENANT, u.node))): int(u.delta[first_a].shape[0])
                              for u in updates} if first_a else {}}
        return summed, info

    def comparable(self, updates, global_state):
        # A rank-r_k delta is zero on the components it did not train (padded for the audit only).
        return [u if all(u.delta[k].shape == v.shape for k, v in global_state.items())
                else u.with_delta(pad(u.delta, global_state), "rank padded for the audit") for u in updates]

    def step(self, optimizer, global_state, summed):
        if self._pending is None or self._pending[0] is not summed:
            raise RuntimeError("svd: the aggregate changed between combine and step (nothing may transform "
                               "svd's sum; central DP and server optimizers other than sgd are refused with it)")
        new, self._pending = self._pending[1], None
        return new

    def round_metrics(self):
        return dict(self._metrics)


def rank_r_factors(bs: list[np.ndarray], as_: list[np.ndarray], weights: list[float], *, scaling: float, rank: int,
                   fill: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The best rank-``rank`` factors of ``T = scaling * sum_k weights_k B_k A_k``, in float64.

    Returns ``(B, A, singular values of T, ||T - scaling B A||_F / ||T||_F)`` with
    ``B = U_r S_r / scaling`` and ``A = V_r^T``. ``T`` is never formed: with
    ``Bc = [w_1 B_1 | ... ]`` (``out x R``) and ``Ac = [A_1; ...]`` (``R x in``), two thin QR
    factorisations ``Bc = Qb Rb``, ``Ac^T = Qa Ra`` leave an ``R x R`` core
    ``scaling Rb Ra^T`` whose SVD gives T's: ``O((out + in) R^2)`` instead of ``O(out in R)``.
    The error is T's tail of singular values, ``sqrt(sum_{i>r} s_i^2 / sum_i s_i^2)`` (0 for
    T = 0). Components beyond T's ``min(out, in, R)`` directions get B = 0 and A = ``fill``'s
    row (zeros without one).
    """
    bc = np.concatenate([np.asarray(b, np.float64) * w for b, w in zip(bs, weights)], axis=1)
    ac = np.concatenate([np.asarray(a, np.float64) for a in as_], axis=0)
    qb, rb = np.linalg.qr(bc)
    qa, ra = np.linalg.qr(ac.T)
    u, s, vt = np.linalg.svd(scaling * (rb @ ra.T), full_matrices=False)
    k = min(rank, s.size)
    b_new = np.zeros((bc.shape[0], rank))
    a_new = np.zeros((rank, ac.shape[1])) if fill is None else np.array(fill, np.float64, copy=True)
    b_new[:, :k] = (qb @ u[:, :k]) * (s[:k] / scaling)
    a_new[:k] = (qa @ vt[:k].T).T
    total = float(np.sum(s ** 2))
    error = float(np.sqrt(np.sum(s[k:] ** 2) / total)) if total > 0 else 0.0
    return b_new, a_new, s, error


RULES: dict[str, type[LoraRule]] = {cls.name: cls for cls in (AB, FFA, SVD)}


def make_lora_rule(cfg, *, initial: Mapping[str, np.ndarray] | None = None) -> LoraRule:
    """The rule a :class:`fedlora.common.config.Config` names (``initial``: the seeded initial adapter)."""
    rule = cfg.federation.lora_rule
    if rule == "svd":
        return SVD(scaling=cfg.adapter.alpha / cfg.adapter.r, server_lr=cfg.federation.server_lr, initial=initial)
    try:
        return RULES[rule]()
    except KeyError:
        raise ValueError(f"unknown LoRA rule {rule!r}; choose one of {', '.join(RULES)}") from None
