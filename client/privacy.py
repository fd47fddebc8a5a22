"""Privacy mechanisms on the tenant's side, as objects with a no-privacy default.

``fedlora.client.train.train`` and ``fedlora.client.task.train_round`` call the same small interface
whatever the mechanism is (apple/pfl-research style), so neither has an ``if dp`` branch:

* ``before_round()``   — refuse early (the ledger says the budget would be exceeded);
* ``prepare(model, optimizer, loader)`` — wrap them for training (Opacus for DP-SGD);
* ``loss(out, batch)`` — the training loss (per-example mean under DP-SGD, see below);
* ``after_train()``    — unwrap, so the process-cached model is clean for the next round;
* ``finalize_delta(delta)`` — last transform before the update leaves (central DP clips);
* ``commit(**context) -> epsilon`` — write the ledger (before the reply is sent): DP-SGD's
  spend, or a release without local DP (epsilon infinite from then on);
* ``public_metrics(metrics)`` — what of the reply's metrics may leave the node.

Mechanisms: :class:`NoPrivacy` (the default), :class:`LocalDP` (record-level DP-SGD
with Opacus' ``PrivacyEngine`` and RDP accountant, Poisson sampling, a persistent
ledger), :class:`CentralClip` (tenant-level DP: the client clips its whole delta; the
server adds the noise, see ``fedlora.server.central_dp``).

Two soundness details of :class:`LocalDP`:

* the loss is the mean over examples of each example's token-mean loss. Hugging Face's
  loss divides by the tokens of the *whole batch*, which makes one example's gradient
  depend on the other examples' lengths, so clipping would no longer bound one record's
  influence;
* sampling and noise draw from the OS entropy pool, never from the run seed (the server
  sends the seed, and could otherwise replay both the batches and the noise).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections import OrderedDict
from functools import lru_cache
from types import SimpleNamespace
from typing import Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedlora.client.ledger import PrivacyLedger, Spend

log = logging.getLogger(__name__)

# Reply metrics computed from the training records without noise.
WITHHELD_UNDER_LOCAL_DP = frozenset({"train-loss", "train-first-loss", "train-tokens", "truncated"})


class ClientPrivacy:
    """The interface, which is also the no-privacy behaviour."""

    name = "none"
    ledger: PrivacyLedger | None = None

    def before_round(self) -> None:
        """Raise :class:`fedlora.client.ledger.BudgetExhausted` to decline the round."""

    def prepare(self, model, optimizer, loader):
        return model, optimizer, loader

    def loss(self, tokens: TokenLogits) -> torch.Tensor:
        """The micro-batch's loss from its supervised positions' logits."""
        return tokens.mean_loss()

    def after_train(self) -> None:
        """Undo whatever :meth:`prepare` did to the model."""

    def finalize_delta(self, delta: "OrderedDict[str, np.ndarray]") -> "OrderedDict[str, np.ndarray]":
        return delta

    def commit(self, **context: object) -> float:
        """Account for the update about to leave; returns the tenant's cumulative local-DP epsilon
        for the reply (0 without local DP: the ledger records the release as epsilon = inf)."""
        if self.ledger is not None:
            self.ledger.record_release(mechanism=self.name, **context)
        return 0.0

    def public_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """The reply's metrics as they may leave the node."""
        return metrics


class NoPrivacy(ClientPrivacy):
    """No differential privacy (the default)."""

    def __init__(self, *, ledger: PrivacyLedger | None = None) -> None:
        self.ledger = ledger


def entropy_generator(seed: int | None = None) -> torch.Generator:
    """A torch generator seeded from the OS entropy pool (or ``seed``, for tests only)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None else seed)


def sample_rate_for(num_examples: int, batch_size: int) -> float:
    """Opacus' Poisson rate for a loader of ``batch_size`` over ``num_examples``: 1 / batches per epoch."""
    if num_examples < 1:
        raise ValueError("no training examples")
    return 1.0 / math.ceil(num_examples / min(batch_size, num_examples))


