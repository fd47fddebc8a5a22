"""Deployment helpers without a federation: command lines, node config, process clean-up, report."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora.client.task import tenant_from_node_config
from fedlora.common.config import parse_config
from fedlora.simulations.cli import deployment as deploy
from tests.common.make_records import write_round
from fedlora.simulations.cli import launcher

BIN = Path(sys.executable).parent


def _flags(program: str) -> set[str]:
    """Every ``--flag`` that ``program --help`` documents."""
    out = subprocess.run([str(BIN / program), "--help"], capture_output=True, text=True, timeout=60,
                         env=deploy.flower_env(Path("/nonexistent-flwr-home"))).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", out))


def _used(cmd: list[str]) -> set[str]:
    return {a.split("=")[0] for a in cmd if a.startswith("--")}


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    from fedlora.common.tls import write_tls_certificates

    out = tmp_path_factory.mktemp("certs")
    write_tls_certificates(out)
    return deploy.TlsFiles.from_dir(out)


def test_superlink_command_has_tls_auth_database_and_no_runtime_installs(tls, tmp_path):
    cmd = deploy.superlink_command(tls=tls, database=tmp_path / "s.db", port=9095, superexec_secret=tmp_path / "s")
    assert cmd[cmd.index("--ssl-ca-certfile") + 1] == str(tls.ca_cert)
    assert cmd[cmd.index("--database") + 1] == str(tmp_path / "s.db")
    assert {"--enable-supernode-auth", "--disable-runtime-dependency-installation"} <= set(cmd)
    assert "--insecure" not in cmd


def test_superlink_listens_on_loopback_only_under_process_isolation(tls, tmp_path):
    # the tenants reach it through the Fleet proxy; only the executor holding the secret claims a ServerApp task
    cmd = deploy.superlink_command(tls=tls, database=tmp_path / "s.db", superexec_secret=tmp_path / "s")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--isolation") + 1] == "process"
    assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == str(tmp_path / "s")
    executor = deploy.serverapp_executor_command(tls=tls, superexec_secret=tmp_path / "s", port=9095)
    assert executor[executor.index("--runtime-api-address") + 1] == "127.0.0.1:9095"
    assert executor[executor.index("--superexec-auth-secret-file") + 1] == str(tmp_path / "s")


def test_superexec_secret_is_private_and_kept(tmp_path):
    path = deploy.superexec_secret(tmp_path / "state" / "superexec.secret")
    first = path.read_text()
    assert len(first) == 64 and (path.stat().st_mode & 0o777) == 0o600
    assert deploy.superexec_secret(path).read_text() == first  # made once, then reused


def test_fleet_proxy_config_passes_fleet_only_and_nginx_accepts_it(tls, tmp_path):
    # Prepare / Execute
    import subprocess

    cmd = deploy.fleet_proxy_files(tmp_path / "proxy", tls=tls, host="0.0.0.0", port=9093, internal_port=9095)
    conf = (tmp_path / "proxy" / "nginx.conf").read_text()
    # Assert: Fleet to the loopback SuperLink, verified against the CA; everything else 403; nginx -t passes
    assert "location /v1/fleet/ {" in conf and "server 127.0.0.1:9095;" in conf and "listen 0.0.0.0:9093 ssl;" in conf
    assert f"proxy_ssl_trusted_certificate {tls.ca_cert};" in conf and "proxy_ssl_verify on;" in conf
    assert 'location / { return 403' in conf and conf.count("location") == 2
    check = subprocess.run([*cmd, "-t"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.slow
def test_superlink_flags_exist_in_flower(tls, tmp_path):
    cmd = deploy.superlink_command(tls=tls, database=tmp_path / "s.db", health_port=9098, superexec_secret=tmp_path / "s")
    assert _used(cmd) <= _flags("flower-superlink")
    executor = deploy.serverapp_executor_command(tls=tls, superexec_secret=tmp_path / "s")
    assert _used(executor) <= _flags("flower-superexec")


@pytest.mark.slow
def test_supernode_flags_exist_in_flower_and_runtime_api_stays_on_loopback(tls, tmp_path):
    cmd = deploy.supernode_command(superlink="10.0.0.1:9093", ca_cert=tls.ca_cert, private_key=tmp_path / "k",
                                   data_path=tmp_path / "train.jsonl", tenant_id=3, max_retries=0)
    assert _used(cmd) <= _flags("flower-supernode")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--root-certificates") + 1] == str(tls.ca_cert)


def test_node_config_reaches_the_client_as_the_tenant_data(tmp_path):
    # Prepare: a train file with its holdout beside it, parsed the way Flower parses --node-config
    from flwr.common.config import parse_config_args

    (tmp_path / "my data").mkdir()
    train = tmp_path / "my data" / "train.jsonl"
    train.write_text("{}\n")
    (tmp_path / "my data" / "holdout.jsonl").write_text("{}\n")
    # Execute
    node_config = parse_config_args([deploy.node_config(train, tenant_id=5)])
    tenant = tenant_from_node_config(node_config, parse_config({}))
    # Assert
    assert (tenant.tenant_id, tenant.train_path, tenant.holdout_path) == (5, train, tmp_path / "my data" / "holdout.jsonl")


def test_a_tenants_lora_rank_reaches_the_client_through_the_node_config(tmp_path):
    # Prepare: a tenant of rank 2 in a rank-8 svd run
    from flwr.common.config import parse_config_args

    train = tmp_path / "train.jsonl"
    cfg = parse_config({"federation.lora-rule": "svd", "adapter.r": 8})
    # Execute
    text = deploy.node_config(train, tenant_id=1, lora_rank=2)
    tenant = tenant_from_node_config(parse_config_args([text]), cfg)
    # Assert
    assert text == f'data-path="{train}" tenant-id=1 lora-rank=2'
    assert tenant.rank == 2
    assert tenant_from_node_config(parse_config_args([deploy.node_config(train, tenant_id=1)]), cfg).rank is None


@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_node_config_refuses_a_rank_that_is_not_a_positive_integer(tmp_path, rank):
    with pytest.raises(deploy.DeploymentConfigError, match=f"LoRA rank {rank!r} must be a positive integer"):
        deploy.node_config(tmp_path / "train.jsonl", tenant_id=0, lora_rank=rank)


def test_simulated_tenant_ranks_are_refused_in_a_deployment_run():
    # Prepare: a valid svd config for simulation, with ranks per simulated tenant
    cfg = parse_config({"run.dir": "/abs/run", "federation.lora-rule": "svd", "simulation.tenants": 2,
                        "simulation.tenant-ranks": "4,2"})
    # Execute / Assert: the deployment's ClientApps would never read it, so say where ranks go
    with pytest.raises(deploy.DeploymentConfigError, match=r"--lora-rank N"):
        deploy.deployment_config(cfg, node_auth=True)


def test_node_config_refuses_a_relative_data_path():
    with pytest.raises(deploy.DeploymentError, match="must be absolute"):
        deploy.node_config("data/train.jsonl", tenant_id=0)


def test_missing_tls_files_name_the_command_that_makes_them(tmp_path):
    with pytest.raises(deploy.DeploymentError, match="fedlora certs --out"):
        deploy.TlsFiles.from_dir(tmp_path)


def test_flower_env_turns_off_telemetry_update_check_and_runtime_installs(tmp_path):
    env = deploy.flower_env(tmp_path, "t1")
    assert (env["FLWR_TELEMETRY_ENABLED"], env["FLWR_DISABLE_UPDATE_CHECK"],
            env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"]) == ("0", "1", "1")
    assert (env["FLWR_HOME"], env[launcher.TAG_ENV]) == (str(tmp_path), "t1")


@pytest.mark.slow
def test_kill_tagged_ends_detached_grandchildren(tmp_path):
    # Prepare: a child that starts a grandchild in its own session (as Flower's SuperExec is)
    tag = "unit-test-tag-" + str(time.time_ns())
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "start_new_session=True); time.sleep(60)")
    proc = launcher.start("sleeper", [sys.executable, "-c", code], state_dir=tmp_path,
                        env={**deploy.flower_env(tmp_path, tag)})
    launcher.wait_for(lambda: len(launcher.tagged_pids(tag)) == 2, timeout=20, what="two tagged processes")
    # Execute
    launcher.kill_tagged(tag, grace=2)
    # Assert
    assert launcher.tagged_pids(tag) == []
    proc.popen.wait(timeout=5)


def test_deployment_section_lists_who_finished_each_round(tmp_path):
    # Prepare: a run directory as the ServerApp leaves it, tenant 2 missing in round 2
    cfg = parse_config({"deployment.engine": "deployment", "deployment.tls": True, "deployment.node-auth": True,
                        "federation.round-timeout": 60.0})
    for k, finished in ((1, ["0", "1", "10", "2"]), (2, ["0", "1", "10"])):
        write_round(tmp_path, k, sampled=["10", "2", "1", "0"], finished=finished, seconds=12.5)
    # Execute
    lines = deploy.deployment_section(tmp_path, cfg)
    # Assert
    assert "- engine: deployment; TLS on; SuperNode authentication on" in lines
    assert "| 1 | 0, 1, 2, 10 | 0, 1, 2, 10 | - | 12.5 |" in lines
    assert "| 2 | 0, 1, 2, 10 | 0, 1, 10 | 2 | 12.5 |" in lines


def test_deployment_run_needs_an_absolute_run_dir():
    with pytest.raises(deploy.DeploymentError, match="absolute"):
        deploy.deployment_config(parse_config({}), node_auth=True)


def test_deployment_config_states_engine_tls_and_auth():
    cfg = deploy.deployment_config(parse_config({"run.dir": "/abs/run"}), node_auth=True)
    assert (cfg.deployment.engine, cfg.deployment.tls, cfg.deployment.node_auth) == ("deployment", True, True)


def test_cli_prints_the_tenant_supernode_command(tmp_path, capsys):
    # Prepare
    from fedlora.simulations.cli.main import main

    data = tmp_path / "train.jsonl"
    # Execute
    rc = main(["deploy", "supernode", "--superlink", "link.example.org:9093", "--ca", str(tmp_path / "ca.crt"),
               "--key", str(tmp_path / "hospital-a"), "--data", str(data), "--tenant-id", "4", "--print"])
    # Assert: the tenant worker's command, the SuperNode's naming the worker's socket, its task executor
    worker, line, executor = capsys.readouterr().out.strip().splitlines()
    socket = tmp_path / ".fedlora-state" / "worker" / "worker.sock"
    secret = tmp_path / ".fedlora-state" / "superexec.secret"
    assert rc == 0
    assert f"--isolation process --superexec-auth-secret-file {secret}" in line
    assert "flower-superexec --runtime-api-address 127.0.0.1:9094 --insecure" in executor
    assert f"--superexec-auth-secret-file {secret}" in executor
    assert f"-m fedlora.client.worker --socket {socket} --parent-pid SUPERVISOR_PID" in worker
    assert f"--auth-supernode-private-key {tmp_path / 'hospital-a'}" in line
    assert f"""--node-config 'data-path="{data}" tenant-id=4 worker-socket="{socket}" ledger-dir=""" in line


