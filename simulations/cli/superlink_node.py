"""The operator's SuperLink host, supervised: the SuperLink, its ServerApp executor and the Fleet proxy.

``fedlora deploy superlink`` runs :func:`run_superlink`:

- ``flower-superlink`` on **loopback** (``--internal-port``): Control, Fleet and the ServerApp's
  Runtime API, TLS, node authentication, process isolation with a SuperExec secret;
- ``flower-superexec``, the only process holding that secret, which claims each run's ServerApp
  task and starts it;
- nginx on the public address (``--host``/``--port``), passing Flower's Fleet API only
  (:mod:`fedlora.simulations.cli.fleet_proxy`): the tenants' SuperNodes dial it.

The proxy and the executor start once the SuperLink answers. SIGTERM, SIGINT or SIGHUP stops all
three (proxy first, SuperLink last); when any of them exits the others are stopped and its exit
code is the command's.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from functools import partial

from fedlora.simulations.cli.launcher import accepts, die_with_parent, stop_child

READY_TIMEOUT = 60.0


class SuperLinkHost:
    def __init__(self, superlink: list[str], executor: list[str], proxy: list[str], *, internal_port: int,
                 env: dict[str, str] | None = None) -> None:
        self.cmds = {"superlink": superlink, "serverapp executor": executor, "fleet proxy": proxy}
        self.internal_port, self.env = internal_port, env
        self.children: dict[str, subprocess.Popen] = {}
        self.stopping = False

    def say(self, line: str) -> None:
        print(f"fedlora deploy superlink: {line}", file=sys.stderr, flush=True)

    def _spawn(self, name: str) -> subprocess.Popen:
        child = subprocess.Popen(self.cmds[name], env=self.env, stdin=subprocess.DEVNULL,
                                 preexec_fn=partial(die_with_parent, signal.SIGTERM))
        self.children[name] = child
        return child

    def stop(self, *_) -> None:
        self.stopping = True
        for name in ("fleet proxy", "serverapp executor", "superlink"):
            stop_child(self.children.get(name), grace=15.0)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.stop)
        try:
            link = self._spawn("superlink")
            deadline = time.monotonic() + READY_TIMEOUT
            while not self.stopping and link.poll() is None and not accepts(self.internal_port):
                if time.monotonic() > deadline:
                    self.say(f"the SuperLink did not listen on 127.0.0.1:{self.internal_port} within "
                             f"{READY_TIMEOUT:.0f} s")
                    return 1
                time.sleep(0.2)
            if self.stopping or link.poll() is not None:
                return link.returncode or 0
            self._spawn("serverapp executor")
            self._spawn("fleet proxy")
            self.say("the SuperLink serves the operator on 127.0.0.1; the tenants reach only its Fleet API, "
                     "through the proxy")
            while not self.stopping:
                for name, child in self.children.items():
                    if child.poll() is not None:
                        self.say(f"the {name} exited with code {child.returncode}; stopping the others")
                        return child.returncode or 1
                time.sleep(0.5)
            return 0
        finally:
            self.stop()


def run_superlink(superlink: list[str], executor: list[str], proxy: list[str], *, internal_port: int,
                  env: dict[str, str] | None = None) -> int:
    return SuperLinkHost(superlink, executor, proxy, internal_port=internal_port, env=env).run()
