"""The fedlora strategy: LoRA-delta FedAvg on Flower's Message API.

Differences from Flower's stock FedAvg, each for a reason:

* clients send **deltas** (local - global), and only LoRA tensors;
* every reply is validated before it counts (finite values, exact tensor names, shapes
  and dtypes, example count in range, exact metric keys); a bad reply is dropped with
  the tenant and the reason, and the round goes on with the rest;
* aggregation goes through a weighted **sum** (see ``server.aggregation``), with each
  tenant's weight capped;
* sampling waits for the minimum number of tenants only up to the round timeout, so a
  lost tenant never hangs a run;
* each round's global adapter is checkpointed atomically and its metrics and bytes on
  the wire are recorded (``server.records``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common import messages as keys
from common.adapter import from_arrayrecord, to_arrayrecord
from common.config import FederationConfig
from server.aggregation import Aggregator, Rejected, Update, validate_update, weighted_sum
from server.central_dp import NoServerPrivacy, ServerPrivacy
from server.records import RoundRecorder


class NotEnoughTenants(RuntimeError):
    """Fewer tenants connected than the minimum, for longer than the round timeout."""


def sample_nodes(grid: Grid, *, fraction: float, minimum: int, timeout: float,
                 rng: random.Random, poll: float = 1.0) -> tuple[list[int], int]:
    """Sample ``max(fraction * connected, minimum)`` nodes, waiting at most ``timeout`` s
    for ``minimum`` to connect. Returns (sampled ids, connected count)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            break
        if time.monotonic() > deadline:
            raise NotEnoughTenants(f"only {len(nodes)} tenant(s) connected after {timeout:.0f}s; "
                                   f"federation.min-train-nodes is {minimum}")
        log(INFO, "Waiting for tenants: %d connected, %d needed", len(nodes), minimum)
        time.sleep(poll)
    size = min(len(nodes), max(int(round(fraction * len(nodes))), minimum))
    return sorted(rng.sample(nodes, size)), len(nodes)


def _array_bytes(msg: Message) -> int:
    return sum(rec.count_bytes() for rec in msg.content.array_records.values()) if msg.has_content() else 0