def test_cli_supernode_policy_and_ledger_dir_reach_the_node_config(tmp_path, capsys, monkeypatch):
    # Prepare: a node without --ledger-dir keeps its ledgers under the fedlora home, not its state dir
    from fedlora.simulations.cli.main import main

    monkeypatch.setenv("FEDLORA_HOME", str(tmp_path / "home"))
    data, policy = tmp_path / "train.jsonl", tmp_path / "policy.toml"
    # Execute
    rc = main(["deploy", "supernode", "--superlink", "l:9093", "--ca", str(tmp_path / "ca.crt"), "--key",
               str(tmp_path / "k"), "--data", str(data), "--policy", str(policy), "--print"])
    rc2 = main(["deploy", "supernode", "--superlink", "l:9093", "--ca", str(tmp_path / "ca.crt"), "--key",
                str(tmp_path / "k"), "--data", str(data), "--ledger-dir", str(tmp_path / "led"), "--print"])
    # Assert
    _, first, _, _, second, _ = capsys.readouterr().out.strip().splitlines()  # each: worker, SuperNode, executor
    assert rc == rc2 == 0
    assert f'policy="{policy}" ledger-dir="{tmp_path / "home" / "ledgers"}"' in first
    assert f'ledger-dir="{tmp_path / "led"}"' in second and "policy=" not in second


