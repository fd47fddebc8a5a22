"""Secure aggregation (SecAgg+, Bell et al. 2020): the arithmetic both sides share.

The server must learn only ``sum_k w_k * delta_k`` and ``sum_k w_k``. A run fixes every
``w_k`` at 1 (:func:`quantizer_for`: a weight inside the masked vector cannot be checked), so
the server checks the weight total exactly; the packing below allows integer weights up to
``max_weight``. Each tenant turns its delta and its weight into one integer vector (:func:`pack`), adds masks
that cancel in the sum (:func:`prg_mask`), and the server removes what is left of the
masks after the others reveal shares of the seeds (see ``fedlora.server.secagg``).

Vector layout (``n`` adapter floats, one weight element)::

    [ quantize((w / max_weight) * delta) ... ,  w ]   mod 2**modulus_bits

Quantization: each value ``x`` in ``[-clip, clip]`` becomes
``q = rint((x + clip) / step)`` with ``step = 2 * clip / top``, so
``|x - (q * step - clip)| <= step / 2``. The weight ``w`` (an integer, at most
``max_weight``) travels unquantized, so the total weight is exact. For ``n`` finishers
with total weight ``W`` the recovered weighted sum is off by at most
``n * max_weight * step / 2`` per element, and the weighted **mean** by at most
:func:`mean_error_bound` ``= n * max_weight * step / (2 * W)`` (plus float32 rounding
of the result). The modulus must hold the sum: ``n * max(top, max_weight) <
2**modulus_bits`` (:func:`capacity`).

Sizing, by ``federation.delta-encoding`` (:func:`quantizer_for`, :meth:`Quantizer.for_tenants`):

* **fp32**: ``secagg.quantization-bits`` levels mod ``2**secagg.modulus-bits``, as configured;
  ``top = 2**bits - 1`` (an even number of levels: 0 lies half a step off the grid, which
  is negligible at the default 22 bits);
* **int8**: 8 bits; **bf16**: 16-bit words — ``16 - headroom`` bits while the weight cap and
  at least 9 bits (bfloat16's significand and sign) fit beside the headroom, else 16 bits
  in 32-bit words. Both grids are **centred** (``top = 2**bits - 2``: an odd number of
  levels, 0 exactly on the grid, so small values are not all pushed half a step off), and
  the modulus is sized for the round's ``n`` tenants: ``max(bits, bit length of
  max_weight) + headroom``, ``headroom = ceil(log2 n) + 1``. The masked vector travels as
  uint16 where the modulus fits 16 bits (half of fp32's bytes), else uint32 / uint64. The
  server tells each tenant ``n`` with the upload request; both sides size the same way.
  The grid is fixed over ``[-secagg.clip, secagg.clip]`` (the tenants cannot each have a
  scale: the sum needs one grid), so int8's step is ``clip / 127``: set ``secagg.clip`` near
  the largest weighted delta element, or most of a small delta waits in the tenants' error
  feedback (``fedlora.client.feedback``) for later rounds.

Masks are the AES-256-CTR keystream (``cryptography``) keyed with the full 256-bit seed,
never folded to 32 bits: seeds that differ anywhere give unrelated masks.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from fedlora.common.weighting import tenant_weight

SEED_BYTES = 32


class UpdateRefused(ValueError):
    """A tenant's update that must not be masked and sent, with the reason."""


@dataclass(frozen=True)
class Quantizer:
    """Fixed-point encoding of the masked vector (see the module docstring)."""

    clip: float          # values must lie in [-clip, clip]
    bits: int            # quantization levels: 2**bits (2**bits - 1 on a centred grid)
    modulus_bits: int    # arithmetic is mod 2**modulus_bits
    max_weight: int      # cap on one tenant's FedAvg weight
    weighting: str = "examples"  # federation.weighting (fedlora.common.weighting)
    encoding: str = "fp32"       # federation.delta-encoding: fp32 as configured; bf16 / int8 sized per round

    @property
    def centred(self) -> bool:
        """Whether 0 is on the grid (the bf16 / int8 sizings)."""
        return self.encoding != "fp32"

    @property
    def top(self) -> int:
        """The largest quantized value (the grid is 0..top)."""
        return 2**self.bits - 1 - int(self.centred)

    @property
    def step(self) -> float:
        return 2.0 * self.clip / self.top

    @property
    def dtype(self) -> type:
        if self.modulus_bits <= 16:
            return np.uint16
        return np.uint32 if self.modulus_bits <= 32 else np.uint64

    def reduce(self, v: np.ndarray) -> np.ndarray:
        """``v mod 2**modulus_bits`` (the dtype wraps; smaller moduli are masked)."""
        if self.modulus_bits in (16, 32, 64):
            return v
        return v & self.dtype((1 << self.modulus_bits) - 1)

    def capacity(self) -> int:
        """Most tenants whose vectors can be summed without wrapping the modulus."""
        return (2**self.modulus_bits - 1) // max(self.top, self.max_weight)

    def mean_error_bound(self, n: int, total_weight: float) -> float:
        """Largest per-element error of the recovered weighted mean of ``n`` finishers."""
        return n * self.max_weight * self.step / (2.0 * total_weight)

    def for_tenants(self, n: int) -> "Quantizer":
        """This quantizer sized for a round that sums ``n`` tenants (fp32: itself, as configured)."""
        if not self.centred:
            return self
        bits, modulus = sized_bits(self.encoding, n, self.max_weight)
        return replace(self, bits=bits, modulus_bits=modulus)

    def describe(self) -> str:
        wire = np.dtype(self.dtype).name
        return f"{self.bits} bits mod 2^{self.modulus_bits} ({wire})"


