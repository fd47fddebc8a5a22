"""FedProx's proximal term (Li et al., "Federated Optimization in Heterogeneous Networks",
MLSys 2020), as a decoupled step toward the round's global adapter.

FedProx adds ``mu/2 * ||w - w_global||^2`` to each tenant's local objective, over the
trainable (LoRA) parameters, with ``w_global`` the adapter the tenant received this round.
Here it is not added to the loss. After every optimizer step:

    w <- w - lr_t * mu * (w - w_global)

with ``lr_t`` the learning rate of the step just taken. For plain SGD this is exactly the
gradient step on FedProx's proximal term (its gradient is ``mu * (w - w_global)``); with
AdamW it is the decoupled form, as AdamW's weight decay is decoupled from the gradient
(Loshchilov & Hutter 2019), but pulling toward ``w_global`` instead of toward zero.

Why not in the loss: under DP-SGD Opacus replaces each gradient by the clipped, noised sum
of per-example gradients, so a term in the loss would be clipped per example together with
the data term (and its strength would depend on the batch). The decoupled step depends only
on the parameters, which are already the mechanism's private outputs, and on the global
adapter, which is public to the tenant: it is identical with and without DP and costs no
privacy.

``NoProximal`` is the default: the training loop calls the same two methods either way.
"""

from __future__ import annotations

import torch


class NoProximal:
    """No proximal term (``train.prox-mu = 0``)."""

    mu = 0.0

    def start(self, params: list[torch.nn.Parameter]) -> None:
        """Training begins: ``params`` hold the round's global adapter."""

    def after_step(self, lr: float) -> None:
        """One optimizer step with learning rate ``lr`` was just taken."""


class Proximal(NoProximal):
    """w <- w - lr * mu * (w - w_global) after every step, w_global snapshotted at ``start``."""

    def __init__(self, *, mu: float) -> None:
        if mu < 0:
            raise ValueError(f"prox mu must be >= 0, got {mu}")
        self.mu = mu
        self._params: list[torch.nn.Parameter] = []
        self._anchor: list[torch.Tensor] = []

    def start(self, params):
        self._params = list(params)
        self._anchor = [p.detach().clone() for p in self._params]

    @torch.no_grad()
    def after_step(self, lr):
        factor = lr * self.mu
        for p, anchor in zip(self._params, self._anchor):
            p.sub_(p - anchor, alpha=factor)


def make_proximal(mu: float) -> NoProximal:
    """``train.prox-mu`` as an object: :class:`Proximal`, or :class:`NoProximal` for 0."""
    return Proximal(mu=mu) if mu > 0 else NoProximal()
