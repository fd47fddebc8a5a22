"""The consistency round of authenticated SecAgg+: a tenant with a roster reveals unmask shares only
for the survivor set it signed, and only when at least its threshold of share holders signed that
same set. Driven through fedlora's own client state machine; the test plays a server that lies
about who survived (to obtain a node's mask key from one tenant and its self-mask seed from another).
"""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest

from fedlora.client import secagg as client
from fedlora.common.config import FederationConfig, SecAggConfig
from fedlora.common.credentials import write_node_keypair
from fedlora.common.secagg import quantizer_for
from fedlora.common.secagg_identity import load_identity_key, load_roster, sign, survivors_statement

NODES = (11, 12, 13, 14)  # everyone neighbours everyone; threshold 3 of 4 share holders
Q = quantizer_for(SecAggConfig(enabled=True), FederationConfig(max_weight=1))
DELTA = OrderedDict([("x.lora_A.weight", np.full((2, 2), 0.25, np.float32))])


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("consistency")
    pairs = {n: write_node_keypair(root, f"node-{n}") for n in NODES}
    roster = root / "roster.json"
    roster.write_text(json.dumps({str(n): pub.read_text() for n, (_, pub) in pairs.items()}))
    return {n: load_identity_key(priv) for n, (priv, _) in pairs.items()}, load_roster(roster)


def _uploaded(federation):
    """Every node through setup, key sharing and its masked upload (round 1, attempt 1)."""
    identity, roster = federation
    stores = {n: {} for n in NODES}
    keys = {n: client.setup(stores[n], node=n, server_round=1, attempt=1, neighbours=[m for m in NODES if m != n],
                            threshold=3, identity=identity[n]) for n in NODES}
    sealed = {n: client.share_keys(stores[n], server_round=1, attempt=1, public_keys={m: k[:2] for m, k in keys.items()},
                                   signatures={m: k[2] for m, k in keys.items()}, roster=roster) for n in NODES}
    for n in NODES:
        client.masked_upload(stores[n], server_round=1, attempt=1, quantizer=Q, train=lambda: (DELTA, 1),
                             ciphertexts={m: sealed[m][n] for m in NODES if m != n})
    return stores


def _sign_all(stores, federation, survivors, nodes=NODES):
    identity, _ = federation
    return {n: client.consistency(stores[n], server_round=1, attempt=1, survivors=survivors, identity=identity[n])
            for n in nodes}


def _unmask(stores, roster, node, survivors, signatures):
    active = [m for m in NODES if m in survivors]
    dead = [m for m in NODES if m not in survivors]
    return client.unmask(stores[node], server_round=1, attempt=1, active=active, dead=dead, survivors=survivors,
                         signatures={m: s for m, s in signatures.items() if m != node}, roster=roster)


def test_an_honest_consistency_round_releases_the_shares(federation):
    # Prepare: node 14 uploaded nothing usable, so the survivors are 11, 12, 13
    stores, survivors = _uploaded(federation), [11, 12, 13]
    sigs = _sign_all(stores, federation, survivors, nodes=survivors)
    held = json.loads(stores[11]["state"])
    # Execute
    out = _unmask(stores, federation[1], 11, survivors, sigs)
    # Assert: self-mask seed shares for the survivors, the mask-key share for node 14, nothing else
    assert {n: s.hex() for n, s in out.items()} == {11: held["b_shares"]["11"], 12: held["b_shares"]["12"],
                                                  13: held["b_shares"]["13"], 14: held["sk_shares"]["14"]}


def test_two_survivor_views_cannot_both_gather_signatures(federation):
    # Prepare: the server tells 11 and 12 that node 14 survived and tells 13 it dropped
    stores = _uploaded(federation)
    identity, roster = federation
    view_a, view_b = [11, 12, 13, 14], [11, 12, 13]
    sigs = {**_sign_all(stores, federation, view_a, nodes=(11, 12, 14)),
            13: client.consistency(stores[13], server_round=1, attempt=1, survivors=view_b, identity=identity[13])}
    # Execute / Assert: node 13 sees only its own signature on its view (below the threshold 3)...
    with pytest.raises(client.SecAggRefused, match="only 1 of this tenant's share holders signed"):
        _unmask(stores, roster, 13, view_b, {})
    # ... and a signature made over the other view does not count for it
    with pytest.raises(client.SecAggRefused, match="node 11's survivor set is not signed"):
        _unmask(stores, roster, 13, view_b, {11: sigs[11], 12: sigs[12]})
    assert json.loads(stores[13]["state"])["stage"] == "consistent"  # it still holds its shares


def test_unmasking_without_the_consistency_round_is_refused(federation):
    stores = _uploaded(federation)
    with pytest.raises(client.SecAggRefused, match="no consistency round before unmasking"):
        client.unmask(stores[11], server_round=1, attempt=1, active=list(NODES), dead=[], roster=federation[1])


def test_an_unmask_request_for_another_set_than_the_signed_one_is_refused(federation):
    stores, survivors = _uploaded(federation), list(NODES)
    sigs = _sign_all(stores, federation, survivors)
    with pytest.raises(client.SecAggRefused, match="is not the one this tenant signed"):
        _unmask(stores, federation[1], 11, [11, 12, 13], sigs)


def test_a_forged_survivor_signature_is_refused(federation, tmp_path):
    # Prepare: the server signs node 12's consistency with a key of its own
    stores, survivors = _uploaded(federation), list(NODES)
    sigs = _sign_all(stores, federation, survivors)
    priv, _ = write_node_keypair(tmp_path, "sybil")
    sigs[12] = sign(load_identity_key(priv), survivors_statement(1, 1, survivors))
    # Execute / Assert
    with pytest.raises(client.SecAggRefused, match="node 12's survivor set is not signed by its rostered"):
        _unmask(stores, federation[1], 11, survivors, sigs)


def test_a_survivor_set_without_this_tenant_or_below_the_threshold_is_refused(federation):
    stores = _uploaded(federation)
    with pytest.raises(client.SecAggRefused, match="leaves out this tenant"):
        client.consistency(stores[11], server_round=1, attempt=1, survivors=[12, 13, 14])
    with pytest.raises(client.SecAggRefused, match="below the threshold 3"):
        client.consistency(stores[11], server_round=1, attempt=1, survivors=[11, 12])
