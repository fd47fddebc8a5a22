"""End to end on Flower's Deployment Engine on 127.0.0.1: TLS, node authentication, tenant nodes.

One SuperLink (TLS, ``--enable-supernode-auth``, SQLite state) serves the whole module. Three
registered tenant nodes (SuperNode + tenant worker, as ``fedlora deploy supernode`` runs them),
each with its own JSONL file, run 3 rounds of the real apps on
the tiny base; one tenant's SuperNode is killed after round 1 and round 2 completes with the
other two; the ServerApp is killed after round 2 and ``--resume`` (a new Flower run on the same
SuperLink) finishes round 3 from round 2's checkpoint. A node with an unregistered key and a
node without the CA are refused. Every
process the module starts carries a tag in its environment; the fixture kills all of them,
also when a test fails, and the last test proves none is left.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from fedlora.common.config import parse_config
from fedlora.simulations.cli.launcher import tagged_pids
from fedlora.simulations.cli.local_federation import LocalFederation, Tenant

pytestmark = pytest.mark.slow

# A live reply can take minutes on a loaded 2-core machine; a dead SuperNode is declared
# unavailable by Flower after ~60 s (missed heartbeats), well inside this.
ROUND_TIMEOUT = 180.0
TENANTS = 3
KILLED = "2"  # tenant id whose SuperNode dies after round 1
BASE = os.environ.get("FEDLORA_TEST_BASE", "embedded")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """The shared SuperLink with three registered, connected tenant SuperNodes."""
    from fedlora.simulations.synthetic import write_tenants

    root = tmp_path_factory.mktemp("deployment")
    write_tenants(root / "data", num_tenants=TENANTS, train_size=48, holdout_size=8, preference_size=8, seed=0)
    fed = LocalFederation(root / "federation")
    with fed:
        for t in range(TENANTS):  # tenant 0 loads the run's base as it starts (deploy supernode --warm)
            fed.start_node(Tenant(f"tenant-{t}", t, root / "data" / f"tenant_{t:03d}" / "train.jsonl"),
                           warm=parse_config({"model.base": BASE}) if t == 0 else None)
        fed.wait_online(TENANTS)
        fed.warm_states = fed.wait_warm()  # type: ignore[attr-defined]
        fed.data_root = root / "data"  # type: ignore[attr-defined]
        yield fed
    # Leaving the context stopped everything; the last test checks nothing is left.


@pytest.fixture(scope="module")
def run(federation, tmp_path_factory):
    """3 rounds: tenant ``KILLED``'s SuperNode is SIGKILLed as soon as round 1 is recorded, the
    ServerApp as soon as round 2 is; then the run is resumed as ``fedlora deploy run --resume`` does."""
    from fedlora.simulations.cli.launcher import DeploymentError
    from fedlora.simulations.cli.resume import resume_config

    run_dir = tmp_path_factory.mktemp("run") / "deploy-run"
    cfg = parse_config({
        "model.base": BASE,
        "federation.rounds": 3, "federation.min-train-nodes": 2, "federation.round-timeout": ROUND_TIMEOUT,
        "train.local-steps": 4, "train.batch-size": 8, "train.threads": 1, "eval.max-new-tokens": 16,
        "run.dir": str(run_dir), "run.baselines": False,
    })
    killed = {}

    def recorded(k: int) -> bool:
        while not (run_dir / "metrics" / f"round_00{k}.json").is_file():
            if stop.is_set():
                return False
            time.sleep(0.2)
        return True

    def crash() -> None:
        if not recorded(1):
            return
        os.killpg(federation.procs[f"supernode-tenant-{KILLED}"].popen.pid, signal.SIGKILL)  # a crash
        killed["at"] = time.monotonic()
        if not recorded(2):
            return
        killed["serverapp"] = [pid for pid in tagged_pids(federation.tag) if _is_serverapp(pid)]
        for pid in killed["serverapp"]:
            os.kill(pid, signal.SIGKILL)

    stop = threading.Event()
    killer = threading.Thread(target=crash, daemon=True)
    killer.start()
    start = time.monotonic()
    try:
        with pytest.raises(DeploymentError) as first:
            federation.run(cfg, timeout=900)
        interrupted = json.loads((run_dir / "metrics" / "round_002.json").read_text())
        report = federation.run(resume_config(run_dir), timeout=600)
    finally:
        stop.set()
        killer.join(timeout=5)
    rounds = [json.loads((run_dir / f"metrics/round_00{k}.json").read_text()) for k in (1, 2, 3)]
    return {"dir": run_dir, "report": report, "rounds": rounds, "seconds": time.monotonic() - start,
            "after_kill": time.monotonic() - killed["at"], "serverapp": killed["serverapp"],
            "first_error": str(first.value), "round2_before_resume": interrupted}


def _is_serverapp(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"flwr-serverapp" in fh.read()
    except OSError:
        return False


def test_three_rounds_land_a_final_adapter_in_the_run_dir(run):
    # Assert: the final adapter is a PEFT directory in run.dir, written after round 3
    adapter = run["dir"] / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "adapter_config.json").is_file()
    assert json.loads((run["dir"] / "federation.json").read_text())["rounds"] == 3


def test_killed_serverapp_run_stops_and_says_how_to_resume(run):
    # Assert: the ServerApp was killed; the first run failed naming the kept round and the command
    assert run["serverapp"], "no ServerApp process was found to kill"
    assert "round 2 is the last complete one" in run["first_error"]
    assert f"--resume {run['dir']}" in run["first_error"]


def test_resumed_run_continues_after_round_two_with_the_rounds_before_kept(run):
    # Assert: round 3 ran in the resumed Flower run; rounds 1-2 are the interrupted run's records
    summary = json.loads((run["dir"] / "federation.json").read_text())
    assert summary["resumed_after"] == 2 and summary["aggregated_rounds"] == 3
    assert run["rounds"][1] == run["round2_before_resume"]
    third = run["rounds"][2]
    assert third["round"] == 3 and third["aggregated"] and third["finished"] == ["0", "1"]
    assert (run["dir"] / "FEDERATION_DONE").is_file()
    assert (run["dir"] / "checkpoints" / "round_003" / "adapter_model.safetensors").is_file()


def test_every_tenant_finishes_round_one(run):
    assert run["rounds"][0]["finished"] == ["0", "1", "2"]


def test_killed_supernode_round_completes_with_the_others_within_the_timeout(run):
    # Round 2 waits at most the round timeout for the dead node (plus one more for evaluation)
    second = run["rounds"][1]
    assert second["finished"] == ["0", "1"]
    assert KILLED in second["sampled"] and KILLED not in second["finished"]
    assert second["aggregated"]
    assert run["after_kill"] < 2 * ROUND_TIMEOUT + 90


def test_killed_supernode_is_reported_as_unavailable(run):
    # Flower answers for the dead node (its error reply comes from the SuperLink itself)
    reasons = [d["reason"] for d in run["rounds"][1]["dropped"]]
    assert any("Node Unavailable" in r for r in reasons), reasons


def test_report_states_engine_tls_auth_and_who_finished(run):
    text = run["report"].read_text()
    assert "Flower Deployment Engine (SuperLink + SuperNodes), TLS on, SuperNode authentication on" in text
    assert "| 1 | 0, 1, 2 | 0, 1, 2 | - |" in text
    assert "| 2 | 0, 1, 2 | 0, 1 | 2 |" in text
    assert "| 3 | 0, 1 | 0, 1 | - |" in text  # the resumed run's report covers every round


def test_every_message_of_the_surviving_tenants_was_pulled_and_served_by_their_worker(run, federation):
    # Prepare: each surviving tenant's worker, asked over its socket
    from fedlora.client.warm import WARM_FILE, read_warm
    from fedlora.client.worker_link import health, socket_path

    for name in ("tenant-0", "tenant-1"):
        # Execute
        record = health(socket_path(federation.state_dir / f"node-{name}"))
        # Assert: train + evaluate in each of the 3 rounds (and round 3's again after the resume
        # if the kill landed mid-round), all in the one long-lived worker, none failed
        assert record["served"] >= 6 and record["failed"] == 0, record
        # ... each one pulled by the worker itself: no Flower ClientApp process was started (a
        # task of the killed ServerApp's run may have ended as stopped)
        assert record["tasks"] == record["served"] + record["stopped_tasks"], record
        assert [m["base"] for m in record["models"]] == [BASE]
        # ... tenant 0 had the model loaded before the run, and the run found it (one model, above);
        # every worker records what it served, for its next start's warm-up
        assert federation.warm_states[f"supernode-{name}"]["state"] == ("loaded" if name == "tenant-0" else "none")
        assert read_warm(socket_path(federation.state_dir / f"node-{name}").parent / WARM_FILE)["model.base"] == BASE
        log = federation.procs[f"supernode-{name}"].text()
        assert "in the ClientApp process instead" not in log
        assert "Start `flwr-clientapp` process" not in log and "running Flower's flwr-clientapp" not in log


def test_unregistered_key_is_refused(federation):
    # Prepare: a key the operator never registered
    data = federation.data_root / "tenant_000" / "train.jsonl"
    # Execute
    proc = federation.start_node(Tenant("stranger", 7, data), register=False, max_retries=0)
    proc.popen.wait(timeout=60)
    time.sleep(0.5)
    # Assert: the SuperLink refused to activate it and the SuperNode gave up
    assert proc.popen.returncode != 0
    assert "Failed to activate SuperNode" in proc.text()


def test_node_without_the_ca_is_refused(federation):
    # Prepare: a registered key, but no --root-certificates (system CAs do not know ours)
    data = federation.data_root / "tenant_001" / "train.jsonl"
    # Execute
    proc = federation.start_node(Tenant("no-ca", 8, data), with_ca=False, max_retries=0)
    proc.popen.wait(timeout=60)
    time.sleep(0.5)
    # Assert
    assert proc.popen.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in proc.text()


def test_no_process_is_left_behind(federation):
    # Execute: what the fixture does at the end of the module (also when a test failed)
    federation.close()
    # Assert: no SuperLink, SuperNode, SuperExec, ServerApp or ClientApp process remains
    assert tagged_pids(federation.tag) == []
