"""Secure aggregation with an int8 / bf16 delta encoding, end to end over a fake Grid: the
server sizes the quantizer for the round, the tenants (with error feedback) send uint16
vectors, and the round's mean is the plaintext mean within the quantizer's bound."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedlora.client import secagg as client
from fedlora.client.feedback import RESIDUAL_FILE, DeltaSender, ResidualStore
from fedlora.common import messages as keys
from fedlora.common import secagg_wire as wire
from fedlora.common.adapter import from_arrayrecord, to_arrayrecord
from fedlora.common.config import FederationConfig, SecAggConfig
from fedlora.common.encoding import encoding_for
from fedlora.common.secagg import quantizer_for
from fedlora.server.aggregation import FedAvg
from fedlora.server.records import RoundRecorder
from fedlora.server.secagg import SecAggTransport
from fedlora.server.strategy import FedLoraStrategy
from tests.server.test_secagg import FakeGrid, _task_identity  # noqa: F401  (fixture)

GLOBAL = OrderedDict([("x.lora_A.weight", np.zeros((8, 256), np.float32)),
                      ("x.lora_B.weight", np.zeros((256, 8), np.float32))])  # 4,096 floats
SEC = SecAggConfig(enabled=True, stage_timeout=5.0, clip=1.0)


class Tenant:
    """A tenant's four stages over a dict store; its delta leaves through a DeltaSender with error feedback."""

    def __init__(self, node: int, delta, weight: int, fed: FederationConfig, state_dir) -> None:
        self.node, self.delta, self.weight, self.fed, self.state_dir = node, delta, weight, fed, state_dir
        self.store: dict = {}

    def __call__(self, msg: Message) -> Message:
        stage, c = msg.metadata.message_type.split(".", 1)[1], msg.content
        try:
            if stage == wire.SETUP:
                out = wire.setup_reply(*client.setup(self.store, node=self.node, **wire.read_setup_request(c)))
            elif stage == wire.SHARE:
                out = wire.share_reply(client.share_keys(self.store, **wire.read_share_request(c)))
            elif stage == wire.UPLOAD:
                server_round = int(c.config_records[keys.CONFIG][keys.ROUND])
                sender = DeltaSender(encoding_for(self.fed), store=ResidualStore(self.state_dir), run="1",
                                     server_round=server_round)
                vec = client.masked_upload(self.store, quantizer=quantizer_for(SEC, self.fed),
                                           train=lambda: (self.delta, self.weight), pack_update=sender.secagg,
                                           **wire.read_upload_request(c))
                sender.commit()
                m = {k: 1.0 for k in keys.SECAGG_TRAIN_METRICS} | {keys.TENANT: self.node}
                out = RecordDict({keys.ARRAYS: wire.upload_array(vec), keys.METRICS: MetricRecord(m)})
            else:
                out = wire.unmask_reply(client.unmask(self.store, **wire.read_unmask_request(c)))
        except client.SecAggRefused as why:
            return Message(Error(code=keys.SECAGG_REFUSED, reason=str(why)), reply_to=msg)
        return Message(out, reply_to=msg)


def _run(tmp_path, encoding: str, rounds: int = 1):
    fed = FederationConfig(min_train_nodes=2, round_timeout=5.0, max_weight=100, fraction_evaluate=0.0,
                           delta_encoding=encoding)
    rng = np.random.default_rng(0)
    deltas = [OrderedDict((k, rng.normal(0, 0.01, v.shape).astype(np.float32)) for k, v in GLOBAL.items())
              for _ in range(3)]
    weights = [20, 50, 100]
    tenants = {101 + i: Tenant(101 + i, deltas[i], weights[i], fed, tmp_path / f"tenant_{i}") for i in range(3)}
    rec = RoundRecorder(tmp_path / encoding, save=lambda p, s, r: None)
    strategy = FedLoraStrategy(fed, FedAvg(), rec, transport=SecAggTransport(SEC, quantizer_for(SEC, fed), seed=0),
                               seed=0)
    result = strategy.start(grid=FakeGrid(tenants), initial_arrays=to_arrayrecord(GLOBAL), num_rounds=rounds,
                            timeout=5, evaluate_config=ConfigRecord())
    record = json.loads((tmp_path / encoding / "metrics" / "round_001.json").read_text())
    # every tenant weighs 1 under secure aggregation, whatever it claims
    want = OrderedDict((k, sum(d[k].astype(np.float64) for d in deltas) / len(deltas)) for k in GLOBAL)
    return result, record, want, quantizer_for(SEC, fed).for_tenants(3)


@pytest.mark.parametrize("encoding, bits, modulus", [("int8", 8, 8 + 3), ("bf16", 13, 16)])
def test_encoded_secure_round_is_the_plaintext_mean_within_the_bound(tmp_path, encoding, bits, modulus):
    # Execute: one secure round of three tenants (claiming 20, 50, 100 examples; each weighs 1)
    result, record, want, q = _run(tmp_path, encoding)
    # Assert: the sized quantizer is recorded; the mean is within n * max_weight * step / (2 W)
    assert record["secagg"]["quantizer"] == {"encoding": encoding, "bits": bits, "modulus_bits": modulus,
                                             "wire_dtype": "uint16"}
    got = from_arrayrecord(result.arrays)
    for k in GLOBAL:
        assert np.max(np.abs(got[k] - want[k])) <= q.mean_error_bound(3, 3) + 1e-6
    assert all((tmp_path / f"tenant_{i}" / RESIDUAL_FILE).is_file() for i in range(3))


def test_encoded_secure_round_sends_half_the_upload_bytes(tmp_path):
    # Execute: the same round with fp32 (uint32 words) and int8 (uint16 words)
    _, fp32, _, _ = _run(tmp_path, "fp32")
    _, int8, _, _ = _run(tmp_path, "int8")
    # Assert: every other stage is the same size; each of 3 masked vectors of 4,096 + 1 words is 2 bytes a word smaller
    assert fp32["bytes_up"] - int8["bytes_up"] == 3 * 4097 * 2
    assert fp32["secagg"].get("quantizer") is None  # fp32 records what it always recorded


def test_error_feedback_under_secure_aggregation_carries_the_rounding_into_round_two(tmp_path):
    # Execute: two rounds of the same deltas with int8
    result, _, want, q = _run(tmp_path, "int8", rounds=2)
    # Assert: two rounds moved the global adapter by ~2x the mean: round 2 re-sends round 1's rounding error,
    # so the error of the two-round total stays within one round's bound (not two)
    got = from_arrayrecord(result.arrays)
    for k in GLOBAL:
        assert np.max(np.abs(got[k] - 2 * want[k])) <= q.mean_error_bound(3, 3) + 1e-6
