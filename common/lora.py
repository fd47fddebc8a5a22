"""LoRA's two factors by name, for the rules of ``federation.lora-rule`` on both sides.

PEFT names a module's factors ``<module>.lora_A.weight`` (shape ``r x in``) and
``<module>.lora_B.weight`` (``out x r``); the module then computes ``W x + s B A x`` with
the scaling ``s = alpha / r``. A rank-``k`` part of an adapter is its first ``k``
components: the first ``k`` rows of every A and columns of every B. Tenants of lower rank
(``lora-rank`` in the node config, ``simulation.tenant-ranks`` in simulation) train such a
part; see ``fedlora.server.lora_rules`` and ``fedlora.client.lora_rules``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import numpy as np

A_TAG, B_TAG = ".lora_A.", ".lora_B."


def is_a(name: str) -> bool:
    return A_TAG in name


def is_b(name: str) -> bool:
    return B_TAG in name


def pairs(names) -> "OrderedDict[str, tuple[str, str]]":
    """module -> (its A tensor's name, its B tensor's name), for every module with both."""
    names = list(names)
    present = set(names)
    out: "OrderedDict[str, tuple[str, str]]" = OrderedDict()
    for a in names:
        if is_a(a) and a.replace(A_TAG, B_TAG) in present:
            out[a.split(A_TAG)[0]] = (a, a.replace(A_TAG, B_TAG))
    return out


def truncate(state: Mapping[str, np.ndarray], rank: int) -> "OrderedDict[str, np.ndarray]":
    """The rank-``rank`` part: A[:rank], B[:, :rank]; other tensors as they are."""
    return OrderedDict((k, v[:rank] if is_a(k) else v[:, :rank] if is_b(k) else v) for k, v in state.items())


def pad(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> "OrderedDict[str, np.ndarray]":
    """``state`` (a rank-k part) zero-padded to the shapes of ``reference`` (rank r >= k)."""
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for k, ref in reference.items():
        v = np.asarray(state[k])
        if v.shape == ref.shape:
            out[k] = v
            continue
        full = np.zeros(ref.shape, dtype=v.dtype)
        full[tuple(slice(0, d) for d in v.shape)] = v
        out[k] = full
    return out


def parse_ranks(text: str) -> list[int]:
    """``"8,4,2"`` -> [8, 4, 2] (``simulation.tenant-ranks``); ValueError names the bad item."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        try:
            out.append(int(item))
        except ValueError:
            raise ValueError(f"{item!r} is not an integer rank") from None
    return out
