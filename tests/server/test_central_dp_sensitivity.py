"""Central DP's sensitivity holds with every bound setting the config accepts: adding or removing
one tenant moves the pre-noise sum by at most the clip C, which is what the accountant assumes.

The adversarial case is the adaptive bound (x the round's median norm): honest norms
0.1, 0.1, 0.2, 2, 2 put the median at 0.2 and the bound at 0.6, dropping both norm-2 tenants;
one more tenant of norm 2 moves the median to 1.1 and re-admits them, so the sum would move by
3C. Under central DP only data-independent bounds act, so it moves by the newcomer's clipped
delta alone."""

from __future__ import annotations

from collections import OrderedDict
from itertools import product

import numpy as np
import pytest

from fedlora.common.config import ConfigError, parse_config
from fedlora.server.aggregation import Update
from fedlora.server.records import RoundRecorder
from fedlora.server.server_app import make_strategy
from fedlora.server.transport import Collected
from fedlora.simulations.scenario import load_scenario

SHAPES = {"x.lora_A.weight": (2, 4), "x.lora_B.weight": (4, 2)}
HONEST_NORMS = (0.1, 0.1, 0.2, 2.0, 2.0)
SETTINGS = [dict(zip(("federation.max-update-norm", "federation.norm-multiplier", "federation.weight-multiplier",
                      "federation.bound-policy", "federation.outlier-action"), v))
            for v in product((0.0, 0.3, 10.0), (0.0, 3.0), (0.0, 2.0), ("drop", "clip"), ("drop", "flag"))]


def _update(node: int, norm: float, seed: int) -> Update:
    rng = np.random.default_rng(seed)
    raw = OrderedDict((k, rng.normal(0, 1, s)) for k, s in SHAPES.items())
    scale = norm / np.sqrt(sum(float((v ** 2).sum()) for v in raw.values())) if norm else 0.0
    return Update(OrderedDict((k, (v * scale).astype(np.float32)) for k, v in raw.items()), num_examples=10,
                  weight=1.0, metrics={}, node=node)


def _pre_noise_sum(cfg, updates: list[Update], tmp_path) -> np.ndarray:
    recorder = RoundRecorder(tmp_path, save=lambda *a: None)
    recorder.start_round(1, sampled=[u.node for u in updates], connected=len(updates))
    strategy = make_strategy(cfg, recorder)
    strategy._global = OrderedDict((k, np.zeros(s, np.float32)) for k, s in SHAPES.items())
    summed, _, _ = strategy._aggregate(Collected(updates=list(updates)), 1)
    if summed is None:
        return np.zeros(sum(int(np.prod(s)) for s in SHAPES.values()))
    return np.concatenate([v.astype(np.float64).ravel() for v in summed.total.values()])


def _accepted():
    out = []
    for setting in SETTINGS:
        try:
            out.append((setting, parse_config({**load_scenario("central_dp"), **setting})))
        except ConfigError:
            continue
    return out


ACCEPTED = _accepted()


def test_every_bound_setting_is_accepted_under_central_dp():
    assert len(ACCEPTED) == len(SETTINGS) == 48


@pytest.mark.parametrize("setting, cfg", ACCEPTED, ids=["-".join(map(str, s.values())) for s, _ in ACCEPTED])
@pytest.mark.parametrize("newcomer", [2.0, 0.0, 0.35])
def test_one_tenant_more_or_less_moves_the_sum_by_at_most_the_clip(setting, cfg, newcomer, tmp_path):
    # Prepare: five honest tenants, and the same five plus one
    honest = [_update(100 + i, norm, seed=i) for i, norm in enumerate(HONEST_NORMS)]
    extra = _update(200, newcomer, seed=99)
    # Execute
    without = _pre_noise_sum(cfg, honest, tmp_path / "a")
    with_one = _pre_noise_sum(cfg, [*honest, extra], tmp_path / "b")
    # Assert: at most C = privacy.central-clip (float32 rounding aside)
    assert np.linalg.norm(with_one - without) <= cfg.privacy.central_clip * (1 + 1e-5)


def test_the_shipped_scenario_keeps_no_adaptive_bound(tmp_path):
    cfg = parse_config(load_scenario("central_dp"))
    strategy = make_strategy(cfg, RoundRecorder(tmp_path, save=lambda *a: None))
    assert cfg.federation.norm_multiplier > 0  # the federation default, which central DP sets aside
    assert strategy.bounds.norm_multiplier == 0 and strategy.bounds.weight_multiplier == 0


@pytest.mark.parametrize("mode, unpredictable", [("central", True), ("local", True), ("none", False)])
def test_under_dp_the_tenants_are_drawn_from_os_randomness_not_the_published_seed(mode, unpredictable, tmp_path):
    import random

    overrides = {"central": load_scenario("central_dp"), "local": load_scenario("local_dp"), "none": {}}[mode]
    strategy = make_strategy(parse_config(overrides), RoundRecorder(tmp_path, save=lambda *a: None))
    assert isinstance(strategy.rng, random.SystemRandom) is unpredictable
    # a resumed run has no draw to restore under DP, and restores the seeded one without
    assert (strategy.resume_state()["rng"] is None) is unpredictable
