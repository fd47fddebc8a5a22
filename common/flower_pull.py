"""Flower's pull of a message's objects, with a first retry that suits a message still arriving.

When a message is announced before all its objects have been uploaded (the sender pushes
them right after the message), Flower 1.42's ``pull_objects`` waits 1 s before it asks again
for the object it missed, then doubles up to 10 s. On a small adapter the upload takes tens
of milliseconds, so that first second is pure waiting, once per message and side: the
SuperNode pulling the ServerApp's message, the ServerApp pulling a tenant's reply.
:func:`shorten_first_pull_retry` makes the first retry come after 50 ms, in the process that
calls it; Flower's doubling, cap and limits stay as they are.
"""

from __future__ import annotations

import warnings

PULL_FIRST_RETRY = 0.05


def shorten_first_pull_retry(seconds: float = PULL_FIRST_RETRY) -> bool:
    """Retry a message object that is not there yet after ``seconds`` first (Flower: 1 s).
    False (and unchanged) where this Flower's pull has no such setting."""
    from flwr.supercore.inflatable import inflatable_utils

    defaults = getattr(inflatable_utils.pull_objects, "__kwdefaults__", None) or {}
    if "initial_backoff" not in defaults:
        warnings.warn("this Flower's object pull has no initial_backoff; its first retry is unchanged", stacklevel=2)
        return False
    defaults["initial_backoff"] = min(defaults["initial_backoff"], seconds)
    return True
