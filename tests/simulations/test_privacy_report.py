"""The report's privacy section: epsilon per tenant or per round, declines, with vs without DP."""

from __future__ import annotations

import json

from fedlora.common.config import parse_config
from fedlora.simulations.report import privacy_section
from tests.common.make_records import round_record

CFG = parse_config({"privacy.mode": "local", "privacy.delta": 1e-5, "privacy.target-epsilon": 8.0,
                    "privacy.noise-multiplier": 1.0, "privacy.max-grad-norm": 1.0, "privacy.budget": 10.0,
                    "privacy.sampling": "poisson", "privacy.central-clip": 0.5,
                    "privacy.central-noise-multiplier": 1.0})


def _row(model, em, loss):
    return {"model": model, "mean_exact_match": em, "mean_loss": loss}


def test_local_dp_section_lists_epsilon_declines_and_quality_ratio(tmp_path):
    # Prepare: two rounds; tenant 1 declines in round 2; the run without DP scored EM 0.5
    rounds = [round_record(1, train={"0": {"dp-epsilon": 5.0}, "1": {"dp-epsilon": 5.0}}),
              round_record(2, train={"0": {"dp-epsilon": 8.0}},
                           dropped=[{"tenant": "1", "reason": "client error: privacy budget exhausted: ..."}])]
    (tmp_path / "without_dp").mkdir()
    (tmp_path / "without_dp" / "comparison.json").write_text(json.dumps([_row("federated", 0.5, 0.6)]))
    # Execute
    text = "\n".join(privacy_section(tmp_path, CFG, rounds, [_row("federated", 0.45, 0.9)]))
    # Assert: last epsilon per tenant, the decline, delta, and 0.45 / 0.5 = 0.900
    assert "| 0 | 8.000 |" in text and "| 1 | 5.000 |" in text
    assert "tenant 1 (round 2)" in text
    assert "delta = 1e-05" in text
    assert "**0.900**" in text


def test_central_dp_section_has_epsilon_per_round(tmp_path):
    rounds = [round_record(1, privacy={"received": 2, "sampled": 5, "sample_rate": 1.0, "noise_std_mean": 0.25,
                                       "epsilon": 3.5})]
    cfg = CFG.replace(**{"privacy.mode": "central", "federation.max-weight": 1})
    text = "\n".join(privacy_section(tmp_path, cfg, rounds, []))
    assert "| 1 | 2 | 5 | 1.000 | 0.25 | 3.500 |" in text


def test_no_section_without_privacy(tmp_path):
    assert privacy_section(tmp_path, parse_config({}), [], []) == []
