"""A whole federation on this machine (tests, benchmarks, demos): a SuperLink on loopback with its
ServerApp executor and Fleet proxy, and tenant SuperNodes with their workers, each started the
way ``fedlora deploy superlink`` / ``deploy supernode`` start them; leaving it stops every process
it started (tagged: :mod:`fedlora.simulations.cli.launcher`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fedlora.simulations.cli.deployment import (CONNECTION, DEFAULT_POLL, TlsFiles, fleet_proxy_files, flower_env,
                                                flwr_cli, online_nodes, register_node, run_deployment,
                                                serverapp_executor_command, superexec_secret, superlink_command,
                                                supernode_command, write_cli_config)
from fedlora.simulations.cli.launcher import (BIN, TAG_ENV, DeploymentError, Proc, accepts, free_port, kill_tagged,
                                              start, tagged_pids, wait_for, watchdog)


@dataclass(frozen=True)
class Tenant:
    """One tenant node: its name (key file), its tenant id, its data file and its LoRA rank."""

    name: str
    tenant_id: int
    data_path: Path
    lora_rank: int | None = None  # its own LoRA rank (federation.lora-rule = svd); None: adapter.r
    policy: Path | None = None  # its own tenant policy (fedlora.client.policy); None: the server decides
    roster: Path | None = None  # the admitted nodes' keys: its secure rounds are authenticated; None: not


@dataclass
class LocalFederation:
    """A SuperLink with TLS + node auth + SQLite on 127.0.0.1 and tenant SuperNodes.

    Use as a context manager; leaving it (also on error) stops every process it started.
    """

    state_dir: Path
    node_auth: bool = True
    port: int = 0   # the public (proxy) port the tenants dial
    host: str = "127.0.0.1"  # the address the proxy listens on (and the certificate names)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    procs: dict[str, Proc] = field(default_factory=dict)
    worker_sockets: dict[str, Path] = field(default_factory=dict)  # node name -> its worker socket
    runtime_ports: dict[str, int] = field(default_factory=dict)  # tenant name -> its SuperNode's Runtime API port

    def __post_init__(self) -> None:
        from fedlora.common.tls import write_tls_certificates

        self.state_dir = Path(self.state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.internal_port = free_port()
        self.superlink = f"{self.host}:{self.port}"  # the proxy: Fleet only
        self.internal = f"127.0.0.1:{self.internal_port}"  # the SuperLink itself: the operator's
        certs = self.state_dir / "certs"
        if not (certs / "ca.crt").is_file():
            write_tls_certificates(certs, hosts=tuple(dict.fromkeys(("127.0.0.1", "localhost", self.host))))
        self.tls = TlsFiles.from_dir(certs)
        self.keys = self.state_dir / "keys"
        self.cli_home = self.state_dir / "operator-home"
        write_cli_config(self.cli_home, superlink=self.internal, ca_cert=self.tls.ca_cert)

    # -- lifecycle ----------------------------------------------------------------
    def __enter__(self) -> "LocalFederation":
        self._watchdog = watchdog(self.tag)  # every tagged process dies with this one, SIGKILL included
        self._watchdog.__enter__()
        try:
            self._start_superlink()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start_superlink(self) -> None:
        secret = superexec_secret(self.state_dir / "superexec.secret")
        env = flower_env(self.state_dir / "superlink-home", self.tag, task_poll=None)
        cmd = superlink_command(tls=self.tls, database=self.state_dir / "superlink.db", port=self.internal_port,
                                node_auth=self.node_auth, superexec_secret=secret)
        link = start("superlink", cmd, state_dir=self.state_dir, env=env)
        self.procs["superlink"] = link
        wait_for(lambda: link.popen.poll() is not None or flwr_cli(
            ["supernode", "list", CONNECTION], flwr_home=self.cli_home).returncode == 0,
            timeout=60, what=f"the SuperLink on {self.internal} (see {link.log})")
        if link.popen.poll() is not None:
            raise DeploymentError(f"flower-superlink exited with code {link.popen.returncode}:\n{link.text()[-2000:]}")
        self.procs["serverapp-executor"] = start(
            "serverapp-executor", serverapp_executor_command(tls=self.tls, superexec_secret=secret,
                                                             port=self.internal_port),
            state_dir=self.state_dir, env=env)
        proxy = start("fleet-proxy", fleet_proxy_files(self.state_dir / "fleet-proxy", tls=self.tls, host=self.host,
                                                       port=self.port, internal_port=self.internal_port),
                      state_dir=self.state_dir, env=env)
        self.procs["fleet-proxy"] = proxy
        wait_for(lambda: proxy.popen.poll() is not None or accepts(self.port, self.host), timeout=30,
                 what=f"the Fleet proxy on {self.superlink} (see {proxy.log})")
        if proxy.popen.poll() is not None:
            raise DeploymentError(f"nginx exited with code {proxy.popen.returncode}:\n{proxy.text()[-2000:]}")

    def close(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()
        kill_tagged(self.tag)
        watch, self._watchdog = getattr(self, "_watchdog", None), None
        if watch is not None:
            watch.__exit__(None, None, None)

    def leftovers(self) -> list[int]:
        return tagged_pids(self.tag)

    # -- tenants ------------------------------------------------------------------
    def node_key(self, name: str) -> tuple[Path, Path]:
        """The tenant's key pair, made on first use (as ``fedlora keys node NAME`` does)."""
        from fedlora.common.credentials import write_node_keypair

        priv = self.keys / name
        if not priv.is_file():
            return write_node_keypair(self.keys, name)
        return priv, self.keys / f"{name}.pub"

    def register(self, name: str) -> str:
        return register_node(self.node_key(name)[1], flwr_home=self.cli_home)

    def start_node(self, tenant: Tenant, *, register: bool = True, with_ca: bool = True,
                   max_retries: int | None = None, worker: bool = True,
                   poll_interval: float | None = DEFAULT_POLL, warm=None, trusted_fabs: tuple[str, ...] = (),
                   netns: str | None = None) -> Proc:
        """Start one tenant's node (registering its key first unless told not to): its SuperNode
        and, unless ``worker=False``, its tenant worker, supervised as ``fedlora deploy supernode`` does;
        ``poll_interval``: see :func:`supernode_command` (None: Flower's 3 s); ``warm``: a Config
        whose model the worker loads as it starts (``fedlora deploy supernode --warm``); the node's
        ledgers go to its own directory (``ledgers-<name>``), as ``--ledger-dir`` would put them;
        ``netns``: run the node in that network namespace (``ip netns exec``), a tenant's own host."""
        from fedlora.client.worker_link import socket_path

        priv, _ = self.node_key(tenant.name)
        if register:
            self.register(tenant.name)
        node_dir = self.state_dir / f"node-{tenant.name}"
        socket = socket_path(node_dir) if worker else None
        if warm is not None and socket is not None:
            from fedlora.client.warm import write_warm

            write_warm(socket.parent, warm.to_flat())
        cmd = supernode_command(superlink=self.superlink, ca_cert=self.tls.ca_cert if with_ca else None,
                                private_key=priv, data_path=tenant.data_path, tenant_id=tenant.tenant_id,
                                runtime_port=self.runtime_ports.setdefault(tenant.name, free_port()),
                                max_retries=max_retries, lora_rank=tenant.lora_rank,
                                worker_socket=socket, poll_interval=poll_interval, policy=tenant.policy,
                                ledger_dir=self.state_dir / f"ledgers-{tenant.name}", roster=tenant.roster,
                                superexec_secret=node_dir / "superexec.secret")
        where = ["--socket", str(socket)] if socket is not None else ["--no-worker", "--bin-dir", str(node_dir / "bin")]
        cmd = [str(BIN / "python"), "-m", "fedlora.simulations.cli.tenant_node", *where,
               *(f"--trusted-fab={h}" for h in trusted_fabs), "--", *cmd]
        if netns is not None:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        proc = start(f"supernode-{tenant.name}", cmd, state_dir=self.state_dir,
                     env=flower_env(self.state_dir / f"home-{tenant.name}", self.tag))
        self.procs[proc.name] = proc
        if socket is not None:
            self.worker_sockets[proc.name] = socket
        return proc

    def wait_online(self, count: int, *, timeout: float = 90.0) -> None:
        wait_for(lambda: online_nodes(flwr_home=self.cli_home) >= count, timeout=timeout, poll=1.0,
                 what=f"{count} SuperNode(s) online")

    def wait_warm(self, *, timeout: float = 600.0) -> dict[str, dict]:
        """Wait until no tenant worker is still warming up; returns each node's warm-up state."""
        from fedlora.client import worker_link

        states: dict[str, dict] = {}

        def settled() -> bool:
            for name, sock in self.worker_sockets.items():
                try:
                    states[name] = worker_link.health(sock, timeout=2.0).get("warm", {})
                except (worker_link.WorkerUnavailable, worker_link.WorkerFailed):
                    states[name] = {"state": "warming"}  # not serving yet
            return all(s.get("state") != "warming" for s in states.values())

        wait_for(settled, timeout=timeout, poll=0.5, what="the tenant workers' warm-up")
        return states

    # -- runs ---------------------------------------------------------------------
    def run(self, cfg, *, timeout: float = 0.0, on_line: Callable[[str], None] | None = None) -> Path:
        """Run the fedlora apps with ``cfg`` (``run.dir`` absolute); returns the report path."""
        return run_deployment(cfg, flwr_home=self.cli_home, node_auth=self.node_auth, timeout=timeout,
                              on_line=on_line, env_extra={TAG_ENV: self.tag})
