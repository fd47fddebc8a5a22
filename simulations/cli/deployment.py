"""fedlora on Flower's Deployment Engine: command lines, processes and runs.

A federation operator runs one SuperLink (TLS, SuperNode authentication, SQLite state) on
loopback, behind a Fleet proxy (:mod:`fedlora.simulations.cli.fleet_proxy`), with its ServerApp
executor; each tenant runs one SuperNode next to its own JSONL file. This module builds the exact
``flower-superlink`` / ``flower-superexec`` / ``flower-supernode`` / ``flwr`` command lines —
with telemetry, update checks and runtime dependency installation off, internal APIs on
loopback, process isolation with a SuperExec secret — submits runs and writes their report.
:mod:`fedlora.simulations.cli.local_federation` starts a whole federation on this machine
(tests, benchmark). The apps are the same as in simulation; only the engine differs. ``run.dir``
must be absolute because the ServerApp runs in the SuperLink's working directory.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from fedlora.simulations.cli.launcher import BIN, TAG_ENV, DeploymentConfigError, DeploymentError, stamp, stream_run
from fedlora.simulations.cli.launcher import flower_env as _base_env

CONNECTION = "fedlora"
DEFAULT_POLL = 0.5  # seconds between an idle SuperNode's polls (Flower's own: 3)
# How often a tenant node's SuperExec asks its SuperNode for a new ClientApp task (Flower: 1 s).
# The SuperLink's SuperExec keeps Flower's 1 s: it starts one ServerApp per run, and each of its
# polls is a request the SuperLink serves through its SQL state, 4 a second otherwise.
TASK_POLL_SECONDS = 0.25


# --------------------------------------------------------------------------- #
# Command lines (printed by the CLI, run by the helpers below and by docker/)
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class TlsFiles:
    """The CA and the SuperLink's server certificate, as ``fedlora certs`` writes them."""

    ca_cert: Path
    server_cert: Path | None = None
    server_key: Path | None = None

    @classmethod
    def from_dir(cls, certs_dir: Path | str) -> "TlsFiles":
        d = Path(certs_dir).resolve()
        files = cls(d / "ca.crt", d / "server.crt", d / "server.key")
        missing = [str(p) for p in (files.ca_cert, files.server_cert, files.server_key) if not p.is_file()]
        if missing:
            raise DeploymentConfigError(f"missing TLS file(s): {', '.join(missing)}; create them with "
                                  f"`fedlora certs --out {d} --host <address the tenants dial>`")
        return files


INTERNAL_PORT = 9095  # the SuperLink's own port, on loopback: Control and Runtime live there


def superlink_command(*, tls: TlsFiles, database: Path, port: int = INTERNAL_PORT, node_auth: bool = True,
                      superexec_secret: Path, health_port: int | None = None) -> list[str]:
    """``flower-superlink`` with TLS, node authentication, SQLite state and no runtime installs,
    on **loopback** only: Flower 1.42 serves Fleet, Control and the ServerApp's Runtime API on one
    port, and the tenants reach Fleet through the proxy (:mod:`fedlora.simulations.cli.fleet_proxy`).
    Process isolation: the ServerApp runs under :func:`serverapp_executor_command`, which must
    hold ``superexec_secret`` to claim its task. The optional health server is on loopback too.
    """
    cmd = [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(tls.ca_cert),
           "--ssl-certfile", str(tls.server_cert), "--ssl-keyfile", str(tls.server_key),
           "--database", str(database), "--host", "127.0.0.1", "--port", str(port),
           "--isolation", "process", "--superexec-auth-secret-file", str(superexec_secret),
           "--disable-runtime-dependency-installation"]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    if health_port:
        cmd += ["--health-server-address", f"127.0.0.1:{health_port}"]
    return cmd


def serverapp_executor_command(*, tls: TlsFiles, superexec_secret: Path, port: int = INTERNAL_PORT) -> list[str]:
    """``flower-superexec``: pulls each run's ServerApp task from the SuperLink's loopback Runtime
    API with the SuperExec secret and starts it (the installed fedlora's ``flwr-serverapp``)."""
    return [str(BIN / "flower-superexec"), "--runtime-api-address", f"127.0.0.1:{port}",
            "--root-certificates", str(tls.ca_cert), "--superexec-auth-secret-file", str(superexec_secret)]


