"""The tenant policy, enforced where every message passes: a Flower mod on the tenant's handlers.

:data:`fedlora.client.handlers.app` runs behind :func:`tenant_policy`, in the tenant worker and in
an in-process ClientApp alike, so no path to the handlers skips it. For a node with a policy
(node config ``policy``; in simulation, the run's ``simulation.tenant-policy``) the mod:

1. checks the run's config and the message against the policy before any work
   (:mod:`fedlora.client.policy_check`); a breach is declined with error code
   ``POLICY_DECLINED`` and a reason the server records (``policy: ... [code]``), and the whole
   request (metadata and run config) is appended to ``<state dir>/policy/declines.jsonl``;
2. counts evaluations in the tenant's ledger, within the policy's per-run budget (an
   evaluation piggy-backed on a training message is dropped from it once the budget is spent);
3. lets out only the metrics the policy names, evaluation metrics rounded and noised as it says;
4. with ``reply.errors = "code"``, replaces every error text with a reason code and a short
   public message; the details go to the node's log.

A node without a policy passes every message through unchanged (the server decides its privacy).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
from pathlib import Path

from flwr.app import Context, Error, Message, MetricRecord

from fedlora.client.policy import PolicyDeclined, PolicyError, TenantPolicy, data_problems, load_policy
from fedlora.common import messages as keys
from fedlora.common import secagg_wire as wire

log = logging.getLogger("fedlora.policy")
NODE_CONFIG_KEY = "policy"  # the node config key naming the tenant's policy file
DECLINE_LOG = Path("policy") / "declines.jsonl"
_PUBLIC_ERRORS = {keys.DECLINED: "budget", keys.SECAGG_REFUSED: "secagg-refused",
                  keys.POLICY_DECLINED: "policy"}


def policy_path(context: Context) -> str | None:
    """The policy file this node answers under: its node config's ``policy``; in simulation
    (a ``partition-id`` node) the run's ``simulation.tenant-policy`` (one file for every tenant,
    or ``F0,F1,...`` one per tenant, an empty entry for none). A deployment node never takes a
    policy from the run config: the server would choose the tenant's rules."""
    own = context.node_config.get(NODE_CONFIG_KEY)
    if own:
        return str(own)
    if "partition-id" not in context.node_config or "data-path" in context.node_config:
        return None
    value = str(context.run_config.get("simulation.tenant-policy", "") or "")
    files = [f.strip() for f in value.split(",")] if value else []
    if len(files) > 1:
        pid = int(context.node_config["partition-id"])  # type: ignore[arg-type]
        return files[pid] if pid < len(files) and files[pid] else None
    return files[0] if files else None


def tenant_policy(msg: Message, context: Context, call_next) -> Message:
    """Flower mod: the tenant's policy around its handlers (see the module doc)."""
    path = policy_path(context)
    if path is None:
        return call_next(msg, context)
    try:
        policy = load_policy(path)
    except PolicyError as err:  # fail closed: a node whose policy cannot be read answers nothing
        log.error("%s; declining every task", err)
        return _error(msg, keys.POLICY_DECLINED, f"policy: tenant {_tenant_id(context)}: its policy cannot be "
                                                 "read; it declines every task until its operator fixes it "
                                                 "[policy-unreadable]")
    try:
        cfg, tenant, ledger = _tenant(context)
        with ledger.locked():  # evaluation count: check through record
            _check(policy, msg, cfg, tenant, ledger, signed=bool(context.node_config.get("secagg-roster")))
            reply = _handle(policy, msg, context, call_next)
            _count_evaluation(policy, msg, reply, ledger, context)
    except PolicyDeclined as why:
        _record_decline(msg, context, why)
        return _error(msg, keys.POLICY_DECLINED, f"policy: tenant {_tenant_id(context)}: {why.public}")
    except Exception:  # noqa: BLE001 - the tenant's own setup failed: details stay here
        log.exception("a %s message could not be checked against the policy", msg.metadata.message_type)
        return _error(msg, keys.TENANT_ERROR, _public_failure(policy, msg))
    return _public_reply(policy, msg, reply)


def _tenant_id(context: Context) -> int:
    """The tenant's public number (as every reply's ``tenant-id``), for the server's records."""
    value = context.node_config.get("tenant-id", context.node_config.get("partition-id", 0))
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


def _tenant(context: Context):
    from fedlora.client.task import ledger_for, tenant_from_node_config
    from fedlora.common.config import parse_config

    cfg = parse_config(context.run_config)
    tenant = tenant_from_node_config(context.node_config, cfg)
    return cfg, tenant, ledger_for(tenant)


