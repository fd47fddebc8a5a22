"""The federation operator's record of admitted tenants: node id -> public key and the most
examples the server will credit that node (``fedlora deploy register --max-examples N``).

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


def record(flwr_home: Path, node_id: int, *, public_key: Path, max_examples: int | None) -> Path:
    """Remember an admitted node (and its cap, when the operator gave one)."""
    entries = read(flwr_home)
    entries[str(node_id)] = {"public_key": str(public_key), "max_examples": max_examples}
    path = Path(flwr_home) / REGISTRY_FILE
    write_json_atomic(path, entries)
    return path


def example_caps(flwr_home: Path) -> str:
    """The ``federation.example-caps`` value for every node with a cap ("" when none)."""
    return ",".join(f"{node}:{e['max_examples']}" for node, e in sorted(read(flwr_home).items(), key=lambda kv: int(kv[0]))
                    if e.get("max_examples"))
