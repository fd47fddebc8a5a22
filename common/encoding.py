"""Wire encodings of a tenant's delta (``federation.delta-encoding``): fp32, bf16, int8.

The tenant encodes (``fedlora.client.feedback``, which keeps the rounding error for its next
round), the server decodes and validates strictly: what :func:`decode` returns is float32
arrays of the declared shapes, which ``fedlora.server.aggregation.validate_update`` then checks
as it checks an fp32 reply (names, shapes, finite values). A malformed reply raises
:class:`EncodingError` naming the tensor; the server drops that tenant and goes on.

Wire form: one Flower ``Array`` per adapter tensor, under the tensor's own name; the
``stype`` says how its bytes were made (Flower's field for exactly that), so a record
describes itself:

* **fp32**: the ``.npy`` float32 array (``stype`` ``numpy.ndarray``), exactly as before
  (``fedlora.common.adapter.to_arrayrecord`` / ``from_arrayrecord``; the fast path is unchanged);
* **bf16**: ``stype`` ``fedlora.bf16``, dtype ``bfloat16``, the tensor's shape, the data
  the bfloat16 words in C order (little-endian 16-bit): the float32 value rounded to the
  nearest bfloat16, ties to even. Half the bytes; relative error at most ``2**-8`` (half
  an ulp of bfloat16's 8 significant bits);
* **int8**: ``stype`` ``fedlora.int8``, dtype ``int8``, the tensor's shape, values in
  ``[-127, 127]`` (symmetric, round to nearest), **plus** ``NAME::scale``: ``stype``
  ``fedlora.int8-scale``, dtype ``float32``, one finite scale >= 0 per row of a 2-D tensor
  (``federation.int8-scale = row``, shape ``(rows,)``) or one per tensor (``tensor``, or a
  tensor that is not 2-D; shape ``()``). ``value = q * scale``, ``scale = max|x| / 127``
  over the row or tensor, so the error is at most ``scale / 2`` per element. About a
  quarter of the bytes plus 4 bytes per scale.

The encoders can also round **toward zero** (``toward_zero=True``): no element then grows
in magnitude, which is how ``fedlora.client.feedback`` keeps a central-DP clip on what is sent.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

import numpy as np

ENCODINGS = ("fp32", "bf16", "int8")
STYPES = {"bf16": "fedlora.bf16", "int8": "fedlora.int8"}
SCALE_STYPE = "fedlora.int8-scale"
SCALE_SUFFIX = "::scale"
_WIRE_DTYPE = {"bf16": ("bfloat16", np.dtype("<u2")), "int8": ("int8", np.dtype("i1"))}
_ENCODING_OF_STYPE = {v: k for k, v in STYPES.items()}


class EncodingError(ValueError):
    """An encoded reply that cannot be decoded as the configured encoding; the message names the tensor."""


@dataclass(frozen=True)
class Encoding:
    """One run's wire encoding of a delta (``Config.federation``: delta-encoding, int8-scale)."""

    name: str = "fp32"        # fp32 | bf16 | int8
    int8_scale: str = "row"   # int8: one scale per row of a 2-D tensor, or per tensor

    def __post_init__(self) -> None:
        if self.name not in ENCODINGS or self.int8_scale not in ("row", "tensor"):
            raise ValueError(f"unknown delta encoding {self.name!r} / int8 scale {self.int8_scale!r}")

    def __str__(self) -> str:
        return f"int8 ({self.int8_scale} scales)" if self.name == "int8" else self.name

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of an int8 tensor's scales: ``(rows,)`` per row of a 2-D tensor, else ``()``."""
        return (int(shape[0]),) if self.int8_scale == "row" and len(shape) == 2 else ()


FP32 = Encoding()


def encoding_for(federation) -> Encoding:
    """The encoding a :class:`fedlora.common.config.FederationConfig` names; both sides build the same one."""
    return Encoding(federation.delta_encoding, federation.int8_scale)


