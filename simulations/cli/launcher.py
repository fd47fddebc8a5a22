"""Start Flower's processes and leave nothing behind: the simulation engine, and the
process plumbing the deployment launcher (:mod:`fedlora.simulations.cli.deployment`) shares.

``flwr run`` submits the app bundle to a SuperLink started with ``--simulation``. We start
that SuperLink ourselves — on ports of our choosing, from a neutral working directory,
with a private ``FLWR_HOME`` and with telemetry, update checks and runtime dependency
installation off — and stop its whole process group when the run ends, fails or is
interrupted. Two runs (or a test and a run) coexist when they use different ports.

Every process we start carries a private tag in its environment (``TAG_ENV``), so even
those Flower detaches into their own sessions (SuperExec, the ServerApp, Ray's workers) are
found (:func:`tagged_pids`) and ended. They also die with the launcher when it is killed
(SIGKILL included): each direct child gets a parent-death signal (``PR_SET_PDEATHSIG``), and a
small reaper process (:mod:`fedlora.simulations.cli.reaper`) holds the read end of a pipe whose write
end only the launcher has; when the launcher dies the pipe closes and the reaper kills every
tagged process (:func:`watchdog`).
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from fedlora.common.offline import quiet_and_offline

TAG_ENV = "FEDLORA_DEPLOY_TAG"  # marks every process a LocalFederation starts


class SimulationError(RuntimeError):
    """The Flower simulation did not complete."""


class DeploymentError(RuntimeError):
    """A deployment process or run did not do what was asked."""


class DeploymentConfigError(DeploymentError, ValueError):
    """A deployment asked for with input the user must fix (missing TLS files, a relative path)."""


_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up once, not in the forked child
except (OSError, AttributeError):  # not Linux: the reaper alone covers it
    _prctl = None


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """``preexec_fn``: the child gets ``sig`` when the thread that started it dies (Linux)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def new_tag() -> str:
    return uuid.uuid4().hex


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on ``host:port`` (a TCP connection succeeds)."""
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimulationError(f"flower-superlink exited with code {proc.returncode}; see {log}")
        if accepts(port):
            return
        time.sleep(0.2)
    raise SimulationError(f"flower-superlink did not open port {port} within {timeout:.0f}s; see {log}")


def stop_group(proc: subprocess.Popen, *, grace: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds."""
    if proc.poll() is not None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # orphans of an exited leader
        except (ProcessLookupError, PermissionError):
            pass
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=5)


def stop_child(child: subprocess.Popen | None, *, grace: float) -> None:
    """SIGTERM one child (not its group), then SIGKILL it after ``grace`` seconds; a supervisor's stop."""
    if child is None or child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


BIN = Path(sys.executable).parent  # where flower-superlink, flower-superexec, flwr live


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Offline switches, a private FLWR_HOME, and this environment's scripts first on PATH
    (the SuperLink starts ``flower-superexec`` by name, also when no venv is activated)."""
    env = {**os.environ, **quiet_and_offline(), "FLWR_HOME": str(flwr_home)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def pump_lines(stream, fh, on_line: Callable[[str], None] | None = None,
               line_format: Callable[[str], str] = lambda line: line) -> None:
    """Copy a process's output to ``fh`` line by line (formatted), and to ``on_line``."""
    for line in stream:
        fh.write(line_format(line))
        fh.flush()
        if on_line:
            on_line(line.rstrip("\n"))


def stream_run(cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path, timeout: float,
               on_line: Callable[[str], None] | None = None, timeout_error: type[Exception] = SimulationError,
               line_format: Callable[[str], str] = lambda line: line) -> tuple[int, str]:
    """Run ``cmd`` (e.g. ``flwr run ... --stream``) in its own process group, copying its output
    to ``log`` and ``on_line``; the deadline holds even while the command prints nothing.
    Returns (exit code, the whole log); the process group is always stopped."""
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True,
                                preexec_fn=die_with_parent)
        try:
            reader = threading.Thread(target=pump_lines, args=(proc.stdout, fh, on_line, line_format), daemon=True)
            reader.start()
            try:
                proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                raise timeout_error(f"the run exceeded {timeout:.0f}s; see {log}") from None
            reader.join(timeout=10)
        finally:
            stop_group(proc, grace=5)
    return proc.returncode, log.read_text()


