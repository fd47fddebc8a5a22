"""Fixtures of the release tests: a signing key, a finished run with a merged model, and
its published version (one of each per test module)."""

from __future__ import annotations

import pytest

from fedlora.common.adapter import write_json_atomic
from fedlora.common.config import parse_config
from fedlora.common.credentials import write_signing_keypair
from fedlora.server.release.artifacts import locate
from fedlora.server.release.stages import ReleaseInputs, run_merge, run_publish
from tests.common.make_records import write_summary
from tests.server.adapters import write_noisy_adapter


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_signing_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished run: config, federation summary, aggregate adapter, merged model."""
    cfg = parse_config({"simulation.tenants": 3, "federation.rounds": 2})
    root = tmp_path_factory.mktemp("run")
    write_json_atomic(root / "config.json", cfg.to_flat())
    write_summary(root, rounds=2, tenants=["0", "1", "2"])
    write_noisy_adapter(root / "adapter", cfg, seed=5)
    run_merge(locate(root), ReleaseInputs(merge_prompts=("Say hello.",)))
    return root


@pytest.fixture(scope="module")
def version(run_dir, keys, tmp_path_factory):
    registry = tmp_path_factory.mktemp("registry")
    result = run_publish(locate(run_dir), registry=registry, name="demo", signing_key=keys[0])
    assert result.verified is True, result.problems
    return result.path
