"""A tenant's secure-aggregation state machine refuses what it must refuse, with the reason."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from fedlora.client import secagg as client
from fedlora.common.secagg import Quantizer

Q = Quantizer(clip=8.0, bits=22, modulus_bits=32, max_weight=100)
DELTA = OrderedDict([("w", np.full((2, 2), 0.01, np.float32))])


def _three_tenants(delta=DELTA):
    """Nodes 1, 2, 3 (complete graph, threshold 2) taken through setup and key sharing."""
    stores = {n: {} for n in (1, 2, 3)}
    pks = {n: client.setup(stores[n], node=n, server_round=1, attempt=1,
                           neighbours=[m for m in stores if m != n], threshold=2) for n in stores}
    cts = {n: client.share_keys(stores[n], server_round=1, attempt=1, public_keys=pks) for n in stores}
    inbox = {n: {src: cts[src][n] for src in stores if src != n} for n in stores}
    return stores, inbox


def _upload(store, inbox, delta=DELTA, n=10):
    return client.masked_upload(store, server_round=1, attempt=1, ciphertexts=inbox, quantizer=Q,
                                train=lambda: (delta, n))


def test_contradictory_unmask_request_is_refused():
    # Prepare: node 1 uploaded
    stores, inbox = _three_tenants()
    _upload(stores[1], inbox[1])
    # Execute / Assert: node 2 listed as both active and dropped
    with pytest.raises(client.SecAggRefused, match=r"contradictory unmask request: node\(s\) \[2\]"):
        client.unmask(stores[1], server_round=1, attempt=1, active=[1, 2, 3], dead=[2])


def test_unmask_reveals_one_share_per_node_and_only_once():
    stores, inbox = _three_tenants()
    _upload(stores[1], inbox[1])
    shares = client.unmask(stores[1], server_round=1, attempt=1, active=[1, 2], dead=[3])
    assert sorted(shares) == [1, 2, 3]
    with pytest.raises(client.SecAggRefused, match="stage out of order"):
        client.unmask(stores[1], server_round=1, attempt=1, active=[1, 2, 3], dead=[])


def test_unmask_below_threshold_is_refused():
    stores, inbox = _three_tenants()
    _upload(stores[1], inbox[1])
    with pytest.raises(client.SecAggRefused, match="below the threshold 2"):
        client.unmask(stores[1], server_round=1, attempt=1, active=[1], dead=[2, 3])


def test_nan_update_is_refused_before_masking_with_the_reason():
    stores, inbox = _three_tenants()
    bad = OrderedDict([("w", np.array([[0.0, np.nan], [0.0, 0.0]], np.float32))])
    with pytest.raises(client.SecAggRefused, match="update tensor w contains NaN or Inf; nothing was sent"):
        _upload(stores[1], inbox[1], delta=bad)


def test_update_outside_clipping_range_is_refused():
    stores, inbox = _three_tenants()
    big = OrderedDict([("w", np.full((2, 2), 20.0, np.float32))])
    with pytest.raises(client.SecAggRefused, match="outside the clipping range"):
        _upload(stores[1], inbox[1], delta=big, n=100)


def test_masked_vector_hides_the_update_and_masks_cancel_in_the_sum():
    # Prepare
    stores, inbox = _three_tenants()
    # Execute: all three upload; add their vectors mod 2^32
    vecs = [_upload(stores[n], inbox[n]) for n in (1, 2, 3)]
    # Assert: one masked vector looks nothing like the packed update; the pairwise masks
    # cancel, so the sum minus the three self masks is the sum of packed updates
    from fedlora.common.secagg import pack, prg_mask
    import json

    packed = pack(DELTA, 10, Q)
    assert np.count_nonzero(vecs[0] == packed) <= 1
    total = (vecs[0] + vecs[1] + vecs[2]).astype(Q.dtype)
    for n in (1, 2, 3):
        total -= prg_mask(bytes.fromhex(json.loads(stores[n]["state"])["b"]), total.size, Q)
    np.testing.assert_array_equal(total, (3 * packed.astype(np.uint64)).astype(Q.dtype))


def test_second_masked_upload_in_a_round_is_refused():
    stores, inbox = _three_tenants()
    _upload(stores[1], inbox[1])
    with pytest.raises(client.SecAggRefused, match="already sent a masked update in round 1"):
        client.setup(stores[1], node=1, server_round=1, attempt=2, neighbours=[2, 3], threshold=2)


def test_weak_threshold_and_missing_shares_are_refused():
    with pytest.raises(client.SecAggRefused, match="strict majority"):
        client.setup({}, node=1, server_round=1, attempt=1, neighbours=[2, 3, 4], threshold=2)
    stores, inbox = _three_tenants()
    del inbox[1][3]
    with pytest.raises(client.SecAggRefused, match=r"shares from \[2\] but the neighbours are \[2, 3\]"):
        _upload(stores[1], inbox[1])


def test_tampered_share_is_refused():
    stores, inbox = _three_tenants()
    inbox[1][2] = inbox[1][3]  # node 3's ciphertext relayed as if from node 2
    with pytest.raises(client.SecAggRefused, match="failed authentication"):
        _upload(stores[1], inbox[1])


def test_client_app_turns_a_refusal_into_an_error_reply_with_the_reason():
    # Prepare: an unmask request to a node that never took part in this round
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.client.handlers import secagg_unmask
    from fedlora.common import messages as keys
    from fedlora.common import secagg_wire as wire

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    msg = Message(wire.unmask_request(1, 1, [7, 8], [8]), message_type=wire.message_type(wire.UNMASK), dst_node_id=7)
    # Execute
    reply = secagg_unmask(msg, ctx)
    # Assert
    assert reply.has_error() and reply.error.code == keys.SECAGG_REFUSED
    assert "this tenant holds nothing" in reply.error.reason
