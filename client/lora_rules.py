"""A tenant's side of ``federation.lora-rule``: what it trains and what its reply holds.

``fedlora.client.task.train_round`` calls the same three methods whatever the rule (the server's
side is ``fedlora.server.lora_rules``):

* ``start(global_state)`` — the adapter the tenant loads before training;
* ``training(model)`` — a context in which only the rule's factors are trainable; it gives
  the hook ``fedlora.client.train.train`` runs after every optimizer step, and makes every adapter
  tensor trainable again on the way out (the process-cached model stays clean);
* ``reply(delta)`` — the part of ``local - start`` that is sent.

Rules: :class:`BothFactors` (``ab``, and ``svd`` at full rank: train A and B, send both);
:class:`FrozenA` (``ffa``: ``requires_grad`` is off for every ``lora_A``, so neither the
optimizer nor Opacus' privacy engine ever sees A, and only the ``lora_B`` deltas are sent);
:class:`LowRank` (``svd`` for a tenant of rank ``r_k < r``).

A rank-``r_k`` tenant trains the rank-``r_k`` adapter ``B[:, :r_k] A[:r_k]`` inside the
process's rank-r model: it loads the global adapter's first ``r_k`` components (the svd
rule's factors are in SVD order) with the others set to zero, and holds those at zero
after every step. A zero component has zero gradient (``dL/dB_i`` is proportional to
``A_i`` and ``dL/dA_i`` to ``B_i``), so the first ``r_k`` components train exactly as a
PEFT rank-``r_k`` adapter with ``alpha_k = alpha r_k / r`` would (its scaling
``alpha_k / r_k`` is the global ``alpha / r``); the reset after each step only undoes the
DP-SGD noise Opacus adds to every trainable element. One base stays in memory for training
and for evaluating the full global adapter. The reply holds the rank-``r_k`` delta.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import numpy as np
import torch

from fedlora.common.lora import is_a, is_b, pad, truncate


class BothFactors:
    """``ab`` (and ``svd`` at the full rank): train both factors, send both deltas."""

    name = "ab"

    def start(self, global_state: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        return global_state

    def trainable(self, name: str) -> bool:
        return True

    def after_step(self, model) -> Callable[[], None] | None:
        return None

    @contextmanager
    def training(self, model) -> Iterator[Callable[[], None] | None]:
        adapter = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        try:
            for n, p in adapter:
                p.requires_grad_(self.trainable(n))
            yield self.after_step(model)
        finally:
            for _, p in adapter:
                p.requires_grad_(True)

    def reply(self, delta):
        return delta


class FrozenA(BothFactors):
    """``ffa``: A frozen at the global adapter's (the shared seeded initialisation); B trains.

    ``whole_adapter``: the transport packs every tensor of the adapter (secure aggregation
    lays its vector out by the broadcast adapter), so A's delta, exactly zero, is sent too;
    the server reads B alone."""

    name = "ffa"

    def __init__(self, *, whole_adapter: bool = False) -> None:
        self.whole_adapter = whole_adapter

    def trainable(self, name):
        return not is_a(name)

    def reply(self, delta):
        return delta if self.whole_adapter else type(delta)((k, v) for k, v in delta.items() if not is_a(k))


class LowRank(BothFactors):
    """``svd`` for a tenant of rank ``rank`` < r: the first ``rank`` components train, the rest stay 0."""

    name = "svd"

    def __init__(self, *, rank: int) -> None:
        if rank < 1:
            raise ValueError(f"LoRA rank {rank} must be at least 1")
        self.rank = rank

    def start(self, global_state):
        return pad(truncate(global_state, self.rank), global_state)

    def after_step(self, model):
        factors = [(p, is_a(n)) for n, p in model.named_parameters() if p.requires_grad and (is_a(n) or is_b(n))]

        @torch.no_grad()
        def hold_at_zero() -> None:
            for p, rows in factors:
                (p[self.rank:] if rows else p[:, self.rank:]).zero_()
        return hold_at_zero

    def reply(self, delta):
        return truncate(delta, self.rank)


def make_tenant_rule(cfg, *, rank: int | None = None) -> BothFactors:
    """The tenant's side of the run's rule; ``rank``: the tenant's own LoRA rank (svd only)."""
    if cfg.federation.lora_rule == "ffa":
        return FrozenA(whole_adapter=cfg.secagg.enabled)
    if rank is not None and rank < cfg.adapter.r:
        return LowRank(rank=rank)
    return BothFactors()
