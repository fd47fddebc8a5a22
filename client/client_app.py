"""fedlora ClientApp: a tenant trains on its own data and replies with the LoRA delta only."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.task import evaluate_round, session, tenant_data, tenant_from_node_config, train_round
from common import messages as keys
from common.adapter import from_arrayrecord, to_arrayrecord
from common.config import parse_config

app = ClientApp()


def _setup(msg: Message, context: Context):
    cfg = parse_config(context.run_config)
    loaded = session(cfg)
    data = tenant_data(tenant_from_node_config(context.node_config, cfg), cfg, loaded.tokenizer)
    return cfg, loaded, data, from_arrayrecord(msg.content.array_records[keys.ARRAYS])


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, loaded, data, global_state = _setup(msg, context)
    conf = msg.content.config_records[keys.CONFIG]
    delta, metrics = train_round(loaded, data, global_state, cfg, server_round=int(conf[keys.ROUND]),
                                 seed=int(conf[keys.SEED]))
    content = RecordDict({keys.ARRAYS: to_arrayrecord(delta), keys.METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, loaded, data, global_state = _setup(msg, context)
    metrics = evaluate_round(loaded, data, global_state, cfg)
    return Message(content=RecordDict({keys.METRICS: MetricRecord(metrics)}), reply_to=msg)
