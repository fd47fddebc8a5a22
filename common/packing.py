"""An ArrayRecord of many tensors travels as one packed Array.

Flower 1.42 moves every ``Array`` of a message as its own object (one request each between
SuperLink and SuperNode, each over TLS): a LoRA adapter is two tensors per target module,
56 for the embedded base and hundreds for a 7B model, so on the Deployment Engine sending an
adapter cost seconds of per-object round trips for under a megabyte of data. Packed, the
adapter is one ``Array`` (split by Flower into 5 MB chunks as any large array is).

The packed Array's bytes: an 8-byte big-endian header length, a JSON header listing each
original Array as ``[name, dtype, shape, stype, nbytes]`` in order, then the Arrays' bytes
back to back. Unpacking gives back ArrayRecords equal, Array by Array, to the packed ones;
a record of fewer than two Arrays is left as it is. The server packs what it sends and
unpacks what it receives (``fedlora.server.grid.PromptGrid``); the ClientApp does the same with a
Flower mod (``fedlora.client.client_app``), so the handlers and the strategy never see a packed
record.
"""

from __future__ import annotations

import json
import struct

from flwr.app import Array, ArrayRecord, RecordDict

PACKED_KEY = "fedlora.packed"
PACKED_STYPE = "fedlora.packed/1"
_LEN = struct.Struct(">Q")


def pack_record(record: ArrayRecord) -> ArrayRecord:
    """One Array holding every Array of ``record`` (unchanged if it holds fewer than two)."""
    if len(record) < 2:
        return record
    layout = [[name, a.dtype, list(a.shape), a.stype, len(a.data)] for name, a in record.items()]
    header = json.dumps(layout, separators=(",", ":")).encode()
    data = b"".join([_LEN.pack(len(header)), header, *(a.data for a in record.values())])
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)},
                       keep_input=True)


def is_packed(record: ArrayRecord) -> bool:
    return list(record.keys()) == [PACKED_KEY] and record[PACKED_KEY].stype == PACKED_STYPE


def unpack_record(record: ArrayRecord) -> ArrayRecord:
    """The ArrayRecord ``pack_record`` packed; a record that is not packed is returned as is.
    Raises ValueError, naming what is wrong, for a packed Array whose bytes do not add up."""
    if not is_packed(record):
        return record
    data = memoryview(record[PACKED_KEY].data)
    try:
        (size,) = _LEN.unpack_from(data, 0)
        if _LEN.size + size > len(data):
            raise ValueError(f"a {size}-byte header in {len(data)} bytes")
        layout = json.loads(bytes(data[_LEN.size:_LEN.size + size]))
    except (struct.error, ValueError) as err:
        raise ValueError(f"packed arrays: unreadable header ({err})") from None
    at = _LEN.size + size
    out: dict[str, Array] = {}
    for entry in layout:
        if not (isinstance(entry, list) and len(entry) == 5 and isinstance(entry[4], int) and entry[4] >= 0):
            raise ValueError(f"packed arrays: malformed layout entry {str(entry)[:80]}")
        name, dtype, shape, stype, nbytes = entry
        if at + nbytes > len(data) or name in out:
            raise ValueError(f"packed arrays: {name!r} runs past the data or repeats")
        out[str(name)] = Array(dtype=str(dtype), shape=tuple(int(d) for d in shape), stype=str(stype),
                               data=bytes(data[at:at + nbytes]))
        at += nbytes
    if at != len(data):
        raise ValueError(f"packed arrays: {len(data) - at} bytes after the last array")
    return ArrayRecord(out, keep_input=True)


def _map(content: RecordDict, fn) -> RecordDict:
    return RecordDict({key: fn(rec) if isinstance(rec, ArrayRecord) else rec for key, rec in content.items()})


def pack_content(content: RecordDict, cache: dict[int, ArrayRecord] | None = None) -> RecordDict:
    """``content`` with each of its ArrayRecords packed. ``cache`` (id of a record -> its packed
    form) packs a record sent in many messages, the global adapter, once."""
    if cache is None:
        return _map(content, pack_record)

    def cached(rec: ArrayRecord) -> ArrayRecord:
        if id(rec) not in cache:
            cache[id(rec)] = pack_record(rec)
        return cache[id(rec)]
    return _map(content, cached)


def unpack_content(content: RecordDict) -> RecordDict:
    """``content`` with each packed ArrayRecord unpacked (ValueError if one is malformed)."""
    return _map(content, unpack_record)
