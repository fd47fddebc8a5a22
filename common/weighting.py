"""A tenant's weight in the aggregate, from the example count it claims.

Both sides apply the same rule: the server to the claims it sees (plain transport), the
tenant to its own count under secure aggregation, where the weight travels inside the
masked sum. ``federation.weighting``:

* ``examples``: the count itself (FedAvg), capped at ``federation.max-weight``;
* ``sqrt-examples``: its square root (rounded, at least 1), capped the same way, so a
  tenant with 100x the data weighs 10x;
* ``uniform``: every tenant weighs 1 whatever it claims.

In deployment the federation operator may also declare, per registered node, the most
examples it will credit (``federation.example-caps``, written by ``fedlora deploy register
--max-examples``): the server counts ``min(claim, cap)`` for that node. The server can only
enforce this where it sees claims (plain transport); under secure aggregation the weight
travels inside the masked sum and only ``max-weight`` bounds it.
"""

from __future__ import annotations

import math

WEIGHTINGS = ("examples", "sqrt-examples", "uniform")


def tenant_weight(num_examples: int, *, rule: str, max_weight: int) -> int:
    """The integer weight of a tenant claiming ``num_examples`` (>= 1)."""
    n = max(int(num_examples), 1)
    if rule == "examples":
        w = n
    elif rule == "sqrt-examples":
        w = max(int(round(math.sqrt(n))), 1)
    elif rule == "uniform":
        w = 1
    else:
        raise ValueError(f"unknown weighting {rule!r}; choose one of {', '.join(WEIGHTINGS)}")
    return min(w, max_weight)


def parse_caps(text: str) -> dict[int, int]:
    """``"NODE:N,NODE:N"`` -> {node id: most examples credited}; raises ValueError with the entry."""
    caps: dict[int, int] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        node, sep, n = entry.partition(":")
        try:
            if not sep:
                raise ValueError
            node_id, cap = int(node), int(n)
        except ValueError:
            raise ValueError(f"{entry!r} is not NODE-ID:MAX-EXAMPLES") from None
        if cap < 1:
            raise ValueError(f"{entry!r}: the cap must be at least 1")
        caps[node_id] = cap
    return caps
