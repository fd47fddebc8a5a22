"""fedlora ClientApp: forwards each message to the tenant's worker, or handles it in-process.

On a deployment node started with ``fedlora deploy supernode`` the node config names the
tenant worker's socket (``worker-socket``): the message and its context go to the worker,
which has the model and data loaded already, and its reply comes back (see
:mod:`fedlora.client.worker_link`). This module imports no torch, so the ClientApp process that
Flower starts for every message costs only Flower's own start-up. Without a worker
(simulation, tests, a node started with ``--no-worker``) the same handlers
(:mod:`fedlora.client.handlers`) run here. (A node started by ``fedlora deploy supernode`` does not
start this process per message at all: its ``flwr-clientapp`` hands the whole task to the
worker, see :mod:`fedlora.client.task_runner`; this forwarder serves when that cannot.)

Every ArrayRecord travels packed into one Array (the ``packed_arrays`` mod; see
:mod:`fedlora.common.packing`).

If the node names a worker that does not answer, the message is handled in-process (slower,
same result) and a warning says so; a worker that fails mid-request is an error for that
message, never a second attempt (the round may already be charged to the privacy ledger).
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora.client import worker_link
from fedlora.common import secagg_wire as wire
from fedlora.common.packing import pack_content, unpack_content

log = logging.getLogger("fedlora.clientapp")


def packed_arrays(msg: Message, context: Context, call_next) -> Message:
    """Flower mod: the server's packed ArrayRecords unpacked for the handlers, the reply's
    packed for the way back (see :mod:`fedlora.common.packing`)."""
    if msg.has_content():
        msg.content = unpack_content(msg.content)
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content = pack_content(reply.content)
    return reply


app = ClientApp(mods=[packed_arrays])


def handle(msg: Message, context: Context) -> Message:
    """One message, by the worker when the node has one, else in this process."""
    path = context.node_config.get(worker_link.NODE_CONFIG_KEY)
    if path:
        try:
            return worker_link.forward(str(path), msg, context)
        except worker_link.WorkerUnavailable as why:
            log.warning("%s; handling %s in the ClientApp process instead", why, msg.metadata.message_type)
    from fedlora.client.handlers import app as local

    return local(msg, context)


train = app.train()(handle)
evaluate = app.evaluate()(handle)
for _stage in wire.STAGES:  # secure aggregation's stages
    app.train(_stage)(handle)
