"""Local DP-SGD really acts on the LoRA parameters, with the accountant's numbers.

A tiny Llama with LoRA on every linear layer keeps these tests fast; the mechanism is
the one the tenants use (``fedlora.client.privacy.LocalDP`` around Opacus).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedlora.client.ledger import Spend, epsilon_of
from fedlora.client.loss import OutputHead
from fedlora.client.privacy import LocalDP, NoPrivacy, clip_delta
from fedlora.client.train import make_loader, train
from fedlora.common.adapter import get_state, subtract
from fedlora.common.config import ConfigError, TrainConfig, parse_config
from fedlora.common.data import Tokenized, collate

IDS = [[1, 5, 6, 7, 8, 9], [1, 10, 11, 12], [1, 20, 21, 22, 23, 24, 25, 26], [1, 30, 31, 32, 33]]
LABELS = [[-100, -100, 6, 7, 8, 9], [-100, 10, 11, 12], [-100, -100, -100, 22, 23, 24, 25, 26],
          [-100, -100, 31, 32, 33]]
DATA = Tokenized(IDS, LABELS, truncated=0, tokens=sum(map(len, IDS)))


def tiny_lora(seed: int = 0):
    """A 1-layer Llama with LoRA (non-zero B, so every LoRA tensor has a gradient)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                            init_lora_weights=False))


