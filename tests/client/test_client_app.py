"""A tenant's reply holds only LoRA tensors of the expected names and shapes plus scalar metrics."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedlora.client import client_app
from fedlora.common import messages as keys
from fedlora.common.adapter import get_state, to_arrayrecord
from fedlora.common.data import read_examples, tenant_paths
from fedlora.common.model import load_model


def _context(small_cfg, tenants_dir, partition=1):
    run_config = {**small_cfg.to_flat(), "data.dir": str(tenants_dir)}
    return Context(run_id=1, node_id=7, node_config={"partition-id": partition, "num-partitions": 4},
                   state=RecordDict(), run_config=run_config)


def _request(global_state, message_type):
    content = RecordDict({keys.ARRAYS: to_arrayrecord(global_state),
                          keys.CONFIG: ConfigRecord({keys.ROUND: 1, keys.SEED: 0})})
    return Message(content=content, message_type=message_type, dst_node_id=7)


@pytest.mark.slow
def test_train_reply_is_only_the_lora_delta_and_scalar_metrics(small_cfg, tenants_dir):
    # Prepare: the global adapter as the server would send it
    global_state = get_state(load_model(small_cfg.model, small_cfg.adapter, for_training=False).model)
    # Execute: the real ClientApp train handler
    reply = client_app.train(_request(global_state, "train"), _context(small_cfg, tenants_dir))
    content = reply.content
    # Assert: exactly one ArrayRecord and one MetricRecord, nothing else
    assert list(content.array_records) == [keys.ARRAYS]
    assert list(content.metric_records) == [keys.METRICS]
    assert not content.config_records
    arrays = {k: v.numpy() for k, v in content.array_records[keys.ARRAYS].items()}
    assert set(arrays) == set(global_state)
    for name, arr in arrays.items():
        assert "lora_A" in name or "lora_B" in name, name
        assert arr.shape == global_state[name].shape and arr.dtype == np.float32
    # It is a delta: B started at zero, so delta_B == local_B, and A moved from its init
    assert any(np.abs(a).max() > 0 for n, a in arrays.items() if "lora_B" in n)
    assert max(np.abs(a).max() for a in arrays.values()) < 1.0  # a small step, not the weights of the base
    metrics = dict(content.metric_records[keys.METRICS])
    assert set(metrics) == keys.TRAIN_METRICS
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    train_rows = read_examples(tenant_paths(tenants_dir, 1)[0])
    assert metrics[keys.NUM_EXAMPLES] == len(train_rows)
    assert metrics[keys.TENANT] == 1
    # No text or token ids anywhere: every value is a float tensor or a scalar
    total_bytes = sum(a.nbytes for a in arrays.values())
    assert total_bytes == sum(v.nbytes for v in global_state.values())


@pytest.mark.slow
def test_evaluate_reply_is_scalar_metrics_only(small_cfg, tenants_dir):
    global_state = get_state(load_model(small_cfg.model, small_cfg.adapter, for_training=False).model)
    reply = client_app.evaluate(_request(global_state, "evaluate"), _context(small_cfg, tenants_dir, partition=2))
    assert not reply.content.array_records and not reply.content.config_records
    metrics = dict(reply.content.metric_records[keys.METRICS])
    assert set(metrics) == keys.EVAL_METRICS
    assert 0.0 <= metrics["eval-exact-match"] <= 1.0
    assert metrics[keys.TENANT] == 2


def test_node_without_data_location_gets_a_clear_error(small_cfg):
    from fedlora.client.task import TenantConfigError, tenant_from_node_config

    with pytest.raises(TenantConfigError, match="data-path"):
        tenant_from_node_config({}, small_cfg)
