"""A tenant's deployment node: its SuperNode and the tenant worker beside it, supervised.

``fedlora deploy supernode`` runs :func:`run_node`: it starts the tenant worker
(:mod:`fedlora.client.worker`, which loads the ML stack once), waits until the worker answers on
its socket, then starts ``flower-supernode`` with that socket in its node config, and stays
in the foreground:

- Flower's SuperExec finds fedlora's ``flwr-clientapp`` (:mod:`fedlora.client.clientapp_shim`) first
  on the SuperNode's PATH, so each message's task is pulled and answered by the worker itself
  instead of a fresh Flower process per message; Flower's own ``flwr-clientapp``, which would
  run the run's app bundle, is never started;
- the worker is restarted if it dies (tasks run meanwhile in fresh processes of this node's
  fedlora, :mod:`fedlora.client.standalone`: never the bundle's code); without a worker
  (``--no-worker``) every task runs that way;
- under process isolation (``--isolation process`` with a SuperExec secret, as ``fedlora deploy
  supernode`` starts it) the node's own ``flower-superexec`` is the only process that can claim
  a task from the SuperNode's loopback Runtime API: it holds the secret (mode 0600, made here on
  first use), so another local user of the host cannot take a task and the context it carries;
- SIGTERM, SIGINT or SIGHUP stops the SuperNode first, then the worker;
- when the SuperNode exits, the worker is stopped and its exit code is the node's;
- both children get the kernel's parent-death signal, so even a SIGKILLed supervisor leaves
  nothing behind (the worker also watches its parent).

    python -m fedlora.simulations.cli.tenant_node --socket PATH -- flower-supernode ARGS...
    python -m fedlora.simulations.cli.tenant_node --no-worker --bin-dir DIR -- flower-supernode ARGS...
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

from fedlora.client import clientapp_shim, worker_link
from fedlora.simulations.cli.launcher import die_with_parent, stop_child

READY_TIMEOUT = 600.0  # a cold import of torch + transformers on a slow disk
RESTARTS = 5           # worker restarts allowed within RESTART_WINDOW seconds
RESTART_WINDOW = 300.0


def worker_command(socket: Path, parent_pid: int | str, *, preload: bool = True) -> list[str]:
    return [sys.executable, "-m", "fedlora.client.worker", "--socket", str(socket), "--parent-pid", str(parent_pid),
            *([] if preload else ["--no-preload"])]


class TenantNode:
    """The two children and the supervisor's decisions about them."""

    def __init__(self, supernode_cmd: list[str], socket: Path | None, *, env: dict[str, str] | None = None,
                 say: Callable[[str], None] | None = None, preload: bool = True,
                 trusted_fabs: tuple[str, ...] = (), bin_dir: Path | None = None):
        self.supernode_cmd, self.env, self.preload = supernode_cmd, env, preload
        self.socket = Path(socket) if socket is not None else None  # None: no worker
        self.trusted_fabs = tuple(trusted_fabs)
        self.bin_dir = bin_dir or (self.socket.parent / "bin" if self.socket else None)
        if self.bin_dir is None:
            raise ValueError("a node without a worker needs a bin_dir for its flwr-clientapp")
        self.say = say or (lambda line: print(f"fedlora deploy supernode: {line}", file=sys.stderr, flush=True))
        self.worker: subprocess.Popen | None = None
        self.supernode: subprocess.Popen | None = None
        self.executor: subprocess.Popen | None = None
        self.restarts: list[float] = []
        self.stopping = False

    def _spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        # SIGTERM, not SIGKILL, when the supervisor dies: the worker removes its socket, the SuperNode stops cleanly
        return subprocess.Popen(cmd, env=env or self.env, stdin=subprocess.DEVNULL,
                                preexec_fn=partial(die_with_parent, signal.SIGTERM))

    def start_worker(self) -> None:
        if self.socket is None:
            return
        self.worker = self._spawn(worker_command(self.socket, os.getpid(), preload=self.preload))
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and not self.stopping:
            if self.worker.poll() is not None:
                raise RuntimeError(f"the tenant worker exited with code {self.worker.returncode} before it served "
                                   f"(its log is above); start with --no-worker to run each task in a fresh process")
            try:
                health = worker_link.health(self.socket, timeout=2.0)
            except (worker_link.WorkerUnavailable, worker_link.WorkerFailed):
                time.sleep(0.2)
                continue
            self.say(f"tenant worker ready (pid {health['pid']}) on {self.socket}")
            return
        raise RuntimeError(f"the tenant worker did not answer on {self.socket} within {READY_TIMEOUT:.0f} s")

    def _keep_worker(self) -> None:
        """Restart a worker that died, a bounded number of times."""
        if self.worker is None or self.worker.poll() is None or self.stopping:
            return
        if self._too_many_restarts():
            self.say(f"the tenant worker died {RESTARTS + 1} times in {RESTART_WINDOW:.0f} s; not restarting it "
                     "(tasks now run in fresh processes of this node's fedlora, never the run's bundle)")
            self.worker = None
            return
        self.say(f"the tenant worker exited with code {self.worker.returncode}; restarting it")
        try:
            self.start_worker()
        except RuntimeError as err:
            self.say(str(err))

    def _too_many_restarts(self) -> bool:
        """Count one restart; whether more than RESTARTS happened within RESTART_WINDOW."""
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW] + [now]
        return len(self.restarts) > RESTARTS

    def supernode_env(self) -> dict[str, str]:
        """The SuperNode's environment: with fedlora's ``flwr-clientapp`` first on PATH (it hands
        each task to the worker, else to a fresh process of this node's fedlora)."""
        return supernode_env(self.env, bin_dir=self.bin_dir, socket=self.socket, trusted_fabs=self.trusted_fabs)

    def executor_command(self) -> list[str] | None:
        """The node's task executor under process isolation (None: Flower's own, in the SuperNode),
        its SuperExec secret made on first use."""
        cmd = executor_command(self.supernode_cmd, os.getpid())
        if cmd is not None:
            from fedlora.simulations.cli.deployment import superexec_secret

            superexec_secret(Path(_flag(cmd, "--superexec-auth-secret-file")))
        return cmd

    def stop(self, *_) -> None:
        self.stopping = True
        for child, grace in ((self.executor, 10.0), (self.supernode, 15.0), (self.worker, 10.0)):
            stop_child(child, grace=grace)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.stop)
        try:
            self.start_worker()
            if self.stopping:
                return 0
            executor = self.executor_command()
            env = self.supernode_env()
            self.supernode = self._spawn(self.supernode_cmd, env=env)
            if executor is not None:
                self.executor = self._spawn(executor, env=env)
            while self.supernode.poll() is None and not self.stopping:
                self._keep_worker()
                if self.executor is not None and self.executor.poll() is not None and not self.stopping:
                    if self._too_many_restarts():
                        self.say("the node's task executor keeps exiting; stopping the node")
                        break
                    self.say(f"the node's task executor exited with code {self.executor.returncode}; restarting it")
                    self.executor = self._spawn(executor, env=env)
                time.sleep(0.5)
        finally:
            self.stop()
        return self.supernode.returncode if self.supernode is not None else 0


