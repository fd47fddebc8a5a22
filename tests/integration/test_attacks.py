"""Through Flower: one tenant of four sends its delta x100 (a hostile ClientApp wrapping
fedlora's own); with the default bounds the run completes, the attacker is flagged and
dropped every round, and the honest tenants do as well as without it."""

from __future__ import annotations

import pytest

from fedlora.simulations.attacks import harness

pytestmark = pytest.mark.slow


def test_scaled_update_is_dropped_and_flagged_and_the_honest_tenants_keep_their_quality(tmp_path):
    # Prepare: the default scenario, shortened; no evaluation each round (the honest EM is scored
    # on the final adapter, by the harness)
    from fedlora.simulations.scenario import resolve
    from fedlora.simulations.synthetic import write_tenants

    cfg = resolve("default", {"run.baselines": False, "dpo.enabled": False, "publish.enabled": False,
                              "federation.rounds": 3, "data.train-size": 256, "data.holdout-size": 48,
                              "federation.fraction-evaluate": 0.0},
                  str(tmp_path / "base"))
    data = tmp_path / "data"
    write_tenants(data, num_tenants=4, train_size=256, holdout_size=48, seed=0)
    app = harness.hostile_app_dir()
    # Execute: without an attacker, then with tenant 3 scaling its delta x100
    clean = harness.run_one(cfg, "none", "defaults", root=tmp_path, data_dir=data, app_dir=app)
    attacked = harness.run_one(cfg, "scale", "defaults", root=tmp_path, data_dir=data, app_dir=app)
    # Assert
    assert attacked["aggregated"] == attacked["rounds"] == 3
    assert attacked["attacker_flagged"] == 3 and attacked["attacker_actions"] == {"dropped": 3}
    assert clean["attacker_flagged"] == 0 and clean["honest_flags"] == 0 and attacked["honest_flags"] == 0
    assert attacked["mean_honest_em"] >= 0.9 * clean["mean_honest_em"]
    assert clean["mean_honest_em"] > 0.2  # the federation learned something to protect
