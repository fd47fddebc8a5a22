"""Who a reply is from: the node Flower authenticated, never the tenant id the reply claims.

Every reply carries a ``tenant-id`` metric, but a reply is the tenant's own word. The
server's records, audit and report are keyed by tenant, so a node that claimed another
tenant's id would overwrite that tenant's entries (and two sites left at tenant 0 would
merge into one). A :class:`TenantRoster` binds each Flower node id (on a deployment, the id
the node's registered key authenticates as) to one tenant id:

* with the operator's assignment (``federation.tenant-nodes = "NODE-ID:TENANT,..."``, written
  by ``fedlora deploy register --tenant-id``), a node's replies must claim its assigned tenant,
  and a node without one is refused;
* without it (a simulation, a bare ``flwr run``), a node's first claim binds it for this start
  of the ServerApp: a later different claim, or a claim of a tenant another node holds, is
  refused. (A resumed simulation has new node ids, so bindings are not carried over.)

A refused reply is :class:`~fedlora.server.aggregation.Rejected`: it is dropped with the reason,
like any other invalid reply.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedlora.server.aggregation import Rejected


def parse_tenant_nodes(value: str) -> dict[int, int]:
    """``"NODE-ID:TENANT,..."`` -> {node id: tenant id}; raises ValueError naming the bad entry."""
    out: dict[int, int] = {}
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        node, sep, tenant = entry.partition(":")
        if not sep or not node.strip().isdigit() or not tenant.strip().isdigit():
            raise ValueError(f"federation.tenant-nodes entry {entry!r} is not NODE-ID:TENANT")
        if int(node) in out:
            raise ValueError(f"federation.tenant-nodes names node {node.strip()} twice")
        out[int(node)] = int(tenant)
    tenants = list(out.values())
    if len(set(tenants)) != len(tenants):
        twice = sorted({t for t in tenants if tenants.count(t) > 1})
        raise ValueError(f"federation.tenant-nodes gives tenant {twice[0]} to two nodes")
    return out


class TenantRoster:
    """Node id -> tenant id, assigned by the operator or bound by each node's first claim."""

    def __init__(self, assigned: Mapping[int, int] | None = None) -> None:
        self.assigned = dict(assigned or {})
        self._bound: dict[int, int] = dict(self.assigned)

    def tenant_of(self, node: int, claimed: float) -> int:
        """The tenant behind ``node``, checking what its reply ``claimed``; raises :class:`Rejected`."""
        if isinstance(claimed, bool) or not isinstance(claimed, (int, float)) or claimed != int(claimed) \
                or claimed < 0:
            raise Rejected(f"tenant-id {claimed!r} is not a tenant number")
        claimed = int(claimed)
        if self.assigned and node not in self.assigned:
            raise Rejected(f"node {node} is not a registered tenant (federation.tenant-nodes)")
        held = self._bound.get(node)
        if held is not None and held != claimed:
            why = "is registered as" if node in self.assigned else "answered earlier as"
            raise Rejected(f"claims tenant {claimed}, but node {node} {why} tenant {held}")
        other = next((n for n, t in self._bound.items() if t == claimed and n != node), None)
        if other is not None:
            raise Rejected(f"claims tenant {claimed}, which node {other} holds")
        self._bound[node] = claimed
        return claimed