# --------------------------------------------------------------------------- #
# Processes of a deployment: start, find by tag, stop all
# --------------------------------------------------------------------------- #
def tagged_pids(tag: str) -> list[int]:
    """Every live process whose environment carries ``FEDLORA_DEPLOY_TAG=tag``."""
    needle = f"{TAG_ENV}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return pids


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_tagged(tag: str, *, grace: float = 5.0, quiet: float = 0.5, limit: float = 10.0) -> None:
    """SIGTERM every tagged process, then SIGKILL what is left after ``grace`` seconds.

    ``grace=0`` skips SIGTERM: the reaper uses it once the launcher is dead, when there is no
    clean shutdown left to wait for (checkpoints are written atomically, SQLite survives a
    SIGKILL). A process that handles SIGTERM may start others while it shuts down (a Ray
    raylet restarts its dashboard and runtime-env agents), so the SIGKILL phase signals every
    tagged process on each pass and ends only after no tagged process has been seen for
    ``quiet`` seconds (or after ``limit`` seconds)."""
    pids = tagged_pids(tag)
    if grace > 0:
        _signal_all(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = tagged_pids(tag)
    start = last_seen = time.monotonic()
    while time.monotonic() - last_seen < quiet and time.monotonic() - start < limit:
        if pids:
            _signal_all(pids, signal.SIGKILL)
            last_seen = time.monotonic()
        time.sleep(0.05)
        pids = tagged_pids(tag)


@contextmanager
def watchdog(tag: str, *, grace: float = 5.0) -> Iterator[subprocess.Popen]:
    """Until the block ends, a reaper process waits on a pipe only this process can write to.

    Leaving the block (normally, on an exception or Ctrl-C) ends every tagged process here,
    then closes the pipe. When this process dies without leaving the block (SIGKILL, OOM),
    the kernel closes the pipe and the reaper kills every tagged process within a second or
    two. The reaper runs in its own session, so Ctrl-C on the terminal does not reach it.
    """
    env = dict(os.environ)
    env.pop(TAG_ENV, None)  # the reaper itself is not one of the processes it ends
    reaper = subprocess.Popen([sys.executable, "-m", "fedlora.simulations.cli.reaper", tag], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, cwd="/", env=env, start_new_session=True)
    try:
        yield reaper
    finally:
        try:
            kill_tagged(tag, grace=grace)
        finally:
            reaper.stdin.close()
            try:
                reaper.wait(timeout=10)
            except subprocess.TimeoutExpired:
                reaper.kill()


@dataclass
class Proc:
    """One started process with its log file."""

    name: str
    popen: subprocess.Popen
    log: Path

    def stop(self) -> None:
        stop_group(self.popen, grace=5)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


def stamp(line: str) -> str:
    """Prefix a log line with the wall-clock time (Flower's own lines carry none)."""
    return f"{time.time():.3f} {line}"


def start(name: str, cmd: list[str], *, state_dir: Path, env: dict[str, str], cwd: Path | None = None) -> Proc:
    """Start ``cmd`` in its own process group; its output goes, time-stamped, to ``state_dir/<name>.log``."""
    log = state_dir / f"{name}.log"
    work = cwd or state_dir / f"{name}-cwd"
    work.mkdir(parents=True, exist_ok=True)
    fh = log.open("a", buffering=1)
    fh.write(stamp(f"$ {shlex.join(cmd)}\n"))
    popen = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True, text=True, errors="replace",
                             preexec_fn=die_with_parent)
    threading.Thread(target=pump_lines, args=(popen.stdout, fh), kwargs={"line_format": stamp}, daemon=True, name=f"log-{name}").start()
    return Proc(name, popen, log)


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise DeploymentError(f"timed out after {timeout:.0f}s waiting for {what}")



