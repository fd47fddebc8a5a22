"""Error feedback on the tenant: nothing lost to rounding (only delayed), the residual kept
across processes and forgotten by a new run, and the central-DP clip held by what is sent."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from fedlora.client.feedback import RESIDUAL_FILE, DeltaSender, ResidualStore, norm
from fedlora.common.adapter import to_arrayrecord
from fedlora.common.encoding import FP32, Encoding, decode
from fedlora.common.secagg import Quantizer, dequantize, pack

INT8_TENSOR, INT8_ROW, BF16 = Encoding("int8", "tensor"), Encoding("int8", "row"), Encoding("bf16")


def _sender(tmp_path, encoding, server_round, *, run="run-1", clip=None, feedback=True):
    store = ResidualStore(tmp_path) if feedback else None
    return DeltaSender(encoding, store=store, run=run, server_round=server_round, clip=clip)


def _send(tmp_path, encoding, delta, server_round, **kw):
    """One round in a fresh sender (as a fresh ClientApp process would build it): what the server decodes."""
    sender = _sender(tmp_path, encoding, server_round, **kw)
    record = sender.plain(delta)
    sender.commit()
    return decode(record, encoding)


def _residual(tmp_path, like, server_round, run="run-1", wire="int8-tensor"):
    return ResidualStore(tmp_path).load(like, run=run, wire=wire, server_round=server_round)


def test_hand_computed_two_rounds_lose_nothing(tmp_path):
    # Prepare: int8, one scale for the tensor: max 127/128 gives the scale 2^-7, and 2^-8 is half a step
    delta = OrderedDict(t=np.array([127 / 128, 2.0**-8], np.float32))
    # Execute: the same delta twice, each round in new objects reading the state dir
    first = _send(tmp_path, INT8_TENSOR, delta, 1)
    second = _send(tmp_path, INT8_TENSOR, delta, 2)
    # Assert: round 1 rounds 0.5 step to 0 (ties to even) and keeps 2^-8; round 2 sends 2^-8 + 2^-8 = one step
    np.testing.assert_array_equal(first["t"], [127 / 128, 0.0])
    np.testing.assert_array_equal(second["t"], [127 / 128, 2.0**-7])
    np.testing.assert_array_equal(_residual(tmp_path, delta, 3)["t"], [0.0, 0.0])
    np.testing.assert_array_equal(first["t"] + second["t"], 2 * delta["t"])  # sum sent == sum of deltas - e_2 (0)


@pytest.mark.parametrize("encoding", [INT8_ROW, INT8_TENSOR, BF16], ids=str)
def test_sum_sent_equals_sum_of_deltas_up_to_the_last_residual(tmp_path, encoding):
    # Prepare: five rounds of random deltas
    rng = np.random.default_rng(0)
    deltas = [OrderedDict(a=rng.normal(0, 1e-3, (8, 64)).astype(np.float32),
                          b=rng.normal(0, 1e-3, (64, 8)).astype(np.float32)) for _ in range(5)]
    # Execute
    sent = [_send(tmp_path, encoding, d, t + 1) for t, d in enumerate(deltas)]
    wire = "bf16" if encoding.name == "bf16" else f"int8-{encoding.int8_scale}"
    last = _residual(tmp_path, deltas[0], 6, wire=wire)
    # Assert: sum_t s_t + e_T == sum_t delta_t (float32 additions aside), and e_T is one rounding's worth
    for k in deltas[0]:
        total_sent = sum(s[k].astype(np.float64) for s in sent)
        total_delta = sum(d[k].astype(np.float64) for d in deltas)
        np.testing.assert_allclose(total_sent + last[k], total_delta, atol=1e-9)
        # |e_T| <= half a step: max|x| / 254 (int8), |x| * 2^-8 (bf16); x is delta_T plus a smaller residual
        assert 0 < np.abs(last[k]).max() <= np.abs(deltas[-1][k]).max() * 2.0**-7


def test_residual_survives_a_new_process_as_safetensors(tmp_path):
    from safetensors.numpy import load_file

    # Prepare / Execute: one round in one sender
    delta = OrderedDict(t=np.array([127 / 128, 2.0**-8], np.float32))
    _send(tmp_path, INT8_TENSOR, delta, 1)
    # Assert: the file is plain safetensors in the state dir; a new store (process) reads it for round 2
    assert load_file(str(tmp_path / RESIDUAL_FILE))["t"].tolist() == [0.0, 2.0**-8]
    np.testing.assert_array_equal(_residual(tmp_path, delta, 2)["t"], [0.0, 2.0**-8])
    assert not list(tmp_path.glob(".*"))  # written atomically: no temporary left behind


@pytest.mark.parametrize("change, why", [
    ({"run": "run-2"}, "another run"),
    ({"server_round": 1}, "a round that is not after the stored one (a restarted round)"),
    ({"wire": "bf16"}, "another encoding"),
    ({"like": OrderedDict(t=np.zeros(3, np.float32))}, "other shapes"),
])
def test_new_lineage_starts_from_zero(tmp_path, change, why):
    # Prepare: a residual of round 1 of run-1
    delta = OrderedDict(t=np.array([127 / 128, 2.0**-8], np.float32))
    _send(tmp_path, INT8_TENSOR, delta, 1)
    args = {"like": delta, "run": "run-1", "wire": "int8-tensor", "server_round": 2} | change
    # Execute
    got = ResidualStore(tmp_path).load(args.pop("like"), **args)
    # Assert: zeros, for any of these reasons
    assert all(not v.any() for v in got.values()), why


def test_unreadable_residual_starts_from_zero(tmp_path):
    (tmp_path / RESIDUAL_FILE).write_bytes(b"not safetensors")
    delta = OrderedDict(t=np.ones(2, np.float32))
    assert not _residual(tmp_path, delta, 2)["t"].any()


@pytest.mark.parametrize("encoding", [INT8_ROW, BF16], ids=str)
def test_central_clip_bounds_what_is_sent_after_the_residual(tmp_path, encoding):
    # Prepare: a delta already at the clip (the client's central-DP clip did that), plus a residual
    # from the last round that pushes delta + residual past it
    rng = np.random.default_rng(3)
    clip = 0.5
    raw = OrderedDict(a=rng.normal(0, 1, (8, 32)).astype(np.float32), b=rng.normal(0, 1, (32, 8)).astype(np.float32))
    delta = OrderedDict((k, (v * (clip / norm(raw))).astype(np.float32)) for k, v in raw.items())
    wire = "bf16" if encoding.name == "bf16" else "int8-row"
    ResidualStore(tmp_path).save(OrderedDict((k, (0.01 * np.sign(v)).astype(np.float32)) for k, v in delta.items()),
                                 run="run-1", wire=wire, server_round=1)
    assert norm({k: v + 0.01 * np.sign(v) for k, v in delta.items()}) > clip  # the residual alone would break it
    # Execute
    sent = _send(tmp_path, encoding, delta, 2, clip=clip)
    # Assert: what the server decodes is within the clip
    assert norm(sent) <= clip
    assert norm(sent) > 0.99 * clip  # and still the update, not zeros


def test_rounding_toward_zero_when_nearest_would_cross_the_clip(tmp_path):
    # Prepare: bf16 of 1 + 2^-7 - 2^-9 rounds *up* to 1 + 2^-7, so a delta of norm exactly 1.0 grows
    clip = 1 + 2**-7 - 2**-9
    delta = OrderedDict(t=np.array([clip], np.float32))
    assert float(decode(_sender(tmp_path, BF16, 1, feedback=False).plain(delta), BF16)["t"][0]) > clip
    # Execute: the same with the clip
    sent = _send(tmp_path, BF16, delta, 1, clip=clip, feedback=False)
    # Assert: truncated instead (1.0 exactly), within the clip
    assert sent["t"].tolist() == [1.0]


def test_secagg_residual_is_the_quantizers_and_sums_to_the_deltas(tmp_path):
    # Prepare: an int8-sized quantizer for 3 tenants (step 2/254), weight 5 of max 10
    q = Quantizer(clip=1.0, bits=8, modulus_bits=12, max_weight=10, encoding="int8")
    rng = np.random.default_rng(4)
    deltas = [OrderedDict(t=rng.normal(0, 0.01, 50).astype(np.float32)) for _ in range(4)]
    # Execute: four rounds, each in a new sender
    sent = []
    for t, d in enumerate(deltas):
        s = _sender(tmp_path, FP32, t + 1)
        vector = s.secagg(d, 5, q)
        s.commit()
        sent.append(dequantize(vector, 5, q))
    last = ResidualStore(tmp_path).load(deltas[0], run="run-1", wire="secagg-int8", server_round=5)["t"]
    # Assert: on the centred grid; sum sent + e_T == sum deltas; |e_T| within half a step (in delta units)
    assert vector.dtype == np.uint16
    np.testing.assert_allclose(sum(sent) + last, sum(d["t"].astype(np.float64) for d in deltas), atol=1e-7)
    assert np.abs(last).max() <= q.step / 2 * (10 / 5) + 1e-7


def test_secagg_central_clip_bounds_the_dequantized_update(tmp_path):
    # Prepare: weight 1 of 1 (central DP); the grid's step 2/254 makes rounding up cross the clip
    q = Quantizer(clip=1.0, bits=8, modulus_bits=10, max_weight=1, encoding="int8")
    x = np.full(16, 3.6 * q.step, np.float32)   # each rounds up to 4 steps: norm 16 steps > 14.4 steps
    clip = float(np.linalg.norm(x.astype(np.float64)))
    delta = OrderedDict(t=x)
    assert np.linalg.norm(dequantize(pack(delta, 1, q), 1, q)) > clip
    # Execute
    vector = _sender(tmp_path, FP32, 1, clip=clip, feedback=False).secagg(delta, 1, q)
    # Assert
    assert np.linalg.norm(dequantize(vector, 1, q)) <= clip


def test_fp32_sends_what_it_always_sent_and_writes_nothing(tmp_path):
    # Prepare
    delta = OrderedDict(t=np.random.default_rng(5).normal(size=(4, 4)).astype(np.float32))
    q = Quantizer(clip=8.0, bits=22, modulus_bits=32, max_weight=10)
    # Execute
    sender = _sender(tmp_path, FP32, 1)
    record, vector = sender.plain(delta), sender.secagg(delta, 3, q)
    sender.commit()
    # Assert: byte for byte to_arrayrecord / pack, and no residual file
    assert record["t"].data == to_arrayrecord(delta)["t"].data
    np.testing.assert_array_equal(vector, pack(delta, 3, q))
    assert not (tmp_path / RESIDUAL_FILE).exists()


def test_without_error_feedback_nothing_is_kept(tmp_path):
    _send(tmp_path, INT8_ROW, OrderedDict(t=np.ones((2, 2), np.float32) / 3), 1, feedback=False)
    assert not (tmp_path / RESIDUAL_FILE).exists()


def test_non_finite_delta_leaves_a_zero_residual(tmp_path):
    # Prepare / Execute: a NaN delta with int8 (its scale is NaN: the server will refuse it)
    sender = _sender(tmp_path, INT8_ROW, 1)
    sender.plain(OrderedDict(t=np.array([[np.nan, 1.0]], np.float32)))
    sender.commit()
    # Assert: the next round does not inherit the NaN
    assert not _residual(tmp_path, OrderedDict(t=np.zeros((1, 2), np.float32)), 2, wire="int8-row")["t"].any()
