"""A server that substitutes one tenant's neighbours' keys, against tenants with a roster: every
tenant handed a substituted key refuses key sharing with the reason, the round records why, and
no share leaves those tenants (the server never holds a share it could open). A server that skips
the consistency round, or lies in it, gets no unmask share either."""

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
        self.identity, self.roster, self.shared, self.unmasked = identity, roster, False, False

    def __call__(self, msg):
        stage, c = msg.metadata.message_type.split(".", 1)[1], msg.content
        if stage == self.fail_at:
            self.fail_at = None  # lost once: no reply, as a node that went away
            return None
        try:
            if stage == wire.SETUP:
                out = wire.setup_reply(*client.setup(self.store, node=self.node, identity=self.identity,
                                                     **wire.read_setup_request(c)))
            elif stage == wire.SHARE:
                out = wire.share_reply(client.share_keys(self.store, roster=self.roster,
                                                         **wire.read_share_request(c)))
                self.shared = True
            elif stage == wire.CONSISTENCY:
                out = wire.consistency_reply(client.consistency(self.store, identity=self.identity,
                                                                **wire.read_consistency_request(c)))
            elif stage == wire.UNMASK:
                out = wire.unmask_reply(client.unmask(self.store, roster=self.roster, **wire.read_unmask_request(c)))
                self.unmasked = True
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


def test_an_authenticated_round_completes_through_the_consistency_round(tmp_path, tenants):
    _, record, grid = _run(tmp_path, tenants)
    assert record["aggregated"] is True and record["secagg"]["finished"] == 4
    stages = [t.split(".", 1)[1] for t in grid.sent]
    assert stages.count(wire.CONSISTENCY) == 4 and stages.index(wire.CONSISTENCY) < stages.index(wire.UNMASK)


def test_a_server_that_skips_the_consistency_round_gets_no_unmask_share(tmp_path, tenants, monkeypatch):
    # Prepare: the server sends the unmask requests without the survivors' signatures
    real = wire.unmask_request
    monkeypatch.setattr(wire, "unmask_request", lambda r, a, active, dead, **_: real(r, a, active, dead))
    # Execute
    result, record, _ = _run(tmp_path, tenants)
    # Assert: every tenant refused to unmask, with the reason; the round failed, nothing revealed
    refused = [d for d in record["dropped"] if "unmasking" in d["reason"]]
    assert len(refused) == 4 and all("the unmask request's survivor set None is not the one" in d["reason"]
                                     for d in refused)
    assert record["aggregated"] is False and not any(t.unmasked for t in tenants.values())


def test_a_survivor_set_signature_swapped_in_transit_is_refused(tmp_path, tenants, monkeypatch):
    # Prepare: the server hands each tenant node 102's signature in place of node 103's
    real = wire.unmask_request

    def swap(r, a, active, dead, *, survivors=None, signatures=None):
        if signatures and 103 in signatures and 102 in signatures:
            signatures = {**signatures, 103: signatures[102]}
        return real(r, a, active, dead, survivors=survivors, signatures=signatures)

    monkeypatch.setattr(wire, "unmask_request", swap)
    # Execute
    _, record, _ = _run(tmp_path, tenants)
    # Assert: the tenants shown the swapped signature refuse; too few are left to unmask
    reasons = [d["reason"] for d in record["dropped"] if d["node"] in (101, 104)]
    assert reasons and all("node 103's survivor set is not signed by its rostered identity key" in r for r in reasons)
    assert record["aggregated"] is False


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


def test_a_tenant_lost_in_the_consistency_round_still_counts_and_the_others_unmask(tmp_path, tenants):
    # Prepare: node 103 uploads, then goes away before it signs the survivor set
    tenants[103].fail_at = wire.CONSISTENCY
    # Execute
    _, record, grid = _run(tmp_path, tenants)
    # Assert: its vector is in the sum (it uploaded); the three others signed, which meets every
    # threshold (3 of 4 holders), and unmasked; the record names the stage it was lost in
    assert record["aggregated"] is True and record["secagg"]["finished"] == 4
    assert record["secagg"]["dropped_per_stage"]["consistency"] == 1
    stages = [t.split(".", 1)[1] for t in grid.sent]
    assert stages.count(wire.UNMASK) == 3
