"""FedProx as a decoupled step toward the round's global adapter: off changes nothing, on it
pulls the adapter back, with and without DP-SGD, and one step is the formula by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedlora.client.prox import NoProximal, Proximal, make_proximal
from fedlora.client.train import train
from fedlora.common.adapter import get_state
from fedlora.common.config import ConfigError, TrainConfig, parse_config
from tests.client.test_privacy import DATA, dp, tiny_lora

CFG = TrainConfig(local_steps=5, batch_size=4, learning_rate=1e-2, schedule="constant", warmup_ratio=0.0,
                  max_grad_norm=0.0)


def trained(proximal=None, privacy=None):
    """(adapter before, adapter after) of the tiny Llama trained with CFG."""
    model = tiny_lora()
    before = get_state(model)
    train(model, DATA, CFG, pad_id=0, seed=0, progress=False, privacy=privacy, proximal=proximal)
    return before, get_state(model)


def distance(a, b) -> float:
    return math.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in a))


def test_one_step_is_the_formula_by_hand():
    # Prepare: w_global = (1, -2); an optimizer step then moved w to (3, -2)
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    prox = Proximal(mu=2.0)
    prox.start([w])
    with torch.no_grad():
        w.copy_(torch.tensor([3.0, -2.0]))
    # Execute: lr 0.25, so lr * mu = 0.5
    prox.after_step(0.25)
    # Assert: w - 0.5 (w - w_global) = (3 - 0.5 * 2, -2 - 0.5 * 0) = (2, -2)
    assert w.tolist() == [2.0, -2.0]


def test_for_plain_sgd_it_is_the_gradient_step_on_the_proximal_term():
    # Prepare: w_global = (0.5, -1, 2); w = (1.5, 0.25, 2); mu 0.75, lr 0.5
    anchor, start = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.5, 0.25, 2.0])
    mu, lr = 0.75, 0.5
    sgd_w = torch.nn.Parameter(start.clone())
    prox_w = torch.nn.Parameter(anchor.clone())
    prox = Proximal(mu=mu)
    prox.start([prox_w])
    with torch.no_grad():
        prox_w.copy_(start)
    # Execute: one SGD step on mu/2 ||w - w_global||^2, and one decoupled step
    loss = mu / 2 * ((sgd_w - anchor) ** 2).sum()
    loss.backward()
    torch.optim.SGD([sgd_w], lr=lr).step()
    prox.after_step(lr)
    # Assert: both are w - lr mu (w - w_global) = (1.125, -0.21875, 2)
    assert sgd_w.tolist() == prox_w.tolist() == [1.125, -0.21875, 2.0]


def test_mu_zero_leaves_training_bit_identical():
    # Prepare / Execute: today's loop, the config's mu = 0, and a Proximal with mu = 0
    _, today = trained()
    _, off = trained(make_proximal(0.0))
    _, zero = trained(Proximal(mu=0.0))
    # Assert
    assert type(make_proximal(0.0)) is NoProximal
    for k in today:
        assert np.array_equal(today[k], off[k]) and np.array_equal(today[k], zero[k]), k


def test_a_large_mu_keeps_the_adapter_closer_to_the_global_one():
    # Prepare / Execute: mu 0 and mu 40 (lr * mu = 0.4 of the gap back per step)
    start, free = trained()
    _, pulled = trained(make_proximal(40.0))
    # Assert: the pulled adapter moved, but less than half as far
    moved, moved_prox = distance(free, start), distance(pulled, start)
    assert moved > 1e-3
    assert 0 < moved_prox < 0.5 * moved, (moved_prox, moved)


def test_it_pulls_the_same_way_under_dp_sgd():
    # Prepare: DP-SGD (Opacus) with the same noise seed in both runs
    start, free = trained(privacy=dp(sigma=0.5, seed=3))
    _, pulled = trained(make_proximal(40.0), privacy=dp(sigma=0.5, seed=3))
    # Assert: the clipped, noised steps still happened, and the pull held
    moved, moved_prox = distance(free, start), distance(pulled, start)
    assert moved > 1e-3
    assert 0 < moved_prox < 0.5 * moved, (moved_prox, moved)


def test_a_tenant_round_trains_with_the_configured_mu(monkeypatch, tmp_path):
    # Prepare: a tenant round on the tiny Llama; record what training is given
    import fedlora.client.train
    from fedlora.client.task import Tenant, TenantData, train_round

    seen = []
    real = fedlora.client.train.train
    monkeypatch.setattr(fedlora.client.train, "train", lambda *a, **kw: seen.append(kw["proximal"]) or real(*a, **kw))
    model = tiny_lora()
    loaded = SimpleNamespace(model=model, tokenizer=SimpleNamespace(pad_token_id=0), device="cpu")
    data = TenantData(Tenant(0, tmp_path / "train.jsonl", None, tmp_path / "state"), [None] * 4, [], DATA)
    cfg = parse_config({"train.prox-mu": 0.5, "train.local-steps": 2, "train.batch-size": 4})
    # Execute
    train_round(loaded, data, get_state(model), cfg, server_round=1, seed=0)
    # Assert: the run config's train.prox-mu reached the training loop
    assert isinstance(seen[0], Proximal) and seen[0].mu == 0.5


@pytest.mark.parametrize("flat, message", [
    ({"train.prox-mu": -0.1}, "train.prox-mu: -0.1 is below the minimum 0.0"),
    ({"train.prox-mu": 200.0}, "train.prox-mu: prox-mu x train.learning-rate = 1.2 > 1"),
    ({"train.prox": 0.1}, "did you mean 'train.prox-mu'"),
])
def test_bad_prox_mu_is_refused(flat, message):
    import re

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(flat)


def test_prox_mu_is_off_by_default():
    assert parse_config({}).train.prox_mu == 0.0
    assert parse_config({"train.prox-mu": 1}).train.prox_mu == 1.0
