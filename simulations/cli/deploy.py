"""``fedlora deploy ...``: start a SuperLink or a tenant's SuperNode, register tenants, run.

Each command prints or runs the exact Flower command line (see :mod:`fedlora.simulations.cli.deployment`), with
telemetry, update checks and runtime dependency installation off.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from fedlora.simulations.cli import deployment

DEFAULT_HOME = Path.home() / ".fedlora" / "flwr"


def add_commands(sub) -> None:
    """Register ``deploy`` and its sub-commands on the top-level parser's subparsers."""
    dep = sub.add_parser("deploy", help="run on Flower's Deployment Engine (SuperLink, SuperNodes, TLS, node auth)",
                         description="Operator: `deploy superlink`, `deploy register`, `deploy run`. "
                                     "Tenant: `deploy supernode`. See README, section Deployment.")
    cmds = dep.add_subparsers(dest="deploy_command", required=True, metavar="STEP")

    link = cmds.add_parser("superlink", help="start the SuperLink (TLS, node auth, SQLite state) behind its Fleet proxy",
                           description="Starts three processes and supervises them: flower-superlink on "
                                       "127.0.0.1:--internal-port (Control, Fleet and Runtime APIs; the operator's "
                                       "`deploy register` / `deploy run` connect there), its ServerApp executor "
                                       "(process isolation, SuperExec secret beside --database), and nginx on "
                                       "--host:--port passing only Flower's Fleet API, which the tenants dial. "
                                       "Needs nginx (apt-get install nginx-light).")
    link.add_argument("--certs", required=True, help="directory with ca.crt, server.crt, server.key (`fedlora certs`)")
    link.add_argument("--database", required=True, help="SQLite state file, e.g. state/superlink.db")
    link.add_argument("--host", default="0.0.0.0", help="address the Fleet proxy serves the tenants on (default: 0.0.0.0)")
    link.add_argument("--port", type=int, default=9093, help="the tenants' HTTPS port: Fleet API only (default: 9093)")
    link.add_argument("--internal-port", type=int, default=deployment.INTERNAL_PORT,
                      help=f"the SuperLink's own port, on 127.0.0.1: the operator's (default: {deployment.INTERNAL_PORT})")
    link.add_argument("--no-node-auth", action="store_true", help="admit any SuperNode (not recommended)")
    link.add_argument("--print", action="store_true", help="print the command instead of running it")

    node = cmds.add_parser("supernode", help="start this tenant's SuperNode on its own data file")
    node.add_argument("--superlink", required=True, help="SuperLink address HOST:PORT")
    node.add_argument("--ca", required=True, help="the federation's CA certificate (ca.crt)")
    node.add_argument("--key", required=True, help="this tenant's private key (`fedlora keys node NAME`)")
    node.add_argument("--data", required=True, help="this tenant's training JSONL (holdout beside it)")
    node.add_argument("--holdout", help="holdout JSONL (default: beside --data)")
    node.add_argument("--tenant-id", type=int, default=0, help="this tenant's number in reports (default: 0)")
    node.add_argument("--runtime-port", type=int, default=9094, help="loopback port for ClientApp processes")
    node.add_argument("--lora-rank", type=int, metavar="N",
                      help="train at LoRA rank N, 1..the run's adapter.r (runs with federation.lora-rule = svd "
                           "only; default: the run's rank)")
    node.add_argument("--state-dir", metavar="DIR",
                      help="writable directory for this node's privacy ledger, delta residuals and worker socket "
                           "(default: .fedlora-state/ beside --data)")
    node.add_argument("--poll-interval", type=float, default=deployment.DEFAULT_POLL, metavar="SECONDS",
                      help="seconds between the idle SuperNode's requests for a message (default: "
                           f"{deployment.DEFAULT_POLL}; Flower's own is 3, which delays every message 1.5 s "
                           "on average)")
    node.add_argument("--policy", metavar="FILE",
                      help="this tenant's own privacy policy (`fedlora policy init FILE`): every task that breaks "
                           "it is declined before any work, whatever the run config says. Without one the "
                           "server's run config decides this node's privacy")
    node.add_argument("--ledger-dir", metavar="DIR",
                      help="where this tenant's privacy ledgers live, one per data digest, so a new --state-dir "
                           "on the same data continues the same budget (default: the policy's ledger.dir, else "
                           "~/.fedlora/ledgers)")
    node.add_argument("--roster", metavar="FILE",
                      help="the federation's admitted node keys (from the operator: `fedlora deploy roster`): "
                           "this node signs its secure-aggregation keys with --key and refuses a round whose "
                           "neighbours' keys are not signed by their rostered key (a server substituting keys)")
    node.add_argument("--trusted-fab", action="append", default=[], metavar="SHA256",
                      help="an app bundle (FAB) whose own ClientApp code this node may run, by the SHA-256 of its "
                           "bytes; without it the node runs only its own installed fedlora, never a run's code")
    node.add_argument("--no-worker", action="store_true",
                      help="no tenant worker: every task runs in a fresh process of this node's fedlora, which "
                           "imports torch and loads the model itself (slower)")
    node.add_argument("--warm", metavar="SCENARIO",
                      help="the worker loads the base and adapter this scenario (name or .toml, as `deploy run "
                           "--scenario` takes) names when it starts, so round 1 does not wait for it; later "
                           "starts warm up with the model it last served")
    node.add_argument("--warm-set", action="append", metavar="KEY=VALUE",
                      help="with --warm: one run-config key the federation's run changes (e.g. model.precision=nf4)")
    node.add_argument("--print", action="store_true", help="print the command instead of running it")

    worker = cmds.add_parser("worker-status", help="ask this tenant's worker how it is (JSON)",
                             description="Prints the tenant worker's health: pid, uptime, messages served and "
                                         "failed, what it holds loaded, its memory. Exit 1 if none answers.")
    worker.add_argument("--state-dir", help="the node's --state-dir (default: .fedlora-state/ beside --data)")
    worker.add_argument("--data", help="the node's --data, to find the default state dir")

    roster = cmds.add_parser("roster", help="write the admitted nodes' keys for the tenants (authenticated SecAgg+)",
                             description="Write every registered node's public key, by node id, to FILE: give it "
                                         "to each tenant (out of band) for `deploy supernode --roster FILE`.")
    roster.add_argument("--out", required=True, metavar="FILE", help="where to write the roster (JSON)")
    roster.add_argument("--flwr-home", default=str(DEFAULT_HOME), help=f"flwr CLI home (default: {DEFAULT_HOME})")
    for name, text in (("register", "admit a tenant's public key"), ("run", "run the fedlora apps")):
        p = cmds.add_parser(name, help=text)
        p.add_argument("--superlink", default=f"127.0.0.1:{deployment.INTERNAL_PORT}",
                       help="the SuperLink's own address, on its host's loopback (default: "
                            f"127.0.0.1:{deployment.INTERNAL_PORT}); the tenants' public port serves Fleet only")
        p.add_argument("--ca", required=True, help="the federation's CA certificate (ca.crt)")
        p.add_argument("--flwr-home", default=str(DEFAULT_HOME), help=f"flwr CLI home (default: {DEFAULT_HOME})")
    cmds.choices["register"].add_argument("public_key", help="the tenant's NAME.pub")
    cmds.choices["register"].add_argument("--max-examples", type=int, metavar="N",
                                          help="credit this tenant with at most N examples in the aggregate, "
                                               "whatever it claims (enforced by the server)")
    cmds.choices["register"].add_argument("--tenant-id", type=int, metavar="N",
                                          help="the tenant this key is (its node's --tenant-id); the server "
                                               "then files every reply from this node under tenant N and "
                                               "refuses a reply that claims another; two keys cannot be "
                                               "one tenant")
    run = cmds.choices["run"]
    run.add_argument("--scenario", default="deployment", help="scenario name or .toml (default: deployment)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one run-config key")
    run.add_argument("--run-dir", help="absolute run directory on the SuperLink's machine (required unless --resume)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run after its last complete round, with its own config.json")
    run.add_argument("--no-node-auth", action="store_true", help="the SuperLink runs without node auth")


