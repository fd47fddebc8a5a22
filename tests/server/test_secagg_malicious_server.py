"""A server that substitutes one tenant's neighbours' keys, against tenants with a roster: every
tenant handed a substituted key refuses key sharing with the reason, the round records why, and
no share leaves those tenants (the server never holds a share it could open)."""

from __future__ import annotations

import json

import pytest
from flwr.app import Error, Message

from fedlora.client import secagg as client
from fedlora.common import messages as keys
from fedlora.common import secagg_crypto as crypto
from fedlora.common import secagg_wire as wire
from fedlora.common.credentials import write_node_keypair
from fedlora.common.secagg_identity import load_identity_key, load_roster
from tests.server.test_secagg import Tenant, _deltas, _run


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


class SignedTenant(Tenant):
    """A tenant whose setup signs with its identity key and whose key sharing checks the roster."""

    def __init__(self, node, delta, identity, roster) -> None:
        super().__init__(node, delta, 10)
        self.identity, self.roster, self.shared = identity, roster, False

    def __call__(self, msg):
        stage, c = msg.metadata.message_type.split(".", 1)[1], msg.content
        try:
            if stage == wire.SETUP:
                out = wire.setup_reply(*client.setup(self.store, node=self.node, identity=self.identity,
                                                     **wire.read_setup_request(c)))
            elif stage == wire.SHARE:
                out = wire.share_reply(client.share_keys(self.store, roster=self.roster,
                                                         **wire.read_share_request(c)))
                self.shared = True
            else:
                return super().__call__(msg)
        except client.SecAggRefused as why:
            return Message(Error(code=keys.SECAGG_REFUSED, reason=str(why)), reply_to=msg)
        return Message(out, reply_to=msg)


@pytest.fixture
def tenants(tmp_path):
    pairs = {101 + i: write_node_keypair(tmp_path, f"n{i}") for i in range(4)}
    roster_file = tmp_path / "roster.json"
    roster_file.write_text(json.dumps({str(n): pub.read_text() for n, (_, pub) in pairs.items()}))
    roster, deltas = load_roster(roster_file), _deltas(4)
    return {n: SignedTenant(n, deltas[i], load_identity_key(pairs[n][0]), roster) for i, n in enumerate(pairs)}


def test_an_authenticated_round_completes(tmp_path, tenants):
    _, record, _ = _run(tmp_path, tenants)
    assert record["aggregated"] is True and record["secagg"]["finished"] == 4


def test_substituted_keys_are_refused_and_no_share_leaves(tmp_path, tenants, monkeypatch):
    # Prepare: the server relays its own keys as node 102's to node 101 (the unmasking attack)
    real = wire.share_request
    evil = crypto.public_bytes(crypto.new_private_key()), crypto.public_bytes(crypto.new_private_key())

    def substitute(server_round, attempt, keys_by_node):
        if 101 in keys_by_node and 102 in keys_by_node and len(keys_by_node) and substitute.victim:
            substitute.victim = False
            keys_by_node = {**keys_by_node, 102: (*evil, keys_by_node[102][2])}
        return real(server_round, attempt, keys_by_node)

    substitute.victim = True  # the first share request built is node 101's
    monkeypatch.setattr(wire, "share_request", substitute)
    # Execute
    result, record, _ = _run(tmp_path, tenants)
    # Assert: node 101 refused with the reason, shared nothing; the round did not unmask it
    refused = [d for d in record["dropped"] if d["node"] == 101]
    assert refused and "node 102's keys are not signed by its rostered identity key" in refused[0]["reason"]
    assert tenants[101].shared is False
    assert 101 not in [int(t) for t in record["finished"]]
