"""The one training function: it learns the task, and it is deterministic for a seed."""

from __future__ import annotations

import numpy as np

from client.train import train
from common.adapter import get_state, set_state
from common.config import parse_config
from common.data import read_examples, tenant_paths, tokenize_examples
from common.evaluate import evaluate
from common.model import load_model


def test_training_raises_holdout_exact_match(tmp_path):
    # Prepare: tenant 0 of the default synthetic set (256 train rows, 48 holdout rows);
    # the untuned base (adapter B = 0) scores nothing on the task
    from simulations.synthetic import write_tenants

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
