"""The privacy ledger: epsilon accumulates across rounds and process restarts; a spent
budget makes the tenant decline, and the run carries on without it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedlora.client import handlers as client_app
from fedlora.client.ledger import BudgetExhausted, LedgerError, PrivacyLedger, Spend, epsilon_of
from fedlora.client.privacy import noise_for_target, sample_rate_for
from fedlora.client.task import Tenant, TenantData
from fedlora.common import messages as keys
from fedlora.common.adapter import get_state, to_arrayrecord
from fedlora.common.config import parse_config
from fedlora.common.model import Loaded
from tests.client.test_privacy import DATA, tiny_lora

ROOT = Path(__file__).resolve().parents[2]


def _accountant_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Opacus' RDP accountant stepped once per DP-SGD step, independently of the ledger."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


def _tenant_app(monkeypatch, tmp_path, model, *, mode="local", extra=None, **privacy):
    """The real ClientApp train handler on a tiny model and 4 examples, ledger in tmp_path."""
    flat = {"train.local-steps": 2, "train.batch-size": 2, "federation.rounds": 3, "privacy.mode": mode,
            **(extra or {}), **{f"privacy.{k}": v for k, v in privacy.items()}}
    cfg = parse_config(flat)
    tenant = Tenant(3, tmp_path / "train.jsonl", None, state_dir=tmp_path / "state")
    data = TenantData(tenant, train=[None] * len(DATA), holdout=[], tokenized=DATA)  # type: ignore[list-item]
    loaded = Loaded(model, SimpleNamespace(pad_token_id=0), torch.device("cpu"))

    def setup(msg, context):
        from fedlora.common.adapter import from_arrayrecord

        return cfg, loaded, data, from_arrayrecord(msg.content.array_records[keys.ARRAYS])

    monkeypatch.setattr(client_app, "_setup", setup)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config=flat)

    def handle(msg: Message) -> Message:
        return client_app.train(msg, context)

    return cfg, handle


def _train_request(global_state, server_round=1, node=7):
    content = RecordDict({keys.ARRAYS: to_arrayrecord(global_state),
                          keys.CONFIG: ConfigRecord({keys.ROUND: server_round, keys.SEED: 0})})
    return Message(content=content, message_type="train", dst_node_id=node)


@pytest.mark.slow
def test_after_r_rounds_of_k_steps_epsilon_is_the_accountants_for_r_times_k(monkeypatch, tmp_path):
    # Prepare: R = 3 rounds of k = 2 steps, 4 examples in batches of 2 (q = 1/2), target epsilon 8
    model = tiny_lora()
    cfg, handle = _tenant_app(monkeypatch, tmp_path, model, **{"target-epsilon": 8.0})
    global_state = get_state(model)
    sigma = noise_for_target(target_epsilon=8.0, delta=1e-5, sample_rate=0.5, steps=6)
    replies = []
    # Execute: three rounds through the real ClientApp handler
    for r in (1, 2, 3):
        replies.append(dict(handle(_train_request(global_state, r)).content.metric_records[keys.METRICS]))
    # Assert: the ledger's epsilon is the accountant's for 6 steps, which is the target (8)
    expected = _accountant_epsilon(sigma, 0.5, 6, 1e-5)
    ledger = PrivacyLedger(tmp_path / "state")
    assert sample_rate_for(4, 2) == 0.5
    assert ledger.epsilon(delta=1e-5) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(8.0, abs=0.05)
    # every reply carried the cumulative epsilon, written to the ledger before the reply left
    entries = ledger.entries()
    assert [e["steps"] for e in entries] == [2, 2, 2]
    assert [rep[keys.DP_EPSILON] for rep in replies] == pytest.approx([e["epsilon_after"] for e in entries])
    assert replies[0][keys.DP_EPSILON] < replies[1][keys.DP_EPSILON] < replies[2][keys.DP_EPSILON]


_NODE_ROUND = textwrap.dedent("""
    import os, signal, sys
    from fedlora.client.ledger import PrivacyLedger, Spend
    eps = PrivacyLedger(sys.argv[1]).record(Spend(1.1, 0.05, 40), delta=1e-5, round=int(sys.argv[2]))
    print(repr(eps), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the node dies right after accounting
""")


@pytest.mark.slow
def test_killed_and_restarted_node_process_keeps_its_epsilon(tmp_path):
    # Execute: two rounds, each in a fresh Python process that is SIGKILLed after recording
    printed = []
    for r in (1, 2):
        out = subprocess.run([sys.executable, "-c", _NODE_ROUND, str(tmp_path), str(r)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == -9, out.stderr
        printed.append(float(out.stdout.strip()))
    # Assert: round 2 saw round 1's spend; a third reader gets the accountant's value for 80 steps
    expected = _accountant_epsilon(1.1, 0.05, 80, 1e-5)
    assert printed[1] == pytest.approx(expected, rel=1e-9)
    assert printed[0] < printed[1]
    assert PrivacyLedger(tmp_path).epsilon(delta=1e-5) == pytest.approx(expected, rel=1e-9)


def test_exhausted_budget_is_refused_before_training(tmp_path):
    # Prepare: a ledger at epsilon ~1.6; budget 2; the next round alone would cost ~1.6 more
    ledger = PrivacyLedger(tmp_path)
    spent = ledger.record(Spend(1.0, 0.1, 30), delta=1e-5)
    # Execute / Assert
    with pytest.raises(BudgetExhausted, match="budget 2"):
        ledger.check(Spend(1.0, 0.1, 30), delta=1e-5, budget=2.0)
    assert ledger.check(Spend(1.0, 0.1, 30), delta=1e-5, budget=100.0) == pytest.approx(
        epsilon_of([Spend(1.0, 0.1, 60)], delta=1e-5))
    assert len(ledger.entries()) == 1 and ledger.epsilon(delta=1e-5) == spent  # checking spends nothing


def test_unreadable_ledger_is_an_error_not_an_empty_budget(tmp_path):
    (tmp_path / "privacy_ledger.json").write_text('{"version": 1, "entries": [{"steps": 3}]}')
    with pytest.raises(LedgerError, match="never delete it"):
        PrivacyLedger(tmp_path).epsilon(delta=1e-5)


@pytest.mark.slow
def test_tenant_over_budget_declines_and_the_run_completes_without_it(monkeypatch, tmp_path):
    from fedlora.server.aggregation import FedAvg
    from fedlora.server.records import RoundRecorder
    from fedlora.server.strategy import FedLoraStrategy
    from tests.server.test_strategy import FakeGrid, good
    from fedlora.common.adapter import from_arrayrecord
    from fedlora.common.config import FederationConfig

    # Prepare: tenant 3 runs the real ClientApp with a ledger already over its budget of 1
    model = tiny_lora()
    _, handle = _tenant_app(monkeypatch, tmp_path, model, **{"target-epsilon": 1.0, "budget": 1.0})
    PrivacyLedger(tmp_path / "state").record(Spend(1.0, 1.0, 5), delta=1e-5)
    before = PrivacyLedger(tmp_path / "state").entries()
    glob = get_state(model)
    behaviour = {1: _fake(glob, 1.0, tenant=0), 2: _fake(glob, 3.0, tenant=1), 3: handle}
    rec = RoundRecorder(tmp_path / "run", save=lambda p, s, r: None)
    strategy = FedLoraStrategy(FederationConfig(min_train_nodes=2, round_timeout=2.0, fraction_evaluate=0.0),
                               FedAvg(), rec)
    # Execute: two full rounds through Flower's Strategy.start
    result = strategy.start(grid=FakeGrid(behaviour), initial_arrays=to_arrayrecord(glob), num_rounds=2,
                            timeout=5)
    # Assert: both rounds aggregated tenants 0 and 1 (mean delta 2 per round); tenant 3 declined with the reason
    final = from_arrayrecord(result.arrays)
    for k, v in glob.items():
        np.testing.assert_allclose(final[k], v + 4.0, rtol=1e-5)
    for r in (1, 2):
        record = json.loads((tmp_path / "run" / "metrics" / f"round_{r:03d}.json").read_text())
        assert record["finished"] == ["0", "1"]
        assert record["dropped"][0]["node"] == 3 and "privacy budget exhausted" in record["dropped"][0]["reason"]
    assert PrivacyLedger(tmp_path / "state").entries() == before  # nothing trained, nothing spent


def _fake(glob, value, *, tenant):
    def reply(msg):
        delta = OrderedDict((k, np.full(v.shape, value, np.float32)) for k, v in glob.items())
        m = {k: 1.0 for k in keys.TRAIN_METRICS}
        m.update({keys.NUM_EXAMPLES: 10, keys.TENANT: tenant})
        from fedlora.common.adapter import to_arrayrecord as pack
        from flwr.app import MetricRecord

        return Message(RecordDict({keys.ARRAYS: pack(delta), keys.METRICS: MetricRecord(m)}), reply_to=msg)
    return reply


_CONCURRENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fedlora.client.ledger import BudgetExhausted, PrivacyLedger, Spend
    ledger = PrivacyLedger.for_data(sys.argv[1], Path(sys.argv[2]))
    spend = Spend(1.0, 0.1, 30)
    try:
        with ledger.locked():                      # what train_round holds from check through record
            ledger.check(spend, delta=1e-5, budget=float(sys.argv[3]))
            Path(sys.argv[4]).touch()              # "checked": the other process may now try
            time.sleep(1.5)                         # training
            ledger.record(spend, delta=1e-5)
        print("spent")
    except BudgetExhausted:
        print("declined")
""")


