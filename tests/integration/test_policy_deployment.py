"""A tenant's policy holds against the server, on Flower's Deployment Engine on 127.0.0.1.

One SuperLink (TLS, node auth) and two tenant nodes (SuperNode + worker, as ``fedlora deploy
supernode --policy`` runs them), each under a policy that requires local DP with epsilon <= 2
per run at the tenant's delta, sigma >= 0.8, batch >= 8 and authenticated secure aggregation (each
node holds the operator's roster and signs its keys and the survivor set). Runs submitted
through ``flwr run`` whose config breaks the policy in one way each are declined by both tenants,
with the reason in the server's records, no training and no ledger charge; then an honest run
under the same policy completes, and its training and evaluation are what the ledger holds.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedlora.client.ledger import PrivacyLedger
from fedlora.client.policy_check import fingerprint
from fedlora.common.config import parse_config
from fedlora.simulations.cli.deployment import LocalFederation, Tenant
from fedlora.simulations.cli.launcher import DeploymentError
from fedlora.simulations.cli.registry import node_id_from

pytestmark = pytest.mark.slow
TENANTS = 2
HONEST = {"privacy.mode": "local", "privacy.target-epsilon": 1.0, "privacy.delta": 1e-5, "privacy.budget": 4.0,
          "secagg.enabled": True, "federation.rounds": 1, "federation.min-train-nodes": 2,
          "federation.round-timeout": 180.0, "train.local-steps": 3, "train.batch-size": 8, "train.threads": 1,
          "eval.max-new-tokens": 8, "run.baselines": False}


def _policy(path: Path) -> Path:
    path.write_text(f"""
[privacy]
mode = "local"
delta = 1e-4
max-epsilon-per-run = 2.0
lifetime-epsilon = 6.0
min-noise-multiplier = 0.8
min-batch-size = 8
[secagg]
required = true
min-neighbours = 1
signed = true
[compute]
max-rounds = 5
max-local-steps = 8
[evaluation]
max-per-run = 4
[bases]
embedded = "sha256:{fingerprint('embedded')}"
""")
    return path


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    from fedlora.simulations.synthetic import write_tenants

    root = tmp_path_factory.mktemp("policy-deployment")
    write_tenants(root / "data", num_tenants=TENANTS, train_size=48, holdout_size=8, preference_size=8, seed=0)
    policy = _policy(root / "policy.toml")
    fed = LocalFederation(root / "federation")
    with fed:
        names = [f"tenant-{t}" for t in range(TENANTS)]
        roster = root / "roster.json"  # what `fedlora deploy roster` hands the tenants: node id -> key
        roster.write_text(json.dumps({str(node_id_from(fed.register(n))): fed.node_key(n)[1].read_text().strip()
                                      for n in names}))
        fed.tenants = [Tenant(n, t, root / "data" / f"tenant_{t:03d}" / "train.jsonl", policy=policy, roster=roster)
                       for t, n in enumerate(names)]  # type: ignore[attr-defined]
        for tenant in fed.tenants:
            fed.start_node(tenant, register=False, warm=parse_config({}))
        fed.wait_online(TENANTS)
        fed.wait_warm()
        fed.root = root  # type: ignore[attr-defined]
        yield fed


def _ledger(fed, tenant) -> PrivacyLedger:
    return PrivacyLedger.for_data(fed.state_dir / f"ledgers-{tenant.name}", tenant.data_path)


# Each breaks the policy in one way (the honest run's other keys unchanged) and the code that says so.
HOSTILE = {
    "mode-none": ({"privacy.mode": "none"}, "privacy-mode"),
    "budget": ({"privacy.budget": 1e12}, "budget"),
    "delta": ({"privacy.delta": 0.1}, "delta"),
    "noise": ({"privacy.target-epsilon": 0.0, "privacy.noise-multiplier": 1e-6}, "noise-multiplier"),
    "batch": ({"train.batch-size": 1}, "batch-size"),
    "steps": ({"train.local-steps": 9}, "local-steps"),
    "no-secagg": ({"secagg.enabled": False}, "secagg"),
    "base": ({"model.base": "OTHER"}, "base"),
    "evaluations": ({"federation.rounds": 1000}, "evaluations"),
}


@pytest.fixture(scope="module")
def hostile(federation, tmp_path_factory):
    """Every hostile run, submitted at once; each run's directory."""
    from fedlora.common.model import embedded_base_dir

    other = tmp_path_factory.mktemp("bases") / "other"
    shutil.copytree(embedded_base_dir(), other)  # a real base the server can load, the tenants never listed
    dirs = {name: tmp_path_factory.mktemp("hostile") / name for name in HOSTILE}

    def submit(name: str) -> str:
        change = {k: (str(other) if v == "OTHER" else v) for k, v in HOSTILE[name][0].items()}
        try:
            federation.run(parse_config({**HONEST, **change, "run.dir": str(dirs[name])}), timeout=600)
        except DeploymentError as err:
            return str(err)
        return "completed"

    with ThreadPoolExecutor(len(HOSTILE)) as pool:
        outcomes = dict(zip(HOSTILE, pool.map(submit, HOSTILE)))
    ledgers = {t.name: _ledger(federation, t).entries() for t in federation.tenants}
    return dirs, outcomes, ledgers