# -- bfloat16 ---------------------------------------------------------------------------
def bf16_words(x: np.ndarray, *, toward_zero: bool = False) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16): round to nearest, ties to even (or toward
    zero: truncation). NaN stays a (quiet) NaN, inf stays inf; a finite value past the
    largest bfloat16 rounds to inf, as IEEE rounding does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    if toward_zero:
        return (u >> 16).astype(np.uint16)
    with np.errstate(over="ignore"):
        words = ((u + (((u >> 16) & np.uint32(1)) + np.uint32(0x7FFF))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # the bias could carry a NaN's payload into the exponent or wrap it; keep it a NaN
        words[nan] = ((u[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return words


def bf16_values(words: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float32 (exact: bfloat16 is float32's upper half)."""
    return (np.asarray(words, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# -- int8 -------------------------------------------------------------------------------
def int8_quantize(x: np.ndarray, scale_shape: tuple[int, ...], *, toward_zero: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(values in [-127, 127] as int8, float32 scales of ``scale_shape``): ``scale = max|x| / 127``
    over each row (``scale_shape == (rows,)``) or the whole tensor (``()``). A non-finite
    input gives a non-finite scale, which the server refuses."""
    x = np.asarray(x, dtype=np.float32)
    per_row = scale_shape != ()
    if x.size == 0:
        return np.zeros(x.shape, np.int8), np.zeros(scale_shape, np.float32)
    amax = np.max(np.abs(x), axis=1) if per_row else np.max(np.abs(x))
    scale = np.asarray(amax / np.float32(127), dtype=np.float32).reshape(scale_shape)
    safe = np.where((scale > 0) & np.isfinite(scale), scale, np.float32(1))
    with np.errstate(invalid="ignore"):
        y = x / (safe[:, None] if per_row else safe)
        y = np.trunc(y) if toward_zero else np.rint(y)
        y = np.nan_to_num(np.clip(y, -127, 127), nan=0.0)
    return y.astype(np.int8), scale


def int8_values(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 values and their scales -> float32 ``q * scale``."""
    scale = np.asarray(scale, dtype=np.float32)
    return q.astype(np.float32) * (scale[:, None] if scale.ndim == 1 else scale)


# -- the encoded delta ------------------------------------------------------------------
@dataclass
class Encoded:
    """A delta as it travels: per tensor the wire payload (and the int8 scales)."""

    encoding: Encoding
    payload: "OrderedDict[str, np.ndarray]"   # uint16 bfloat16 words / int8 values / float32 (fp32)
    scales: "OrderedDict[str, np.ndarray]"    # int8 only

    def decoded(self) -> "OrderedDict[str, np.ndarray]":
        """What the server will decode: float32, bit for bit."""
        if self.encoding.name == "bf16":
            return OrderedDict((k, bf16_values(w)) for k, w in self.payload.items())
        if self.encoding.name == "int8":
            return OrderedDict((k, int8_values(q, self.scales[k])) for k, q in self.payload.items())
        return OrderedDict((k, np.asarray(v, np.float32)) for k, v in self.payload.items())

    def record(self):
        """The Flower ``ArrayRecord`` of the wire form (see the module docstring)."""
        from flwr.app import Array, ArrayRecord

        from fedlora.common.adapter import to_arrayrecord

        if self.encoding.name == "fp32":
            return to_arrayrecord(self.payload)
        record = ArrayRecord()
        stype, (dtype_name, _) = STYPES[self.encoding.name], _WIRE_DTYPE[self.encoding.name]
        for k, v in self.payload.items():
            record[k] = Array(dtype=dtype_name, shape=tuple(int(d) for d in v.shape), stype=stype,
                              data=np.asarray(v, order="C").tobytes())
            if k in self.scales:
                s = np.asarray(self.scales[k], dtype="<f4", order="C")  # (ascontiguousarray makes 0-d 1-d)
                record[k + SCALE_SUFFIX] = Array(dtype="float32", shape=tuple(int(d) for d in s.shape),
                                                 stype=SCALE_STYPE, data=s.tobytes())
        return record


def encode(state: Mapping[str, np.ndarray], encoding: Encoding, *, toward_zero: bool = False) -> Encoded:
    """Encode float32 tensors (round to nearest; ``toward_zero`` for magnitudes that never grow)."""
    payload, scales = OrderedDict(), OrderedDict()
    for k, v in state.items():
        v = np.asarray(v, dtype=np.float32)
        if encoding.name == "bf16":
            payload[k] = bf16_words(v, toward_zero=toward_zero)
        elif encoding.name == "int8":
            payload[k], scales[k] = int8_quantize(v, encoding.scale_shape(v.shape), toward_zero=toward_zero)
        else:
            payload[k] = v
    return Encoded(encoding, payload, scales)


# -- server side: strict decoding -------------------------------------------------------
def decode(record, encoding: Encoding) -> "OrderedDict[str, np.ndarray]":
    """The float32 tensors of an encoded reply, or :class:`EncodingError` with the reason.

    Every entry must be in ``encoding``'s form: its ``stype`` and dtype, a shape of sizes,
    exactly as many bytes as the shape needs (so nothing larger than what arrived is ever
    allocated), int8 values in [-127, 127] and, for int8, its ``::scale`` entry of the
    shape the declared shape implies, with finite, non-negative scales; no entry besides
    the tensors and their scales. Names and shapes against the global adapter are
    ``validate_update``'s to check (with the LoRA rule's shape check). fp32 goes through
    ``fedlora.common.adapter.from_arrayrecord``'s (fast) strict path."""
    if encoding.name == "fp32":
        from fedlora.common.adapter import from_arrayrecord

        return from_arrayrecord(record, encoding=encoding)
    tensors = [k for k in record.keys() if not k.endswith(SCALE_SUFFIX)]
    out = OrderedDict((k, _decode_tensor(k, record[k], encoding)) for k in tensors)
    scales = [k for k in record.keys() if k.endswith(SCALE_SUFFIX)]
    if encoding.name != "int8" and scales:
        raise EncodingError(f"{encoding} carries no scales, but the reply has {scales[0]}")
    stray = sorted(k for k in scales if k[:-len(SCALE_SUFFIX)] not in out)
    if stray:
        raise EncodingError(f"scale entry {stray[0]} has no tensor {stray[0][:-len(SCALE_SUFFIX)]}")
    if encoding.name == "int8":
        for k, q in out.items():
            out[k] = int8_values(q, _decode_scale(k, record.get(k + SCALE_SUFFIX), encoding.scale_shape(q.shape)))
    return out


def _encoding_of(stype: str) -> str:
    if stype == "numpy.ndarray":
        return "fp32"
    return _ENCODING_OF_STYPE.get(stype, f"unknown ({stype!r:.40})")


def _payload(name: str, arr, shape: tuple[int, ...], itemsize: int, what: str) -> bytes:
    data = arr.data
    if len(data) != math.prod(shape) * itemsize:
        raise EncodingError(f"tensor {name}: {what} holds {len(data)} bytes, the shape {shape} needs "
                            f"{math.prod(shape) * itemsize}")
    return data


def _shape(name: str, arr) -> tuple[int, ...]:
    shape = arr.shape
    if not isinstance(shape, (tuple, list)) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise EncodingError(f"tensor {name}: shape {shape!r:.60} is not a tuple of sizes")
    return tuple(shape)


def _decode_tensor(name: str, arr, encoding: Encoding) -> np.ndarray:
    """bf16 -> float32 values; int8 -> the int8 values (scaled by the caller)."""
    got = _encoding_of(arr.stype)
    if got != encoding.name:
        raise EncodingError(f"tensor {name}: encoded as {got}, but federation.delta-encoding is {encoding.name}")
    dtype_name, dtype = _WIRE_DTYPE[encoding.name]
    if arr.dtype != dtype_name:
        raise EncodingError(f"tensor {name}: dtype {arr.dtype!r:.40} is not {dtype_name!r} ({encoding.name})")
    shape = _shape(name, arr)
    values = np.frombuffer(_payload(name, arr, shape, dtype.itemsize, f"{encoding.name} payload"),
                           dtype=dtype).reshape(shape)
    if encoding.name == "bf16":
        return bf16_values(values)
    if values.size and values.min() < -127:
        raise EncodingError(f"tensor {name}: int8 value -128 is outside the symmetric range [-127, 127]")
    return values


def _decode_scale(name: str, arr, expected: tuple[int, ...]) -> np.ndarray:
    key = name + SCALE_SUFFIX
    if arr is None:
        raise EncodingError(f"tensor {name}: int8 without its scale entry {key}")
    if arr.stype != SCALE_STYPE or arr.dtype != "float32":
        raise EncodingError(f"tensor {name}: scale {key} is {arr.stype!r:.40}/{arr.dtype!r:.20}, "
                            f"not {SCALE_STYPE!r}/'float32'")
    shape = _shape(key, arr)
    if shape != expected:
        raise EncodingError(f"tensor {name}: scale shape {shape} != expected {expected}")
    scale = np.frombuffer(_payload(key, arr, shape, 4, "scale"), dtype="<f4").reshape(shape)
    if not np.all(np.isfinite(scale)):
        raise EncodingError(f"tensor {name}: a scale is not finite")
    if scale.size and scale.min() < 0:
        raise EncodingError(f"tensor {name}: a scale is negative (int8 scales are max|x| / 127 >= 0)")
    return scale