def test_cli_supernode_roster_makes_the_node_sign_with_its_own_key(tmp_path, capsys):
    # Execute
    from fedlora.simulations.cli.main import main

    rc = main(["deploy", "supernode", "--superlink", "l:9093", "--ca", str(tmp_path / "ca.crt"), "--key",
               str(tmp_path / "k"), "--data", str(tmp_path / "train.jsonl"), "--roster", str(tmp_path / "r.json"),
               "--print"])
    # Assert: the roster and the SuperNode's own key (its identity) reach the node config
    supernode = capsys.readouterr().out.strip().splitlines()[-2]
    assert rc == 0
    assert f'secagg-roster="{tmp_path / "r.json"}" identity-key="{tmp_path / "k"}"' in supernode


def test_cli_supernode_state_dir_holds_the_ledger_and_the_worker_socket(tmp_path, capsys):
    # Prepare
    from fedlora.simulations.cli.main import main

    data, state = tmp_path / "train.jsonl", tmp_path / "state"
    # Execute
    rc = main(["deploy", "supernode", "--superlink", "link.example.org:9093", "--ca", str(tmp_path / "ca.crt"),
               "--key", str(tmp_path / "k"), "--data", str(data), "--state-dir", str(state), "--print"])
    # Assert
    line = capsys.readouterr().out.strip().splitlines()[-2]
    assert rc == 0
    assert f'state-dir="{state}" worker-socket="{state / "worker" / "worker.sock"}"' in line