def _node_state_dir(state_dir: str | None, data: str | None) -> Path:
    from fedlora.client.ledger import STATE_DIR_NAME

    if state_dir:
        return Path(state_dir).resolve()
    if not data:
        raise deployment.DeploymentConfigError("give --state-dir, or --data to find the default state dir")
    return Path(data).resolve().parent / STATE_DIR_NAME


def _supernode(args: argparse.Namespace) -> int:
    """The tenant's SuperNode, with its tenant worker unless --no-worker (see fedlora.simulations.cli.tenant_node)."""
    from fedlora.client import worker_link
    from fedlora.simulations.cli.preflight import check_supernode

    socket = None
    state_dir = _node_state_dir(args.state_dir, args.data)
    if not args.no_worker:
        try:
            socket = worker_link.socket_path(state_dir)
        except ValueError as err:
            raise deployment.DeploymentConfigError(str(err)) from None
    policy = Path(args.policy).resolve() if args.policy else None
    cmd = deployment.supernode_command(  # refuses a bad --lora-rank before any file is read
        superlink=args.superlink, ca_cert=Path(args.ca).resolve(), private_key=Path(args.key).resolve(),
        data_path=Path(args.data).resolve(), tenant_id=args.tenant_id,
        holdout_path=Path(args.holdout).resolve() if args.holdout else None,
        runtime_port=args.runtime_port, lora_rank=args.lora_rank,
        state_dir=Path(args.state_dir).resolve() if args.state_dir else None, worker_socket=socket,
        poll_interval=args.poll_interval, policy=policy, ledger_dir=_ledger_dir(args, policy),
        roster=Path(args.roster).resolve() if args.roster else None,
        superexec_secret=state_dir / "superexec.secret")  # tenant_node makes it and runs the executor
    warm = _warm_config(args, with_worker=socket is not None)
    if args.print:  # what the node's supervisor (fedlora.simulations.cli.tenant_node) starts
        from fedlora.simulations.cli.tenant_node import executor_command, worker_command

        if socket is not None:
            print(shlex.join(worker_command(socket, "SUPERVISOR_PID")))
        print(shlex.join(cmd))
        print(shlex.join(executor_command(cmd, "SUPERVISOR_PID")))
        return 0
    check_supernode(ca_cert=args.ca, private_key=args.key, data=args.data, holdout=args.holdout,
                    tenant_id=args.tenant_id, policy=policy)
    if policy is None:
        print("fedlora deploy supernode: no --policy: the server's run config decides this node's privacy "
              "(write one with `fedlora policy init policy.toml`)", file=sys.stderr, flush=True)
    if warm is not None:
        from fedlora.client.warm import write_warm

        write_warm(socket.parent, warm)
    from fedlora.simulations.cli.tenant_node import run_node

    try:
        return run_node(cmd, socket, env=deployment.flower_env(Path(os.environ.get("FLWR_HOME", DEFAULT_HOME))),
                        trusted_fabs=tuple(args.trusted_fab), bin_dir=state_dir / "worker" / "bin")
    except RuntimeError as err:
        print(f"fedlora deploy supernode: {err}", file=sys.stderr)
        return 1


