"""The tenant's message handlers: a tenant trains on its own data and replies with the LoRA delta only.

``app`` is an in-process ClientApp with every handler (train, evaluate, the four SecAgg+
stages), behind the tenant policy's mod (:mod:`fedlora.client.policy_mod`: every path to a
handler passes it). The ClientApp Flower loads (:mod:`fedlora.client.client_app`) runs it in its own process,
or forwards each message to the node's tenant worker (:mod:`fedlora.client.worker`), which runs it
with the model already loaded.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.client.feedback import DeltaSender
from fedlora.client.ledger import STATE_DIR_NAME, BudgetExhausted
from fedlora.client import secagg
from fedlora.client.policy_mod import node_limits, tenant_policy
from fedlora.client.task import (TenantConfigError, evaluate_round, session, tenant_data, tenant_from_node_config,
                                 train_round)
from fedlora.common import messages as keys
from fedlora.common import secagg_wire as wire
from fedlora.common.adapter import from_arrayrecord
from fedlora.common.config import parse_config
from fedlora.common.offline import quiet_and_offline
from fedlora.common.secagg import quantizer_for

app = ClientApp(mods=[tenant_policy])
log = logging.getLogger(__name__)


def _setup(msg: Message, context: Context):
    quiet_and_offline()
    cfg = parse_config(context.run_config)
    loaded = session(cfg)
    data = tenant_data(tenant_from_node_config(context.node_config, cfg), cfg, loaded.tokenizer)
    return cfg, loaded, data, from_arrayrecord(msg.content.array_records[keys.ARRAYS])


def _sender(msg: Message, cfg, data, server_round: int) -> DeltaSender:
    """The round's delta encoding and error feedback, kept in the tenant's state directory."""
    state_dir = data.tenant.state_dir or data.tenant.train_path.parent / STATE_DIR_NAME
    return DeltaSender.for_round(cfg, state_dir=state_dir, run=str(msg.metadata.run_id), server_round=server_round)


def _evaluate_first(conf, loaded, data, global_state, cfg) -> dict[str, MetricRecord]:
    """The evaluation of the adapter a training message carries, before training moves it,
    when its config asks for one (``federation.evaluate-with-train``; its reply's
    ``evaluation`` record). A tenant that cannot evaluate still trains, and says why."""
    if not conf.get(keys.EVALUATE_FIRST, False):
        return {}
    try:
        return {keys.EVALUATION: MetricRecord(evaluate_round(loaded, data, global_state, cfg))}
    except TenantConfigError as why:
        log.warning("round %s: no evaluation with this training: %s", conf.get(keys.ROUND), why)
        return {}


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, loaded, data, global_state = _setup(msg, context)
    conf = msg.content.config_records[keys.CONFIG]
    evaluation = _evaluate_first(conf, loaded, data, global_state, cfg)
    try:
        delta, metrics = train_round(loaded, data, global_state, cfg, server_round=int(conf[keys.ROUND]),
                                     seed=int(conf[keys.SEED]), run=str(msg.metadata.run_id),
                                     limits=node_limits(context))
    except BudgetExhausted as why:  # declines: the server records the reason and carries on
        return Message(Error(code=keys.DECLINED, reason=str(why)), reply_to=msg)
    sender = _sender(msg, cfg, data, int(conf[keys.ROUND]))
    content = RecordDict({keys.ARRAYS: sender.plain(delta), keys.METRICS: MetricRecord(metrics), **evaluation})
    sender.commit()  # the residual is on disk before the reply leaves
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, loaded, data, global_state = _setup(msg, context)
    metrics = evaluate_round(loaded, data, global_state, cfg)
    return Message(content=RecordDict({keys.METRICS: MetricRecord(metrics)}), reply_to=msg)


# -- secure aggregation (SecAgg+): four stages (five when authenticated) instead of one train message
def _secure(stage):
    """Run a stage on the node's secagg state; a refusal becomes an error reply with its reason."""
    def wrapped(msg: Message, context: Context) -> Message:
        if "secagg" not in context.state.config_records:
            context.state["secagg"] = ConfigRecord()
        try:
            return Message(content=stage(msg, context, context.state.config_records["secagg"]), reply_to=msg)
        except (secagg.SecAggRefused, ValueError) as why:
            return Message(Error(code=keys.SECAGG_REFUSED, reason=str(why)), reply_to=msg)
        except BudgetExhausted as why:
            return Message(Error(code=keys.DECLINED, reason=str(why)), reply_to=msg)
    return wrapped


