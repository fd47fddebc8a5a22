"""One typed config: every problem reported at once; pyproject and dataclass defaults agree."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedlora.common.config import Config, ConfigError, parse_config
from fedlora.simulations.scenario import SCENARIOS, flatten, load_scenario

ROOT = Path(__file__).resolve().parents[2]


def test_every_bad_key_is_listed_at_once():
    # Prepare: two unknown keys and four bad values
    flat = {
        "train.lerning-rate": 0.1,
        "bogus.key": 1,
        "train.batch-size": 0,
        "model.precision": "int8",
        "adapter.r": "eight",
        "run.baselines": "maybe",
    }
    # Execute
    with pytest.raises(ConfigError) as err:
        parse_config(flat)
    # Assert: one error names all six keys, with allowed values where there are some
    problems = err.value.problems
    assert len(problems) == 6
    text = str(err.value)
    for key in flat:
        assert key in text
    assert "did you mean 'train.learning-rate'" in text
    assert "fp32, bf16, nf4" in text
    assert "below the minimum 1" in text


def test_relative_run_dir_is_refused():
    with pytest.raises(ConfigError, match="run.dir: 'runs/x' must be an absolute path"):
        parse_config({"run.dir": "runs/x"})


def test_values_are_coerced_from_flower_types():
    cfg = parse_config({"train.learning-rate": 1, "adapter.alpha": 8, "run.baselines": "false"})
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    assert cfg.run.baselines is False


def test_pyproject_defaults_equal_dataclass_defaults():
    # Prepare
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flower_defaults = flatten(pyproject["tool"]["flwr"]["app"]["config"])
    # Execute
    ours = Config().to_flat()
    # Assert: same keys, same values, same types
    assert flower_defaults == ours
    for key, value in ours.items():
        assert type(flower_defaults[key]) is type(value), key


def test_round_trip_through_flat_form():
    cfg = parse_config({"adapter.method": "dora", "federation.rounds": 7})
    assert parse_config(cfg.to_flat()) == cfg


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_scenario_loads_and_validates(path):
    cfg = parse_config(load_scenario(path.stem), source=str(path))
    assert cfg.simulation.tenants >= 2
    assert cfg.federation.min_train_nodes <= cfg.simulation.tenants


def test_at_least_three_scenarios_ship():
    names = {p.stem for p in SCENARIOS.glob("*.toml")}
    assert {"default", "many_tenants", "non_iid"} <= names


@pytest.mark.parametrize("typed, meant", [("train.lr", "train.learning-rate"), ("train.local", "train.local-steps"),
                                          ("federation.agregator", "federation.aggregator")])
def test_did_you_mean_names_the_field_the_user_meant(typed, meant):
    with pytest.raises(ConfigError, match=f"did you mean '{meant}'"):
        parse_config({typed: 1})


def test_central_dp_with_secure_aggregation_needs_trust_clients():
    flat = {"privacy.mode": "central", "federation.max-weight": 1, "secagg.enabled": True}
    with pytest.raises(ConfigError, match="privacy.trust-clients"):
        parse_config(flat)
    assert parse_config({**flat, "privacy.trust-clients": True}).privacy.trust_clients


def test_central_dp_refuses_a_robust_aggregator():
    with pytest.raises(ConfigError, match="sensitivity bound holds for the noised sum"):
        parse_config({"privacy.mode": "central", "federation.max-weight": 1, "federation.aggregator": "median"})
