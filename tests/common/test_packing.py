"""Packed ArrayRecords: what is unpacked equals what was packed, Array by Array, and bytes
that do not add up are refused with the reason."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedlora.common.packing import PACKED_KEY, PACKED_STYPE, is_packed, pack_content, pack_record, unpack_content, unpack_record


def _record():
    return ArrayRecord({"layer.lora_A": Array(np.arange(6, dtype=np.float32).reshape(2, 3)),
                        "layer.lora_B": Array(np.array([1, -2, 3], np.int8)),
                        "empty": Array(np.zeros((0, 4), np.float32))})


def _raw(layout, payload: bytes) -> ArrayRecord:
    header = json.dumps(layout).encode()
    data = struct.pack(">Q", len(header)) + header + payload
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)})


def test_round_trip_keeps_names_order_dtypes_shapes_stypes_and_bytes():
    # Prepare
    record = _record()
    # Execute
    packed = pack_record(record)
    back = unpack_record(packed)
    # Assert
    assert list(packed) == [PACKED_KEY] and is_packed(packed)
    assert list(back) == ["layer.lora_A", "layer.lora_B", "empty"]
    for name, a in record.items():
        b = back[name]
        assert (b.dtype, b.shape, b.stype, b.data) == (a.dtype, a.shape, a.stype, a.data)


def test_packed_size_is_the_arrays_bytes_plus_one_header():
    # Prepare
    record = _record()
    # Execute
    data = pack_record(record)[PACKED_KEY].data
    # Assert: nothing but the 8-byte length, the header and each Array's bytes
    (header,) = struct.unpack_from(">Q", data)
    assert len(data) == 8 + header + sum(len(a.data) for a in record.values())


def test_a_single_array_record_is_left_as_it_is():
    # Prepare
    one = ArrayRecord({"v": Array(np.ones(3, np.float32))})
    # Execute / Assert
    assert pack_record(one) is one and unpack_record(one) is one


def test_content_packs_array_records_only():
    # Prepare
    content = RecordDict({"arrays": _record(), "config": ConfigRecord({"server-round": 2})})
    # Execute
    packed = pack_content(content)
    back = unpack_content(packed)
    # Assert
    assert list(packed.array_records["arrays"]) == [PACKED_KEY]
    assert packed.config_records["config"]["server-round"] == 2
    assert list(back.array_records["arrays"]) == list(_record())


@pytest.mark.parametrize("layout, payload, why", [
    ([["a", "float32", [2], "numpy.ndarray", 8]], b"\0" * 4, "runs past the data"),
    ([["a", "float32", [1], "numpy.ndarray", 4]], b"\0" * 6, "2 bytes after the last array"),
    ([["a", "float32", [1], "numpy.ndarray", 4], ["a", "float32", [1], "numpy.ndarray", 4]], b"\0" * 8,
     "repeats"),
    ([["a", "float32", [1], "numpy.ndarray"]], b"\0" * 4, "malformed layout entry"),
    ([["a", "float32", [1], "numpy.ndarray", -4]], b"", "malformed layout entry"),
])
def test_bytes_that_do_not_add_up_are_refused(layout, payload, why):
    # Execute / Assert
    with pytest.raises(ValueError, match=why):
        unpack_record(_raw(layout, payload))


def test_unreadable_header_is_refused():
    # Prepare: a header length beyond the data
    data = struct.pack(">Q", 999) + b"[]"
    record = ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)})
    # Execute / Assert
    with pytest.raises(ValueError, match="unreadable header"):
        unpack_record(record)
