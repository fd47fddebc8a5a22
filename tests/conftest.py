"""Shared fixtures: offline switches, small configs on the embedded base, synthetic tenants."""

from __future__ import annotations

import os

import pytest

from common.offline import quiet_and_offline

quiet_and_offline()


@pytest.fixture(autouse=True, scope="session")
def _hf_home(tmp_path_factory):
    """Keep Hugging Face caches out of the user's home during tests."""
    os.environ.setdefault("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
    yield


@pytest.fixture(scope="session")
def tenants_dir(tmp_path_factory):
    """4 small synthetic tenants (seeded), with preference and probe files."""
    from simulations.synthetic import write_tenants

    out = tmp_path_factory.mktemp("tenants")
    write_tenants(out, num_tenants=4, train_size=96, holdout_size=24, preference_size=32, seed=0)
    return out


@pytest.fixture(scope="session")
def small_cfg():
    """Defaults with a budget small enough for unit tests."""
    from common.config import parse_config

    return parse_config({"train.local-steps": 4, "train.batch-size": 8, "eval.batch-size": 24})