def _superlink(args: argparse.Namespace) -> int:
    """The SuperLink on loopback, its ServerApp executor and the Fleet proxy (``superlink_node``)."""
    tls = deployment.TlsFiles.from_dir(args.certs)
    db = Path(args.database).resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    secret = deployment.superexec_secret(db.parent / "superexec.secret")
    link = deployment.superlink_command(tls=tls, database=db, port=args.internal_port,
                                        node_auth=not args.no_node_auth, superexec_secret=secret)
    executor = deployment.serverapp_executor_command(tls=tls, superexec_secret=secret, port=args.internal_port)
    proxy = deployment.fleet_proxy_files(db.parent / "fleet-proxy", tls=tls, host=args.host, port=args.port,
                                         internal_port=args.internal_port)
    if args.print:
        for cmd in (link, executor, proxy):
            print(shlex.join(cmd))
        return 0
    from fedlora.simulations.cli.superlink_node import run_superlink

    env = deployment.flower_env(Path(os.environ.get("FLWR_HOME", DEFAULT_HOME)), task_poll=None)
    return run_superlink(link, executor, proxy, internal_port=args.internal_port, env=env)


def _ledger_dir(args: argparse.Namespace, policy: Path | None) -> Path:
    """``--ledger-dir``, else the policy's ``ledger.dir``, else ``<fedlora home>/ledgers``."""
    if args.ledger_dir:
        return Path(args.ledger_dir).expanduser().resolve()
    if policy is not None and policy.is_file():
        from fedlora.client.policy import PolicyError, load_policy

        try:
            return load_policy(policy).ledger_dir()
        except PolicyError:
            pass  # the preflight says what is wrong with it
    from fedlora.common.files import fedlora_home

    return fedlora_home() / "ledgers"


def _warm_config(args: argparse.Namespace, *, with_worker: bool) -> dict | None:
    """The flat run config ``--warm`` / ``--warm-set`` name (validated now), or None."""
    if not (args.warm or args.warm_set):
        return None
    if not with_worker:
        raise deployment.DeploymentConfigError("--warm needs the tenant worker; drop --no-worker or --warm")
    if not args.warm:
        raise deployment.DeploymentConfigError("--warm-set changes the --warm scenario; give --warm too")
    from fedlora.common.config import parse_config
    from fedlora.simulations.scenario import load_scenario, parse_overrides

    flat = {**load_scenario(args.warm), **parse_overrides(args.warm_set or [])}
    return parse_config(flat, source=f"--warm {args.warm}").to_flat()