def headroom_bits(n: int) -> int:
    """Bits the sum of ``n`` values needs above one value's: ``ceil(log2 n) + 1``."""
    return math.ceil(math.log2(max(n, 1))) + 1


def sized_bits(encoding: str, n: int, max_weight: int) -> tuple[int, int]:
    """(quantization bits, modulus bits) of ``encoding`` (bf16 / int8) for a sum of ``n`` tenants."""
    head, wbits = headroom_bits(n), int(max_weight).bit_length()
    if encoding == "int8":
        bits = 8
    elif encoding == "bf16":
        bits = 16 - head if max(9, wbits) + head <= 16 else 16  # 16-bit words while they hold the sum
    else:
        raise ValueError(f"no sizing for delta encoding {encoding!r}")
    modulus = max(bits, wbits) + head
    if modulus > 64:
        raise ValueError(f"{n} tenants with federation.max-weight {max_weight} need a {modulus}-bit modulus "
                         "(at most 64); lower federation.max-weight")
    return bits, modulus


def quantizer_for(secagg, federation) -> Quantizer:
    """The quantizer of a run (``Config.secagg``, ``Config.federation``); both sides build the same one.

    Every tenant weighs 1 under secure aggregation, whatever ``federation.weighting`` says: a weight
    inside the masked vector is the tenant's word the server cannot check (one forged weight
    element divides the whole mean by the wrong total), and a weight sent in the clear would
    reveal the tenant's data size. With fixed weights the unmasked weight total must equal the
    number of tenants summed, exactly, or the round fails.

    fp32: as configured. bf16 / int8: sized for 2 tenants here; :meth:`Quantizer.for_tenants`
    sizes it for the round."""
    encoding = getattr(federation, "delta_encoding", "fp32")
    q = Quantizer(clip=secagg.clip, bits=secagg.quantization_bits, modulus_bits=secagg.modulus_bits,
                  max_weight=1, weighting="uniform", encoding=encoding)
    return q.for_tenants(2)


def check_update(delta: Mapping[str, np.ndarray], num_examples: int, *, clip: float, max_weight: int,
                 weighting: str = "examples") -> int:
    """Client-side checks before masking; returns the weight (``fedlora.common.weighting``) or raises
    :class:`UpdateRefused`."""
    if isinstance(num_examples, bool) or int(num_examples) != num_examples or num_examples < 1:
        raise UpdateRefused(f"num-examples {num_examples!r} is not a positive integer")
    weight = tenant_weight(int(num_examples), rule=weighting, max_weight=max_weight)
    scale = weight / max_weight
    for name, arr in delta.items():
        if not np.all(np.isfinite(arr)):
            raise UpdateRefused(f"update tensor {name} contains NaN or Inf; nothing was sent")
        peak = float(np.max(np.abs(arr))) * scale if arr.size else 0.0
        if peak > clip:
            raise UpdateRefused(f"update tensor {name} reaches {peak:.4g} after weighting, outside the "
                                f"clipping range +-{clip:g}; raise secagg.clip or lower the learning rate")
    return weight


