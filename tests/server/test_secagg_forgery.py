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

from collections import OrderedDict

import numpy as np
import pytest

from fedlora.client import secagg as client
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
