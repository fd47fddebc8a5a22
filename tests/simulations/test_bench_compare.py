"""The comparison benchmark: arms parsed from the command line, figures read from a run's
records, one table."""

from __future__ import annotations

import json

import pytest

from fedlora.simulations.bench.compare import ArmResult, parse_arm, read_arm, table
from tests.common.make_records import write_round, write_summary


def test_parse_arm_reads_name_and_settings():
    # Execute
    name, settings = parse_arm("fedadam-3e-2:federation.server-optimizer=fedadam, federation.server-lr=0.03")
    # Assert
    assert name == "fedadam-3e-2"
    assert settings == {"federation.server-optimizer": "fedadam", "federation.server-lr": "0.03"}


@pytest.mark.parametrize("text", ["no-colon", ":a=1", "x:a"])
def test_parse_arm_refuses_malformed_text(text):
    with pytest.raises(SystemExit):
        parse_arm(text)


def test_read_arm_takes_em_bytes_and_server_seconds_from_the_records(tmp_path):
    # Prepare: 2 rounds, 2 tenants each, 3 MB up in all; server 0.1 s and 0.3 s; round 3 not aggregated
    write_round(tmp_path, 1, finished=["0", "1"], aggregation={"server_seconds": 0.1})
    write_round(tmp_path, 2, finished=["0", "1"], aggregation={"server_seconds": 0.3})
    write_round(tmp_path, 3, finished=[], aggregated=False)
    write_summary(tmp_path, rounds=3, bytes_up=3_000_000)
    (tmp_path / "comparison.json").write_text(json.dumps([
        {"model": "federated", "mean_exact_match": 0.75,
         "per_tenant": {"0": {"exact_match": 0.5}, "1": {"exact_match": 1.0}}},
        {"model": "pooled", "mean_exact_match": 0.8, "per_tenant": {}}]))
    # Execute
    got = read_arm(tmp_path)
    # Assert: 3 MB over 4 tenant-rounds; the median of the aggregated rounds' server seconds
    assert got["mean"] == 0.75 and got["worst"] == 0.5 and got["pooled"] == 0.8
    assert got["uplink_mb"] == pytest.approx(0.75)
    assert got["server_s"] == pytest.approx(0.2)


def test_table_states_the_ratio_to_pooled_or_na():
    # Prepare
    rows = [ArmResult("non_iid", "fedavg", {}, 0.797, 0.6, 0.477, 0.01, 300.0, pooled_exact_match=0.922),
            ArmResult("non_iid", "x", {}, 0.5, 0.5, 0.1, 0.01, 300.0)]
    # Execute
    lines = table(rows).splitlines()
    # Assert: 0.797 / 0.922 = 0.864
    assert "| non_iid | fedavg | 79.7 % | 0.864 | 60.0 % | 0.477 | 0.0100 |" == lines[2]
    assert "| n/a |" in lines[3]