@pytest.mark.parametrize("name", list(HOSTILE))
def test_each_hostile_run_is_declined_by_both_tenants_with_its_reason(hostile, name):
    dirs, outcomes, _ = hostile
    code = HOSTILE[name][1]
    # Assert: the run failed and published nothing; round 1 records both tenants' declines with the code
    assert outcomes[name] != "completed"
    assert (dirs[name] / "FEDERATION_FAILED").is_file() and not (dirs[name] / "registry").exists()
    record = json.loads((dirs[name] / "metrics" / "round_001.json").read_text())
    declines = [d["reason"] for d in record["dropped"] if "declined by the tenant: policy: tenant" in d["reason"]]
    assert {r.split("policy: tenant ")[1].split(":")[0] for r in declines} == {"0", "1"}, record["dropped"]
    assert all(f"[{code}]" in r for r in declines), declines
    assert record["finished"] == [] and len(list((dirs[name] / "metrics").glob("round_*.json"))) == 1


def test_hostile_runs_trained_nothing_and_charged_nothing(federation, hostile):
    _, _, ledgers = hostile
    assert ledgers == {t.name: [] for t in federation.tenants}
    for tenant in federation.tenants:  # each tenant's own log holds every declined request, whole
        logged = [json.loads(line) for line in
                  (tenant.data_path.parent / ".fedlora-state" / "policy" / "declines.jsonl").read_text().splitlines()]
        assert {e["code"] for e in logged} >= {code for _, code in HOSTILE.values()} - {"evaluations"}
        assert all("privacy.mode" in e["run_config"] for e in logged)


def test_honest_run_under_the_same_policy_completes(federation, hostile, tmp_path):
    # Execute: after the hostile runs
    run_dir = tmp_path / "honest"
    report = federation.run(parse_config({**HONEST, "run.dir": str(run_dir)}), timeout=600)
    # Assert: both tenants trained under local DP and secure aggregation; the ledger holds that and the evaluation
    record = json.loads((run_dir / "metrics" / "round_001.json").read_text())
    assert sorted(record["finished"]) == ["0", "1"] and (run_dir / "FEDERATION_DONE").is_file()
    assert record["secagg"]["authenticated"] is True and record["secagg"]["dropped_per_stage"]["consistency"] == 0
    for tenant in federation.tenants:
        entries = _ledger(federation, tenant).entries()
        assert [e["kind"] for e in entries] == ["dp-sgd", "evaluation"]
        assert entries[0]["delta"] == 1e-4 and entries[0]["epsilon_after"] <= 2.0  # the tenant's delta, its cap
    assert "train-first-loss" not in record["train"]["0"] and "train-loss" not in record["train"]["0"]
    assert report.is_file()
