"""``flower-supernode`` with shorter waits.

Flower 1.42's SuperNode asks the SuperLink for a message, and when there is none it sleeps
3 s before asking again (``flwr.supernode.start_client_internal``; a constant, no flag). A
tenant that has just sent its reply therefore finds the next message of the round 1.5 s
late on average, twice per round (train, evaluate) and more under secure aggregation. This
entry point runs Flower's own ``flower-supernode`` unchanged except for three waits:

- the idle poll waits the given number of seconds (``fedlora deploy supernode
  --poll-interval``, default 0.5; 3 or more leaves Flower's timing as it is), and only
  ``BURST_POLL`` s for ``BURST_WINDOW`` s after the node last handled a message: the round's
  next message usually follows within seconds, and between rounds and runs the node goes
  back to the slower poll. Each idle poll is one small authenticated request to the SuperLink;
- while a message is handled, the loop's half-second waits for the reply in the node's own
  state (no network) take ``LOCAL_WAIT`` s;
- pulling a message's objects retries an object that is not there yet (the ServerApp is
  still uploading it) after 50 ms instead of Flower's 1 s
  (:func:`fedlora.common.flower_pull.shorten_pull_retries`), and at most every 0.25 s after that.

    python -m fedlora.simulations.cli.supernode_poll SECONDS FLOWER-SUPERNODE-ARGS...

If this Flower's SuperNode no longer sleeps through its module's ``time``, or its object pull
has no ``initial_backoff``, that part is left unchanged and a warning says so.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from typing import Callable

DEFAULT_POLL = 0.5
IDLE_SLEEP = 3.0        # Flower's idle poll, the only sleep of its loop this long
BURST_POLL = 0.1        # seconds between idle polls right after a message was handled
BURST_WINDOW = 10.0     # for how long after it
LOCAL_WAIT = 0.05       # the loop's waits while a message is handled (the node's own state)


class CappedSleep:
    """The ``time`` module, except that ``sleep`` waits as the module docstring says: the idle
    poll ``cap`` s (``burst`` s within ``window`` s of the last handled message), the waits
    while a message is handled ``local`` s; never longer than asked or than ``cap``."""

    def __init__(self, cap: float, *, burst: float = BURST_POLL, window: float = BURST_WINDOW,
                 local: float = LOCAL_WAIT, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.cap, self.burst, self.window, self.local = cap, min(burst, cap), window, local
        self._sleep, self._clock = sleep, clock
        self.active = -math.inf  # when the loop last waited on a message it was handling

    def sleep(self, seconds: float) -> None:
        now = self._clock()
        if seconds >= IDLE_SLEEP:  # no message was waiting
            wait = self.burst if now - self.active < self.window else self.cap
        else:                      # a message is being handled: its reply or an object's content
            self.active = now
            wait = self.local
        self._sleep(min(seconds, wait, self.cap))

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
        sys.exit("usage: python -m fedlora.simulations.cli.supernode_poll SECONDS FLOWER-SUPERNODE-ARGS...")
    cap = float(sys.argv[1])
    if cap < IDLE_SLEEP:
        from fedlora.common.flower_pull import shorten_pull_retries

        cap_idle_poll(max(cap, 0.05))
        shorten_pull_retries()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *sys.argv[2:]]
    flower_supernode()


if __name__ == "__main__":
    main()