def test_two_concurrent_trainings_cannot_both_spend_past_the_budget(tmp_path):
    # Prepare: a budget that holds one spend of epsilon ~1.6, not two (~2.3)
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n')
    one = epsilon_of([Spend(1.0, 0.1, 30)], delta=1e-5)
    budget = (one + epsilon_of([Spend(1.0, 0.1, 60)], delta=1e-5)) / 2
    # Execute: two processes against one ledger, the second started once the first has checked
    args = [sys.executable, "-c", _CONCURRENT, str(tmp_path / "ledgers"), str(data), str(budget)]
    first = subprocess.Popen([*args, str(tmp_path / "a")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    for _ in range(600):
        if (tmp_path / "a").exists():
            break
        import time

        time.sleep(0.05)
    second = subprocess.Popen([*args, str(tmp_path / "b")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in (first, second))
    # Assert: one spent, one declined; the ledger holds one spend
    assert outs == ["declined", "spent"]
    assert PrivacyLedger.for_data(tmp_path / "ledgers", data).epsilon(delta=1e-5) == pytest.approx(one)


def test_a_new_state_dir_on_the_same_data_sees_the_old_spend(tmp_path):
    # Prepare: a ledger directory the node keeps (the policy's ledger.dir), the data in one file
    from fedlora.client.task import ledger_for

    data, other = tmp_path / "train.jsonl", tmp_path / "other.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n')
    other.write_text('{"instruction": "q2", "output": "a2"}\n')
    first = Tenant(0, data, None, state_dir=tmp_path / "state-a", ledger_dir=tmp_path / "ledgers")
    ledger_for(first).record(Spend(1.0, 0.1, 30), delta=1e-5)
    # Execute: the node restarts with a fresh state directory; a second data set is a second ledger
    again = ledger_for(Tenant(0, data, None, state_dir=tmp_path / "state-b", ledger_dir=tmp_path / "ledgers"))
    fresh = ledger_for(Tenant(0, other, None, state_dir=tmp_path / "state-b", ledger_dir=tmp_path / "ledgers"))
    # Assert
    assert again.epsilon(delta=1e-5) == pytest.approx(epsilon_of([Spend(1.0, 0.1, 30)], delta=1e-5))
    assert fresh.epsilon(delta=1e-5) == 0.0
    assert json.loads(again.path.read_text())["data"].startswith("sha256:")


def test_a_ledger_of_other_data_is_refused(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    ledger = PrivacyLedger.for_data(tmp_path, data)
    ledger.path.write_text(json.dumps({"version": 2, "data": "sha256:" + "0" * 64, "entries": []}))
    with pytest.raises(LedgerError, match="accounts for data sha256:000"):
        ledger.epsilon(delta=1e-5)


def test_a_release_without_local_dp_makes_epsilon_infinite_and_declines_dp(tmp_path):
    # Prepare: one DP-SGD spend, then an update that left in the clear (a non-DP run)
    ledger = PrivacyLedger(tmp_path)
    ledger.record(Spend(1.0, 0.1, 30), delta=1e-5)
    ledger.record_release(mechanism="none", run="2", round=1)
    # Execute / Assert: epsilon is infinite, and no later DP round can claim a finite budget
    assert ledger.epsilon(delta=1e-5) == float("inf")
    with pytest.raises(BudgetExhausted, match="released without local DP"):
        ledger.check(Spend(5.0, 0.01, 1), delta=1e-5, budget=1e9)


def test_a_version_1_ledger_still_reads(tmp_path):
    (tmp_path / "privacy_ledger.json").write_text(json.dumps(
        {"version": 1, "entries": [{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 30}]}))
    assert PrivacyLedger(tmp_path).epsilon(delta=1e-5) == pytest.approx(epsilon_of([Spend(1.0, 0.1, 30)],
                                                                                   delta=1e-5))
