"""A local simulation in a network of its own: its SuperLink is reachable by nobody else.

A simulation runs a ``flower-superlink --simulation`` whose HTTP and Control APIs listen on
127.0.0.1, without TLS or accounts: any other user of the machine could list the run, stream
its logs, stop it or submit runs of their own while it lasts. So :func:`run_private` starts the
SuperLink, ``flwr run`` and every process under them (the ServerApp, Ray and its workers) inside
a fresh user + network namespace (util-linux ``unshare --user --map-root-user --net``, no root
needed): the only interface there is its own loopback, which no process outside can reach.
Files are shared as usual (the run directory, the data), and the run's log lines stream back.

The namespace has a PID namespace of its own too (``--pid --fork --mount-proc --kill-child``):
when its first process ends, the kernel kills every process in it. Ray's agents overwrite their
environment with their process titles, so the tag the reaper looks for is not always there to
find; a PID namespace ends them anyway, within the same instant, whoever started them. Where
the kernel refuses a PID namespace (some containers), the network namespace alone is used.

Where the kernel refuses unprivileged user namespaces, :func:`unavailable` says why and the run
goes ahead on the machine's loopback (``fedlora simulate`` says so in one line).

    python -m fedlora.simulations.cli.private_net SPEC_JSON   # inside the namespace (run_private does it)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

UNSHARE = ("--user", "--map-root-user", "--net")
PID_NS = ("--pid", "--fork", "--mount-proc", "--kill-child")  # all of the run dies with its first process
NETNS_FILE = "network-namespace"  # in the run's Flower state dir: the namespace it ran in (net:[inode])
_CHECKED: list[tuple[str | None, tuple[str, ...]]] = []


def _check() -> tuple[str | None, tuple[str, ...]]:
    """(None, the unshare flags to use) where a private network can be made, else (why not, ())."""
    if not _CHECKED:
        found = shutil.which("unshare")
        if found is None:
            _CHECKED.append(("util-linux's `unshare` is not installed", ()))
        else:
            why = ""
            for flags in (UNSHARE + PID_NS, UNSHARE):
                out = subprocess.run([found, *flags, "true"], capture_output=True, text=True)
                if out.returncode == 0:
                    _CHECKED.append((None, flags))
                    break
                why = why or out.stderr.strip()[:120]
            else:
                _CHECKED.append((f"the kernel refused an unprivileged network namespace ({why})", ()))
    return _CHECKED[0]


def unavailable() -> str | None:
    """None when a private network can be made here, else why not (checked once per process)."""
    return _check()[0]


def flags() -> tuple[str, ...]:
    """The ``unshare`` options a run uses here: a PID namespace too where the kernel allows one."""
    return _check()[1]


def loopback_up() -> None:
    """Bring up ``lo`` in this (new) network namespace, as ``ip link set lo up`` would."""
    import fcntl
    import socket
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sh", fcntl.ioctl(s, siocgifflags, struct.pack("16sh", b"lo", 0)))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


def run_private(spec: dict, *, on_line: Callable[[str], None] | None, error: type[Exception]) -> None:
    """Run :func:`fedlora.simulations.cli.launcher.run_simulation` with ``spec`` (its keyword
    arguments, paths as strings) inside a private network; its log lines go to ``on_line``;
    a failure raises ``error`` with the message the run gave."""
    from fedlora.simulations.cli.launcher import TAG_ENV, die_with_parent

    cmd = [shutil.which("unshare") or "unshare", *flags(), "--", sys.executable, "-m", __name__,
           json.dumps({**spec, "parent_pid": os.getpid()})]
    # tagged, so the reaper ends unshare too (joining a namespace clears its parent-death signal),
    # and with it (--kill-child) the namespace's first process and so everything in it
    env = {**os.environ, TAG_ENV: spec["tag"]} if spec.get("tag") else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, errors="replace", preexec_fn=die_with_parent, env=env)
    import threading

    err: list[str] = []
    drain = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    drain.start()
    try:
        for line in proc.stdout:
            if on_line is not None:
                on_line(line.rstrip("\n"))
        proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    drain.join(timeout=5.0)
    if proc.returncode != 0:
        raise error("".join(err).strip() or f"the private simulation exited with code {proc.returncode}")


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    spec = json.loads(args[0])
    from fedlora.simulations.cli.launcher import SimulationError, die_with_parent, run_simulation

    parent = spec.pop("parent_pid")
    if os.getpid() != 1:  # no PID namespace (there unshare's --kill-child ends this process with it)
        die_with_parent()  # the namespace's credentials cleared the parent-death signal unshare's parent set
        if os.getppid() != parent:
            return 1  # the parent is already gone
    loopback_up()
    Path(spec["state_dir"]).mkdir(parents=True, exist_ok=True)
    (Path(spec["state_dir"]) / NETNS_FILE).write_text(os.readlink("/proc/self/ns/net"), encoding="utf-8")
    for key in ("run_config_toml", "state_dir", "app_dir"):
        if spec.get(key) is not None:
            spec[key] = Path(spec[key])
    try:
        run_simulation(**spec, private=False, on_line=lambda line: print(line, flush=True))
    except SimulationError as err:
        print(str(err), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
