"""The plain transport with a delta encoding: an encoded reply counts as its float32 decoding,
a malformed one is dropped with the tenant and the reason, and the round goes on."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedlora.common import messages as keys
from fedlora.common.adapter import to_arrayrecord
from fedlora.common.encoding import SCALE_SUFFIX, Encoding, encode
from fedlora.server.strategy import FedLoraStrategy
from fedlora.server.transport import PlainTransport
from tests.server.test_strategy import _task_identity  # noqa: F401  (fixture)

GLOBAL = OrderedDict(w=np.zeros((2, 4), np.float32))
INT8 = Encoding("int8", "row")


def _reply(msg: Message, arrays: ArrayRecord, tenant: int) -> Message:
    m = {k: 0.0 for k in keys.TRAIN_METRICS} | {keys.NUM_EXAMPLES: 10, keys.TENANT: tenant}
    return Message(RecordDict({keys.ARRAYS: arrays, keys.METRICS: MetricRecord(m)}), reply_to=msg)


def test_plain_transport_decodes_the_configured_encoding_and_drops_malformed_replies():
    # Prepare: three tenants: a good int8 reply, one without its scales, one in fp32
    transport = PlainTransport(max_examples=100, weight_of=lambda n, node=0: float(n), encoding=INT8)
    sent, _ = transport.configure(1, [1, 2, 3], to_arrayrecord(GLOBAL), ConfigRecord({keys.ROUND: 1}), grid=None)
    delta = OrderedDict(w=np.array([[127 / 128, -0.5, 0, 0], [0, 0, 0, 2.0]], np.float32))
    good = encode(delta, INT8).record()
    no_scale = encode(delta, INT8).record()
    del no_scale["w" + SCALE_SUFFIX]
    replies = [_reply(sent[0], good, 0), _reply(sent[1], no_scale, 1), _reply(sent[2], to_arrayrecord(delta), 2)]
    # Execute
    got = transport.collect(1, replies, reference=GLOBAL)
    # Assert: the good reply is its exact float32 decoding; the others dropped, named, with the reason
    assert [u.node for u in got.updates] == [1]
    np.testing.assert_array_equal(got.updates[0].delta["w"], delta["w"])
    assert got.dropped == [(2, "tensor w: int8 without its scale entry w::scale"),
                           (3, "tensor w: encoded as fp32, but federation.delta-encoding is int8")]
    assert got.bytes_up == sum(r.content.array_records[keys.ARRAYS].count_bytes() for r in replies)


def test_strategy_gives_the_plain_transport_the_run_encoding(tmp_path):
    from fedlora.common.config import FederationConfig
    from fedlora.server.aggregation import FedAvg
    from fedlora.server.records import RoundRecorder

    strategy = FedLoraStrategy(FederationConfig(delta_encoding="bf16"), FedAvg(), RoundRecorder(tmp_path,
                               save=lambda p, s, r: None))
    assert strategy.transport.encoding == Encoding("bf16")