@lru_cache(maxsize=64)
def noise_for_target(*, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest noise multiplier reaching ``target_epsilon`` after ``steps`` (RDP accountant)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant="rdp", epsilon_tolerance=0.005))


class LocalDP(ClientPrivacy):
    """Record-level DP-SGD with Opacus, accounted in the tenant's ledger."""

    name = "local"

    def __init__(self, *, noise_multiplier: float, max_grad_norm: float, sample_rate: float, delta: float,
                 planned_steps: int, ledger: PrivacyLedger | None = None, budget: float = math.inf,
                 poisson: bool = True, grad_sample_mode: str = "ew", noise_seed: int | None = None,
                 run: str | None = None, run_budget: float = math.inf) -> None:
        if noise_multiplier <= 0 or max_grad_norm <= 0:
            raise ValueError("local DP needs noise_multiplier > 0 and max_grad_norm > 0")
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.sample_rate = sample_rate
        self.delta = delta
        self.planned_steps = planned_steps
        self.ledger = ledger
        self.budget = budget
        self.poisson = poisson
        self.grad_sample_mode = grad_sample_mode
        self.noise_seed = noise_seed
        self.run, self.run_budget = run, run_budget  # this run's own cap (a tenant policy's max-epsilon-per-run)
        self.engine = None
        self._wrapped = None
        self.spent: list[Spend] = []

    def before_round(self) -> None:
        if self.ledger is not None:
            self.ledger.check(Spend(self.noise_multiplier, self.sample_rate, self.planned_steps),
                              delta=self.delta, budget=self.budget, run=self.run, run_budget=self.run_budget)

    def prepare(self, model, optimizer, loader: DataLoader):
        from opacus import PrivacyEngine

        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not trainable or trainable != in_optimizer:
            raise RuntimeError("DP-SGD must see exactly the trainable (adapter) parameters: the optimizer holds "
                               f"{len(in_optimizer)} tensors, the model trains {len(trainable)}")
        if not self.poisson:
            warnings.warn("local DP without Poisson sampling: the RDP accountant assumes Poisson subsampling, so "
                          "the epsilon reported for this run is not a guarantee", stacklevel=2)
        model.train()  # Opacus validates a module in training mode
        gen = entropy_generator(self.noise_seed)
        # Same rows, same collation; batches drawn from entropy, not from the run seed.
        loader = DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=True, generator=gen,
                            collate_fn=loader.collate_fn)
        with warnings.catch_warnings():  # "secure RNG off": torchcsprng is not installable; see the module doc
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            self.engine = PrivacyEngine(accountant="rdp")
        self._wrapped, optimizer, loader = self.engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm, poisson_sampling=self.poisson, grad_sample_mode=self.grad_sample_mode,
            noise_generator=entropy_generator(None if self.noise_seed is None else self.noise_seed + 1))
        loader.collate_fn = _collate_or_empty(getattr(loader.collate_fn, "wrapped_collator_fn", loader.collate_fn))
        return _SkipEmpty(self._wrapped, optimizer), optimizer, loader

    def loss(self, tokens: TokenLogits) -> torch.Tensor:
        # Opacus scales per-sample gradients for a mean over the batch of per-example losses.
        return tokens.per_example_loss().mean()

    def after_train(self) -> None:
        if self.engine is not None:
            self.spent = [Spend(float(s), float(q), int(n)) for s, q, n in self.engine.accountant.history]
        if self._wrapped is not None:
            self._wrapped.to_standard_module()  # removes hooks and per-sample gradients
            self._wrapped = None

    def public_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Training statistics computed without noise would bypass DP-SGD: they leave as 0.
        The example count stays (it is the FedAvg weight; DP-SGD treats it as public too)."""
        return {k: (0.0 if k in WITHHELD_UNDER_LOCAL_DP else v) for k, v in metrics.items()}

    def commit(self, **context: object) -> float:
        from fedlora.client.ledger import epsilon_of

        if self.ledger is None:
            return epsilon_of(self.spent, delta=self.delta)
        eps = self.ledger.epsilon(delta=self.delta)
        for spend in self.spent:
            eps = self.ledger.record(spend, delta=self.delta, run=self.run, **context)
        return eps


def _collate_or_empty(collate):
    """Poisson sampling can draw no example at all: give the loop an empty batch of the usual form."""
    def fn(rows):
        if rows:
            return collate(rows)
        empty = torch.zeros((0, 1), dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty.clone(), "labels": empty.clone()}
    return fn


class _SkipEmpty:
    """The Opacus-wrapped model, except that an empty batch skips the forward pass: its
    per-sample gradients are an empty set, which Opacus clips to a zero sum, so the step is
    noise only (as DP-SGD requires)."""

    def __init__(self, wrapped, optimizer) -> None:
        self._wrapped = wrapped
        self._params = optimizer.params

    def __call__(self, input_ids: torch.Tensor, *args, **kwargs):
        kwargs.pop("labels", None)  # the mechanism computes the loss per example; skip the model's own
        if input_ids.shape[0] > 0:
            return self._wrapped(input_ids, *args, **kwargs)
        for p in self._params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        return SimpleNamespace(logits=torch.zeros((), requires_grad=True), loss=None)

    def __getattr__(self, name: str):
        return getattr(self._wrapped, name)


def clip_delta(delta: Mapping[str, np.ndarray], *, clip: float) -> "OrderedDict[str, np.ndarray]":
    """Scale the whole delta (all tensors as one vector) to L2 norm at most ``clip``."""
    norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values()))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return OrderedDict((k, (v * scale).astype(v.dtype)) for k, v in delta.items())


class CentralClip(ClientPrivacy):
    """Tenant-level (central) DP, client side: bound this tenant's influence on the sum."""

    name = "central"

    def __init__(self, *, clip: float, ledger: PrivacyLedger | None = None) -> None:
        if clip <= 0:
            raise ValueError("central DP needs a positive clip norm")
        self.clip = clip
        self.ledger = ledger

    def finalize_delta(self, delta):
        return clip_delta(delta, clip=self.clip)