def fleet_proxy_files(prefix: Path, *, tls: TlsFiles, host: str, port: int, internal_port: int = INTERNAL_PORT) -> list[str]:
    """Write the proxy's nginx config under ``prefix``; returns its command line (the public
    ``host:port`` passes Flower's Fleet API to the loopback SuperLink, and nothing else)."""
    from fedlora.simulations.cli.fleet_proxy import proxy_command, write_proxy

    conf = write_proxy(prefix, listen=f"{host}:{port}", upstream=f"127.0.0.1:{internal_port}",
                       server_cert=tls.server_cert, server_key=tls.server_key, ca_cert=tls.ca_cert)
    return proxy_command(conf)


def superexec_secret(path: Path) -> Path:
    """The SuperExec shared secret at ``path`` (32 random bytes, hex, mode 0600), made on first use."""
    path = Path(path)
    if not path.is_file():
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path.resolve()


def node_config(data_path: Path | str, *, tenant_id: int, holdout_path: Path | str | None = None,
                lora_rank: int | None = None, state_dir: Path | str | None = None,
                worker_socket: Path | str | None = None, policy: Path | str | None = None,
                ledger_dir: Path | str | None = None, roster: Path | str | None = None,
                identity_key: Path | str | None = None) -> str:
    """The ``--node-config`` string the ClientApp reads (``fedlora.client.task.tenant_from_node_config``).

    ``lora_rank``: the tenant's own LoRA rank (``lora-rank``; runs with ``federation.lora-rule
    = svd`` only, at most the run's ``adapter.r``, which the ClientApp checks); None: the run's rank.
    ``state_dir``: where the node keeps its privacy ledger and delta residuals (``state-dir``;
    default: ``.fedlora-state/`` beside the data file); ``worker_socket``: the tenant worker's
    Unix socket (``worker-socket``; the ClientApp then forwards every message to it); ``policy``: the
    tenant's own policy file (``policy``, :mod:`fedlora.client.policy`); ``ledger_dir``: where its
    privacy ledgers live, one per data digest (``ledger-dir``); ``roster``: the federation's admitted
    node keys (``secagg-roster``) and ``identity_key`` the node's own key (``identity-key``): secure
    rounds are then authenticated (:mod:`fedlora.common.secagg_identity`).
    """
    data_path = Path(data_path)
    if not data_path.is_absolute():
        raise DeploymentConfigError(f"data path {data_path} must be absolute (the ClientApp runs in another directory)")
    parts = [f"data-path={json.dumps(str(data_path))}", f"tenant-id={int(tenant_id)}"]
    if holdout_path is not None:
        parts.append(f"holdout-path={json.dumps(str(Path(holdout_path).resolve()))}")
    if lora_rank is not None:
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
            raise DeploymentConfigError(f"LoRA rank {lora_rank!r} must be a positive integer "
                                        "(at most the run's adapter.r; federation.lora-rule = svd)")
        parts.append(f"lora-rank={lora_rank}")
    for key, path in (("state-dir", state_dir), ("worker-socket", worker_socket), ("policy", policy),
                      ("ledger-dir", ledger_dir), ("secagg-roster", roster), ("identity-key", identity_key)):
        if path is not None:
            parts.append(f"{key}={json.dumps(str(Path(path).resolve()))}")
    return " ".join(parts)


def supernode_command(*, superlink: str, ca_cert: Path | None, private_key: Path | None, data_path: Path | str,
                      tenant_id: int, holdout_path: Path | str | None = None, runtime_port: int = 9094,
                      max_retries: int | None = None, lora_rank: int | None = None,
                      state_dir: Path | str | None = None, worker_socket: Path | str | None = None,
                      poll_interval: float | None = None, policy: Path | str | None = None,
                      ledger_dir: Path | str | None = None, roster: Path | str | None = None,
                      superexec_secret: Path | None = None) -> list[str]:
    """``flower-supernode`` for one tenant: TLS to the SuperLink, its auth key, its own data file.

    The SuperNode's Runtime API (where its ClientApp processes connect) stays on 127.0.0.1; with
    ``superexec_secret`` it runs under process isolation, so only an executor holding that secret
    (the one :mod:`fedlora.simulations.cli.tenant_node` starts) can claim a task and the context
    it carries (the node's SecAgg secrets): not any local user of the host.
    ``ca_cert=None`` or ``private_key=None`` leave those flags out (only to show refusals);
    ``poll_interval``: seconds between the idle SuperNode's polls for a message, below Flower's
    fixed 3 s (through :mod:`fedlora.simulations.cli.supernode_poll`; None: Flower's own);
    ``lora_rank``: the tenant's own LoRA rank (see :func:`node_config`).
    """
    cmd = [str(BIN / "flower-supernode"), "--superlink", superlink]
    if poll_interval is not None and poll_interval < 3.0:  # Flower's own idle poll is 3 s
        if poll_interval <= 0:
            raise DeploymentConfigError(f"poll interval {poll_interval} s must be positive")
        cmd = [str(BIN / "python"), "-m", "fedlora.simulations.cli.supernode_poll", f"{poll_interval:g}", *cmd[1:]]
    if ca_cert is not None:
        cmd += ["--root-certificates", str(ca_cert)]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    cmd += ["--node-config", node_config(data_path, tenant_id=tenant_id, holdout_path=holdout_path,
                                         lora_rank=lora_rank, state_dir=state_dir, worker_socket=worker_socket,
                                         policy=policy, ledger_dir=ledger_dir, roster=roster,
                                         identity_key=private_key if roster is not None else None),
            "--host", "127.0.0.1", "--port", str(runtime_port)]
    cmd += (["--isolation", "process", "--superexec-auth-secret-file", str(Path(superexec_secret).resolve())]
            if superexec_secret is not None else ["--isolation", "subprocess"])
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    return cmd


