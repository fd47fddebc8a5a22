"""A tenant's side of the LoRA rules: under ffa A never moves (also under DP-SGD, which sees
only B) and the reply holds B alone; a lower-rank svd tenant trains exactly what a PEFT
adapter of its rank would, and a rank in the node config without svd is refused."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedlora.client.task import Tenant, TenantConfigError, TenantData, tenant_from_node_config, train_round
from fedlora.common.adapter import get_state, set_state
from fedlora.common.config import parse_config
from fedlora.common.lora import is_a, is_b, truncate
from tests.client.test_privacy import DATA

R, ALPHA = 4, 8.0
SMALL = {"adapter.r": R, "adapter.alpha": ALPHA, "train.local-steps": 3, "train.batch-size": 4,
         "train.learning-rate": 0.05, "train.schedule": "constant", "train.warmup-ratio": 0.0}
LOCAL_DP = {"privacy.mode": "local", "privacy.target-epsilon": 0.0, "privacy.noise-multiplier": 1.0}


def tiny(rank: int = R, alpha: float = ALPHA, seed: int = 0):
    """tests.client.test_privacy.tiny_lora's 1-layer Llama (the same base for a seed) at any LoRA rank."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear",
                                                            init_lora_weights=False))


def a_round(model, cfg, tmp_path, *, rank=None):
    """(delta, metrics) of one tenant round of ``model`` from its current adapter."""
    loaded = SimpleNamespace(model=model, tokenizer=SimpleNamespace(pad_token_id=0), device="cpu")
    data = TenantData(Tenant(0, tmp_path / "train.jsonl", None, tmp_path / "state", rank), [None] * 4, [], DATA)
    return train_round(loaded, data, get_state(model), cfg, server_round=1, seed=0)


@pytest.mark.parametrize("privacy", [{}, LOCAL_DP], ids=["no-dp", "local-dp"])
def test_ffa_round_never_moves_a_and_replies_with_b_alone(tmp_path, monkeypatch, privacy):
    # Prepare: the tiny Llama with a random adapter; record what DP-SGD's optimizer holds
    import fedlora.client.privacy

    model = tiny()
    start = get_state(model)
    seen = []
    real = fedlora.client.privacy.LocalDP.prepare
    monkeypatch.setattr(fedlora.client.privacy.LocalDP, "prepare", lambda self, m, opt, loader: seen.append(
        {id(p) for g in opt.param_groups for p in g["params"]}) or real(self, m, opt, loader))
    cfg = parse_config({**SMALL, **privacy, "federation.lora-rule": "ffa"})
    # Execute
    delta, _ = a_round(model, cfg, tmp_path)
    # Assert: every A is the start's, bit for bit; the reply is the B deltas, and B moved
    after = get_state(model)
    assert all(after[k].tobytes() == v.tobytes() for k, v in start.items() if is_a(k))
    assert sorted(delta) == sorted(k for k in start if is_b(k))
    assert all(np.any(delta[k] != 0) for k in delta)
    if privacy:  # Opacus' optimizer was given the B parameters only
        b_params = {id(p) for n, p in model.named_parameters() if ".lora_B." in n}
        assert seen == [b_params]
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)  # the cached model is clean


def test_a_lower_rank_tenant_trains_as_a_peft_adapter_of_its_own_rank(tmp_path):
    # Prepare: a rank-4 global adapter; tenant rank 2 inside the rank-4 model, and a real
    # rank-2 PEFT adapter (alpha 8 * 2 / 4 = 4, the same scaling 2) on the same base, started
    # from the global's first two components
    model, reference = tiny(), tiny(rank=2, alpha=ALPHA * 2 / R)
    glob = get_state(model)
    set_state(reference, truncate(glob, 2))
    svd = parse_config({**SMALL, "federation.lora-rule": "svd"})
    plain = parse_config({**SMALL, "adapter.r": 2, "adapter.alpha": ALPHA * 2 / R})
    # Execute: one round each
    delta, _ = a_round(model, svd, tmp_path / "a", rank=2)
    want, _ = a_round(reference, plain, tmp_path / "b")
    # Assert: the reply is rank 2 and is the rank-2 adapter's delta
    for k, v in want.items():
        assert delta[k].shape == v.shape == ((2, v.shape[1]) if is_a(k) else (v.shape[0], 2))
        np.testing.assert_allclose(delta[k], v, rtol=1e-4, atol=1e-6)
    assert np.max(np.abs(next(iter(want.values())))) > 1e-3  # it trained


def test_a_lower_rank_tenant_keeps_its_unused_components_at_zero_under_dp_sgd(tmp_path):
    # Prepare: DP-SGD adds noise to every trainable element, the unused components included
    model = tiny()
    cfg = parse_config({**SMALL, **LOCAL_DP, "federation.lora-rule": "svd"})
    # Execute
    delta, _ = a_round(model, cfg, tmp_path, rank=1)
    # Assert: components 2..4 are exactly zero after the round; the reply is rank 1
    for n, p in model.named_parameters():
        if ".lora_A." in n:
            assert torch.all(p[1:] == 0) and torch.any(p[:1] != 0), n
        elif ".lora_B." in n:
            assert torch.all(p[:, 1:] == 0), n
    assert all(v.shape[0 if is_a(k) else 1] == 1 for k, v in delta.items())


@pytest.mark.parametrize("flat, node, message", [
    ({}, {"lora-rank": 2}, "node config lora-rank = 2: a tenant of its own LoRA rank needs federation.lora-rule = "
                           "svd (this run uses 'ab')"),
    ({"federation.lora-rule": "ffa"}, {"lora-rank": 2}, "(this run uses 'ffa')"),
    ({"federation.lora-rule": "svd"}, {"lora-rank": 9}, "node config lora-rank = 9: outside 1..8"),
    ({"federation.lora-rule": "svd"}, {"lora-rank": "two"}, "lora-rank = 'two': expected a positive integer"),
])
def test_a_rank_the_run_cannot_use_is_refused_with_the_reason(tmp_path, flat, node, message):
    with pytest.raises(TenantConfigError, match=re.escape(message)):
        tenant_from_node_config({"data-path": str(tmp_path / "train.jsonl"), **node}, parse_config(flat))


def test_the_rank_comes_from_the_node_config_or_the_simulations_tenant_ranks(tmp_path):
    cfg = parse_config({"federation.lora-rule": "svd", "simulation.tenants": 2, "simulation.tenant-ranks": "8,2",
                        "data.dir": str(tmp_path)})
    assert tenant_from_node_config({"data-path": str(tmp_path / "t.jsonl"), "lora-rank": 4}, cfg).rank == 4
    assert tenant_from_node_config({"data-path": str(tmp_path / "t.jsonl")}, cfg).rank is None
    assert [tenant_from_node_config({"partition-id": p}, cfg).rank for p in (0, 1)] == [8, 2]