def make_client_privacy(cfg, *, ledger: PrivacyLedger | None, num_examples: int, run: str | None = None,
                        limits=None) -> ClientPrivacy:
    """The mechanism a :class:`fedlora.common.config.Config` asks for, for one tenant's round.

    ``limits`` (a tenant policy's :class:`fedlora.client.policy.PrivacyLimits`) replaces the run's
    delta and budget with the tenant's own, and caps this ``run``'s epsilon."""
    p = cfg.privacy
    if p.mode == "central":
        return CentralClip(clip=p.central_clip, ledger=ledger)
    if p.mode != "local":
        return NoPrivacy(ledger=ledger)
    q = sample_rate_for(num_examples, cfg.train.batch_size)
    sigma = noise_multiplier_for(cfg, sample_rate=q)
    delta, budget, run_budget = (p.delta, p.budget, math.inf) if limits is None else \
        (limits.delta, min(p.budget, limits.lifetime_epsilon), limits.max_epsilon_per_run)
    return LocalDP(noise_multiplier=sigma, max_grad_norm=p.max_grad_norm, sample_rate=q, delta=delta,
                   planned_steps=cfg.train.local_steps, ledger=ledger, budget=budget,
                   poisson=p.sampling == "poisson", grad_sample_mode=p.grad_sample_mode, run=run,
                   run_budget=run_budget)


def noise_multiplier_for(cfg, *, sample_rate: float) -> float:
    """The DP-SGD noise multiplier a run's config means: ``privacy.noise-multiplier``, or the one
    calibrated to ``privacy.target-epsilon`` over the run's rounds x local steps."""
    p = cfg.privacy
    if p.target_epsilon > 0:
        return noise_for_target(target_epsilon=p.target_epsilon, delta=p.delta, sample_rate=sample_rate,
                                steps=cfg.federation.rounds * cfg.train.local_steps)
    return p.noise_multiplier