def _check(policy: TenantPolicy, msg: Message, cfg, tenant, ledger, *, signed: bool) -> None:
    from fedlora.client.policy_check import check, message_problems, run_problems

    records = count_records(tenant.train_path)
    kind = msg.metadata.message_type
    neighbours = None
    if kind == f"train.{wire.SETUP}":
        try:
            neighbours = len(wire.read_setup_request(msg.content)["neighbours"])
        except (KeyError, ValueError, TypeError):
            neighbours = None  # malformed: the handler refuses it
    run = str(msg.metadata.run_id)
    evaluations = ledger.evaluations(run=run) if kind == "evaluate" else None
    lifetime = ledger.evaluations() if kind == "evaluate" else None
    check([*run_problems(policy, cfg, num_records=records),
           *[("data", p) for p in data_problems(policy, records)],
           *message_problems(policy, kind, neighbours=neighbours, evaluations=evaluations,
                             lifetime_evaluations=lifetime, signed=signed)])
    if _evaluates_first(msg) and (ledger.evaluations(run=run) >= policy.evaluation.max_per_run
                                  or ledger.evaluations() >= policy.evaluation.max_lifetime):
        log.warning("round %s: the run's evaluation budget is spent; training without the evaluation it asked for",
                    msg.content.config_records[keys.CONFIG].get(keys.ROUND))
        msg.content.config_records[keys.CONFIG][keys.EVALUATE_FIRST] = False


def _evaluates_first(msg: Message) -> bool:
    if not msg.has_content() or keys.CONFIG not in msg.content.config_records:
        return False
    return bool(msg.content.config_records[keys.CONFIG].get(keys.EVALUATE_FIRST, False))


def _handle(policy: TenantPolicy, msg: Message, context: Context, call_next) -> Message:
    try:
        return call_next(msg, context)
    except PolicyDeclined:
        raise
    except Exception:  # noqa: BLE001 - as Flower would, but the text stays on the node
        if policy.reply.errors == "full":
            raise
        log.exception("a %s message failed", msg.metadata.message_type)
        return _error(msg, keys.TENANT_ERROR, _public_failure(policy, msg))


def node_limits(context: Context):
    """The ledger limits of this node's policy (:class:`fedlora.client.policy.PrivacyLimits`), or None."""
    path = policy_path(context)
    return None if path is None else load_policy(path).limits


def _count_evaluation(policy: TenantPolicy, msg: Message, reply: Message, ledger, context: Context) -> None:
    if reply.has_error():
        return
    kind = msg.metadata.message_type
    evaluated = kind == "evaluate" or keys.EVALUATION in reply.content.metric_records
    if evaluated:
        ledger.record_evaluation(run=str(msg.metadata.run_id), tenant=_tenant_id(context), message=kind)


def _public_failure(policy: TenantPolicy, msg: Message) -> str:
    return (f"tenant-error: the tenant could not handle this {msg.metadata.message_type} message; its operator "
            "has the details in the node's log")


def _public_reply(policy: TenantPolicy, msg: Message, reply: Message) -> Message:
    if reply.has_error():
        if policy.reply.errors == "full" or reply.error.code == keys.POLICY_DECLINED:
            return reply
        code = _PUBLIC_ERRORS.get(reply.error.code)
        log.warning("a %s message ended in error %s: %s", msg.metadata.message_type, reply.error.code,
                    reply.error.reason)
        if code == "budget":
            text = "privacy budget exhausted: the tenant's budget does not allow this round [budget]"
        elif code == "secagg-refused":
            text = "secagg-refused: the tenant refused this secure-aggregation request [secagg-refused]"
        else:
            text = _public_failure(policy, msg)
        return _error(msg, reply.error.code if code else keys.TENANT_ERROR, text)
    content = reply.content
    for name in list(content.metric_records):
        metrics = dict(content.metric_records[name])
        training = name == keys.METRICS and msg.metadata.message_type != "evaluate"
        content.metric_records[name] = MetricRecord(
            _train_metrics(policy, metrics) if training else _eval_metrics(policy, metrics))
    return reply


def _train_metrics(policy: TenantPolicy, metrics: dict) -> dict:
    allowed = keys.REQUIRED_METRICS | set(policy.reply.train_metrics)
    return {k: v for k, v in metrics.items() if k in allowed}


_RNG = random.SystemRandom()


def _eval_metrics(policy: TenantPolicy, metrics: dict) -> dict:
    e = policy.evaluation
    out = {}
    for k, v in metrics.items():
        if k in keys.REQUIRED_METRICS:
            out[k] = v
        elif k in e.metrics:
            v = float(v) + (_RNG.gauss(0.0, e.noise) if e.noise > 0 else 0.0)
            out[k] = round(v / e.round_to) * e.round_to if e.round_to > 0 else v
    return out


def _error(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _record_decline(msg: Message, context: Context, why: PolicyDeclined) -> None:
    """The whole request, on the node: one JSON line in ``<state dir>/policy/declines.jsonl``."""
    from fedlora.client.task import node_state_dir

    log.warning("declined a %s message of run %s: %s", msg.metadata.message_type, msg.metadata.run_id, why.public)
    entry = {"at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "run": msg.metadata.run_id,
             "message_type": msg.metadata.message_type, "code": why.code, "reason": why.public,
             "config": dict(msg.content.config_records[keys.CONFIG]) if msg.has_content() and
             keys.CONFIG in msg.content.config_records else {},
             "run_config": dict(context.run_config), "node_config": dict(context.node_config)}
    try:
        path = node_state_dir(context) / DECLINE_LOG
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=str) + "\n")
    except (OSError, ValueError) as err:
        log.error("could not write the decline to the node's log file: %s", err)


_COUNTS: dict[tuple, int] = {}


def count_records(path: Path) -> int:
    """Training records in a JSONL file (non-blank lines), cached per file, size and time."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _COUNTS:
        with path.open("rb") as f:
            _COUNTS[key] = sum(1 for line in f if line.strip())
    return _COUNTS[key]
