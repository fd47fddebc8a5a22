"""A training message that asks for an evaluation first (``federation.evaluate-with-train``):
the reply carries the evaluation of the adapter the message brought, and the very update the
tenant would have sent without it."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedlora.client.handlers import app
from fedlora.client.task import evaluate_round, session, tenant_data, tenant_from_node_config
from fedlora.common import messages as keys
from fedlora.common.adapter import from_arrayrecord, get_state, to_arrayrecord
from fedlora.common.config import parse_config

pytestmark = pytest.mark.slow  # the embedded model trains and evaluates


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    yield


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    from fedlora.simulations.synthetic import write_tenants

    out = tmp_path_factory.mktemp("tenants")
    write_tenants(out, num_tenants=2, train_size=16, holdout_size=4, preference_size=4, seed=0)
    return parse_config({"train.local-steps": 2, "train.batch-size": 8, "train.threads": 1,
                         "eval.max-new-tokens": 8, "data.dir": str(out)})


def _reply(cfg, global_state, **config):
    msg = Message(RecordDict({keys.ARRAYS: to_arrayrecord(global_state),
                              keys.CONFIG: ConfigRecord({keys.ROUND: 2, keys.SEED: 0, **config})}),
                  message_type="train", dst_node_id=7)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(),
                      run_config=cfg.to_flat())
    return app(msg, context).content


def test_the_reply_carries_the_evaluation_of_the_adapter_it_was_sent_and_the_same_update(cfg):
    # Prepare: the adapter the tenant is sent, and what evaluating it directly gives
    loaded = session(cfg)
    global_state = {k: v.copy() for k, v in get_state(loaded.model).items()}
    data = tenant_data(tenant_from_node_config({"partition-id": 1, "num-partitions": 2}, cfg), cfg, loaded.tokenizer)
    want = evaluate_round(loaded, data, global_state, cfg)
    # Execute: the same training message with and without the evaluation
    fused = _reply(cfg, global_state, **{keys.EVALUATE_FIRST: True})
    plain = _reply(cfg, global_state)
    # Assert: the evaluation is the adapter's, the update the same to the byte
    got = dict(fused.metric_records[keys.EVALUATION])
    assert set(got) == keys.EVAL_METRICS
    assert {k: v for k, v in got.items() if k != "eval-seconds"} == pytest.approx(
        {k: v for k, v in want.items() if k != "eval-seconds"}, rel=1e-5)
    assert keys.EVALUATION not in plain.metric_records
    a, b = (from_arrayrecord(c.array_records[keys.ARRAYS]) for c in (fused, plain))
    assert list(a) == list(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