def write_cli_config(flwr_home: Path, *, superlink: str, ca_cert: Path) -> Path:
    """Add (or update) the SuperLink connection ``fedlora`` (TLS with our CA) in ``$FLWR_HOME/config.toml``,
    keeping the file's other connections; ``fedlora`` becomes the default when the file names none."""
    from fedlora.simulations.cli.flwr_config import merge_connections, superlink_connection

    return merge_connections(flwr_home, {CONNECTION: superlink_connection(superlink, ca_cert)}, default=CONNECTION)


def flower_env(flwr_home: Path, tag: str | None = None, *, task_poll: float | None = TASK_POLL_SECONDS) -> dict[str, str]:
    """The environment for every Flower process we start: offline switches, private home, tag;
    ``task_poll``: the seconds between a SuperExec's task polls (None: Flower's own)."""
    env = _base_env(flwr_home)  # offline switches, private home, our scripts first on PATH
    if task_poll is not None:
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(task_poll))
    if tag:
        env[TAG_ENV] = tag
    return env


def flwr_cli(args: Sequence[str], *, flwr_home: Path, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run one ``flwr`` CLI command against the ``fedlora`` connection."""
    return subprocess.run([str(BIN / "flwr"), *args], env=flower_env(flwr_home), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, cwd=flwr_home)


def register_node(public_key: Path, *, flwr_home: Path) -> str:
    """``flwr supernode register KEY.pub``: admit one tenant's key; returns Flower's output."""
    out = flwr_cli(["supernode", "register", str(public_key), CONNECTION], flwr_home=flwr_home)
    if out.returncode != 0:
        raise DeploymentError(f"registering {public_key} failed (exit {out.returncode}):\n{out.stdout}{out.stderr}"
                              + _public_port_hint(out.stdout + out.stderr))
    return out.stdout


def _public_port_hint(text: str) -> str:
    """What to do when the operator dialled the tenants' port (the Fleet proxy answers 403)."""
    if "403" not in text:
        return ""
    return (f"\nthat address is the tenants' port, which serves Flower's Fleet API only: run this on the "
            f"SuperLink's host with --superlink 127.0.0.1:{INTERNAL_PORT} (its --internal-port)")


def online_nodes(*, flwr_home: Path) -> int:
    """How many registered SuperNodes the SuperLink sees online."""
    out = flwr_cli(["supernode", "list", CONNECTION, "--format", "json"], flwr_home=flwr_home)
    if out.returncode != 0:
        raise DeploymentError(f"`flwr supernode list` failed (exit {out.returncode}):\n{out.stdout}{out.stderr}")
    nodes = json.loads(out.stdout).get("nodes", [])
    return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")


def submit_run(run_config_toml: Path, *, flwr_home: Path, log: Path, timeout: float = 3600.0,
               on_line: Callable[[str], None] | None = None, env_extra: dict[str, str] | None = None,
               app_dir: Path | None = None) -> None:
    """``flwr run APP fedlora --run-config FILE --stream``; raises if the run failed. ``app_dir``: the
    Flower app (default: the installed fedlora's, :func:`~fedlora.simulations.cli.flower_app.app_dir`)."""
    from fedlora.simulations.cli.flower_app import app_dir as installed_app

    cmd = [str(BIN / "flwr"), "run", str(app_dir or installed_app()), CONNECTION, "--run-config", str(run_config_toml), "--stream"]
    code, text = stream_run(cmd, cwd=flwr_home, env={**flower_env(flwr_home), **(env_extra or {})}, log=log,
                            timeout=timeout, on_line=on_line, timeout_error=DeploymentError, line_format=stamp)
    if code != 0 or "Exit Code:" in text or "ServerApp raised an exception" in text:
        raise DeploymentError(f"the Flower run failed (exit code {code}); see {log}\n"
                              + "\n".join(text.splitlines()[-25:]) + _public_port_hint(text))


# --------------------------------------------------------------------------- #
# A deployment run and its report
# --------------------------------------------------------------------------- #
def deployment_config(cfg, *, node_auth: bool):
    """The run's config as the Deployment Engine runs it (TLS is always on here)."""
    if not cfg.run.dir or not Path(cfg.run.dir).is_absolute():
        raise DeploymentConfigError("run.dir must be an absolute path: the ServerApp runs in the SuperLink's directory")
    if cfg.simulation.tenant_ranks:  # the ClientApp would ignore it: its node config names no partition
        raise DeploymentConfigError(f"simulation.tenant-ranks = {cfg.simulation.tenant_ranks!r} applies to simulated "
                                    "tenants only; in a deployment each tenant states its own rank with "
                                    "`fedlora deploy supernode ... --lora-rank N`; drop the key")
    return cfg.replace(**{"deployment.engine": "deployment", "deployment.tls": True,
                          "deployment.node-auth": node_auth})


def deployment_section(run_dir: Path, cfg) -> list[str]:
    """Report lines: engine, TLS, authentication and which tenants finished each round."""
    from fedlora.common.records import read_rounds
    from fedlora.simulations.report import ON_OFF

    lines = ["## Deployment", "",
             f"- engine: {cfg.deployment.engine}; TLS {ON_OFF[cfg.deployment.tls]}; "
             f"SuperNode authentication {ON_OFF[cfg.deployment.node_auth]}",
             f"- round timeout {cfg.federation.round_timeout:.0f} s; minimum tenants per round "
             f"{cfg.federation.min_train_nodes}", "",
             "| round | sampled | finished | did not finish | seconds |", "|---|---|---|---|---|"]
    def names(tenants) -> str:
        return ", ".join(sorted(tenants, key=lambda t: (len(t), t))) or "-"

    for r in read_rounds(run_dir):
        missing = [t for t in r.sampled if t not in r.finished]
        lines.append(f"| {r.round} | {names(r.sampled)} | {names(r.finished)} | {names(missing)} | "
                     f"{r.seconds:.1f} |")
    return lines + [""]


def report_deployment(run_dir: Path, cfg, extra: Sequence[str] = ()) -> Path:
    from fedlora.simulations.report import plot, write_report

    plot(run_dir)
    return write_report(run_dir, cfg, comparison=[], extra_sections=[*deployment_section(run_dir, cfg), *extra])


def run_deployment(cfg, *, flwr_home: Path, node_auth: bool, log: Path | None = None, timeout: float = 0.0,
                   on_line: Callable[[str], None] | None = None, env_extra: dict[str, str] | None = None) -> Path:
    """Submit one run to a running SuperLink, wait for its final adapter, write the report."""
    from fedlora.simulations.scenario import write_run_config

    cfg = deployment_config(cfg, node_auth=node_auth)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rc = write_run_config(cfg, run_dir / "run_config.toml")
    log = log or run_dir / "flower.log"
    timeout = timeout or cfg.federation.round_timeout * cfg.federation.rounds * 3 + 600
    try:
        submit_run(rc, flwr_home=flwr_home, log=log, timeout=timeout, on_line=on_line, env_extra=env_extra)
    except DeploymentError as err:
        raise DeploymentError(f"{err}{_how_to_continue(run_dir)}") from None
    if not (run_dir / "FEDERATION_DONE").is_file():
        raise DeploymentError(f"the run ended without a final adapter in {run_dir}; see {log}"
                              f"{_how_to_continue(run_dir)}")
    return report_deployment(run_dir, cfg)


def _how_to_continue(run_dir: Path) -> str:
    """The resume command, when the ServerApp stopped after a complete round (crash, kill, lost node)."""
    from fedlora.simulations.cli.resume import resumable

    if not resumable(run_dir):
        return ""
    from fedlora.common.records import read_rounds

    last = read_rounds(run_dir)[-1].round
    return (f"\nround {last} is the last complete one and its checkpoint is kept; continue with: "
            f"fedlora deploy run --superlink ... --ca ... --resume {run_dir}")
