"""Flower's pull of a message's objects, with retries that suit a message still arriving.

When a message is announced before all its objects have been uploaded (the sender pushes
them right after the message), Flower 1.42's ``pull_objects`` waits 1 s before it asks again
for the object it missed, then doubles up to 10 s. On a small adapter the upload takes tens
of milliseconds, so that first second is pure waiting, once per message and side: the
SuperNode pulling the ServerApp's message, the worker pulling it from the SuperNode, the
ServerApp pulling a tenant's reply; and an object that arrives just after a doubled wait
began is picked up that much later (after 50 ms, 100, 200, 400, 800 ms: an object there at
0.8 s waited until 1.55 s). :func:`shorten_pull_retries`, in the process that calls it, makes
the first retry come after 50 ms and caps the doubling at 0.25 s. Each retry is one small
request for one object, and Flower asks for at most as many objects at once as the host has
cores. The number of tries is raised so that only Flower's time limit (2 h) ends the wait,
as with its own schedule, so a large adapter on a slow link still arrives.
"""

from __future__ import annotations

import math
import warnings

PULL_FIRST_RETRY = 0.05
PULL_RETRY_CAP = 0.25


def retry_schedule(first: float = PULL_FIRST_RETRY, cap: float = PULL_RETRY_CAP, *,
                   max_time: float = 7200.0) -> dict[str, float | int]:
    """The keyword arguments of Flower's object pull for these retries: ``initial_backoff``,
    ``backoff_cap`` and enough ``max_tries_per_object`` that ``max_time`` is the limit (each
    wait is at least 80 % of ``cap`` once doubled up to it: Flower jitters them by 20 %)."""
    return {"initial_backoff": first, "backoff_cap": cap,
            "max_tries_per_object": math.ceil(max_time / (0.8 * cap)) + math.ceil(math.log2(max(cap / first, 1))) + 1}


def shorten_pull_retries(first: float = PULL_FIRST_RETRY, cap: float = PULL_RETRY_CAP) -> bool:
    """Retry a message object that is not there yet after ``first`` s, doubling up to ``cap``
    (Flower: 1 s, up to 10 s), in this process; never longer than Flower's. False (and
    unchanged) where this Flower's pull has no such settings."""
    from flwr.supercore.inflatable import inflatable_utils

    defaults = getattr(inflatable_utils.pull_objects, "__kwdefaults__", None) or {}
    if not {"initial_backoff", "backoff_cap", "max_tries_per_object", "max_time"} <= set(defaults):
        warnings.warn("this Flower's object pull has other settings; its retries are unchanged", stacklevel=2)
        return False
    want = retry_schedule(min(first, defaults["initial_backoff"]), min(cap, defaults["backoff_cap"]),
                          max_time=defaults["max_time"] or 7200.0)
    defaults["initial_backoff"], defaults["backoff_cap"] = want["initial_backoff"], want["backoff_cap"]
    if defaults["max_tries_per_object"] is not None:
        defaults["max_tries_per_object"] = max(defaults["max_tries_per_object"], want["max_tries_per_object"])
    return True
