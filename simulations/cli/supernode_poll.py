"""``flower-supernode`` with a shorter idle poll.

Flower 1.42's SuperNode asks the SuperLink for a message, and when there is none it sleeps
3 s before asking again (``flwr.supernode.start_client_internal``; a constant, no flag). A
tenant that has just sent its reply therefore finds the next message of the round 1.5 s
late on average, twice per round (train, evaluate) and more under secure aggregation. This
entry point runs Flower's own ``flower-supernode`` unchanged except for that idle sleep, and
the half-second waits of its reply loop, which it caps at the given number of seconds
(``fedlora deploy supernode --poll-interval``, default 0.5; 3 or more leaves Flower's timing
as it is). Each idle poll is one small authenticated request to the SuperLink.

    python -m simulations.cli.supernode_poll SECONDS FLOWER-SUPERNODE-ARGS...

If this Flower's SuperNode no longer sleeps through its module's ``time``, nothing is changed
and a warning says so.
"""

from __future__ import annotations

import sys
import time
import warnings

DEFAULT_POLL = 0.5


class CappedSleep:
    """The ``time`` module, except that ``sleep`` waits at most ``cap`` seconds."""

    def __init__(self, cap: float):
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str):
        return getattr(time, name)


def cap_idle_poll(cap: float) -> bool:
    """Cap the SuperNode loop's sleeps at ``cap`` s; False (and unchanged) where it cannot."""
    import flwr.supernode.start_client_internal as loop

    if getattr(loop, "time", None) is not time:
        warnings.warn("this Flower's SuperNode loop does not sleep through `time`; its poll interval is unchanged",
                      stacklevel=2)
        return False
    loop.time = CappedSleep(cap)
    return True


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m simulations.cli.supernode_poll SECONDS FLOWER-SUPERNODE-ARGS...")
    cap = float(sys.argv[1])
    if cap < 3.0:
        cap_idle_poll(max(cap, 0.05))
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *sys.argv[2:]]
    flower_supernode()


if __name__ == "__main__":
    main()
