"""Adapter state <-> Flower ArrayRecord <-> PEFT directory (safetensors), and nothing else.

PEFT's ``get/set_peft_model_state_dict`` is the boundary: the names that travel are
exactly the names PEFT saves, so a directory written here loads with plain
``PeftModel.from_pretrained``. Directories are written atomically: a crash never leaves
a half-written checkpoint under the final name.
"""

from __future__ import annotations

import io
import json
import math
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import numpy as np

from fedlora.common.files import atomic_dir, write_json_atomic  # noqa: F401  (write_json_atomic: callers import it from here)

METADATA_FILE = "fedlora.json"


def get_state(model) -> "OrderedDict[str, np.ndarray]":
    """The trainable adapter tensors of ``model`` as float32 numpy arrays, in PEFT's names."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model)
    return OrderedDict((k, v.detach().to("cpu").float().numpy().copy()) for k, v in sd.items())


def set_state(model, state: Mapping[str, np.ndarray]) -> None:
    """Load adapter tensors into ``model``; every name must match, in both directions."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise KeyError(f"adapter tensors do not match the model: missing {missing[:3]}, "
                       f"unexpected {extra[:3]}")
    tensors = {}
    for k, ref in expected.items():
        arr = np.asarray(state[k])
        if tuple(arr.shape) != tuple(ref.shape):
            raise ValueError(f"adapter tensor {k}: shape {arr.shape} != expected {tuple(ref.shape)}")
        arr = np.ascontiguousarray(arr)
        # read-only views (from_arrayrecord) are copied: torch refuses to share non-writable memory
        tensors[k] = (torch.from_numpy(arr) if arr.flags.writeable else torch.tensor(arr)).to(ref.dtype)
    result = set_peft_model_state_dict(model, tensors)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KeyError(f"PEFT did not accept adapter tensors: {unexpected[:3]}")