def executor_command(supernode_cmd: list[str], parent_pid: int | str) -> list[str] | None:
    """``flower-superexec`` for a SuperNode under process isolation: it claims the node's tasks from
    its loopback Runtime API with the SuperExec secret and starts fedlora's ``flwr-clientapp``
    (first on its PATH); None for a SuperNode that runs its tasks itself (subprocess isolation)."""
    if _flag(supernode_cmd, "--isolation") != "process":
        return None
    secret, port = _flag(supernode_cmd, "--superexec-auth-secret-file"), _flag(supernode_cmd, "--port")
    if not secret or not port:
        raise RuntimeError("process isolation needs --superexec-auth-secret-file and --port on the SuperNode")
    return [str(Path(sys.executable).parent / "flower-superexec"), "--runtime-api-address", f"127.0.0.1:{port}",
            "--insecure", "--superexec-auth-secret-file", secret, "--parent-pid", str(parent_pid)]


def _flag(cmd: list[str], name: str) -> str | None:
    """The value of ``name`` in a command line (``--name VALUE`` or ``--name=VALUE``)."""
    for i, arg in enumerate(cmd):
        if arg == name and i + 1 < len(cmd):
            return cmd[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def supernode_env(env: dict[str, str] | None, *, bin_dir: Path, socket: Path | None,
                  trusted_fabs: tuple[str, ...] = ()) -> dict[str, str]:
    """``env`` (default: this process's) with fedlora's ``flwr-clientapp`` installed in ``bin_dir``
    first on PATH, handing tasks to the worker on ``socket`` (None: none)."""
    env = dict(os.environ if env is None else env)
    path = env.get("PATH", os.defpath)
    clientapp_shim.install(bin_dir, worker_socket=socket, fallback=clientapp_shim.fallback_command(trusted_fabs))
    env["PATH"] = f"{bin_dir}{os.pathsep}{path}"
    return env


def run_node(supernode_cmd: list[str], socket: Path | None, *, env: dict[str, str] | None = None,
             trusted_fabs: tuple[str, ...] = (), bin_dir: Path | None = None) -> int:
    """Run a tenant's SuperNode with its worker (``socket``; None: none) until the SuperNode exits
    or a signal comes."""
    return TenantNode(supernode_cmd, socket, env=env, trusted_fabs=trusted_fabs, bin_dir=bin_dir).run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedlora.simulations.cli.tenant_node", description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", type=Path, help="the tenant worker's Unix socket")
    p.add_argument("--no-worker", action="store_true", help="no worker: every task runs in a fresh process")
    p.add_argument("--bin-dir", type=Path, help="where fedlora's flwr-clientapp goes (default: beside the socket)")
    p.add_argument("--trusted-fab", action="append", default=[], metavar="SHA256",
                   help="an app bundle whose own ClientApp may run on this node")
    p.add_argument("--no-preload", action="store_true", help="the worker imports the ML stack at its first message")
    p.add_argument("supernode", nargs=argparse.REMAINDER, help="-- then the flower-supernode command line")
    args = p.parse_args(argv)
    cmd = args.supernode[1:] if args.supernode[:1] == ["--"] else args.supernode
    if not cmd:
        p.error("give the flower-supernode command after --")
    if (args.socket is None) != args.no_worker or (args.no_worker and args.bin_dir is None):
        p.error("give --socket, or --no-worker with --bin-dir")
    try:
        return TenantNode(cmd, None if args.no_worker else args.socket, preload=not args.no_preload,
                          trusted_fabs=tuple(args.trusted_fab), bin_dir=args.bin_dir).run()
    except RuntimeError as err:
        print(f"fedlora deploy supernode: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
