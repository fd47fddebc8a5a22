"""Authenticated SecAgg+: a tenant with a roster shares nothing with keys its neighbours did not sign.

Driven through fedlora's own client state machine, with the server's relay played by the test
(a malicious server substitutes, drops or replays keys).
"""

from __future__ import annotations

import json

import pytest

from fedlora.client import secagg as client
from fedlora.common import secagg_crypto as crypto
from fedlora.common.credentials import write_node_keypair
from fedlora.common.secagg_identity import RosterError, load_identity_key, load_roster, sign, statement

NODES = (11, 12, 13)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Three nodes' identity keys (SuperNode keys) and the operator's roster of them."""
    root = tmp_path_factory.mktemp("identity")
    keys = {n: write_node_keypair(root, f"node-{n}") for n in NODES}
    roster = root / "roster.json"
    roster.write_text(json.dumps({str(n): pub.read_text() for n, (_, pub) in keys.items()}))
    return {n: load_identity_key(priv) for n, (priv, _) in keys.items()}, load_roster(roster), root


def _setup(federation, server_round=1):
    identity, _, _ = federation
    stores = {n: {} for n in NODES}
    replies = {n: client.setup(stores[n], node=n, server_round=server_round, attempt=1,
                               neighbours=[m for m in NODES if m != n], threshold=2, identity=identity[n])
               for n in NODES}
    return stores, replies


def _share(stores, replies, roster, node=11, server_round=1):
    relayed = {n: replies[n][:2] for n in NODES}
    return client.share_keys(stores[node], server_round=server_round, attempt=1, public_keys=relayed,
                             signatures={n: replies[n][2] for n in NODES}, roster=roster)


def test_honest_relay_of_signed_keys_is_accepted(federation):
    # Prepare
    stores, replies = _setup(federation)
    # Execute
    out = _share(stores, replies, federation[1])
    # Assert: a ciphertext for each neighbour
    assert sorted(out) == [12, 13]


def test_a_substituted_key_is_refused_and_no_share_leaves(federation):
    # Prepare: the server swaps node 12's keys for its own (it holds their private halves)
    stores, replies = _setup(federation)
    mine = crypto.new_private_key(), crypto.new_private_key()
    replies[12] = (crypto.public_bytes(mine[0]), crypto.public_bytes(mine[1]), replies[12][2])
    # Execute / Assert
    with pytest.raises(client.SecAggRefused, match="no share leaves this tenant: node 12's keys are not signed"):
        _share(stores, replies, federation[1])
    assert json.loads(stores[11]["state"])["stage"] == "setup"  # nothing was shared


def test_a_key_signed_by_a_key_not_on_the_roster_is_refused(federation, tmp_path):
    # Prepare: the server signs its substitute with a node key of its own (a Sybil it registered)
    stores, replies = _setup(federation)
    priv, _ = write_node_keypair(tmp_path, "sybil")
    c, s = crypto.public_bytes(crypto.new_private_key()), crypto.public_bytes(crypto.new_private_key())
    replies[13] = (c, s, sign(load_identity_key(priv), statement(1, 1, 13, c, s)))
    # Execute / Assert
    with pytest.raises(client.SecAggRefused, match="node 13's keys are not signed by its rostered identity key"):
        _share(stores, replies, federation[1])


def test_an_unknown_node_and_an_unsigned_key_are_refused(federation):
    identity, roster, _ = federation
    stores, replies = _setup(federation)
    without_13 = {n: k for n, k in roster.items() if n != 13}
    with pytest.raises(client.SecAggRefused, match="node 13 is not on this tenant's roster"):
        _share(stores, replies, without_13)
    stores, replies = _setup(federation)
    replies[12] = (*replies[12][:2], b"")
    with pytest.raises(client.SecAggRefused, match="node 12's keys carry no signature"):
        _share(stores, replies, roster)


def test_keys_signed_for_another_round_are_refused(federation):
    # Prepare: node 12's genuine, signed keys of round 1, replayed by the server in round 2
    _, old = _setup(federation, server_round=1)
    stores, replies = _setup(federation, server_round=2)
    replies[12] = old[12]
    # Execute / Assert
    with pytest.raises(client.SecAggRefused, match="node 12's keys are not signed"):
        _share(stores, replies, federation[1], server_round=2)


def test_a_broken_roster_names_the_file_and_the_entry(tmp_path):
    bad = tmp_path / "roster.json"
    bad.write_text(json.dumps({"11": "not a key"}))
    with pytest.raises(RosterError, match=r"roster .*roster.json, node 11: not an OpenSSH public key"):
        load_roster(bad)
    with pytest.raises(RosterError, match="get it from the federation's operator"):
        load_roster(tmp_path / "missing.json")