def test_cli_supernode_without_worker_is_the_plain_supernode(tmp_path, capsys):
    # Prepare
    from fedlora.simulations.cli.main import main

    data = tmp_path / "train.jsonl"
    # Execute
    rc = main(["deploy", "supernode", "--superlink", "link.example.org:9093", "--ca", str(tmp_path / "ca.crt"),
               "--key", str(tmp_path / "k"), "--data", str(data), "--no-worker", "--print"])
    # Assert: the SuperNode and its executor, and the node config names no worker
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 2 and "flower-superexec" in lines[1]
    assert "worker-socket" not in lines[0] and "-m fedlora.client.worker" not in "\n".join(lines)


def test_cli_supernode_polls_at_the_given_interval_or_as_flower_does(tmp_path, capsys):
    # Prepare
    from fedlora.simulations.cli.main import main

    args = ["deploy", "supernode", "--superlink", "link.example.org:9093", "--ca", str(tmp_path / "ca.crt"),
            "--key", str(tmp_path / "k"), "--data", str(tmp_path / "train.jsonl"), "--no-worker", "--print"]
    # Execute
    main([*args, "--poll-interval", "0.25"])
    fast = capsys.readouterr().out.split()
    main([*args, "--poll-interval", "3"])
    flower = capsys.readouterr().out.split()
    # Assert: below Flower's 3 s the SuperNode runs through the poll wrapper; at 3 s it is Flower's own
    assert fast[1:4] == ["-m", "fedlora.simulations.cli.supernode_poll", "0.25"] and fast[4] == "--superlink"
    assert flower[0].endswith("flower-supernode") and flower[1] == "--superlink"


def test_cli_superlink_without_certificates_says_how_to_make_them(tmp_path, capsys):
    from fedlora.simulations.cli.main import main

    rc = main(["deploy", "superlink", "--certs", str(tmp_path), "--database", str(tmp_path / "db"), "--print"])
    assert rc == 2
    assert "fedlora certs --out" in capsys.readouterr().err