@app.train(wire.SETUP)
@_secure
def secagg_setup(msg: Message, context: Context, store) -> RecordDict:
    node = msg.metadata.dst_node_id
    identity = _identity(context)
    return wire.setup_reply(*secagg.setup(store, node=node, identity=identity,
                                          **wire.read_setup_request(msg.content)))


@app.train(wire.SHARE)
@_secure
def secagg_share(msg: Message, context: Context, store) -> RecordDict:
    return wire.share_reply(secagg.share_keys(store, roster=_roster(context), **wire.read_share_request(msg.content)))


def _identity(context: Context):
    """The node's identity key (node config ``identity-key``: its SuperNode key), or None.
    A node with a roster must have one: its neighbours refuse unsigned keys."""
    path = context.node_config.get("identity-key")
    if not path:
        if context.node_config.get("secagg-roster"):
            raise secagg.SecAggRefused("this node has a roster but no identity-key to sign its own keys with; "
                                       "start it with `fedlora deploy supernode --key ... --roster ...`")
        return None
    from fedlora.common.secagg_identity import load_identity_key

    try:
        return load_identity_key(str(path))
    except OSError as err:
        raise secagg.SecAggRefused(f"identity-key {path}: {err.strerror or err}") from None


def _roster(context: Context):
    """The federation's admitted node keys (node config ``secagg-roster``), or None (unauthenticated)."""
    path = context.node_config.get("secagg-roster")
    if not path:
        return None
    from fedlora.common.secagg_identity import load_roster

    return load_roster(str(path))


@app.train(wire.UPLOAD)
@_secure
def secagg_upload(msg: Message, context: Context, store) -> RecordDict:
    cfg, loaded, data, global_state = _setup(msg, context)
    conf, metrics = msg.content.config_records[keys.CONFIG], {}
    evaluation = _evaluate_first(conf, loaded, data, global_state, cfg)

    def local_round():
        delta, metrics_ = train_round(loaded, data, global_state, cfg, server_round=int(conf[keys.ROUND]),
                                      seed=int(conf[keys.SEED]), run=str(msg.metadata.run_id),
                                      limits=node_limits(context))
        metrics.update({k: v for k, v in metrics_.items() if k in keys.SECAGG_TRAIN_METRICS})
        return delta, metrics_[keys.NUM_EXAMPLES]

    sender = _sender(msg, cfg, data, int(conf[keys.ROUND]))
    vector = secagg.masked_upload(store, quantizer=quantizer_for(cfg.secagg, cfg.federation), train=local_round,
                                  pack_update=sender.secagg, **wire.read_upload_request(msg.content))
    sender.commit()
    return RecordDict({keys.ARRAYS: wire.upload_array(vector), keys.METRICS: MetricRecord(metrics), **evaluation})


@app.train(wire.CONSISTENCY)
@_secure
def secagg_consistency(msg: Message, context: Context, store) -> RecordDict:
    return wire.consistency_reply(secagg.consistency(store, identity=_identity(context),
                                                     **wire.read_consistency_request(msg.content)))


@app.train(wire.UNMASK)
@_secure
def secagg_unmask(msg: Message, context: Context, store) -> RecordDict:
    return wire.unmask_reply(secagg.unmask(store, roster=_roster(context), **wire.read_unmask_request(msg.content)))