def pack(delta: Mapping[str, np.ndarray], weight: int, q: Quantizer, *, toward_zero: bool = False) -> np.ndarray:
    """The integer vector a tenant masks: quantized ``(w / max_weight) * delta``, then ``w``.

    ``toward_zero`` (centred grids only) rounds every value toward 0, so none grows in
    magnitude (``fedlora.client.feedback`` keeps a central-DP clip so)."""
    if not 1 <= weight <= q.max_weight:
        raise UpdateRefused(f"weight {weight} outside [1, {q.max_weight}] (federation.max-weight)")
    if toward_zero and not q.centred:
        raise ValueError("rounding toward zero needs a centred grid (a bf16 / int8 sizing)")
    flat = np.concatenate([np.ravel(a) for a in delta.values()] or [np.zeros(0, np.float32)])
    x = np.multiply(flat, weight / q.max_weight / q.step, dtype=np.float64)  # (x / step), in float64
    top = q.top
    mid = top // 2  # centred: the grid's zero
    if q.centred:
        if x.size and not (-mid - 0.5 <= x.min() and x.max() <= mid + 0.5):  # NaN fails both comparisons
            raise UpdateRefused("update outside the clipping range or not finite")
        (np.trunc if toward_zero else np.rint)(x, out=x)
        x += mid
    else:
        x += q.clip / q.step
        if x.size and not (-0.5 <= x.min() and x.max() <= top + 0.5):  # NaN fails both comparisons
            raise UpdateRefused("update outside the clipping range or not finite")
        np.rint(x, out=x)
    out = np.empty(x.size + 1, dtype=q.dtype)
    np.clip(x, 0, top, out=x)  # only float rounding at the very edges can reach past 0 or top
    out[:-1] = x
    out[-1] = weight
    return out


def dequantize(vector: np.ndarray, weight: int, q: Quantizer) -> np.ndarray:
    """What one packed vector stands for, as float64 ``delta`` values (the inverse of :func:`pack`
    up to the rounding): the tenant's share of the sum, for its error feedback."""
    zero = q.top // 2 if q.centred else q.clip / q.step
    return (vector[:-1].astype(np.float64) - zero) * q.step * (q.max_weight / weight)


def unpack(total: np.ndarray, n: int, shapes: Mapping[str, tuple[int, ...]], q: Quantizer
           ) -> tuple["OrderedDict[str, np.ndarray]", float]:
    """From the unmasked sum of ``n`` vectors: (``sum_k w_k * delta_k`` by tensor, ``sum_k w_k``)."""
    if q.centred:
        x = (total[:-1].astype(np.float64) - n * (q.top // 2)) * q.step
    else:
        x = total[:-1].astype(np.float64) * q.step - n * q.clip
    weighted = x * q.max_weight
    out, offset = OrderedDict(), 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        out[name] = weighted[offset:offset + size].reshape(shape).astype(np.float32)
        offset += size
    if offset != x.size:
        raise ValueError(f"unmasked vector has {x.size} values, the adapter {offset}")
    return out, float(total[-1])


def prg_mask(seed: bytes, length: int, q: Quantizer) -> np.ndarray:
    """``length`` uniform values mod ``2**modulus_bits`` from a 32-byte seed: the AES-256-CTR
    keystream under that key (a CTR-DRBG-style expansion; AES-NI makes it cheap)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if len(seed) != SEED_BYTES:
        raise ValueError(f"mask seeds are {SEED_BYTES} bytes, got {len(seed)}")
    itemsize = np.dtype(q.dtype).itemsize
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()
    stream = enc.update(bytes(length * itemsize))
    return q.reduce(np.frombuffer(stream, dtype=q.dtype))  # read-only view, no copy


def neighbour_graph(nodes: list[int], k: int, *, seed: int) -> dict[int, list[int]]:
    """A k-regular ring (Harary-style) over a seeded shuffle of ``nodes``; ``k = 0`` or
    ``k >= len(nodes) - 1`` is the complete graph. Symmetric: v in g[u] iff u in g[v]."""
    n = len(nodes)
    if k <= 0 or k >= n - 1:
        return {u: sorted(v for v in nodes if v != u) for u in nodes}
    order = sorted(nodes)
    random.Random(seed).shuffle(order)
    half = (k + 1) // 2
    graph: dict[int, set[int]] = {u: set() for u in nodes}
    for i, u in enumerate(order):
        for d in range(1, half + 1):
            v = order[(i + d) % n]
            graph[u].add(v)
            graph[v].add(u)
    return {u: sorted(vs) for u, vs in graph.items()}


def threshold(holders: int, share: float) -> int:
    """Shares needed to rebuild a secret held by ``holders`` nodes: strictly more than
    ``share`` of them (``share >= 0.5`` keeps any two disjoint answer sets from both
    succeeding, so the server never learns a tenant's self-mask *and* its pairwise key)."""
    return min(holders, math.floor(share * holders) + 1)


def mask_sign(me: int, other: int) -> int:
    """Pairwise masks are added by the smaller node id and subtracted by the larger."""
    return 1 if me < other else -1
