"""A tenant that forges what it puts inside the masked vector, against the server's checks.

Under secure aggregation every tenant weighs 1, so the unmasked weight total must be exactly
the number of tenants summed: a forged weight element fails the round (the mean is never
divided by a total the attacker chose, so it is amplified by at most 1.0). The update
elements are bounded only by the sum check: each element of the unmasked total lies in
``[0, n * top]``, so the recovered mean lies in ``[-clip, clip]`` whatever one tenant sends.
One tenant can therefore move the mean by up to ``2 * clip`` per element (an honest tenant
by at most ``2 * clip / n``); no bound tighter than that holds without proofs of range.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest

from flwr.app import Message

from fedlora.client import secagg as client
from fedlora.common import secagg_wire as wire
from fedlora.common.adapter import from_arrayrecord
from fedlora.common.secagg import pack, quantizer_for
from tests.server.test_secagg import FED, GLOBAL, SEC, Tenant, _run


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


ZERO = OrderedDict((k, np.zeros(v.shape, np.float32)) for k, v in GLOBAL.items())


class Forger(Tenant):
    """A tenant whose packed vector is rewritten by ``forge(vector, q)`` before it is masked."""

    def __init__(self, node, forge) -> None:
        super().__init__(node, ZERO, 1)
        self.forge = forge
        real = client.masked_upload

        def masked_upload(store, **kw):
            return real(store, **{**kw, "pack_update": lambda d, w, q: self.forge(pack(d, w, q), q)})

        self._upload = masked_upload

    def __call__(self, msg):
        saved, client.masked_upload = client.masked_upload, self._upload
        try:
            return super().__call__(msg)
        finally:
            client.masked_upload = saved


def _fleet(forger, honest: int = 3):
    tenants = {101 + i: Tenant(101 + i, ZERO, 10) for i in range(honest)}
    tenants[200] = Forger(200, forger)
    return tenants


@pytest.mark.parametrize("weight", [0, 2, 500])
def test_a_forged_weight_element_fails_the_round(tmp_path, weight):
    # Prepare: three honest tenants and one whose weight element is not 1
    def forge(vec, q):
        vec[-1] = weight
        return vec

    # Execute
    result, record, _ = _run(tmp_path, _fleet(forge))
    # Assert: no aggregate (the global adapter did not move), and the record says why
    assert "a tenant forged its weight element" in record["secagg"]["failure"]
    assert record["aggregated"] is False
    for k, v in from_arrayrecord(result.arrays).items():
        np.testing.assert_array_equal(v, GLOBAL[k])


def test_one_tenants_largest_effect_is_the_clip_on_the_mean(tmp_path):
    # Prepare: honest tenants send zero deltas; the forger sends the largest total the check passes
    n = 4
    q = quantizer_for(SEC, FED).for_tenants(n)
    zero_point = int(round(q.clip / q.step))  # what a zero delta packs to (fp32's offset grid)

    def forge(vec, q):
        vec[:-1] = n * q.top - (n - 1) * zero_point
        return vec

    # Execute
    result, record, _ = _run(tmp_path, _fleet(forge))
    # Assert: aggregated, and every element of the mean moved by at most clip (the stated bound)
    assert record["aggregated"] is True and record["secagg"]["failure"] is None
    for k, v in from_arrayrecord(result.arrays).items():
        moved = np.abs(v.astype(np.float64) - GLOBAL[k])
        assert moved.max() <= q.clip * (1 + 1e-6) and moved.max() > 0.99 * q.clip


def test_one_step_past_the_bound_fails_the_round(tmp_path):
    n = 4
    q = quantizer_for(SEC, FED).for_tenants(n)
    zero_point = int(round(q.clip / q.step))

    def forge(vec, q):
        vec[:-1] = n * q.top - (n - 1) * zero_point + 1
        return vec

    _, record, _ = _run(tmp_path, _fleet(forge))
    assert "out of range" in record["secagg"]["failure"] and record["aggregated"] is False


class Corrupter(Tenant):
    """An honest tenant, except that every share it reveals in the unmasking has one byte flipped."""

    def __call__(self, msg):
        reply = super().__call__(msg)
        if msg.metadata.message_type.endswith(wire.UNMASK) and not reply.has_error():
            shares = wire.read_unmask_reply(reply.content)
            bad = {v: s[:-1] + bytes([s[-1] ^ 0x5A]) for v, s in shares.items()}
            return Message(wire.unmask_reply(bad), reply_to=msg)
        return reply


def test_a_corrupted_share_is_named_the_round_completes_and_its_holder_is_left_out_after(tmp_path):
    from tests.server.test_secagg import _deltas, _plain_mean, _bound

    # Prepare: five tenants (everyone's neighbour), tenant 104 corrupts every share it reveals
    deltas = _deltas(5)
    tenants = {101 + i: (Corrupter if i == 3 else Tenant)(101 + i, deltas[i], 10) for i in range(5)}
    # Execute: two rounds
    result, record, _ = _run(tmp_path, tenants, rounds=2)
    second = json.loads((tmp_path / "metrics" / "round_002.json").read_text())
    # Assert: round 1 is the plaintext mean of all five, and the culprit is named
    assert record["aggregated"] is True and record["secagg"]["failure"] is None
    assert list(record["secagg"]["inconsistent_shares"]) == ["104"]
    # round 2 leaves 104 out from the start and sums the other four
    assert second["aggregated"] is True and second["secagg"]["finished"] == 4
    assert any(d["node"] == 104 and "excluded" in d["reason"] for d in second["dropped"])
    want = _plain_mean(deltas, [1] * 5)
    want = {k: want[k] + (sum(d[k].astype(np.float64) for i, d in enumerate(deltas) if i != 3) / 4) for k in want}
    got = from_arrayrecord(result.arrays)
    for k in GLOBAL:
        assert np.max(np.abs(got[k] - want[k])) <= 2 * _bound(5, 5)
