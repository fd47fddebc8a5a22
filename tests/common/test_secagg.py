"""The shared arithmetic of secure aggregation: quantization bound, packing, masks, graph."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.common import secagg_crypto as crypto
from fedlora.common.secagg import (
    Quantizer,
    UpdateRefused,
    check_update,
    neighbour_graph,
    pack,
    prg_mask,
    threshold,
    unpack,
)

Q = Quantizer(clip=8.0, bits=22, modulus_bits=32, max_weight=100)


def test_quantization_hand_computed():
    # clip 1, 2 bits: levels 0..3, step 2/3. x = 0.1 -> (0.1 + 1) * 1.5 = 1.65 -> 2 -> 2 * 2/3 - 1 = 1/3
    q = Quantizer(clip=1.0, bits=2, modulus_bits=32, max_weight=1)
    vec = pack({"x": np.array([0.1, -1.0, 1.0])}, 1, q)
    assert vec.tolist() == [2, 0, 3, 1]  # last element: the weight, unquantized
    total, weight = unpack(vec, 1, {"x": (3,)}, q)
    np.testing.assert_allclose(total["x"], [1 / 3, -1.0, 1.0], rtol=1e-6)
    assert weight == 1.0


def test_sum_error_within_documented_bound():
    # Prepare: 10 tenants, values spread over the whole clipping range after weighting
    rng = np.random.default_rng(0)
    weights = rng.integers(1, 101, size=10)
    deltas = [{"a": rng.uniform(-7.9, 7.9, 5000) * Q.max_weight / w} for w in weights]
    # Execute: sum of packed vectors (mod 2^32), then unpack
    total = sum(pack(d, int(w), Q) for d, w in zip(deltas, weights))
    got, weight = unpack(Q.reduce(total.astype(Q.dtype)), 10, {"a": (5000,)}, Q)
    # Assert: weight exact; weighted mean within n * max_weight * step / (2 W)
    want = sum(w * d["a"] for d, w in zip(deltas, weights))
    assert weight == weights.sum()
    err = np.max(np.abs(got["a"] / weight - want / weights.sum()))
    assert err <= Q.mean_error_bound(10, weights.sum()) * 1.0001
    assert Q.mean_error_bound(10, weights.sum()) < 1e-3


def test_check_update_caps_weight_and_refuses_bad_values():
    assert check_update({"a": np.ones(3)}, 250, clip=8.0, max_weight=100) == 100
    with pytest.raises(UpdateRefused, match="NaN or Inf"):
        check_update({"a": np.array([0.0, np.inf])}, 5, clip=8.0, max_weight=100)
    with pytest.raises(UpdateRefused, match=r"outside the clipping range \+-8"):
        check_update({"a": np.array([9.0])}, 100, clip=8.0, max_weight=100)
    with pytest.raises(UpdateRefused, match="not a positive integer"):
        check_update({"a": np.ones(1)}, 0, clip=8.0, max_weight=100)


def test_seeds_colliding_under_32_bit_folding_give_different_masks():
    # Prepare: two seeds whose 4-byte words XOR to the same 32-bit value (Flower folds them so)
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    a = bytes(32)
    b = (7).to_bytes(4, "little") * 2 + bytes(24)  # 7 ^ 7 = 0, like the all-zero seed
    assert pseudo_rand_gen(a, 2**32, [(100,)])[0].tolist() == pseudo_rand_gen(b, 2**32, [(100,)])[0].tolist()
    # Execute
    ma, mb = prg_mask(a, 100, Q), prg_mask(b, 100, Q)
    # Assert: full-entropy expansion tells them apart; same seed, same mask
    assert np.count_nonzero(ma != mb) > 95
    np.testing.assert_array_equal(ma, prg_mask(a, 100, Q))


def test_mask_is_uniform_over_the_modulus():
    m = prg_mask(bytes(range(32)), 200_000, Quantizer(clip=8.0, bits=12, modulus_bits=20, max_weight=1))
    assert m.max() < 2**20 and abs(m.mean() / 2**20 - 0.5) < 0.01


@pytest.mark.parametrize("n, k", [(10, 4), (7, 2), (6, 3), (5, 0), (4, 10)])
def test_neighbour_graph_is_symmetric_and_regular(n, k):
    nodes = list(range(100, 100 + n))
    g = neighbour_graph(nodes, k, seed=1)
    expected = n - 1 if k <= 0 or k >= n - 1 else k + (k % 2)  # odd k rounds up to the next even degree
    assert all(len(g[u]) == expected and u not in g[u] for u in nodes)
    assert all(u in g[v] for u in nodes for v in g[u])


def test_threshold_is_a_strict_majority():
    assert [threshold(m, 0.5) for m in (2, 3, 4, 5, 10)] == [2, 2, 3, 3, 6]
    assert threshold(5, 0.7) == 4


def test_shamir_any_threshold_shares_rebuild_the_seed():
    seed = crypto.new_seed()
    shares = crypto.split(seed, threshold=3, holders=5)
    assert crypto.combine([shares[4], shares[0], shares[2]]) == seed
    assert crypto.combine(shares[1:4]) == seed


def test_pairwise_seed_is_symmetric_and_full_length():
    a, b = crypto.new_private_key(), crypto.new_private_key()
    s_ab = crypto.mask_seed(a, crypto.public_bytes(b))
    assert s_ab == crypto.mask_seed(b, crypto.public_bytes(a)) and len(s_ab) == 32


def test_config_refuses_a_modulus_the_sum_would_overflow():
    from fedlora.common.config import ConfigError, parse_config

    # 2^24 - 1 // (2^22 - 1) = 4 tenants fit; 5 do not
    parse_config({"secagg.enabled": True, "secagg.modulus-bits": 24, "simulation.tenants": 4})
    with pytest.raises(ConfigError, match="would overflow 2\\^24 \\(at most 4\\)"):
        parse_config({"secagg.enabled": True, "secagg.modulus-bits": 24, "simulation.tenants": 5})
