"""A simulated tenant without data.dir (a bare ``flwr run``): its seeded synthetic files, one per SuperNode."""

from __future__ import annotations

import pytest

from fedlora.client.task import tenant_from_node_config
from fedlora.common.config import parse_config
from fedlora.simulations.synthetic import write_tenants

SMALL = {"data.train-size": 12, "data.holdout-size": 4, "data.seed": 3}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_HOME", str(tmp_path / "fedlora-home"))
    return tmp_path / "fedlora-home"


def test_a_partition_without_data_dir_gets_the_files_fedlora_simulate_writes(home, tmp_path):
    # Prepare: what `fedlora simulate` writes for 2 tenants with the same data.* values
    write_tenants(tmp_path / "simulate", num_tenants=2, train_size=12, holdout_size=4, preference_size=0, seed=3)
    cfg = parse_config(SMALL)
    # Execute: tenant 1 of a 2-node simulation
    tenant = tenant_from_node_config({"partition-id": 1, "num-partitions": 2}, cfg)
    # Assert: same bytes, in the fedlora home, never tenant 0's files unless asked
    assert tenant.tenant_id == 1
    assert tenant.train_path.read_bytes() == (tmp_path / "simulate" / "tenant_001" / "train.jsonl").read_bytes()
    assert tenant.holdout_path.read_bytes() == (tmp_path / "simulate" / "tenant_001" / "holdout.jsonl").read_bytes()
    assert len(tenant.train_path.read_text().splitlines()) == 12
    assert tenant.train_path.parent.parent.parent == home / "synthetic"
    assert [p.name for p in tenant.train_path.parent.parent.iterdir()] == ["tenant_001"]
    assert tenant.state_dir == tenant.train_path.parent / ".fedlora-state"


def test_the_same_values_reuse_the_files_and_other_values_get_their_own(home):
    # Prepare
    cfg = parse_config(SMALL)
    first = tenant_from_node_config({"partition-id": 0}, cfg).train_path
    written = first.stat().st_mtime_ns
    # Execute
    again = tenant_from_node_config({"partition-id": 0}, cfg).train_path
    other = tenant_from_node_config({"partition-id": 0}, cfg.replace(**{"data.seed": 4})).train_path
    # Assert
    assert again == first and first.stat().st_mtime_ns == written
    assert other.parent.parent != first.parent.parent
    assert other.read_bytes() != first.read_bytes()


def test_a_tenant_another_writer_put_in_place_first_is_kept(home, monkeypatch):
    # Prepare: the other writer's files land between our check and our rename
    import fedlora.common.files as files

    cfg = parse_config(SMALL)
    real = files.atomic_dir
    target = {}

    def racing(final, **kw):
        ctx = real(final, **kw)
        final.mkdir(parents=True)
        (final / "train.jsonl").write_text("theirs\n")
        target["dir"] = final
        return ctx

    monkeypatch.setattr(files, "atomic_dir", racing)
    # Execute
    tenant = tenant_from_node_config({"partition-id": 2}, cfg)
    # Assert: no error, the winner's file stays, no temporary directory is left
    assert tenant.train_path.read_text() == "theirs\n"
    assert [p.name for p in target["dir"].parent.iterdir()] == ["tenant_002"]


def test_a_given_data_dir_is_used_as_before(home, tmp_path):
    cfg = parse_config({**SMALL, "data.dir": str(tmp_path / "mine")})
    tenant = tenant_from_node_config({"partition-id": 3}, cfg)
    assert tenant.train_path == tmp_path / "mine" / "tenant_003" / "train.jsonl"
    assert not home.exists()


def test_simulation_ledger_dir_moves_a_simulated_tenants_ledger_and_never_a_deployment_nodes(home, tmp_path):
    # Prepare: a run config naming a ledger directory (as simulate's without-DP comparison run does)
    from fedlora.client.task import ledger_for

    cfg = parse_config({**SMALL, "data.dir": str(tmp_path / "mine"), "simulation.ledger-dir": str(tmp_path / "led")})
    write_tenants(tmp_path / "mine", num_tenants=2, train_size=12, holdout_size=4, preference_size=0, seed=3)
    # Execute
    simulated = tenant_from_node_config({"partition-id": 1}, cfg)
    deployed = tenant_from_node_config({"data-path": str(tmp_path / "mine" / "tenant_000" / "train.jsonl")}, cfg)
    # Assert: the simulated tenant's ledger is inside it, one folder per tenant; a node's stays its own
    assert ledger_for(simulated).path.parent == tmp_path / "led" / "tenant_001"
    assert deployed.ledger_dir is None
    assert tmp_path / "led" not in ledger_for(deployed).path.parents