def batch():
    ids, mask, labels = collate(IDS, LABELS, pad_id=0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def dp(sigma=1.0, clip=1.0, mode="ew", seed=0, **kw):
    return LocalDP(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=1.0, delta=1e-5, planned_steps=1,
                   grad_sample_mode=mode, noise_seed=seed, **kw)


def test_accountant_golden_value():
    # Opacus' own golden case: sigma 1.5, q 0.04, 2250 steps, delta 1e-5 -> RDP epsilon 7.329
    assert epsilon_of([Spend(1.5, 0.04, 2250)], delta=1e-5) == pytest.approx(7.33, abs=0.01)


@pytest.mark.parametrize("mode", ["ew", "hooks"])
def test_per_sample_gradients_of_lora_match_per_example_autograd(mode):
    # Prepare: reference gradients of each example's own loss, by plain autograd
    model = tiny_lora()
    params = lora_params(model)
    b = batch()
    per = [model(torch.tensor([ids]), labels=torch.tensor([lab])).loss for ids, lab in zip(IDS, LABELS)]
    expected = [torch.autograd.grad(per[i], list(params.values())) for i in range(len(IDS))]
    mech = dp(mode=mode)
    opt = torch.optim.SGD(list(params.values()), lr=0.0)
    # Execute: one forward/backward as the training loop does it (Opacus-wrapped model, output
    # layer at the supervised positions only, the mechanism's loss)
    head = OutputHead(model)
    with head:
        wrapped, opt, _ = mech.prepare(model, opt, make_loader(DATA, 4, 0, 0))
        out = wrapped(b["input_ids"], attention_mask=b["attention_mask"])
        mech.loss(head.token_logits(out.logits, b["labels"])).backward()
    assert head.response_only
    # Assert: every LoRA tensor has per-sample gradients, equal to the per-example ones
    assert len(params) == 14  # A and B of q, k, v, o, gate, up, down
    for j, (name, p) in enumerate(params.items()):
        assert p.grad_sample is not None, name
        assert p.grad_sample.shape == (len(IDS), *p.shape), name
        for i in range(len(IDS)):
            torch.testing.assert_close(p.grad_sample[i], expected[i][j], atol=1e-6, rtol=1e-4)
    mech.after_train()


def _one_sgd_step(mech, *, zero_loss: bool):
    model = tiny_lora()
    params = lora_params(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(list(params.values()), lr=1.0)
    head = OutputHead(model)
    with head:
        wrapped, opt, _ = mech.prepare(model, opt, make_loader(DATA, 4, 0, 0))
        b = batch()
        out = wrapped(b["input_ids"], attention_mask=b["attention_mask"])
        loss = mech.loss(head.token_logits(out.logits, b["labels"]))
        (loss * 0.0 if zero_loss else loss).backward()
    opt.step()
    mech.after_train()
    return {n: (params[n].detach() - before[n]) for n in params}


def test_noise_norm_with_zero_gradients_is_theory():
    # Prepare: sigma 4, clip 0.5, expected batch 4 (q = 1 over 4 examples); d trainable numbers
    sigma, clip = 4.0, 0.5
    # Execute: one SGD step (lr 1) on an all-zero loss: the step is the noise alone
    moved = _one_sgd_step(dp(sigma=sigma, clip=clip, seed=3), zero_loss=True)
    # Assert: ||noise|| / B ~ sigma * clip * sqrt(d) / B within 15 %, and it reaches every LoRA tensor
    d = sum(v.numel() for v in moved.values())
    theory = sigma * clip * math.sqrt(d) / 4
    norm = math.sqrt(sum(float((v ** 2).sum()) for v in moved.values()))
    assert abs(norm - theory) / theory < 0.15, (norm, theory)
    assert all(float(v.abs().max()) > 0 for v in moved.values())


def test_per_example_clipping_bounds_the_step():
    # Prepare: a clip so small that the clipped sum is ~0, and almost no noise
    mech = dp(sigma=1e-3, clip=1e-6, seed=1)
    # Execute: one SGD step (lr 1) on the real loss
    moved = _one_sgd_step(mech, zero_loss=False)
    plain = _one_sgd_step(NoPrivacy(), zero_loss=False)
    # Assert: without DP the step is large; with DP each example contributed at most 1e-6
    plain_norm = math.sqrt(sum(float((v ** 2).sum()) for v in plain.values()))
    dp_norm = math.sqrt(sum(float((v ** 2).sum()) for v in moved.values()))
    assert plain_norm > 1e-2
    assert dp_norm < 4 * 1e-6 / 4 + 1e-6  # at most 4 clipped examples / B + tiny noise


def test_dp_sgd_is_not_a_silent_noop_in_the_training_loop():
    # Prepare: the same seed, the same data, the real training loop; DP with large noise
    cfg = TrainConfig(local_steps=3, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, schedule="constant")
    start = get_state(tiny_lora())
    runs = {}
    for name, mech in [("plain", NoPrivacy()), ("plain-again", NoPrivacy()), ("dp", dp(sigma=50.0, seed=5))]:
        model = tiny_lora()
        # Execute
        train(model, DATA, cfg, pad_id=0, seed=0, progress=False, privacy=mech)
        runs[name] = np.concatenate([v.ravel() for v in subtract(get_state(model), start).values()])
    # Assert: non-DP runs agree exactly; the DP run is dominated by noise; 3 steps were accounted
    np.testing.assert_allclose(runs["plain"], runs["plain-again"])
    cos = float(runs["dp"] @ runs["plain"] / np.linalg.norm(runs["dp"]) / np.linalg.norm(runs["plain"]))
    assert cos < 0.5, cos
    assert mech.spent == [Spend(50.0, 1.0, 3)]


def test_model_is_unwrapped_after_training():
    # Prepare
    model = tiny_lora()
    names = list(get_state(model))
    cfg = TrainConfig(local_steps=2, batch_size=4)
    # Execute: DP-SGD in hooks mode (the mode that registers module hooks)
    train(model, DATA, cfg, pad_id=0, seed=0, progress=False, privacy=dp(mode="hooks"))
    # Assert: the cached model is a plain PEFT model again: same adapter tensors, no hooks left
    assert list(get_state(model)) == names
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(getattr(p, "grad_sample", None) is not None for p in model.parameters())


def test_non_poisson_sampling_warns_what_it_breaks():
    model = tiny_lora()
    opt = torch.optim.SGD(list(lora_params(model).values()), lr=0.1)
    mech = dp(poisson=False)
    with pytest.warns(UserWarning, match="Poisson"):
        mech.prepare(model, opt, make_loader(DATA, 4, 0, 0))
    mech.after_train()


@pytest.mark.parametrize("flat, message", [
    ({"privacy.sampling": "shuffle"}, "Poisson-sampling assumption"),
    ({"train.grad-accum": 2}, "train.grad-accum: local DP needs 1"),
    ({"privacy.target-epsilon": 20.0, "privacy.budget": 10.0}, "exceeds privacy.budget"),
])
def test_unsound_local_dp_settings_are_refused(flat, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"privacy.mode": "local", **flat})


def test_shuffle_sampling_allowed_only_explicitly():
    cfg = parse_config({"privacy.mode": "local", "privacy.sampling": "shuffle", "privacy.allow-non-poisson": True})
    assert cfg.privacy.sampling == "shuffle"


def test_central_clip_bounds_the_whole_delta():
    # Prepare: a delta of norm 5 (3-4-0 over two tensors)
    delta = {"a": np.array([3.0], np.float32), "b": np.array([4.0, 0.0], np.float32)}
    # Execute
    clipped = clip_delta(delta, clip=1.0)
    small = clip_delta(delta, clip=10.0)
    # Assert: scaled to norm 1 (0.6, 0.8); a delta within the clip is unchanged
    np.testing.assert_allclose(clipped["a"], [0.6], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [0.8, 0.0], rtol=1e-6)
    np.testing.assert_allclose(small["b"], [4.0, 0.0])


def test_an_empty_poisson_batch_takes_a_noise_only_step():
    # Prepare: the mechanism's loader given no example at all (Poisson sampling can draw none)
    model = tiny_lora()
    params = lora_params(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    mech = dp(sigma=4.0, clip=0.5, seed=2)
    opt = torch.optim.SGD(list(params.values()), lr=1.0)
    wrapped, opt, loader = mech.prepare(model, opt, make_loader(DATA, 4, 0, 0))
    b = loader.collate_fn([])
    # Execute: the training loop's step on it
    out = wrapped(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    (out.logits.sum() * 0.0).backward()  # what fedlora.client.train does for an empty batch
    opt.step()
    mech.after_train()
    # Assert: every LoRA tensor moved by noise alone; the step was accounted
    assert b["input_ids"].shape[0] == 0
    assert all(float((p.detach() - before[n]).abs().max()) > 0 for n, p in params.items())
    assert mech.spent == [Spend(4.0, 1.0, 1)]


def test_noise_free_training_statistics_do_not_leave_under_local_dp():
    # Prepare: a reply's metrics as train_round builds them
    metrics = {"num-examples": 256, "tenant-id": 2, "train-loss": 0.7, "train-first-loss": 2.0, "train-steps": 25,
               "train-tokens": 900, "train-seconds": 3.0, "truncated": 1, "dp-epsilon": 2.5}
    # Execute
    local, plain = dp().public_metrics(metrics), NoPrivacy().public_metrics(metrics)
    # Assert: loss, tokens and truncation (computed from the records without noise) leave as 0
    assert local == {**metrics, "train-loss": 0.0, "train-first-loss": 0.0, "train-tokens": 0.0, "truncated": 0.0}
    assert plain == metrics
