"""Wire encodings of a delta: bf16 and int8 round trips within their bounds, their bytes, the
fp32 path unchanged, and every malformed encoded reply refused with its reason."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array

from fedlora.common.adapter import from_arrayrecord, to_arrayrecord
from fedlora.common.encoding import (
    FP32,
    SCALE_STYPE,
    SCALE_SUFFIX,
    Encoding,
    EncodingError,
    bf16_values,
    bf16_words,
    decode,
    encode,
    int8_quantize,
)

BF16, INT8_ROW, INT8_TENSOR = Encoding("bf16"), Encoding("int8", "row"), Encoding("int8", "tensor")


def _embedded_adapter(seed: int = 0) -> "OrderedDict[str, np.ndarray]":
    """The embedded base's LoRA adapter (r = 8 on every linear layer): 24 A (8, 192), 20 B (192, 8),
    8 B (512, 8), 4 A (8, 512) — 116,736 floats."""
    rng = np.random.default_rng(seed)
    shapes = [(8, 192)] * 24 + [(192, 8)] * 20 + [(512, 8)] * 8 + [(8, 512)] * 4
    return OrderedDict((f"base_model.model.layers.{i}.lora_{'A' if s[0] == 8 else 'B'}.weight",
                        rng.normal(0, 1e-3, s).astype(np.float32)) for i, s in enumerate(shapes))


def _data_bytes(record) -> int:
    return sum(len(v.data) for v in record.values())


def test_bf16_round_trip_within_half_an_ulp_and_ties_to_even():
    # Prepare: random values of many magnitudes, and hand-made ties
    rng = np.random.default_rng(1)
    x = (rng.normal(size=10_000) * 10.0 ** rng.integers(-8, 4, size=10_000)).astype(np.float32)
    # 1 + 2^-8 lies halfway between 1 and 1 + 2^-7 (odd last bit): ties go to 1.0;
    # 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): it goes up
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)], np.float32)
    # Execute
    back = bf16_values(bf16_words(x))
    # Assert: relative error <= 2^-8 (half an ulp of 8 significant bits, at worst just above a
    # power of two), and 2^-9 is exceeded somewhere (the bound is tight); ties to even
    rel = np.abs(back - x) / np.abs(x)
    assert rel.max() <= 2.0**-8 and rel.max() > 2.0**-9
    np.testing.assert_array_equal(bf16_values(bf16_words(ties)), np.array([1.0, 1 + 2**-6, -1.0], np.float32))


def test_bf16_is_exact_on_representable_values_and_matches_torch():
    import torch

    # Prepare: values with at most 8 significant bits, zeros, infinities
    exact = np.array([0.0, -0.0, 1.0, -2.5, 0.15625, 3 * 2.0**-120, 2.0**100, np.inf, -np.inf], np.float32)
    x = np.random.default_rng(2).normal(size=4096).astype(np.float32)
    # Execute / Assert: exact where representable; bit for bit torch's float32 -> bfloat16 otherwise
    np.testing.assert_array_equal(bf16_values(bf16_words(exact)), exact)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16_words(x), want)
    assert np.isnan(bf16_values(bf16_words(np.array([np.nan], np.float32))))[0]


def test_int8_hand_computed_row_and_tensor_scales():
    # Prepare: row 0's largest magnitude is 127/128, so its scale is exactly 2^-7; row 1 is zeros
    x = np.array([[127 / 128, -0.5, 2.0**-8, 3 * 2.0**-8], [0.0, 0.0, 0.0, 0.0]], np.float32)
    # Execute
    q_row, s_row = int8_quantize(x, (2,))
    q_t, s_t = int8_quantize(x, ())
    # Assert: 2^-8 / 2^-7 = 0.5 rounds to even (0); 3 * 2^-8 / 2^-7 = 1.5 rounds to 2
    np.testing.assert_array_equal(s_row, [2.0**-7, 0.0])
    np.testing.assert_array_equal(q_row, [[127, -64, 0, 2], [0, 0, 0, 0]])
    assert s_t.shape == () and s_t == np.float32(2.0**-7)  # the tensor's max is row 0's
    np.testing.assert_array_equal(q_t, q_row)
    assert int8_quantize(x, (2,), toward_zero=True)[0].tolist() == [[127, -64, 0, 1], [0, 0, 0, 0]]


@pytest.mark.parametrize("encoding", [INT8_ROW, INT8_TENSOR])
def test_int8_round_trip_error_at_most_half_a_scale(encoding):
    # Prepare
    delta = _embedded_adapter()
    # Execute
    enc = encode(delta, encoding)
    back = decode(enc.record(), encoding)
    # Assert: each element within scale / 2 of its row's (or tensor's) scale (+ float32 rounding)
    for k, x in delta.items():
        scale = enc.scales[k][:, None] if encoding.int8_scale == "row" else enc.scales[k]
        assert np.all(np.abs(back[k] - x) <= scale / 2 * (1 + 1e-6))
        assert back[k].dtype == np.float32 and back[k].shape == x.shape


def test_bytes_of_the_embedded_adapter_per_encoding():
    # Prepare: 116,736 floats in 56 tensors; rows: 24 x 8 + 20 x 192 + 8 x 512 + 4 x 8 = 8,160
    delta = _embedded_adapter()
    fp32 = to_arrayrecord(delta)
    # Execute
    records = {e: encode(delta, e).record() for e in (BF16, INT8_ROW, INT8_TENSOR)}
    # Assert: payloads are exactly 2 bytes, 1 byte (+ 4 per scale) per float; .npy headers (128 B each) gone
    assert _data_bytes(fp32) == 4 * 116_736 + 56 * 128
    assert _data_bytes(records[BF16]) == 2 * 116_736
    assert _data_bytes(records[INT8_ROW]) == 116_736 + 4 * 8_160
    assert _data_bytes(records[INT8_TENSOR]) == 116_736 + 4 * 56
    # and what the server's round records count (data + names): bf16 ~1/2, int8 ~1/4 (+ scales)
    ratio = {e: records[e].count_bytes() / fp32.count_bytes() for e in records}
    assert 0.49 < ratio[BF16] < 0.5 and 0.25 < ratio[INT8_TENSOR] < 0.26 and 0.32 < ratio[INT8_ROW] < 0.33


def test_fp32_path_is_bit_identical_to_before():
    # Prepare
    delta = _embedded_adapter()
    plain = to_arrayrecord(delta)
    # Execute: the fp32 encoding, and the strict fp32 read of a reply
    enc = to_arrayrecord(delta, encoding=FP32)
    strict, trusted = from_arrayrecord(enc, encoding=FP32), from_arrayrecord(plain)
    # Assert: the same bytes on the wire; the same (zero-copy, read-only) arrays back
    assert list(enc) == list(plain) and all(enc[k].data == plain[k].data and enc[k].stype == plain[k].stype
                                            for k in plain)
    for k, v in delta.items():
        np.testing.assert_array_equal(strict[k], v)
        assert strict[k].tobytes() == trusted[k].tobytes() and not strict[k].flags.writeable


def test_encoded_record_survives_flower_serialisation():
    from flwr.app import Message, RecordDict
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.supercore.task_identity import TaskIdentity

    # Prepare
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    delta = _embedded_adapter()
    enc = encode(delta, INT8_ROW)
    msg = Message(RecordDict({"arrays": enc.record()}), dst_node_id=1, message_type="train")
    # Execute
    back = message_from_proto(message_to_proto(msg)).content.array_records["arrays"]
    # Assert
    got, want = decode(back, INT8_ROW), enc.decoded()
    assert all(np.array_equal(got[k], want[k]) for k in delta)


def _with(rec, change: dict):
    """``rec`` with entries replaced (or removed: None)."""
    for key, value in change.items():
        if value is None:
            del rec[key]
        else:
            rec[key] = value
    return rec


def _int8_record(**change):
    """A valid int8 (row) record of one (2, 3) tensor ``t``, with entries replaced or removed (``t__``: its scale)."""
    rec = encode({"t": np.array([[0.5, -1.0, 0.25], [2.0, 0.0, -2.0]], np.float32)}, INT8_ROW).record()
    return _with(rec, {k.replace("__", SCALE_SUFFIX): v for k, v in change.items()})


def _bf16_record(change: dict):
    return _with(encode({"t": np.ones((2, 2), np.float32)}, BF16).record(), change)


def _fp32_record(change: dict):
    return _with(to_arrayrecord({"t": np.zeros(3, np.float32)}), change)


def _arr(stype, dtype, shape, data):
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


@pytest.mark.parametrize("record, encoding, reason", [
    (_int8_record(t=_arr("fedlora.int8", "int16", (2, 3), bytes(12))), INT8_ROW, r"tensor t: dtype 'int16' is not 'int8'"),
    (_int8_record(t__=_arr(SCALE_STYPE, "float32", (3,), bytes(12))), INT8_ROW,
     r"tensor t: scale shape \(3,\) != expected \(2,\)"),
    (_int8_record(t__=_arr(SCALE_STYPE, "float32", (), bytes(4))), INT8_ROW,
     r"tensor t: scale shape \(\) != expected \(2,\)"),
    (_int8_record(t__=_arr(SCALE_STYPE, "float32", (2,), np.array([1.0, np.nan], "<f4").tobytes())), INT8_ROW,
     "tensor t: a scale is not finite"),
    (_int8_record(t__=_arr(SCALE_STYPE, "float32", (2,), np.array([1.0, -1.0], "<f4").tobytes())), INT8_ROW,
     "tensor t: a scale is negative"),
    (_int8_record(t__=None), INT8_ROW, r"tensor t: int8 without its scale entry t::scale"),
    (_int8_record(t__=_arr("numpy.ndarray", "float32", (2,), bytes(8))), INT8_ROW, "tensor t: scale t::scale is"),
    (_int8_record(t=_arr("fedlora.int4", "int8", (2, 3), bytes(6))), INT8_ROW,
     r"tensor t: encoded as unknown \('fedlora.int4'\), but federation.delta-encoding is int8"),
    (_int8_record(), BF16, "tensor t: encoded as int8, but federation.delta-encoding is bf16"),
    (_int8_record(), FP32, "tensor t: encoded as int8, but federation.delta-encoding is fp32"),
    (to_arrayrecord({"t": np.zeros((2, 3), np.float32)}), INT8_ROW,
     "tensor t: encoded as fp32, but federation.delta-encoding is int8"),
    (_int8_record(t=_arr("fedlora.int8", "int8", (2, 3), bytes(5))), INT8_ROW,
     r"tensor t: int8 payload holds 5 bytes, the shape \(2, 3\) needs 6"),
    (_int8_record(t=_arr("fedlora.int8", "int8", (2, 3), b"\x80" + bytes(5))), INT8_ROW,
     r"tensor t: int8 value -128 is outside the symmetric range"),
    (_int8_record(u__=_arr(SCALE_STYPE, "float32", (), bytes(4))), INT8_ROW, "scale entry u::scale has no tensor u"),
    (_bf16_record({"t" + SCALE_SUFFIX: _arr(SCALE_STYPE, "float32", (), bytes(4))}), BF16,
     "bf16 carries no scales, but the reply has t::scale"),
    (_bf16_record({"t": _arr("fedlora.bf16", "bfloat16", (2, 2), bytes(6))}), BF16,
     r"tensor t: bf16 payload holds 6 bytes, the shape \(2, 2\) needs 8"),
    (_bf16_record({"t": _arr("fedlora.bf16", "uint16", (2, 2), bytes(8))}), BF16,
     r"tensor t: dtype 'uint16' is not 'bfloat16'"),
    (_fp32_record({"t": _arr("numpy.ndarray", "float32", (3,), b"junk")}), FP32, "tensor t: not a readable .npy array"),
    (_fp32_record({"t": _arr("pickle", "float32", (3,), b"junk")}), FP32,
     r"tensor t: encoded as unknown \('pickle'\), but federation.delta-encoding is fp32"),
], ids=["dtype", "scale-rows", "scale-scalar", "scale-nan", "scale-negative", "scale-missing", "scale-stype",
        "unknown-encoding", "int8-for-bf16", "int8-for-fp32", "fp32-for-int8", "truncated", "minus-128",
        "stray-scale", "bf16-with-scale", "bf16-truncated", "bf16-dtype", "fp32-junk", "fp32-foreign-stype"])
def test_malformed_encoded_reply_is_refused_with_its_reason(record, encoding, reason):
    # Execute / Assert: an EncodingError (a ValueError) naming the tensor, never another exception
    with pytest.raises(EncodingError, match=reason):
        from_arrayrecord(record, encoding=encoding)