def to_arrayrecord(state: Mapping[str, np.ndarray], *, encoding=None):
    """Adapter tensors as a Flower ArrayRecord, each copied once.

    ``encoding`` (a :class:`fedlora.common.encoding.Encoding`; None or fp32: the ``.npy`` float32
    form below) gives the bf16 / int8 wire form of ``fedlora.common.encoding`` instead.

    Each :class:`flwr.app.Array` carries exactly the bytes ``Array(ndarray)`` would (the
    ``.npy`` format, ``stype`` ``numpy.ndarray``: a header, then the C-order data), but
    built with a single copy of the tensor into the ``bytes`` object — Flower's own path
    goes through ``np.save`` into a growing ``BytesIO`` (two or three copies). Dtypes or
    shapes the plain ``.npy`` 1.0 header cannot describe take Flower's path.
    """
    from flwr.app import Array, ArrayRecord
    from flwr.common.constant import SType

    if encoding is not None and encoding.name != "fp32":
        from fedlora.common.encoding import encode

        return encode(state, encoding).record()
    record = ArrayRecord()  # filled in place: ArrayRecord(dict) would build every Array a second time
    for k, v in state.items():
        arr = np.asarray(v, order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
        layout = _npy_header(arr.dtype, arr.shape) if type(arr.dtype)._legacy and not arr.dtype.hasobject else None
        if layout is None:
            record[k] = Array(arr)
        else:
            header, dtype_name, shape = layout
            record[k] = Array(dtype=dtype_name, shape=shape, stype=SType.NUMPY, data=b"".join((header, arr)))
    return record


def from_arrayrecord(record, *, encoding=None) -> "OrderedDict[str, np.ndarray]":
    """The tensors of an ArrayRecord, as **read-only** views of its bytes (no copy).

    The array's layout comes from the ``.npy`` header inside the data, as ``Array.numpy()``
    (``np.load``) reads it; anything that is not a plain C-order ``.npy`` payload of at
    least the declared size (Fortran order, object dtypes, other serialisations, a
    truncated payload) takes ``Array.numpy()`` and behaves — or fails — exactly as it
    does. The views share memory with the record: callers build new arrays from them
    (validation, subtraction, aggregation, ``set_state``) and never write into them; one
    that must write takes a copy.

    ``encoding`` (a :class:`fedlora.common.encoding.Encoding`) reads a tenant's reply strictly as
    that wire encoding: bf16 / int8 are decoded to float32 (``fedlora.common.encoding.decode``);
    fp32 takes the path above, but an entry in
    another serialisation, or one ``Array.numpy()`` cannot read, raises
    :class:`fedlora.common.encoding.EncodingError` naming the tensor instead of whatever
    ``Array.numpy()`` raises. None (the default): as above, for trusted records.
    """
    from flwr.common.constant import SType

    if encoding is not None and encoding.name != "fp32":
        from fedlora.common.encoding import decode

        return decode(record, encoding)
    out = OrderedDict()
    for k, v in record.items():
        data = v.data
        layout = _npy_layout(bytes(data[:_npy_data_offset(data)])) if v.stype == SType.NUMPY else None
        if layout is None:
            out[k] = v.numpy() if encoding is None else _strict_numpy(k, v)
            continue
        dtype, shape, offset, count = layout
        if count == 0 or len(data) - offset < count * dtype.itemsize:
            out[k] = v.numpy() if encoding is None else _strict_numpy(k, v)
        else:
            out[k] = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    return out


def _strict_numpy(name: str, arr) -> np.ndarray:
    """``Array.numpy()`` of a reply's fp32 entry, its failures as an EncodingError naming the tensor."""
    from flwr.common.constant import SType

    from fedlora.common.encoding import EncodingError, _encoding_of

    if arr.stype != SType.NUMPY:
        raise EncodingError(f"tensor {name}: encoded as {_encoding_of(arr.stype)}, but federation.delta-encoding "
                            "is fp32")
    try:
        return arr.numpy()
    except (ValueError, TypeError, OSError, EOFError) as why:
        raise EncodingError(f"tensor {name}: not a readable .npy array ({why})") from None


@lru_cache(maxsize=1024)
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[bytes, str, tuple[int, ...]] | None:
    """(the ``.npy`` header ``np.save`` writes for a C-order array (format 1.0), the dtype's
    name, the shape as ints), or None where a 1.0 header cannot hold it."""
    from numpy.lib import format as npy

    shape = tuple(int(d) for d in shape)
    fp = io.BytesIO()
    try:
        npy.write_array_header_1_0(fp, {"descr": npy.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    except ValueError:  # too large for a 1.0 header: np.save would pick another version
        return None
    return fp.getvalue(), str(dtype), shape


def _npy_data_offset(data) -> int:
    """Where the array data starts in ``.npy`` bytes (0 when they are not ``.npy`` 1.0/2.0)."""
    if len(data) < 12 or bytes(data[:6]) != b"\x93NUMPY":
        return 0
    if data[6] == 1:
        return 10 + int.from_bytes(data[8:10], "little")
    if data[6] == 2:
        return 12 + int.from_bytes(data[8:12], "little")
    return 0


@lru_cache(maxsize=1024)
def _npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...], int, int] | None:
    """(dtype, shape, data offset, element count) from a ``.npy`` header as ``np.load`` reads it, or None
    where ``np.load`` must decide (Fortran order, object dtypes, unknown versions, errors)."""
    from numpy.lib import format as npy

    if not header:
        return None
    fp = io.BytesIO(header)
    try:
        version = npy.read_magic(fp)
        read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}[version]
        shape, fortran, dtype = read(fp)
    except (KeyError, ValueError, OSError):
        return None
    if fortran or dtype.hasobject or fp.tell() != len(header):
        return None
    return dtype, tuple(shape), len(header), math.prod(shape)


def subtract(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> "OrderedDict[str, np.ndarray]":
    return OrderedDict((k, (a[k] - b[k]).astype(np.float32)) for k in a)


def nbytes(state: Mapping[str, np.ndarray]) -> int:
    return int(sum(v.nbytes for v in state.values()))


def save_adapter(out_dir: str | Path, state: Mapping[str, np.ndarray], peft_cfg, *,
                 base_model: str, metadata: Mapping | None = None) -> Path:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)
    plus ``fedlora.json`` metadata, atomically."""
    import copy

    from safetensors.numpy import save_file

    final = Path(out_dir)
    with atomic_dir(final) as tmp:
        cfg = copy.deepcopy(peft_cfg)
        cfg.base_model_name_or_path = base_model
        cfg.save_pretrained(str(tmp))
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
                  str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        if metadata is not None:
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
    return final


def load_adapter_file(adapter_dir: str | Path) -> "OrderedDict[str, np.ndarray]":
    """Adapter tensors from a PEFT directory (safetensors only; never a pickle)."""
    from safetensors.numpy import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; fedlora reads only safetensors adapters")
    return OrderedDict(sorted(load_file(str(path)).items()))
