"""The federation operator's record of admitted tenants: node id -> public key and the most
examples the server will credit that node (``fedlora deploy register --max-examples N``), and
the tenant it is (``--tenant-id N``: the server then takes a reply's tenant from its node, see
``fedlora.server.identity``).

Flower's ``flwr supernode register`` binds a public key to a node id; a node that
authenticates with that key is that node id in every run. ``fedlora deploy run`` turns the
caps recorded here into ``federation.example-caps``, which the server enforces over the
node's own claim (plain transport; see ``fedlora.common.weighting``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fedlora.common.files import write_json_atomic

REGISTRY_FILE = "fedlora-tenants.json"
_REGISTERED = re.compile(r"SuperNode (\d+) registered")


def node_id_from(output: str) -> int | None:
    """The node id in ``flwr supernode register``'s output, if it says one."""
    m = _REGISTERED.search(output)
    return int(m.group(1)) if m else None


def read(flwr_home: Path) -> dict[str, dict]:
    path = Path(flwr_home) / REGISTRY_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


class RegistryError(ValueError):
    """A registration that would make two nodes one tenant."""


def holder_of(flwr_home: Path, tenant_id: int, *, other_than: int | None = None) -> int | None:
    """The node registered as ``tenant_id`` (other than ``other_than``), if any."""
    return next((int(n) for n, e in read(flwr_home).items()
                 if e.get("tenant_id") == tenant_id and int(n) != other_than), None)


def record(flwr_home: Path, node_id: int, *, public_key: Path, max_examples: int | None,
           tenant_id: int | None = None) -> Path:
    """Remember an admitted node (its cap and its tenant id, when the operator gave them);
    a tenant id another node holds is :class:`RegistryError`."""
    entries = read(flwr_home)
    if tenant_id is not None and (held := holder_of(flwr_home, tenant_id, other_than=node_id)) is not None:
        raise RegistryError(f"tenant {tenant_id} is already node {held}; give each site its own --tenant-id")
    entries[str(node_id)] = {"public_key": str(public_key), "max_examples": max_examples,
                             **({"tenant_id": tenant_id} if tenant_id is not None else {})}
    path = Path(flwr_home) / REGISTRY_FILE
    write_json_atomic(path, entries)
    return path


def write_roster(flwr_home: Path, out: Path) -> int:
    """The roster tenants check their neighbours' secure-aggregation keys against (``{node id: public
    key line}``, :mod:`fedlora.common.secagg_identity`), from every registered node; returns how many."""
    entries = {}
    for node, e in sorted(read(flwr_home).items(), key=lambda kv: int(kv[0])):
        entries[node] = Path(e["public_key"]).read_text(encoding="utf-8").strip()
    write_json_atomic(out, entries)
    return len(entries)


def tenant_nodes(flwr_home: Path) -> str:
    """The ``federation.tenant-nodes`` value: each node registered with a tenant id ("" when none)."""
    return ",".join(f"{node}:{e['tenant_id']}" for node, e in sorted(read(flwr_home).items(), key=lambda kv: int(kv[0]))
                    if e.get("tenant_id") is not None)


def example_caps(flwr_home: Path) -> str:
    """The ``federation.example-caps`` value for every node with a cap ("" when none)."""
    return ",".join(f"{node}:{e['max_examples']}" for node, e in sorted(read(flwr_home).items(), key=lambda kv: int(kv[0]))
                    if e.get("max_examples"))
