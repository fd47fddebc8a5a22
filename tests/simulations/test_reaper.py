"""The processes a run starts die with its launcher: the reaper's sweep, also against a
process that starts another while it is being stopped (as a Ray raylet does)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fedlora.simulations.cli import launcher

pytestmark = pytest.mark.slow

# On SIGTERM: start a child in a session of its own, then exit after a moment (a raylet restarting its agents).
RESPAWNER = ("import signal, subprocess, sys, time\n"
             "def stop(*_):\n"
             "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
             "    time.sleep(0.3)\n"
             "    sys.exit(0)\n"
             "signal.signal(signal.SIGTERM, stop)\n"
             "print('ready', flush=True)\n"
             "time.sleep(60)\n")


def _start_tagged(code: str, tag: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, launcher.TAG_ENV: tag},
                            stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout.readline() == b"ready\n"
    return proc


def test_kill_tagged_also_ends_what_a_stopping_process_starts():
    # Prepare: a tagged process that starts a detached child when it gets SIGTERM
    tag = f"respawn-{time.time_ns()}"
    proc = _start_tagged(RESPAWNER, tag)
    # Execute
    launcher.kill_tagged(tag, grace=2.0, quiet=0.5)
    # Assert: the process and the child it started on SIGTERM are both gone
    assert launcher.tagged_pids(tag) == []
    proc.wait(timeout=5)


def test_reaper_kills_every_tagged_process_when_the_pipe_closes():
    # Prepare: a reaper on a pipe, and tagged processes, one ignoring SIGTERM and one respawning on it
    tag = f"reaper-{time.time_ns()}"
    env = {k: v for k, v in os.environ.items() if k != launcher.TAG_ENV}
    reaper = subprocess.Popen([sys.executable, "-m", "fedlora.simulations.cli.reaper", tag], stdin=subprocess.PIPE,
                              cwd="/", env=env, start_new_session=True)
    stubborn = _start_tagged("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                             "print('ready', flush=True); time.sleep(60)", tag)
    respawner = _start_tagged(RESPAWNER, tag)
    time.sleep(1.0)  # the reaper has imported what it needs and waits on the pipe
    # Execute: the launcher's end of the pipe closes (as when the launcher is killed)
    closed = time.monotonic()
    reaper.stdin.close()
    while launcher.tagged_pids(tag) and time.monotonic() - closed < 5.0:
        time.sleep(0.05)
    # Assert: nothing is left (the bound is 5 s)
    assert launcher.tagged_pids(tag) == []
    assert reaper.wait(timeout=10) == 0
    stubborn.wait(timeout=5)
    respawner.wait(timeout=5)
