"""The one training function: it learns the task, and it is deterministic for a seed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedlora.client.train import train
from fedlora.common.adapter import get_state, set_state
from fedlora.common.config import parse_config
from fedlora.common.data import read_examples, tenant_paths, tokenize_examples
from fedlora.common.evaluate import evaluate
from fedlora.common.model import load_model


@pytest.mark.slow
def test_training_raises_holdout_exact_match(tmp_path):
    # Prepare: tenant 0 of the default synthetic set (256 train rows, 48 holdout rows);
    # the untuned base (adapter B = 0) scores nothing on the task
    from fedlora.simulations.synthetic import write_tenants

    write_tenants(tmp_path, num_tenants=1, train_size=256, holdout_size=48, preference_size=8, seed=0)
    cfg = parse_config({"train.local-steps": 100, "train.batch-size": 16, "train.schedule": "constant",
                        "eval.batch-size": 48})
    loaded = load_model(cfg.model, cfg.adapter)
    train_path, holdout_path = tenant_paths(tmp_path, 0)
    data = tokenize_examples(read_examples(train_path), loaded.tokenizer, max_length=cfg.data.max_length)
    holdout = read_examples(holdout_path)
    before = evaluate(loaded.model, loaded.tokenizer, holdout, cfg.eval, max_length=cfg.data.max_length)
    # Execute
    metrics = train(loaded.model, data, cfg.train, pad_id=loaded.tokenizer.pad_token_id, progress=False)
    after = evaluate(loaded.model, loaded.tokenizer, holdout, cfg.eval, max_length=cfg.data.max_length)
    # Assert: the loss fell and exact match rose by at least 30 points
    assert metrics.loss < 0.5 * metrics.first_loss
    assert before.exact_match == 0.0
    assert after.exact_match >= before.exact_match + 0.30, (before, after)
    assert after.json_valid >= 0.9


@pytest.mark.slow
def test_training_is_deterministic_for_a_seed(tenants_dir, small_cfg):
    loaded = load_model(small_cfg.model, small_cfg.adapter)
    data = tokenize_examples(read_examples(tenant_paths(tenants_dir, 1)[0])[:32], loaded.tokenizer, max_length=128)
    init = get_state(loaded.model)
    runs = []
    for _ in range(2):
        set_state(loaded.model, init)
        m = train(loaded.model, data, small_cfg.train, pad_id=loaded.tokenizer.pad_token_id, seed=5, progress=False)
        runs.append((m.loss, get_state(loaded.model)))
    assert runs[0][0] == runs[1][0]
    for k in init:
        np.testing.assert_array_equal(runs[0][1][k], runs[1][1][k])


def _lrs(cfg, total: int, start: int, n: int) -> list[float]:
    import torch

    from fedlora.client.train import make_schedule

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg.learning_rate)
    sched = make_schedule(opt, cfg, total, start=start)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_round_windows_of_a_run_schedule_equal_the_single_run_schedule():
    # A tenant's 4 rounds x 25 steps walk the same warm-up + cosine as one 100-step run
    cfg = parse_config({"train.schedule": "cosine", "train.warmup-ratio": 0.1}).train
    whole = _lrs(cfg, 100, 0, 100)
    windows = [lr for r in range(4) for lr in _lrs(cfg, 100, 25 * r, 25)]
    assert np.allclose(whole, windows, rtol=0, atol=1e-12)
    assert whole[0] == 0.0 and max(whole) == cfg.learning_rate and whole[-1] < 0.01 * cfg.learning_rate
    # warm-up happens once: round 2 starts near the peak, not at 0
    assert windows[25] > 0.9 * cfg.learning_rate


def test_schedule_window_per_round_and_span_choice():
    from fedlora.client.task import schedule_window

    cfg = parse_config({"federation.rounds": 3, "train.local-steps": 5})
    assert [schedule_window(cfg, r) for r in (1, 2, 3)] == [(0, 15), (5, 15), (10, 15)]
    assert schedule_window(cfg, 7) == (10, 15)  # never past the span, whatever the round number
    assert schedule_window(cfg.replace(**{"train.schedule-span": "round"}), 2) is None


def test_a_window_past_its_span_is_refused(tmp_path):
    import pytest

    cfg = parse_config({"train.local-steps": 5})
    loaded = load_model(cfg.model, cfg.adapter, seed=0)
    from fedlora.simulations.synthetic import write_tenants

    write_tenants(tmp_path, num_tenants=1, train_size=8, holdout_size=2, preference_size=2, seed=0)
    tok = tokenize_examples(read_examples(tenant_paths(tmp_path, 0)[0]), loaded.tokenizer, max_length=64)
    with pytest.raises(ValueError, match="exceeds its span"):
        train(loaded.model, tok, cfg.train, pad_id=loaded.tokenizer.pad_token_id, progress=False,
              schedule_window=(12, 15))


@pytest.mark.parametrize("privacy", ["none", "hooks"])
def test_gradient_checkpointing_trains_the_same_adapter(privacy):
    # Prepare: the tiny Llama of the DP tests, two copies with the same initialisation
    from fedlora.common.config import TrainConfig
    from tests.client.test_privacy import DATA, dp, tiny_lora

    cfg = TrainConfig(local_steps=3, batch_size=4, learning_rate=1e-2, max_grad_norm=0.0, schedule="constant",
                      warmup_ratio=0.0)
    results, forwards = {}, {}
    for gc in (False, True):
        model = tiny_lora()
        calls = []
        model.get_base_model().model.layers[0].mlp.register_forward_hook(lambda *a: calls.append(1))
        mech = dp(mode="hooks", sigma=0.5, clip=1.0, seed=1) if privacy == "hooks" else None  # same noise draws
        # Execute
        train(model, DATA, dataclasses.replace(cfg, gradient_checkpointing=gc), pad_id=0, seed=0, progress=False,
              privacy=mech)
        results[gc], forwards[gc] = get_state(model), len(calls)
        # Assert: checkpointing is switched off again after training
        assert not model.get_base_model().is_activation_checkpointing
    # Assert: with checkpointing every layer ran again in the backward pass, and that changed nothing
    assert forwards == {False: 3, True: 6}
    for name, value in results[False].items():
        np.testing.assert_allclose(results[True][name], value, atol=1e-6, rtol=1e-5, err_msg=name)
