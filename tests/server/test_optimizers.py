"""Server optimizers: each rule's first two steps by hand, sgd is FedAvg's step to the bit,
and the moments survive a safetensors round trip exactly."""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict

import numpy as np
import pytest

from fedlora.common.config import SERVER_OPTIMIZER_NAMES, ConfigError, FederationConfig, parse_config
from fedlora.server.aggregation import WeightedSum, apply_mean
from fedlora.server.optimizers import OPTIMIZERS, SGD, FedAdam, FedAvgM, make_server_optimizer

# Two tensors; two rounds' mean deltas d1, d2. Each WeightedSum has total weight 4, so its
# total is 4 * d (and the mean is d exactly).
X0 = OrderedDict(a=np.array([1.0, -1.0], np.float32), b=np.array([[0.5]], np.float32))
D1 = OrderedDict(a=np.array([3.0, 2.0], np.float32), b=np.array([[25.0]], np.float32))
D2 = OrderedDict(a=np.array([4.0, 1.0], np.float32), b=np.array([[7.0]], np.float32))
HYPER = dict(lr=0.5, beta1=0.5, beta2=0.75, tau=0.5)


def summed(d) -> WeightedSum:
    return WeightedSum(OrderedDict((k, v * np.float32(4)) for k, v in d.items()), 4.0, 2)


def two_steps(name):
    opt = OPTIMIZERS[name](**HYPER)
    x1 = opt.step(X0, summed(D1))
    return x1, opt.step(x1, summed(D2))


def flat(state) -> list[float]:
    return [float(x) for v in state.values() for x in v.ravel()]


