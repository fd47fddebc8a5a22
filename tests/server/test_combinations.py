"""Every pair of settings the config accepts keeps the server's promises, or is refused.

The axes are the server's choices (aggregator, server optimizer, LoRA rule, delta encoding,
transport, privacy mode, bounds, direction screen, sampling fraction, weighting). For every
pair of values of two axes (the others at their defaults), the config is parsed and the
strategy built; a pair either is refused with a reason, or passes, on one round of the same
replies (five honest tenants, one sign-flipped at the honest norm, one at 50x):

* **order**: the replies in three orders give the same bytes (the sum, and the new adapter);
* **rejected means no influence**: an update the round dropped or left out, replaced by
  another that is dropped or left out again, changes nothing (a step that used the norms of
  rejected updates would move);
* **the absolute bound holds**: with ``federation.max-update-norm`` set, the mean moved by no
  more than the bound (each summed update is within it);
* **central DP's sensitivity**: one tenant added moves the pre-noise sum by at most the clip.

Secure-aggregation pairs only reach the server as a sum: they are checked for acceptance here,
and their sums in ``tests/server/test_secagg*.py``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from itertools import combinations

import numpy as np
import pytest

from fedlora.common import messages as keys
from fedlora.common.config import AGGREGATOR_NAMES, DELTA_ENCODINGS, LORA_RULES, SERVER_OPTIMIZER_NAMES, ConfigError, \
    parse_config
from fedlora.server.aggregation import Update, l2_norm
from fedlora.server.records import RoundRecorder
from fedlora.server.server_app import make_strategy
from fedlora.server.transport import Collected
from fedlora.simulations.scenario import load_scenario

AXES: dict[str, tuple] = {
    "federation.aggregator": AGGREGATOR_NAMES,
    "federation.server-optimizer": SERVER_OPTIMIZER_NAMES,
    "federation.lora-rule": LORA_RULES,
    "federation.delta-encoding": DELTA_ENCODINGS,
    "secagg.enabled": (False, True),
    "privacy.mode": ("none", "local", "central"),
    "bounds": ("adaptive", "absolute", "off"),
    "federation.outlier-action": ("drop", "flag"),
    "federation.fraction-train": (1.0, 0.5),
    "federation.weighting": ("examples", "sqrt-examples", "uniform"),
}
BOUNDS = {"adaptive": {}, "absolute": {"federation.max-update-norm": 2.0},
          "off": {"federation.norm-multiplier": 0.0, "federation.weight-multiplier": 0.0}}
PRIVACY = {"none": {}, "local": load_scenario("local_dp"), "central": load_scenario("central_dp")}
R, FAN = 2, 6
MODULES = ("q", "v")


def _settings(axis: str, value) -> dict:
    if axis == "bounds":
        return BOUNDS[value]
    if axis == "privacy.mode":
        return dict(PRIVACY[value])
    return {axis: value}


def _pairs():
    out = []
    for (a, va), (b, vb) in combinations(AXES.items(), 2):
        for x in va:
            for y in vb:
                out.append(((a, x), (b, y)))
    return out


def _build(pair):
    """(config, strategy) for ``pair``, or raise ConfigError with the reasons."""
    overrides: dict = {"simulation.tenants": 7, "federation.min-train-nodes": 2}
    for axis, value in pair:
        overrides.update(_settings(axis, value))
    cfg = parse_config(overrides)
    return cfg


def _classify():
    accepted, refused = [], []
    for pair in _pairs():
        try:
            accepted.append((pair, _build(pair)))
        except ConfigError as err:
            refused.append((pair, str(err)))
    return accepted, refused


ACCEPTED, REFUSED = _classify()


def _global(rule: str) -> "OrderedDict[str, np.ndarray]":
    rng = np.random.default_rng(99)
    out = OrderedDict()
    for m in MODULES:
        out[f"base_model.model.{m}.lora_A.weight"] = rng.normal(0, 0.3, (R, FAN)).astype(np.float32)
        out[f"base_model.model.{m}.lora_B.weight"] = np.zeros((FAN, R), np.float32)
    return out


def _updates(rule: str, cfg) -> list[Update]:
    """Five honest updates around one direction, one sign-flipped at their norm, one at 50x."""
    rng = np.random.default_rng(0)
    centre = OrderedDict((k, rng.normal(0, 0.1, v.shape).astype(np.float32)) for k, v in _global(rule).items())
    if rule == "ffa":  # A is frozen: only B deltas travel
        centre = OrderedDict((k, v if "lora_B" in k else np.zeros_like(v)) for k, v in centre.items())
    out = []
    for node in range(1, 6):
        noise = OrderedDict((k, (v + rng.normal(0, 0.02, v.shape) * (v != 0)).astype(np.float32))
                            for k, v in centre.items())
        out.append(noise)
    out.append(OrderedDict((k, -v) for k, v in out[0].items()))
    out.append(OrderedDict((k, v * np.float32(50)) for k, v in out[1].items()))
    weight_cap = cfg.federation.max_weight
    return [Update(d, num_examples=64 + 8 * i, weight=float(min(64 + 8 * i, weight_cap)), metrics={keys.TENANT: i},
                   node=100 + i) for i, d in enumerate(out)]


def _round(cfg, updates, tmp_path, *, order=None):
    """(pre-noise sum bytes, new adapter bytes or None, audits) of one round on ``updates``."""
    recorder = RoundRecorder(tmp_path, save=lambda *a: None)
    recorder.start_round(1, sampled=[u.node for u in updates], connected=len(updates))
    rule = cfg.federation.lora_rule
    strategy = make_strategy(cfg, recorder, initial=_global(rule))
    strategy._global = _global(rule)
    strategy._audit_key = b"matrix"
    ups = updates if order is None else [updates[i] for i in order]
    summed, audits, _ = strategy._aggregate(Collected(updates=list(ups)), 1)
    if summed is None:
        return None, None, audits
    total = b"".join(v.tobytes() for v in summed.total.values())
    step = None
    if cfg.privacy.mode != "central":  # central DP's noise is fresh each time; its pre-noise sum is compared
        new = strategy.rule.step(strategy.optimizer, strategy._global, summed)
        step = b"".join(v.tobytes() for v in new.values())
    return total, step, audits


def test_the_matrix_accepts_most_pairs_and_says_why_it_refuses_the_rest():
    # every refusal names the setting to change
    assert len(ACCEPTED) + len(REFUSED) == len(_pairs())
    assert len(ACCEPTED) > len(REFUSED)
    print(f"{len(_pairs())} pairs: {len(ACCEPTED)} accepted, {len(REFUSED)} refused")
    for pair, why in REFUSED:
        problem = why.splitlines()[-1]
        names = {axis if axis not in ("bounds", "privacy.mode", "secagg.enabled") else axis.split(".")[0]
                 for axis, _ in pair}
        assert any(n in problem for n in names) or "privacy." in problem, (pair, problem)
        print(" refused", dict(pair), "-", problem.strip()[:200])


PLAIN = [(pair, cfg) for pair, cfg in ACCEPTED if not cfg.secagg.enabled]


@pytest.mark.parametrize("pair, cfg", PLAIN, ids=[f"{a[1]}+{b[1]}" for (a, b), _ in PLAIN])
def test_every_accepted_pair_keeps_every_invariant(pair, cfg, tmp_path):
    # Prepare
    updates = _updates(cfg.federation.lora_rule, cfg)
    # Execute: three orders
    first = _round(cfg, updates, tmp_path / "a")
    rev = _round(cfg, updates, tmp_path / "b", order=list(reversed(range(len(updates)))))
    rot = _round(cfg, updates, tmp_path / "c", order=[3, 4, 5, 6, 0, 1, 2])
    # Assert: order
    assert first[0] == rev[0] == rot[0] and first[1] == rev[1] == rot[1]
    # Assert: a rejected update replaced by another that is rejected again changes nothing
    audits = first[2]
    rejected = [i for i, u in enumerate(updates) if audits.get(u.node) and audits[u.node].action in ("dropped", "excluded")]
    if rejected and first[0] is not None:
        swapped = list(updates)
        for i in rejected:
            swapped[i] = replace(updates[i], delta=OrderedDict((k, v * np.float32(1.5)) for k, v in updates[i].delta.items()))
        again = _round(cfg, swapped, tmp_path / "d")
        if all(again[2][updates[i].node].action in ("dropped", "excluded") for i in rejected):
            assert again[0] == first[0] and again[1] == first[1]
    # Assert: the absolute bound
    bound = cfg.federation.max_update_norm
    if bound and first[0] is not None:
        summed_updates = [u for u in updates if audits[u.node].action not in ("dropped", "excluded")]
        assert all(min(l2_norm(u.delta), bound) <= bound * (1 + 1e-6) for u in summed_updates)
        assert all(audits[u.node].action in ("clipped", "dropped", "excluded") for u in updates
                   if l2_norm(u.delta) > bound * (1 + 1e-6))
    # Assert: central DP's sensitivity, one tenant more
    if cfg.privacy.mode == "central":
        newcomer = replace(updates[2], node=200, metrics={keys.TENANT: 7})
        more = _round(cfg, [*updates, newcomer], tmp_path / "e")
        a = np.frombuffer(first[0] or b"", np.float32) if first[0] else 0.0
        b = np.frombuffer(more[0], np.float32).astype(np.float64)
        assert float(np.linalg.norm(b - a)) <= cfg.privacy.central_clip * (1 + 1e-5)