def _worker_status(args: argparse.Namespace) -> int:
    import json

    from fedlora.client import worker_link

    try:
        path = worker_link.socket_path(_node_state_dir(args.state_dir, args.data))
    except ValueError as err:
        raise deployment.DeploymentConfigError(str(err)) from None
    try:
        print(json.dumps(worker_link.health(path), indent=2))
    except (worker_link.WorkerUnavailable, worker_link.WorkerFailed) as err:
        print(f"fedlora deploy worker-status: {err}", file=sys.stderr)
        return 1
    return 0


def main_deploy(args: argparse.Namespace) -> int:
    """One ``deploy`` step; errors are printed by ``fedlora``'s main (exit 2, or 1 for a failed run)."""
    return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    if args.deploy_command == "superlink":
        return _superlink(args)
    if args.deploy_command == "supernode":
        return _supernode(args)
    if args.deploy_command == "worker-status":
        return _worker_status(args)
    home = Path(args.flwr_home)
    if args.deploy_command == "roster":
        from fedlora.simulations.cli import registry

        count = registry.write_roster(home, Path(args.out))
        if not count:
            print(f"fedlora deploy roster: no node is registered in {home}; `fedlora deploy register` each "
                  "tenant's key first", file=sys.stderr)
            return 1
        print(f"{args.out}: {count} node key(s); give it to every tenant for `deploy supernode --roster`")
        return 0
    deployment.write_cli_config(home, superlink=args.superlink, ca_cert=Path(args.ca))
    if args.deploy_command == "register":
        from fedlora.simulations.cli import registry

        out = deployment.register_node(Path(args.public_key).resolve(), flwr_home=home)
        print(out)
        node = registry.node_id_from(out)
        if node is not None:
            try:
                registry.record(home, node, public_key=Path(args.public_key).resolve(),
                                max_examples=args.max_examples, tenant_id=args.tenant_id)
            except registry.RegistryError as why:
                print(f"fedlora deploy register: {why} (the key is registered with Flower as node {node}; "
                      "register it again with the right --tenant-id)", file=sys.stderr)
                return 1
        elif args.max_examples or args.tenant_id is not None:
            print("fedlora deploy register: Flower's output names no node id; the cap and tenant id were not "
                  "recorded", file=sys.stderr)
            return 1
        return 0
    from fedlora.simulations.scenario import parse_overrides, resolve

    from fedlora.simulations.cli import registry
    from fedlora.simulations.cli.preflight import check_deployment_run
    from fedlora.simulations.cli.resume import interrupted_message, resume_config

    if args.resume:
        if args.set or args.run_dir:
            print("fedlora deploy run: --resume continues a run with its own config.json; drop --set and --run-dir",
                  file=sys.stderr)
            return 2
        cfg = resume_config(args.resume)  # the caps it was started with travel in its config
    elif not args.run_dir:
        print("fedlora deploy run: give --run-dir (a new run) or --resume RUN_DIR", file=sys.stderr)
        return 2
    else:
        overrides = parse_overrides(args.set or [])
        caps = registry.example_caps(home)
        if caps and "federation.example-caps" not in overrides:  # the operator's caps from registration
            overrides["federation.example-caps"] = caps
        tenants = registry.tenant_nodes(home)
        if tenants and "federation.tenant-nodes" not in overrides:  # and which tenant each node is
            overrides["federation.tenant-nodes"] = tenants
        cfg = resolve(args.scenario, overrides, args.run_dir)
    deployment.deployment_config(cfg, node_auth=not args.no_node_auth)  # what the engine cannot run, first
    check_deployment_run(cfg, ca_cert=args.ca)
    try:
        report = deployment.run_deployment(cfg, flwr_home=home, node_auth=not args.no_node_auth,
                                           on_line=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        # The SuperLink and SuperNodes are the operators' long-lived processes and keep running;
        # only this command's `flwr run` stream stops (the ServerApp may go on: `flwr stop RUN_ID`).
        print(interrupted_message(Path(cfg.run.dir), command="fedlora deploy run --superlink ... --ca ..."),
              file=sys.stderr)
        return 130
    print(f"fedlora: report written to {report}")
    return 0