# --------------------------------------------------------------------------- #
# The simulation engine
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class SimulationLink:
    """A running simulation SuperLink and how ``flwr`` reaches it."""

    connection: str
    flwr_home: Path
    http_port: int
    control_port: int
    log: Path


@contextmanager
def simulation_superlink(state_dir: Path, *, http_port: int = 0, control_port: int = 0,
                         tag: str | None = None) -> Iterator[SimulationLink]:
    """Start ``flower-superlink --simulation`` (tagged with ``tag``) and stop its process group on exit."""
    flwr_home = state_dir / "flwr-home"
    work = flwr_home / "superlink-cwd"
    work.mkdir(parents=True, exist_ok=True)
    http_port = http_port or free_port()
    control_port = control_port or free_port()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "fedlora-sim"\n\n'
        f'[superlink.fedlora-sim]\naddress = "127.0.0.1:{http_port}"\ninsecure = true\n')
    log = state_dir / "superlink.log"
    env = flower_env(flwr_home)
    if tag:
        env[TAG_ENV] = tag
    cmd = [str(BIN / "flower-superlink"), "--insecure", "--simulation",
           "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(http_port),
           "--control-api-address", f"127.0.0.1:{control_port}",
           "--disable-runtime-dependency-installation"]
    with log.open("ab") as fh:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
    try:
        _wait_port(http_port, proc, log)
        yield SimulationLink("fedlora-sim", flwr_home, http_port, control_port, log)
    finally:
        stop_group(proc)


def run_simulation(run_config_toml: Path, *, state_dir: Path, num_supernodes: int, cpus_per_client: int = 1,
                   http_port: int = 0, control_port: int = 0, timeout: float = 3600.0,
                   on_line: Callable[[str], None] | None = None, app_dir: Path | None = None,
                   tag: str | None = None, private: bool = True) -> None:
    """Submit the fedlora apps to a fresh simulation SuperLink and stream the run's log.

    ``on_line`` receives every log line (the caller shows progress); the full log is
    also written to ``state_dir/flower.log``. ``app_dir``: the Flower app to submit (default: the
    installed fedlora's, :func:`~fedlora.simulations.cli.flower_app.app_dir`). Every process of the run carries ``tag``
    (default: a fresh one) and none outlives this call or the launcher (:func:`watchdog`).
    ``private``: all of it runs in a network of its own (:mod:`fedlora.simulations.cli.private_net`),
    where no other user of the machine reaches the SuperLink; where none can be made, on 127.0.0.1.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    tag = tag or new_tag()
    if private:
        from fedlora.simulations.cli import private_net

        why = private_net.unavailable()
        if why is None:
            spec = {"run_config_toml": str(run_config_toml), "state_dir": str(state_dir),
                    "num_supernodes": num_supernodes, "cpus_per_client": cpus_per_client, "http_port": http_port,
                    "control_port": control_port, "timeout": timeout,
                    "app_dir": str(app_dir) if app_dir else None, "tag": tag}
            with watchdog(tag):
                return private_net.run_private(spec, on_line=on_line, error=SimulationError)
        print(f"fedlora: this run's SuperLink listens on 127.0.0.1, where other users of this machine can reach "
              f"it while the run lasts ({why})", file=sys.stderr, flush=True)
    with watchdog(tag), simulation_superlink(state_dir, http_port=http_port, control_port=control_port,
                                             tag=tag) as link:
        from fedlora.simulations.cli.flower_app import app_dir as installed_app

        cmd = [str(BIN / "flwr"), "run", str(app_dir or installed_app()), link.connection,
               "--run-config", str(run_config_toml),
               "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}",
               "--stream"]
        flog = state_dir / "flower.log"
        code, text = stream_run(cmd, cwd=state_dir, env={**flower_env(link.flwr_home), TAG_ENV: tag}, log=flog,
                                timeout=timeout, on_line=on_line, timeout_error=SimulationError)
        if code != 0 or "Simulation raised an exception" in text or "Exit Code:" in text:
            raise SimulationError(f"the Flower run failed (exit code {code}); see {flog}\n"
                                  + "\n".join(text.splitlines()[-25:]))
