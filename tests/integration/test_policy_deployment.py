"""A tenant's policy holds against the server, and the server's control plane is closed to the
tenants, on Flower's Deployment Engine on this machine.

One SuperLink (TLS, node auth) and two tenant nodes (SuperNode + worker, as ``fedlora deploy
supernode --policy`` runs them), each under a policy that requires local DP with epsilon <= 2
per run at the tenant's delta, sigma >= 0.8, batch >= 8 and authenticated secure aggregation (each
node holds the operator's roster and signs its keys and the survivor set). Runs submitted
through ``flwr run`` whose config breaks the policy in one way each are declined by both tenants,
with the reason in the server's records, no training and no ledger charge; then an honest run
under the same policy completes, and its training and evaluation are what the ledger holds.

The tenant nodes run in a network namespace of their own (a tenant's host; where root can make
one), reaching the SuperLink only through its public port, the Fleet proxy (nginx). From there,
holding ca.crt and a registered node key, every Control and Runtime route is refused, the flwr
CLI with it, and the SuperLink's own port is unreachable; without the SuperExec secret neither
the SuperLink nor a tenant's SuperNode hands out a task.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest

from fedlora.client.ledger import PrivacyLedger
from fedlora.client.policy_check import fingerprint
from fedlora.common.config import parse_config
from fedlora.simulations.cli.local_federation import LocalFederation, Tenant
from fedlora.simulations.cli.launcher import DeploymentError
from fedlora.simulations.cli.registry import node_id_from
from tests.integration import netns
from tests.integration.netns import tenant_namespace

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
    with ExitStack() as stack:
        ns = stack.enter_context(tenant_namespace()) if netns.available() is None else None
        fed = stack.enter_context(LocalFederation(root / "federation", host=ns.host_ip if ns else "127.0.0.1"))
        fed.netns = ns  # type: ignore[attr-defined]
        names = [f"tenant-{t}" for t in range(TENANTS)]
        roster = root / "roster.json"  # what `fedlora deploy roster` hands the tenants: node id -> key
        roster.write_text(json.dumps({str(node_id_from(fed.register(n))): fed.node_key(n)[1].read_text().strip()
                                      for n in names}))
        fed.tenants = [Tenant(n, t, root / "data" / f"tenant_{t:03d}" / "train.jsonl", policy=policy, roster=roster)
                       for t, n in enumerate(names)]  # type: ignore[attr-defined]
        for tenant in fed.tenants:  # each in the tenants' own network, where root can make one
            fed.start_node(tenant, register=False, warm=parse_config({}), netns=ns.name if ns else None)
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


# -- the control plane, from a tenant's network: Fleet only ------------------------------------------
PROBE = """
import json, ssl, sys, urllib.request, urllib.error
ca, base, paths = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ctx = ssl.create_default_context(cafile=ca) if ca != "-" else None  # "-": plain HTTP
out = {}
for path in paths:
    req = urllib.request.Request(base + path, data=b"", method="POST",
                                 headers={"content-type": "application/protobuf", "accept": "application/protobuf"})
    try:
        out[path] = urllib.request.urlopen(req, context=ctx, timeout=10).status
    except urllib.error.HTTPError as err:
        out[path] = err.code
    except OSError as err:  # URLError wraps the socket's own error
        out[path] = type(getattr(err, "reason", err)).__name__
print(json.dumps(out))
"""


def _probe(fed, paths: list[str], *, base: str, inside: bool = True, tls: bool = True) -> dict[str, object]:
    """POST an empty protobuf body to each path; status codes (or the connection error) by path."""
    import subprocess
    import sys

    cmd = [sys.executable, "-c", PROBE, str(fed.tls.ca_cert) if tls else "-", base, json.dumps(paths)]
    out = subprocess.run(fed.netns.command(*cmd) if inside else cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _routes(router) -> list[str]:
    return sorted({r.path for r in router.routes if "POST" in getattr(r, "methods", ())})


@pytest.fixture
def tenant_network(federation):
    if federation.netns is None:
        pytest.skip(netns.available())
    return federation


def test_from_a_tenants_network_every_control_and_runtime_route_is_refused(tenant_network):
    from flwr.superlink.routers.control.router import router as control
    from flwr.superlink.routers.fleet.router import router as fleet
    from flwr.supercore.routers.runtime.router import router as runtime

    fed = tenant_network
    closed = _routes(control) + _routes(runtime) + ["/docs", "/openapi.json", "/health"]
    # Execute: every route Flower serves, from inside the tenants' namespace, through the public port
    got = _probe(fed, closed + _routes(fleet), base=f"https://{fed.superlink}")
    # Assert: nginx refuses Control (register / list / start / stop / logs) and Runtime (acquire-task)
    assert len(_routes(control)) >= 15 and "/v1/runtime/acquire-task" in closed
    assert {p: got[p] for p in closed} == {p: 403 for p in closed}
    # ...and passes the Fleet API to the SuperLink, which answers for itself (never nginx's 403)
    assert all(got[p] != 403 for p in _routes(fleet)), got


def test_from_a_tenants_network_the_flwr_cli_is_refused(tenant_network, tmp_path):
    import subprocess

    from fedlora.simulations.cli.deployment import CONNECTION, flower_env, write_cli_config
    from fedlora.simulations.cli.launcher import BIN

    fed = tenant_network
    write_cli_config(tmp_path, superlink=fed.superlink, ca_cert=fed.tls.ca_cert)  # a tenant holds ca.crt
    public = fed.node_key("tenant-0")[1]  # and a registered node key
    for args in (["supernode", "register", str(public), CONNECTION], ["supernode", "list", CONNECTION],
                 ["ls", CONNECTION], ["stop", "1", CONNECTION], ["log", "1", CONNECTION, "--show"]):
        out = subprocess.run(fed.netns.command(str(BIN / "flwr"), *args), env=flower_env(tmp_path), cwd=tmp_path,
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert out.returncode != 0 and "403" in out.stdout + out.stderr, (args, out.stdout[-800:], out.stderr[-800:])


def test_the_superlinks_own_port_is_not_reachable_from_a_tenants_network(tenant_network):
    fed = tenant_network
    got = _probe(fed, ["/v1/control/list-runs"], base=f"https://{fed.netns.host_ip}:{fed.internal_port}")
    assert got == {"/v1/control/list-runs": "ConnectionRefusedError"}


def test_without_the_superexec_secret_no_task_is_handed_out(tenant_network):
    # Prepare: a local user of the SuperLink's host, and one of a tenant's host (its own loopback)
    fed = tenant_network
    # Execute / Assert: the Runtime API hands no ServerApp or ClientApp task to a caller without the secret
    assert _probe(fed, ["/v1/runtime/acquire-task"], base=f"https://localhost:{fed.internal_port}",
                  inside=False) == {"/v1/runtime/acquire-task": 401}
    assert _probe(fed, ["/v1/runtime/acquire-task"], base=f"http://127.0.0.1:{fed.runtime_ports['tenant-0']}",
                  tls=False) == {"/v1/runtime/acquire-task": 401}  # the node's Runtime API: loopback, plain HTTP
