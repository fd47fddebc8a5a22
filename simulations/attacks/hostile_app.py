"""A ClientApp that is fedlora's own, except on one tenant whose training reply it rewrites.

The attack and the attacker come from the environment (the simulation engine's workers
inherit it): ``FEDLORA_ATTACK`` (``scale``, ``sign-flip``, ``noise``, ``max-examples``,
``flip-K`` (sign-flipped at K x its own norm, which is about the round's median), ``shift``
(each coordinate moved by its own magnitude, the same way every round), or ``none``), ``FEDLORA_ATTACKER`` (the tenant id, default 3) and ``FEDLORA_MAX_EXAMPLES``
(the count the ``max-examples`` attacker claims). The honest reply is computed by the
project's unchanged ClientApp handlers; only the delta or the claimed count is changed.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.client import client_app as honest
from fedlora.common import messages as keys
from fedlora.common.adapter import from_arrayrecord, to_arrayrecord

ATTACKS = ("none", "scale", "sign-flip", "noise", "max-examples", "flip-1", "flip-2", "flip-2.9", "shift")

app = ClientApp(mods=[honest.packed_arrays])  # the server packs its arrays for every ClientApp


def rewrite(delta: "OrderedDict[str, np.ndarray]", metrics: dict, attack: str, *, seed: int,
            max_examples: int) -> tuple["OrderedDict[str, np.ndarray]", dict]:
    """The attacker's version of an honest (delta, metrics) reply."""
    if attack == "scale":
        return OrderedDict((k, v * np.float32(100.0)) for k, v in delta.items()), metrics
    if attack == "sign-flip":
        return OrderedDict((k, v * np.float32(-10.0)) for k, v in delta.items()), metrics
    if attack == "noise":  # Gaussian noise at 10x the honest norm, in place of the update
        rng = np.random.default_rng(seed)
        noise = OrderedDict((k, rng.standard_normal(v.shape).astype(v.dtype)) for k, v in delta.items())
        norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values()))
        nnorm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in noise.values()))
        return OrderedDict((k, v * np.float32(10.0 * norm / nnorm)) for k, v in noise.items()), metrics
    if attack.startswith("flip-"):  # at the bounds: sign-flipped at k x its own (about the median) norm
        k = np.float32(-float(attack.removeprefix("flip-")))
        return OrderedDict((key, v * k) for key, v in delta.items()), metrics
    if attack == "shift":  # a little is enough: each coordinate moved by its own size, one fixed way every round
        signs = np.random.default_rng(12345)  # the same direction in every round
        return OrderedDict((key, v + np.abs(v) * signs.choice(np.array([-1, 1], v.dtype), size=v.shape))
                           for key, v in delta.items()), metrics
    if attack == "max-examples":
        return delta, {**metrics, keys.NUM_EXAMPLES: max_examples}
    return delta, metrics


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = honest.train(msg, context)
    attack = os.environ.get("FEDLORA_ATTACK", "none")
    if attack == "none" or reply.has_error():
        return reply
    metrics = dict(reply.content.metric_records[keys.METRICS])
    if int(metrics[keys.TENANT]) != int(os.environ.get("FEDLORA_ATTACKER", "3")):
        return reply
    delta = from_arrayrecord(reply.content.array_records[keys.ARRAYS])
    conf = msg.content.config_records[keys.CONFIG]
    delta, metrics = rewrite(delta, metrics, attack, seed=int(conf[keys.ROUND]),
                             max_examples=int(os.environ.get("FEDLORA_MAX_EXAMPLES", "100000")))
    content = RecordDict({keys.ARRAYS: to_arrayrecord(delta), keys.METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate(msg, context)