class FedLoraStrategy(Strategy):
    """LoRA-delta FedAvg with validation, capped weights, bounded sampling and recording."""

    def __init__(self, cfg: FederationConfig, aggregator: Aggregator, recorder: RoundRecorder, *,
                 seed: int = 0, privacy: ServerPrivacy | None = None) -> None:
        self.cfg = cfg
        self.aggregator = aggregator
        self.recorder = recorder
        self.rng = random.Random(seed)
        self.seed = seed
        self._global: dict | None = None
        self._sent: list[Message] = []  # this stage's messages, to match replies to nodes
        self.privacy = NoServerPrivacy() if privacy is None else privacy  # central DP, or nothing
        self._sampled = self._connected = 0

    def summary(self) -> None:
        log(INFO, "\t├── Aggregator: %s (server lr %.3g)", self.aggregator.name, self.aggregator.server_lr)
        log(INFO, "\t├── Sampling: fraction %.2f, minimum %d", self.cfg.fraction_train, self.cfg.min_train_nodes)
        log(INFO, "\t└── Weight cap %d examples; round timeout %.0fs", self.cfg.max_weight, self.cfg.round_timeout)

    def _messages(self, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int],
                  message_type: str, server_round: int) -> list[Message]:
        config = ConfigRecord({**dict(config), keys.ROUND: server_round, keys.SEED: self.seed})
        content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: config})
        self._sent = [Message(content=content, message_type=message_type, dst_node_id=n) for n in node_ids]
        return self._sent

    def _sender(self, reply: Message) -> int:
        """The node a reply answers for. An error reply made by the SuperLink (e.g. "Node
        Unavailable" for a dead tenant) carries the SuperLink as its source, so the reply
        is matched to the message it answers instead."""
        for sent in self._sent:
            if sent.metadata.message_id and sent.metadata.message_id == reply.metadata.reply_to_message_id:
                return sent.metadata.dst_node_id
        return reply.metadata.src_node_id

    # -- training -----------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = from_arrayrecord(arrays)
        nodes, connected = sample_nodes(grid, fraction=self.cfg.fraction_train,
                                        minimum=self.cfg.min_train_nodes,
                                        timeout=self.cfg.round_timeout, rng=self.rng)
        self.recorder.start_round(server_round, sampled=nodes, connected=connected)
        self._sampled, self._connected = len(nodes), connected
        msgs = self._messages(arrays, config, nodes, MessageType.TRAIN, server_round)
        self.recorder.add_bytes(down=arrays.count_bytes() * len(msgs))
        log(INFO, "Round %d: %d of %d tenants sampled", server_round, len(nodes), connected)
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self._global is not None
        updates: list[Update] = []
        for msg in replies:
            node = self._sender(msg)
            self.recorder.add_bytes(up=_array_bytes(msg))
            try:
                if msg.has_error():
                    raise Rejected(f"client error: {msg.error.reason}")
                content = msg.content
                if keys.ARRAYS not in content.array_records or keys.METRICS not in content.metric_records:
                    raise Rejected(f"reply lacks '{keys.ARRAYS}' or '{keys.METRICS}' record")
                update = validate_update(
                    from_arrayrecord(content.array_records[keys.ARRAYS]),
                    dict(content.metric_records[keys.METRICS]),
                    reference=self._global, expected_metrics=keys.TRAIN_METRICS,
                    max_examples=self.cfg.max_examples, max_weight=self.cfg.max_weight)
            except Rejected as why:
                log(WARNING, "Round %d: reply from node %d dropped: %s", server_round, node, why)
                self.recorder.drop(node, str(why))
                continue
            updates.append(update)
            self.recorder.train_reply(node, update)
        if not updates:
            log(WARNING, "Round %d: no valid update; the global adapter stays as it was", server_round)
            self.recorder.end_train(None)
            return None, None
        summed = self.privacy.on_server_aggregate(weighted_sum(updates), received=len(updates),
                                                  sampled=self._sampled, connected=self._connected)
        self.recorder.privacy(self.privacy.round_report())
        new_global = self.aggregator.apply(self._global, summed)
        self._global = new_global
        self.recorder.end_train(new_global)
        return to_arrayrecord(new_global), MetricRecord(_weighted_metrics(
            [(u.weight, u.metrics) for u in updates], exclude=(keys.TENANT,)))

    # -- evaluation ---------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.cfg.fraction_evaluate == 0.0:
            return []
        nodes, _ = sample_nodes(grid, fraction=self.cfg.fraction_evaluate, minimum=1,
                                timeout=self.cfg.round_timeout, rng=self.rng)
        msgs = self._messages(arrays, config, nodes, MessageType.EVALUATE, server_round)
        self.recorder.add_bytes(down=arrays.count_bytes() * len(msgs))
        return msgs

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        results = []
        for msg in replies:
            node = self._sender(msg)
            if msg.has_error() or keys.METRICS not in msg.content.metric_records:
                reason = msg.error.reason if msg.has_error() else "reply lacks metrics"
                log(WARNING, "Round %d: evaluation from node %d dropped: %s", server_round, node, reason)
                self.recorder.drop(node, f"evaluation: {reason}")
                continue
            metrics = dict(msg.content.metric_records[keys.METRICS])
            if set(metrics) != keys.EVAL_METRICS:
                self.recorder.drop(node, f"evaluation: metric keys {sorted(metrics)} differ from the protocol")
                continue
            results.append((float(metrics[keys.NUM_EXAMPLES]), metrics))
            self.recorder.eval_reply(node, metrics)
        self.recorder.end_round()
        if not results:
            return None
        return MetricRecord(_weighted_metrics(results, exclude=(keys.TENANT,)))


def _weighted_metrics(items: list[tuple[float, dict]], *, exclude: tuple[str, ...]) -> dict[str, float]:
    total = sum(w for w, _ in items)
    names = [k for k in items[0][1] if k not in exclude and k != keys.NUM_EXAMPLES]
    out = {k: sum(w * float(m[k]) for w, m in items) / total for k in names}
    out[keys.NUM_EXAMPLES] = int(sum(m[keys.NUM_EXAMPLES] for _, m in items))
    return out
