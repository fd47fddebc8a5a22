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


def test_tenant_ids_recorded_at_registration_become_the_run_configs_tenant_nodes(tmp_path):
    # Prepare / Execute: two sites registered with their tenant ids, one without
    from fedlora.server.identity import parse_tenant_nodes

    registry.record(tmp_path, 8613, public_key=tmp_path / "a.pub", max_examples=None, tenant_id=0)
    registry.record(tmp_path, 42, public_key=tmp_path / "b.pub", max_examples=None, tenant_id=1)
    registry.record(tmp_path, 7, public_key=tmp_path / "c.pub", max_examples=None)
    # Assert: sorted by node id, in the form the server reads
    value = registry.tenant_nodes(tmp_path)
    assert value == "42:1,8613:0"
    assert parse_tenant_nodes(parse_config({"federation.tenant-nodes": value}).federation.tenant_nodes) == {
        42: 1, 8613: 0}


def test_a_second_site_cannot_register_as_a_tenant_another_node_is(tmp_path):
    import pytest

    registry.record(tmp_path, 8613, public_key=tmp_path / "a.pub", max_examples=None, tenant_id=0)
    with pytest.raises(registry.RegistryError, match="tenant 0 is already node 8613"):
        registry.record(tmp_path, 42, public_key=tmp_path / "b.pub", max_examples=None, tenant_id=0)
    registry.record(tmp_path, 8613, public_key=tmp_path / "a.pub", max_examples=None, tenant_id=0)  # again: fine
    assert registry.tenant_nodes(tmp_path) == "8613:0"


def test_the_roster_lists_every_registered_nodes_key_by_node_id(tmp_path):
    # Prepare: two registered keys
    from fedlora.common.credentials import write_node_keypair
    from fedlora.common.secagg_identity import load_roster

    a, b = write_node_keypair(tmp_path, "a")[1], write_node_keypair(tmp_path, "b")[1]
    registry.record(tmp_path, 8613, public_key=a, max_examples=None, tenant_id=0)
    registry.record(tmp_path, 42, public_key=b, max_examples=None, tenant_id=1)
    # Execute
    count = registry.write_roster(tmp_path, tmp_path / "roster.json")
    # Assert: what a tenant's --roster reads back, one key per node id
    roster = load_roster(tmp_path / "roster.json")
    assert count == 2 and sorted(roster) == [42, 8613]
