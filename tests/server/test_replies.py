"""Every reply validated: metric values finite and in range, example counts capped, and the
tenant behind a reply taken from its node, never from what the reply claims."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict

from fedlora.common import messages as keys
from fedlora.common.adapter import from_arrayrecord, to_arrayrecord
from fedlora.server.aggregation import Rejected, check_metric_values
from fedlora.server.identity import TenantRoster, parse_tenant_nodes
from tests.server.test_strategy import GLOBAL, FakeGrid, _strategy, good


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


# -- metric values -------------------------------------------------------------
HONEST_EVAL = {keys.NUM_EXAMPLES: 16, keys.TENANT: 2, "eval-exact-match": 0.25, "eval-json-valid": 1.0,
               "eval-loss": 1.5, "eval-seconds": 3.0}


def test_honest_metrics_pass():
    check_metric_values(HONEST_EVAL, max_examples=100)


@pytest.mark.parametrize("key, value, says", [
    (keys.NUM_EXAMPLES, math.nan, "not a finite number"),
    (keys.NUM_EXAMPLES, math.inf, "not a finite number"),
    (keys.NUM_EXAMPLES, -4, "out of range [1, 100]"),
    (keys.NUM_EXAMPLES, 1e12, "out of range [1, 100]"),
    (keys.NUM_EXAMPLES, 2.5, "out of range"),
    ("eval-exact-match", 1.5, "'eval-exact-match' = 1.5 is not in [0, 1]"),
    ("eval-exact-match", -0.1, "is not in [0, 1]"),
    ("eval-loss", -1.0, "'eval-loss' = -1.0 is not in [0, inf]"),
    ("eval-seconds", math.inf, "not a finite number"),
    (keys.TENANT, -1, "'tenant-id' = -1 is not a whole number"),
    (keys.TENANT, 0.5, "is not a whole number"),
])
def test_each_impossible_value_is_rejected_with_its_name(key, value, says):
    with pytest.raises(Rejected, match=says.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        check_metric_values({**HONEST_EVAL, key: value}, max_examples=100)


def test_a_boolean_is_not_a_number():
    with pytest.raises(Rejected, match="not a finite number"):
        check_metric_values({**HONEST_EVAL, "eval-json-valid": True}, max_examples=100)


# -- who a reply is from ---------------------------------------------------------
def test_the_operators_assignment_is_parsed_and_checked():
    # Execute / Assert
    assert parse_tenant_nodes(" 11:0, 12:1 ,") == {11: 0, 12: 1}
    for bad, says in (("11-0", "not NODE-ID:TENANT"), ("11:0,11:1", "node 11 twice"),
                      ("11:0,12:0", "tenant 0 to two nodes"), ("x:1", "not NODE-ID:TENANT")):
        with pytest.raises(ValueError, match=says):
            parse_tenant_nodes(bad)


def test_an_assigned_node_must_claim_its_own_tenant_and_an_unknown_node_is_refused():
    roster = TenantRoster({11: 0, 12: 1})
    assert roster.tenant_of(11, 0) == 0
    with pytest.raises(Rejected, match="claims tenant 1, but node 11 is registered as tenant 0"):
        roster.tenant_of(11, 1)
    with pytest.raises(Rejected, match="node 13 is not a registered tenant"):
        roster.tenant_of(13, 2)


def test_without_an_assignment_a_nodes_first_claim_binds_it():
    roster = TenantRoster()
    assert roster.tenant_of(11, 0) == 0 and roster.tenant_of(11, 0) == 0
    with pytest.raises(Rejected, match="claims tenant 0, which node 11 holds"):
        roster.tenant_of(12, 0)
    with pytest.raises(Rejected, match="claims tenant 3, but node 11 answered earlier as tenant 0"):
        roster.tenant_of(11, 3)
    assert roster.tenant_of(12, 1) == 1


# -- through the strategy ------------------------------------------------------------
def lying_evaluation(**metrics):
    def reply(msg):
        if msg.metadata.message_type != "evaluate":
            return good(5.0, tenant=metrics.get(keys.TENANT, 2))(msg)
        m = {**HONEST_EVAL, **metrics}
        return Message(RecordDict({keys.METRICS: MetricRecord(m)}), reply_to=msg)
    return reply


@pytest.mark.parametrize("lie, says", [
    ({keys.NUM_EXAMPLES: math.nan}, "not a finite number"), ({keys.NUM_EXAMPLES: math.inf}, "not a finite number"),
    ({keys.NUM_EXAMPLES: -16}, "out of range"), ({keys.NUM_EXAMPLES: 10**12}, "out of range"),
    ({"eval-exact-match": 7.0}, "not in [0, 1]"),
])
def test_an_impossible_evaluation_is_dropped_and_the_run_finishes(tmp_path, lie, says):
    # Prepare: tenants 0 and 1 honest (EM 0.5 on 4 examples each), tenant 2's evaluation lies
    strategy, saved = _strategy(tmp_path, max_examples=1000)
    grid = FakeGrid({101: good(1.0, tenant=0), 102: good(3.0, tenant=1), 103: lying_evaluation(**lie)})
    # Execute
    result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(GLOBAL), num_rounds=1, timeout=5)
    # Assert: the adapter was written; the evaluation is the honest tenants'; the liar's reason recorded
    assert 1 in saved and result.arrays is not None
    record = json.loads((tmp_path / "metrics" / "round_001.json").read_text())
    assert sorted(record["eval"]) == ["0", "1"]
    (drop,) = [d for d in record["dropped"] if d["reason"].startswith("evaluation:")]
    assert drop["node"] == 103 and says in drop["reason"]
    final = result.evaluate_metrics_clientapp[1]
    assert final["eval-exact-match"] == 0.5 and final[keys.NUM_EXAMPLES] == 8


def test_a_tenant_claiming_anothers_id_cannot_overwrite_its_entries(tmp_path):
    # Prepare: node 103 claims tenant 0, which node 101 holds
    strategy, _ = _strategy(tmp_path)
    grid = FakeGrid({101: good(1.0, tenant=0), 102: good(3.0, tenant=1), 103: good(100.0, tenant=0)})
    # Execute
    result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(GLOBAL), num_rounds=1, timeout=5)
    # Assert: its update and its evaluation are dropped with the reason; tenant 0's entries are node 101's
    np.testing.assert_allclose(from_arrayrecord(result.arrays)["x.lora_A.weight"], 2.0)
    record = json.loads((tmp_path / "metrics" / "round_001.json").read_text())
    assert [d["node"] for d in record["dropped"]] == [103, 103]
    assert all("claims tenant 0, which node 101 holds" in d["reason"] for d in record["dropped"])
    assert record["finished"] == ["0", "1"]


def test_the_operators_assignment_holds_over_the_claim(tmp_path):
    # Prepare: node 102 is registered as tenant 1 but claims tenant 5
    strategy, _ = _strategy(tmp_path, tenant_nodes="101:0,102:1")
    grid = FakeGrid({101: good(1.0, tenant=0), 102: good(3.0, tenant=5)})
    # Execute
    strategy.start(grid=grid, initial_arrays=to_arrayrecord(GLOBAL), num_rounds=1, timeout=5)
    # Assert
    record = json.loads((tmp_path / "metrics" / "round_001.json").read_text())
    assert all("node 102 is registered as tenant 1" in d["reason"] for d in record["dropped"])
    assert record["finished"] == ["0"]


# -- what a reply's text can do in the report ---------------------------------------
def test_a_tenants_text_stays_literal_in_the_report():
    # Prepare: a drop reason that tries a table break, a heading, HTML and a link
    from fedlora.server.release.tables import md_text

    reason = "client error: x | y\n## Owned <img src=x onerror=alert(1)> [click](http://evil)"
    # Execute
    cell = md_text(reason)
    # Assert: one line, no unescaped cell boundary, tag or link syntax
    assert "\n" not in cell and "<" not in cell and ">" not in cell
    assert "|" not in cell.replace("\\|", "") and "[" not in cell.replace("\\[", "")
    assert cell == ("client error: x \\| y \\#\\# Owned &lt;img src=x onerror=alert(1)&gt; "
                    "\\[click\\](http://evil)")
