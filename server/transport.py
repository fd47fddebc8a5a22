"""How one training round's updates reach the strategy: a *transport*.

The strategy is given one transport and never asks which. Both build the round's
training messages (:meth:`Transport.configure`, called from ``configure_train``) and turn
the replies Flower collected into a :class:`Collected` (:meth:`Transport.collect`, called
from ``aggregate_train``):

* :class:`PlainTransport` sends the global adapter, validates every reply
  (``fedlora.server.aggregation.validate_update``) against the reference the strategy passes (its
  LoRA rule's: the whole adapter, ffa's B tensors, or svd's with a per-tenant rank) and
  hands over the **individual** updates, so the server can bound, audit and robustly
  aggregate them;
* ``fedlora.server.secagg.SecAggTransport`` runs SecAgg+'s key stages before the upload, and the
  unmasking after it, and hands over only the **sum** (all secure aggregation reveals).

Either way the strategy gets the same :class:`~fedlora.server.aggregation.WeightedSum` to apply.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.common import messages as keys
from fedlora.common.adapter import from_arrayrecord
from fedlora.server.aggregation import Arrays, Rejected, Update, WeightedSum, validate_update
from fedlora.server.identity import TenantRoster


class RoundFailed(RuntimeError):
    """A round that could not aggregate, where the configuration says to stop."""


class TenantsDeclined(RoundFailed):
    """Every tenant of a round declined under its own policy: later rounds of the same run
    config would be declined again, so the run stops."""


POLICY_DECLINE = "declined by the tenant: policy: "


@dataclass
class Collected:
    """What one round's replies yielded."""

    updates: list[Update] | None = None   # individual validated updates (plain transport)
    total: WeightedSum | None = None      # the sum only (secure aggregation)
    metrics: dict[int, dict] = field(default_factory=dict)   # node -> public training metrics
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (node, reason)
    bytes_down: int = 0
    bytes_up: int = 0
    failure: str | None = None            # why the round produced no aggregate, if it failed
    report: dict | None = None            # the transport's own record (secure aggregation summary)


def sender(sent: list[Message], reply: Message) -> int:
    """The node a reply answers for. An error reply made by the SuperLink (e.g. "Node
    Unavailable" for a dead tenant) carries the SuperLink as its source, so the reply is
    matched to the message it answers instead."""
    for msg in sent:
        if msg.metadata.message_id and msg.metadata.message_id == reply.metadata.reply_to_message_id:
            return msg.metadata.dst_node_id
    return reply.metadata.src_node_id


def array_bytes(content: RecordDict) -> int:
    return sum(rec.count_bytes() for rec in content.array_records.values())


class Transport:
    """The interface: build a round's training messages, collect its replies."""

    name = "base"
    reveals_individual_updates = True
    roster: TenantRoster | None = None  # set by the strategy: which tenant each node is

    def configure(self, server_round: int, nodes: list[int], arrays: ArrayRecord, config: ConfigRecord,
                  grid: Grid) -> tuple[list[Message], int]:
        """The messages Flower sends for training, and the bytes sent before them."""
        raise NotImplementedError

    def collect(self, server_round: int, replies: Iterable[Message], *, reference: Arrays) -> Collected:
        raise NotImplementedError

    def summary(self) -> str:
        return self.name


def error_reason(error) -> str:
    """A tenant's error reply as a drop reason: a decline (its budget or its own policy) says so."""
    if error.code == keys.POLICY_DECLINED:
        return POLICY_DECLINE + error.reason.removeprefix("policy: ")
    if error.code == keys.DECLINED:
        return f"declined by the tenant: {error.reason}"
    return f"client error: {error.reason}"


class PlainTransport(Transport):
    """The global adapter out, each tenant's validated delta back."""

    name = "plain"

    def __init__(self, *, max_examples: int, weight_of, check_shapes=None, encoding=None) -> None:
        self.max_examples = max_examples
        self.weight_of = weight_of  # claimed example count -> weight (fedlora.server.aggregation.Weighting)
        self.check_shapes = check_shapes  # the LoRA rule's shape check (None: the reference's shapes exactly)
        self.encoding = encoding  # the run's delta encoding (fedlora.common.encoding), decoded strictly; None: plain fp32
        self._sent: list[Message] = []

    def configure(self, server_round, nodes, arrays, config, grid):
        content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: config})
        self._sent = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]
        return self._sent, 0

    def collect(self, server_round, replies, *, reference):
        out = Collected(updates=[])
        # by node, not by arrival (float32 sums depend on their order; a node's first tenant claim binds it)
        for node, msg in sorted(((sender(self._sent, m), m) for m in replies), key=lambda nm: nm[0]):
            try:
                if msg.has_error():
                    raise Rejected(error_reason(msg.error))
                content = msg.content
                out.bytes_up += array_bytes(content)
                if keys.ARRAYS not in content.array_records or keys.METRICS not in content.metric_records:
                    raise Rejected(f"reply lacks '{keys.ARRAYS}' or '{keys.METRICS}' record")
                update = validate_update(
                    self._decode(content.array_records[keys.ARRAYS]), dict(content.metric_records[keys.METRICS]),
                    reference=reference, expected_metrics=keys.TRAIN_METRICS, max_examples=self.max_examples,
                    weight_of=self.weight_of, node=node, check_shapes=self.check_shapes)
                if self.roster is not None:
                    self.roster.tenant_of(node, update.metrics[keys.TENANT])
            except Rejected as why:
                out.dropped.append((node, str(why)))
                continue
            out.updates.append(update)
            out.metrics[node] = update.metrics
        return out

    def _decode(self, record) -> Arrays:
        """A reply's tensors as float32; a record not in the run's encoding is :class:`Rejected`."""
        if self.encoding is None:
            return from_arrayrecord(record)
        from fedlora.common.encoding import EncodingError, decode

        try:
            return decode(record, self.encoding)
        except EncodingError as why:
            raise Rejected(str(why)) from None
