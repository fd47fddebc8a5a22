"""The operator's registry: `deploy register --max-examples` caps become federation.example-caps."""

from __future__ import annotations

from fedlora.common.config import parse_config
from fedlora.simulations.cli import registry


def test_caps_recorded_at_registration_become_the_run_configs_example_caps(tmp_path):
    # Prepare: Flower's register output for two nodes, one capped
    out_a = "✅ SuperNode 8613 registered successfully."
    out_b = "✅ SuperNode 42 registered successfully."
    # Execute
    registry.record(tmp_path, registry.node_id_from(out_a), public_key=tmp_path / "a.pub", max_examples=500)
    registry.record(tmp_path, registry.node_id_from(out_b), public_key=tmp_path / "b.pub", max_examples=None)
    # Assert: only the capped node appears; the value parses as the config expects
    caps = registry.example_caps(tmp_path)
    assert caps == "8613:500"
    assert parse_config({"federation.example-caps": caps}).federation.example_caps == "8613:500"
    assert registry.node_id_from("no id here") is None