# Expected (a0, a1, b) after steps 1 and 2, with lr 0.5, beta1 0.5, beta2 0.75, tau 0.5:
EXPECTED = {
    # x += 0.5 d
    "sgd": ([1 + 1.5, -1 + 1, 0.5 + 12.5],
            [2.5 + 2, 0 + 0.5, 13 + 3.5]),
    # m1 = d1 = (3, 2, 25); m2 = 0.5 m1 + d2 = (5.5, 2, 19.5); x += 0.5 m
    "fedavgm": ([1 + 1.5, -1 + 1, 0.5 + 12.5],
                [2.5 + 2.75, 0 + 1, 13 + 9.75]),
    # v1 = d1^2 = (9, 4, 625); v2 = v1 + d2^2 = (25, 5, 674); x += 0.5 d / (sqrt(v) + 0.5)
    "fedadagrad": ([1 + 0.5 * 3 / 3.5, -1 + 0.5 * 2 / 2.5, 0.5 + 0.5 * 25 / 25.5],
                   [1 + 0.5 * 3 / 3.5 + 0.5 * 4 / 5.5, -1 + 0.5 * 2 / 2.5 + 0.5 * 1 / (5 ** 0.5 + 0.5),
                    0.5 + 0.5 * 25 / 25.5 + 0.5 * 7 / (674 ** 0.5 + 0.5)]),
    # m1 = 0.5 d1 = (1.5, 1, 12.5); v1 = 0.25 d1^2 = (2.25, 1, 156.25), sqrt (1.5, 1, 12.5)
    # m2 = 0.5 m1 + 0.5 d2 = (2.75, 1, 9.75); v2 = 0.75 v1 + 0.25 d2^2 = (5.6875, 1, 129.4375)
    "fedadam": ([1 + 0.5 * 1.5 / 2, -1 + 0.5 * 1 / 1.5, 0.5 + 0.5 * 12.5 / 13],
                [1.375 + 0.5 * 2.75 / (5.6875 ** 0.5 + 0.5), -1 + 2 * 0.5 * 1 / 1.5,
                 0.5 + 0.5 * 12.5 / 13 + 0.5 * 9.75 / (129.4375 ** 0.5 + 0.5)]),
    # m as fedadam; v1 = 0 - 0.25 d1^2 sign(0 - d1^2) = (2.25, 1, 156.25), as fedadam;
    # v2 = v1 - 0.25 d2^2 sign(v1 - d2^2): (2.25 + 4, 1 - 0, 156.25 - 12.25) = (6.25, 1, 144),
    # sqrt (2.5, 1, 12): each of sign's three cases once
    "fedyogi": ([1 + 0.5 * 1.5 / 2, -1 + 0.5 * 1 / 1.5, 0.5 + 0.5 * 12.5 / 13],
                [1.375 + 0.5 * 2.75 / 3, -1 + 2 * 0.5 * 1 / 1.5, 0.5 + 0.5 * 12.5 / 13 + 0.5 * 9.75 / 12.5]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_first_two_steps_match_the_hand_computed_rule(name):
    # Prepare: the values written out above
    want1, want2 = EXPECTED[name]
    # Execute
    x1, x2 = two_steps(name)
    # Assert: float32 throughout, within float32 rounding of the exact values
    assert all(v.dtype == np.float32 for v in (*x1.values(), *x2.values()))
    np.testing.assert_allclose(flat(x1), want1, rtol=1e-6)
    np.testing.assert_allclose(flat(x2), want2, rtol=1e-6)


def test_fedavgm_second_step_adds_the_momentum_term_to_sgds():
    # Execute
    _, sgd2 = two_steps("sgd")
    _, avgm2 = two_steps("fedavgm")
    # Assert: the difference is lr * beta1 * m1 = 0.25 * d1 = (0.75, 0.5, 6.25), exactly
    assert [a - b for a, b in zip(flat(avgm2), flat(sgd2))] == [0.75, 0.5, 6.25]


def test_sgd_is_apply_mean_bit_for_bit():
    # Prepare: values and a weight whose scale is not a power of two, so rounding shows
    rng = np.random.default_rng(0)
    glob = OrderedDict((k, rng.standard_normal((16, 8)).astype(np.float32)) for k in ("a", "b"))
    agg = WeightedSum(OrderedDict((k, rng.standard_normal((16, 8)).astype(np.float32)) for k in glob), 3.0, 3)
    # Execute
    got = SGD(lr=0.3).step(glob, agg)
    want = apply_mean(glob, agg, server_lr=0.3)
    # Assert
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k])
    assert SGD(lr=0.3).state_arrays() == {}


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_moments_through_safetensors_give_identical_next_steps(name):
    from safetensors.numpy import load, save

    # Prepare: one step, its moments saved as bytes and loaded into a fresh optimizer
    rng = np.random.default_rng(1)
    glob = OrderedDict((k, rng.standard_normal((5, 3)).astype(np.float32)) for k in ("b", "a"))
    rounds = [WeightedSum(OrderedDict((k, rng.standard_normal((5, 3)).astype(np.float32)) for k in glob), 7.0, 2)
              for _ in range(3)]
    first = OPTIMIZERS[name](lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    x = first.step(glob, rounds[0])
    fresh = OPTIMIZERS[name](lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    fresh.load_state_arrays(load(save(first.state_arrays())))
    # Execute: both take the next two steps
    a, b = x, x
    for r in rounds[1:]:
        a, b = first.step(a, r), fresh.step(b, r)
    # Assert: the same adapters and moments, bit for bit
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert first.state_arrays().keys() == fresh.state_arrays().keys()
    for k, v in first.state_arrays().items():
        assert np.array_equal(v, fresh.state_arrays()[k]), k


def test_moments_of_another_rule_are_refused():
    # Prepare: fedavgm keeps only m
    avgm = FedAvgM(lr=1.0)
    avgm.step(X0, summed(D1))
    # Execute / Assert
    with pytest.raises(ValueError, match=r"fedadam needs moments \['m', 'v'\]"):
        FedAdam(lr=1.0).load_state_arrays(avgm.state_arrays())
    with pytest.raises(ValueError, match="fedavgm keeps moments"):
        FedAvgM(lr=1.0).load_state_arrays({"v/a": X0["a"]})


def test_moments_for_another_adapter_are_refused():
    # Prepare: moments over tensors named a and b; an adapter whose tensor is named c
    adam = FedAdam(lr=1.0)
    adam.step(X0, summed(D1))
    fresh = FedAdam(lr=1.0)
    fresh.load_state_arrays(adam.state_arrays())
    other = OrderedDict(c=np.zeros(2, np.float32))
    # Execute / Assert
    with pytest.raises(ValueError, match="do not match the adapter"):
        fresh.step(other, WeightedSum(OrderedDict(c=np.ones(2, np.float32)), 1.0, 1))


def test_unknown_optimizer_is_refused_with_the_names():
    cfg = dataclasses.replace(FederationConfig(), server_optimizer="adamw")
    with pytest.raises(ValueError, match="unknown server optimizer 'adamw'; choose one of sgd, fedexp, "
                                         "fedavgm, fedadagrad, fedadam, fedyogi"):
        make_server_optimizer(cfg)


def test_registry_matches_the_config_choices_and_the_config_builds_each():
    assert set(OPTIMIZERS) == set(SERVER_OPTIMIZER_NAMES)
    for name in SERVER_OPTIMIZER_NAMES:
        opt = make_server_optimizer(dataclasses.replace(FederationConfig(), server_optimizer=name, server_lr=0.01))
        assert opt.name == name and opt.lr == 0.01
        assert opt.describe().startswith(f"{name} (server lr 0.01")


def test_config_parses_the_server_optimizer_keys():
    # Execute
    cfg = parse_config({"federation.server-optimizer": "fedyogi", "federation.server-lr": 0.03,
                        "federation.server-beta1": 0, "federation.server-beta2": "0.999",
                        "federation.server-tau": 1e-4})
    # Assert: coerced to their types; the defaults leave today's step alone
    fed = cfg.federation
    assert (fed.server_optimizer, fed.server_lr, fed.server_beta1, fed.server_beta2, fed.server_tau) == (
        "fedyogi", 0.03, 0.0, 0.999, 1e-4)
    assert isinstance(fed.server_beta1, float)
    default = parse_config({}).federation
    assert (default.server_optimizer, default.server_lr, default.server_beta1, default.server_beta2,
            default.server_tau) == ("sgd", 1.0, 0.9, 0.99, 1e-3)


@pytest.mark.parametrize("flat, message", [
    ({"federation.server-optimizer": "adamw"},
     "federation.server-optimizer: 'adamw' is not allowed; choose one of sgd, fedexp, fedavgm, fedadam, fedyogi, fedadagrad"),
    ({"federation.server-beta1": 1.0}, "federation.server-beta1: 1.0 must be below 1"),
    ({"federation.server-beta2": 1.5}, "federation.server-beta2: 1.5 is above the maximum 1.0"),
    ({"federation.server-optimizer": "fedadam", "federation.server-tau": 0.0},
     "federation.server-tau: fedadam needs tau > 0"),
    ({"federation.server-optimiser": "fedadam"}, "did you mean 'federation.server-optimizer'"),
    ({"federation.server-optimizer": "fedexp", "federation.aggregator": "krum"},
     "'fedexp' sizes its step as the updates' mean squared norm over the squared norm of their mean, which holds "
     "for the mean (fedavg), not for 'krum'"),
    ({"federation.server-optimizer": "fedexp", "federation.aggregator": "median"}, "not for 'median'"),
])
def test_bad_server_optimizer_settings_are_refused(flat, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(flat)


def test_server_optimizers_run_with_secure_aggregation_and_central_dp():
    # The rules need only the (noised) sum: post-processing, so no combination is refused
    flat = {"federation.server-optimizer": "fedadam", "federation.server-lr": 0.01, "secagg.enabled": True,
            "privacy.mode": "central", "federation.max-weight": 1, "privacy.trust-clients": True}
    assert parse_config(flat).federation.server_optimizer == "fedadam"


# -- fedexp -------------------------------------------------------------------------------
def _updates_sum(deltas, weights, sq_norms=True) -> WeightedSum:
    total = OrderedDict((k, sum(np.float32(w) * d[k] for d, w in zip(deltas, weights))) for k in deltas[0])
    sq = sum(w * sum(float(np.sum(v ** 2)) for v in d.values()) for d, w in zip(deltas, weights)) / sum(weights)
    return WeightedSum(total, float(sum(weights)), len(deltas), sq_norm_mean=sq if sq_norms else None)


def test_fedexp_extrapolates_orthogonal_updates_by_half_their_count():
    # Prepare: 4 orthogonal unit updates of weight 1: mean d = e/4, ||d||^2 = 4/16 = 1/4,
    # mean ||delta||^2 = 1, so eta = max(1, 1 / (2 * (1/4 + tau))) with tau = 0: 2
    eye = np.eye(4, dtype=np.float32)
    deltas = [OrderedDict(a=eye[i]) for i in range(4)]
    opt = OPTIMIZERS["fedexp"](lr=1.0, tau=0.0)
    # Execute
    x = opt.step(OrderedDict(a=np.zeros(4, np.float32)), _updates_sum(deltas, [1, 1, 1, 1]))
    # Assert: x = 0 + 2 * (1/4, 1/4, 1/4, 1/4)
    assert opt.eta == pytest.approx(2.0)
    np.testing.assert_allclose(x["a"], [0.5, 0.5, 0.5, 0.5], rtol=1e-6)
    assert opt.round_info() == {"fedexp_eta": 2.0}


def test_fedexp_is_fedavg_when_the_updates_agree():
    # Prepare: 3 identical updates: mean ||delta||^2 = ||d||^2, ratio 1/2 -> eta = max(1, 1/2) = 1
    deltas = [OrderedDict(a=np.array([3.0, 4.0], np.float32))] * 3
    opt = OPTIMIZERS["fedexp"](lr=1.0, tau=1e-3)
    x0 = OrderedDict(a=np.array([1.0, 1.0], np.float32))
    summed_ = _updates_sum(deltas, [1, 2, 3])
    # Execute
    x = opt.step(x0, summed_)
    # Assert: bit for bit FedAvg's step
    assert opt.eta == 1.0
    np.testing.assert_array_equal(x["a"], apply_mean(x0, summed_, server_lr=1.0)["a"])


def test_fedexp_weights_the_norms_and_adds_tau_to_the_denominator():
    # Prepare: deltas (2, 0) weight 1 and (0, 1) weight 3: d = (2, 3) / 4 = (0.5, 0.75), ||d||^2 = 0.8125;
    # mean ||delta||^2 = (1 * 4 + 3 * 1) / 4 = 1.75; tau = 0.1: eta = 1.75 / (2 * 0.9125) = 0.9589 -> 1
    # and with tau = 0: 1.75 / 1.625 = 1.0769
    deltas = [OrderedDict(a=np.array([2.0, 0.0], np.float32)), OrderedDict(a=np.array([0.0, 1.0], np.float32))]
    x0 = OrderedDict(a=np.zeros(2, np.float32))
    damped, plain = OPTIMIZERS["fedexp"](lr=1.0, tau=0.1), OPTIMIZERS["fedexp"](lr=0.5, tau=0.0)
    # Execute
    damped.step(x0, _updates_sum(deltas, [1, 3]))
    x = plain.step(x0, _updates_sum(deltas, [1, 3]))
    # Assert: the server lr multiplies eta's step
    assert damped.eta == 1.0
    assert plain.eta == pytest.approx(1.75 / 1.625)
    np.testing.assert_allclose(x["a"], 0.5 * plain.eta * np.array([0.5, 0.75]), rtol=1e-6)


def test_fedexp_refuses_a_sum_without_norms():
    opt = OPTIMIZERS["fedexp"](lr=1.0)
    with pytest.raises(ValueError, match="mean squared norm"):
        opt.step(X0, summed(D1))


@pytest.mark.parametrize("section", [{"secagg.enabled": True}, {"privacy.mode": "central"}])
def test_fedexp_is_refused_where_the_server_sees_only_a_sum(section):
    with pytest.raises(ConfigError, match="fedexp"):
        parse_config({"federation.server-optimizer": "fedexp", **section})