def test_cli_passes_the_tenants_lora_rank_to_its_supernode(tmp_path, capsys):
    # Prepare
    from fedlora.simulations.cli.main import main

    data = tmp_path / "train.jsonl"
    args = ["deploy", "supernode", "--superlink", "link.example.org:9093", "--ca", str(tmp_path / "ca.crt"),
            "--key", str(tmp_path / "hospital-a"), "--data", str(data), "--tenant-id", "4", "--print"]
    # Execute
    rc = main([*args, "--lora-rank", "2"])
    out = capsys.readouterr().out.strip()
    refused = main([*args, "--lora-rank", "0"])
    err = capsys.readouterr().err.strip()
    # Assert: the rank travels in the node config; a rank of 0 is one line naming the problem
    assert rc == 0
    assert f"""--node-config 'data-path="{data}" tenant-id=4 lora-rank=2 worker-socket=""" in out
    assert refused == 2
    assert err.splitlines() == ["fedlora deploy supernode: LoRA rank 0 must be a positive integer "
                                "(at most the run's adapter.r; federation.lora-rule = svd)"]


def _supernode_args(tmp_path) -> list[str]:
    return ["deploy", "supernode", "--superlink", "link.example.org:9093", "--ca", str(tmp_path / "ca.crt"),
            "--key", str(tmp_path / "k"), "--data", str(tmp_path / "train.jsonl"), "--state-dir", str(tmp_path / "s")]


def test_cli_warm_writes_the_scenarios_model_keys_for_the_worker(tmp_path, monkeypatch):
    # Prepare: no real node is started
    import fedlora.simulations.cli.preflight as preflight
    import fedlora.simulations.cli.tenant_node as tenant_node
    from fedlora.client.warm import WARM_FILE
    from fedlora.simulations.cli.main import main

    monkeypatch.setattr(preflight, "check_supernode", lambda **_: None)
    monkeypatch.setattr(tenant_node, "run_node", lambda *a, **k: 0)
    # Execute
    rc = main([*_supernode_args(tmp_path), "--warm", "default", "--warm-set", "adapter.r=4",
               "--warm-set", "train.learning-rate=0.5"])
    # Assert: the model's keys, with the override; nothing of the run that does not decide the model
    import json

    warm = json.loads((tmp_path / "s" / "worker" / WARM_FILE).read_text())
    assert rc == 0 and warm["adapter.r"] == 4 and warm["model.base"] == "embedded"
    assert "train.learning-rate" not in warm and "run.dir" not in warm


@pytest.mark.parametrize("extra, says", [
    (["--no-worker", "--warm", "default"], "--warm needs the tenant worker"),
    (["--warm-set", "adapter.r=4"], "give --warm too"),
    (["--warm", "default", "--warm-set", "adapter.r=many"], "adapter.r"),
])
def test_cli_warm_mistakes_are_one_clear_error_before_anything_starts(tmp_path, capsys, extra, says):
    from fedlora.simulations.cli.main import main

    rc = main([*_supernode_args(tmp_path), *extra, "--print"])
    err = capsys.readouterr().err
    assert rc == 2 and says in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_the_compose_proxy_config_is_the_generators_output():
    # docker/fleet-proxy.conf is committed; regenerate it with the command its module's docstring gives
    from pathlib import Path

    from fedlora.simulations.cli import fleet_proxy

    ours = Path(__file__).resolve().parents[2] / "docker" / "fleet-proxy.conf"
    want = fleet_proxy.nginx_config(prefix=Path("/var/lib/fleet-proxy"), listen="0.0.0.0:9093",
                                    upstream="superlink:9093", upstream_name="superlink",
                                    server_cert=Path("/certs/server.crt"), server_key=Path("/certs/server.key"),
                                    ca_cert=Path("/certs/ca.crt"), user="nobody nogroup")
    assert ours.read_text() == want
