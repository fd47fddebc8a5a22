"""``python -m fedlora.simulations.cli.reaper TAG``: end a run's processes once its launcher is gone.

Started by :func:`fedlora.simulations.cli.launcher.watchdog` with a pipe on stdin whose write end
only the launcher holds. Reading returns end-of-file when the launcher closes it or dies
(also by SIGKILL); then every process tagged ``TAG`` is killed with SIGKILL at once (the
launcher is gone: no clean shutdown is left to wait for, and SIGTERM would let a Ray raylet
restart its agents), including those Flower and Ray detach into sessions of their own,
which a parent-death signal does not reach.
"""

from __future__ import annotations

import signal
import sys

from fedlora.simulations.cli.launcher import kill_tagged  # imported now: nothing to load once the launcher dies


def main(tag: str) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closed terminal must not skip the clean-up
    while sys.stdin.buffer.read(4096):
        pass
    kill_tagged(tag, grace=0.0, quiet=2.0)  # a Ray agent started in the last instant is caught too
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
