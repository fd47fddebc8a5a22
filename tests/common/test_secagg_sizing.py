"""The secure quantizer sized from the delta encoding: bits, modulus and wire dtype by hand,
the centred grid packed as uint16, and masked int8-sized vectors that unmask to the sum."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest

from fedlora.client import secagg as client
from fedlora.common.config import ConfigError, FederationConfig, SecAggConfig, parse_config
from fedlora.common.secagg import Quantizer, dequantize, headroom_bits, pack, prg_mask, quantizer_for, unpack


@pytest.mark.parametrize("encoding, tenants, max_weight, bits, modulus, dtype", [
    # int8: 8 bits; modulus = max(8, bit length of max-weight) + ceil(log2 n) + 1
    ("int8", 2, 1024, 8, 11 + 2, np.uint16),      # 1024 has 11 bits: 13
    ("int8", 3, 1, 8, 8 + 3, np.uint16),          # 11
    ("int8", 1000, 1, 8, 8 + 11, np.uint32),      # log2(1000) -> 10, + 1: 19 bits
    # bf16: 16-bit words (16 - headroom bits) while weight cap and >= 9 bits fit beside the headroom
    ("bf16", 2, 1024, 14, 16, np.uint16),
    ("bf16", 16, 1024, 11, 16, np.uint16),        # headroom 5: 11 bits, and 1024's 11 bits just fit
    ("bf16", 17, 1024, 16, 16 + 6, np.uint32),    # headroom 6: 10 bits < 11: 16 bits in 32-bit words
    ("bf16", 128, 1, 16, 16 + 8, np.uint32),      # headroom 8 leaves 8 < 9 bits: 16 bits mod 2^24
])
def test_quantizer_sized_from_the_encoding(encoding, tenants, max_weight, bits, modulus, dtype):
    # Prepare
    s = SecAggConfig(enabled=True)
    base = Quantizer(clip=s.clip, bits=s.quantization_bits, modulus_bits=s.modulus_bits, max_weight=max_weight,
                     encoding=encoding).for_tenants(2)
    # Execute
    q = base.for_tenants(tenants)
    # Assert: as computed by hand, and the modulus holds the sum of the round's tenants
    assert (q.bits, q.modulus_bits, q.dtype) == (bits, modulus, dtype)
    assert q.capacity() >= tenants and q.centred


def test_a_runs_quantizer_weighs_every_tenant_1_whatever_the_weighting():
    # Execute: a run that asks for example weights capped at 1024
    for encoding in ("fp32", "int8", "bf16"):
        q = quantizer_for(SecAggConfig(enabled=True),
                          FederationConfig(delta_encoding=encoding, max_weight=1024, weighting="examples"))
        # Assert: fixed weights, so the weight total the server checks is exactly the tenant count
        assert (q.max_weight, q.weighting) == (1, "uniform"), encoding


def test_fp32_quantizer_is_as_configured():
    q = quantizer_for(SecAggConfig(enabled=True), FederationConfig())
    assert (q.bits, q.modulus_bits, q.dtype, q.top, q.centred) == (22, 32, np.uint32, 2**22 - 1, False)
    assert q.for_tenants(50) is q
    assert headroom_bits(2) == 2 and headroom_bits(5) == 4


def test_centred_grid_packs_uint16_hand_computed():
    # Prepare: int8 for 2 tenants, clip 1, weight 1 of 1: 8 bits mod 2^10, step 2/254 = 1/127, zero at 127
    q = quantizer_for(SecAggConfig(enabled=True, clip=1.0), FederationConfig(delta_encoding="int8", max_weight=1))
    assert (q.bits, q.modulus_bits, q.top, q.dtype) == (8, 10, 254, np.uint16)
    delta = {"x": np.array([0.0, 1.0, -1.0, 0.25, -0.25], np.float32)}
    # Execute
    near, toward = pack(delta, 1, q), pack(delta, 1, q, toward_zero=True)
    # Assert: 0.25 * 127 = 31.75 -> 32 (nearest) or 31 (toward zero); 0 exactly on the grid; weight last
    assert near.dtype == np.uint16 and near.tolist() == [127, 254, 0, 159, 95, 1]
    assert toward.tolist() == [127, 254, 0, 158, 96, 1]
    np.testing.assert_allclose(dequantize(near, 1, q), [0, 1, -1, 32 / 127, -32 / 127], rtol=1e-12)


def test_masked_int8_sized_vectors_unmask_to_the_exact_sum():
    # Prepare: three tenants through the real client state machine (complete graph), int8 for
    # 3 tenants; deltas on the grid (multiples of the step after weighting), so the sum is exact
    s = SecAggConfig(enabled=True, clip=1.0)
    q = Quantizer(clip=1.0, bits=s.quantization_bits, modulus_bits=s.modulus_bits, max_weight=4,
                  encoding="int8").for_tenants(2)  # the packing with weights (a run's quantizer fixes them at 1)
    q3 = q.for_tenants(3)
    step = q3.step
    weights = {1: 1, 2: 2, 3: 4}
    deltas = {n: OrderedDict(a=np.array([k * step * 4 / w for k in (-3, 0, 5)], np.float32)) for n, w in weights.items()}
    stores = {n: {} for n in weights}
    pks = {n: client.setup(stores[n], node=n, server_round=1, attempt=1,
                           neighbours=[m for m in stores if m != n], threshold=2) for n in stores}
    cts = {n: client.share_keys(stores[n], server_round=1, attempt=1, public_keys=pks) for n in stores}
    inbox = {n: {src: cts[src][n] for src in stores if src != n} for n in stores}
    # Execute: masked uploads sized for 3 tenants; sum mod 2^m; remove the self masks (pairwise cancel)
    vecs = {n: client.masked_upload(stores[n], server_round=1, attempt=1, ciphertexts=inbox[n],
                                    quantizer=q, tenants=3,
                                    train=lambda n=n: (deltas[n], weights[n])) for n in stores}
    total = np.zeros(4, q3.dtype)
    for n, v in vecs.items():
        total = q3.reduce(total + v - prg_mask(bytes.fromhex(json.loads(stores[n]["state"])["b"]), 4, q3))
    summed, weight = unpack(total, 3, {"a": (3,)}, q3)
    # Assert: uint16 on the wire, masked (no vector is its plain packing); sum w_k * delta_k exactly
    assert all(v.dtype == np.uint16 and v.tolist() != pack(deltas[n], weights[n], q3).tolist()
               for n, v in vecs.items())
    want = sum(weights[n] * deltas[n]["a"].astype(np.float64) for n in weights)
    np.testing.assert_allclose(summed["a"], want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(want, [-9 * 4 * step, 0, 15 * 4 * step])
    assert weight == 7


def test_client_refuses_a_round_claiming_fewer_tenants_than_its_neighbourhood():
    stores = {n: {} for n in (1, 2, 3)}
    pks = {n: client.setup(stores[n], node=n, server_round=1, attempt=1,
                           neighbours=[m for m in stores if m != n], threshold=2) for n in stores}
    cts = {n: client.share_keys(stores[n], server_round=1, attempt=1, public_keys=pks) for n in stores}
    q = Quantizer(clip=1.0, bits=8, modulus_bits=10, max_weight=1, encoding="int8")
    with pytest.raises(client.SecAggRefused, match=r"claims 2 tenant\(s\), fewer than this tenant's 3 share holders"):
        client.masked_upload(stores[1], server_round=1, attempt=1, ciphertexts={2: cts[2][1], 3: cts[3][1]},
                             quantizer=q, tenants=2, train=lambda: ({"a": np.zeros(1, np.float32)}, 1))


def test_config_refuses_a_sizing_past_64_bits():
    parse_config({"secagg.enabled": True, "federation.delta-encoding": "int8", "simulation.tenants": 1000})
    with pytest.raises(ConfigError, match="federation.delta-encoding: 4 tenants with federation.max-weight"):
        parse_config({"secagg.enabled": True, "federation.delta-encoding": "bf16", "federation.max-weight": 2**62})
