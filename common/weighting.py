"""A tenant's weight in the aggregate, from the example count it claims.

Both sides apply the same rule: the server to the claims it sees (plain transport), the
tenant to its own count under secure aggregation, where the weight travels inside the
masked sum. ``federation.weighting``:

* ``examples``: the count itself (FedAvg), capped at ``federation.max-weight``;
* ``sqrt-examples``: its square root (rounded, at least 1), capped the same way, so a
  tenant with 100x the data weighs 10x;
* ``uniform``: every tenant weighs 1 whatever it claims.
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
