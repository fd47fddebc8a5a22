"""Secure aggregation, server side: SecAgg+ driven through Flower's Grid.

One training round is four message exchanges (``common.secagg_wire``): setup (public
keys), key sharing (encrypted Shamir shares, relayed), masked upload (each tenant trains
and sends its masked vector) and unmasking (shares of the finishers' self-mask seeds and
of the dropped tenants' mask keys). Dropout, stage by stage:

* lost in setup or key sharing: the round restarts **once** with the survivors (nothing
  was uploaded yet, so nothing counts twice); lost again: the round fails;
* lost in the masked upload: the tenant's pairwise masks are removed with its mask key,
  rebuilt from its neighbours' shares;
* lost in unmasking: the others' shares suffice while each secret keeps its threshold.

A round that cannot be unmasked fails loudly with the reason; the global adapter stays
as it was and the run goes on or stops (``secagg.on-failure``). Every stage has a
timeout. The result is the same :class:`~server.aggregation.WeightedSum` the plain path
builds, so :meth:`Aggregator.apply` is unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from typing import Callable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import messages as keys
from common import secagg_crypto as crypto
from common import secagg_wire as wire
from common.adapter import from_arrayrecord, to_arrayrecord
from common.config import ConfigError, FederationConfig, SecAggConfig
from common.secagg import Quantizer, mask_sign, neighbour_graph, prg_mask, quantizer_for, threshold, unpack
from server.aggregation import Aggregator, WeightedSum
from server.records import RoundRecorder
from server.strategy import FedLoraStrategy, sample_nodes


class SecAggFailed(RuntimeError):
    """A secure round that could not be completed (with ``secagg.on-failure = stop``)."""


class _RoundFailed(Exception):
    pass


class _Restart(Exception):
    pass


@dataclass
class SecAggOutcome:
    """What one secure round produced: the sum (or why not) and who dropped where."""

    result: WeightedSum | None = None
    metrics: dict[int, dict] = field(default_factory=dict)          # finisher -> train metrics
    dropped: dict[str, list[dict]] = field(default_factory=lambda: {s: [] for s in wire.STAGE_NAMES.values()})
    attempts: int = 0
    failure: str | None = None
    bytes_down: int = 0
    bytes_up: int = 0

    def summary(self) -> dict:
        return {"enabled": True, "attempts": self.attempts, "finished": len(self.metrics),
                "dropped_per_stage": {s: len(d) for s, d in self.dropped.items()},
                "failure": self.failure}


class SecureRound:
    """Runs the four stages of one round over ``grid``."""

    def __init__(self, grid: Grid, scfg: SecAggConfig, q: Quantizer, *, train_timeout: float, seed: int) -> None:
        self.grid, self.scfg, self.q = grid, scfg, q
        self.train_timeout, self.seed = train_timeout, seed

    def run(self, server_round: int, nodes: list[int], arrays: ArrayRecord, train_config: ConfigRecord,
            shapes: Mapping[str, tuple[int, ...]]) -> SecAggOutcome:
        out = SecAggOutcome()
        members = sorted(nodes)
        for attempt in (1, 2):
            out.attempts = attempt
            try:
                self._attempt(out, server_round, attempt, members, arrays, train_config, shapes)
                return out
            except _Restart:
                lost = {d["node"] for ds in out.dropped.values() for d in ds}
                members = [n for n in members if n not in lost]
                log(WARNING, "Round %d: tenant(s) lost before masking; restarting once with %d survivor(s)",
                    server_round, len(members))
            except _RoundFailed as why:
                out.failure, out.metrics = str(why), {}
                return out
        out.failure, out.metrics = "tenants were lost before masking again after the restart", {}
        return out

    # -- one attempt ----------------------------------------------------------------
    def _attempt(self, out: SecAggOutcome, rnd: int, attempt: int, members: list[int], arrays: ArrayRecord,
                 train_config: ConfigRecord, shapes: Mapping[str, tuple[int, ...]]) -> None:
        if len(members) < 2:
            raise _RoundFailed(f"{len(members)} tenant(s) left; secure aggregation needs at least 2")
        if len(members) > self.q.capacity():
            raise _RoundFailed(f"{len(members)} tenants overflow the modulus (at most {self.q.capacity()}); "
                               "raise secagg.modulus-bits or lower secagg.quantization-bits")
        graph = neighbour_graph(members, self.scfg.neighbours, seed=_graph_seed(self.seed, rnd, attempt))
        holders = {u: sorted([*graph[u], u]) for u in members}
        thr = {u: threshold(len(holders[u]), self.scfg.threshold) for u in members}
        restartable = attempt == 1

        # 1. setup: fresh public keys
        replies = self._exchange(out, wire.SETUP, {
            u: wire.setup_request(rnd, attempt, graph[u], thr[u]) for u in members}, wire.read_setup_reply)
        self._after_key_stage(out, replies, members, restartable)
        # 2. key sharing: relay the neighbourhood's public keys, collect encrypted shares
        replies_sh = self._exchange(out, wire.SHARE, {
            u: wire.share_request(rnd, attempt, {v: replies[v] for v in holders[u]}) for u in members},
            wire.read_share_reply)
        for u, cts in list(replies_sh.items()):
            if set(cts) != set(graph[u]):
                del replies_sh[u]
                self._drop(out, wire.SHARE, u, f"shares addressed to {sorted(cts)}, not its neighbours")
        self._after_key_stage(out, replies_sh, members, restartable)
        pk_s = {u: replies[u][1] for u in members}
        # 3. masked upload: each tenant trains and sends its masked vector
        size = sum(int(np.prod(s)) for s in shapes.values()) + 1
        requests = {}
        for u in members:
            content = wire.upload_request(rnd, attempt, {v: replies_sh[v][u] for v in graph[u]})
            content[keys.ARRAYS] = arrays
            content[keys.CONFIG] = train_config
            requests[u] = content
        uploads = self._exchange(out, wire.UPLOAD, requests, lambda c: (
            wire.read_upload_array(c, size=size, dtype=self.q.dtype), _secure_metrics(c)),
            timeout=self.train_timeout)
        active = sorted(uploads)
        dead = sorted(set(members) - set(active))
        self._check_thresholds(active, dead, holders, thr, "before unmasking")
        # 4. unmasking
        shares = self._exchange(out, wire.UNMASK, {
            u: wire.unmask_request(rnd, attempt, [v for v in holders[u] if v in uploads],
                                   [v for v in holders[u] if v not in uploads]) for u in active},
            wire.read_unmask_reply)
        for u, got in list(shares.items()):
            if set(got) != set(holders[u]):
                del shares[u]
                self._drop(out, wire.UNMASK, u, "shares for nodes outside its neighbourhood")
        self._check_thresholds(list(shares), dead, holders, thr, "after unmasking",
                               owners=active)
        try:
            total = self._unmask({u: uploads[u][0] for u in active}, shares, dead, graph, holders, thr, pk_s)
        except ValueError as why:  # shares that do not combine into a seed or a key
            raise _RoundFailed(f"unmasking failed, a share was corrupted: {why}") from None
        n = len(active)
        top, weight_sum = int(total[:-1].max(initial=0)), int(total[-1])
        if top > n * (2**self.q.bits - 1) or not n <= weight_sum <= n * self.q.max_weight:
            raise _RoundFailed("unmasked sum out of range: a share or a masked vector was corrupted")
        summed, weight = unpack(total, n, shapes, self.q)
        out.result = WeightedSum(summed, weight, len(active))
        out.metrics = {u: uploads[u][1] for u in active}

    def _exchange(self, out: SecAggOutcome, stage: str, contents: dict[int, RecordDict],
                  parse: Callable, *, timeout: float | None = None) -> dict:
        """Send one stage; return {node: parsed reply}; drop the silent, the failed, the malformed."""
        timeout = self.scfg.stage_timeout if timeout is None else timeout
        msgs = [Message(content=c, message_type=wire.message_type(stage), dst_node_id=n)
                for n, c in contents.items()]
        out.bytes_down += sum(wire.content_bytes(c) for c in contents.values())
        got: dict = {}
        for msg in self.grid.send_and_receive(msgs, timeout=timeout):
            node = msg.metadata.src_node_id
            if node not in contents or node in got:
                continue
            if msg.has_error():
                self._drop(out, stage, node, f"client error: {msg.error.reason}")
                continue
            out.bytes_up += wire.content_bytes(msg.content)
            try:
                got[node] = parse(msg.content)
            except (ValueError, KeyError, TypeError) as why:
                self._drop(out, stage, node, f"malformed reply: {why}")
        known = {d["node"] for d in out.dropped[wire.STAGE_NAMES[stage]]}
        for node in contents:
            if node not in got and node not in known:
                self._drop(out, stage, node, f"no reply within {timeout:.0f}s")
        return got

    @staticmethod
    def _drop(out: SecAggOutcome, stage: str, node: int, reason: str) -> None:
        name = wire.STAGE_NAMES[stage]
        log(WARNING, "Secure aggregation: node %d dropped in %s: %s", node, name, reason)
        out.dropped[name].append({"node": node, "reason": f"{name}: {reason}"})

    @staticmethod
    def _after_key_stage(out: SecAggOutcome, replies: dict, members: list[int], restartable: bool) -> None:
        lost = sorted(set(members) - set(replies))
        if lost:
            if restartable:
                raise _Restart()
            raise _RoundFailed(f"node(s) {lost} lost before masking again after the restart")

    @staticmethod
    def _check_thresholds(responders: list[int], dead: list[int], holders: dict[int, list[int]],
                          thr: dict[int, int], when: str, owners: list[int] | None = None) -> None:
        present = set(responders)
        for u in (owners if owners is not None else responders) + dead:
            have = len(present & set(holders[u]))
            if have < thr[u]:
                raise _RoundFailed(f"{when}: only {have} of node {u}'s share holders left, below the "
                                   f"reconstruction threshold {thr[u]}")

    def _unmask(self, vectors: dict[int, np.ndarray], shares: dict[int, dict[int, bytes]], dead: list[int],
                graph: dict[int, list[int]], holders: dict[int, list[int]], thr: dict[int, int],
                pk_s: dict[int, bytes]) -> np.ndarray:
        total = np.zeros_like(next(iter(vectors.values())))
        for vec in vectors.values():
            total += vec
        n = total.size
        for u in vectors:
            b = crypto.combine([shares[r][u] for r in holders[u] if r in shares][:thr[u]])
            total -= prg_mask(b, n, self.q)
        for d in dead:
            sk = crypto.load_private(crypto.combine([shares[r][d] for r in holders[d] if r in shares][:thr[d]]))
            for u in graph[d]:
                if u in vectors:  # u added sign(u, d) * mask(u, d); take it out
                    mask = prg_mask(crypto.mask_seed(sk, pk_s[u]), n, self.q)
                    total = total - mask if mask_sign(u, d) > 0 else total + mask
        return self.q.reduce(total)


def _graph_seed(seed: int, server_round: int, attempt: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{server_round}/{attempt}".encode()).digest()[:8], "big")


def _secure_metrics(content: RecordDict) -> dict:
    if keys.METRICS not in content.metric_records:
        raise ValueError(f"reply lacks '{keys.METRICS}'")
    m = dict(content.metric_records[keys.METRICS])
    if set(m) != keys.SECAGG_TRAIN_METRICS:
        raise ValueError(f"metric keys {sorted(m)} differ from the secure protocol")
    if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in m.values()):
        raise ValueError("a metric is not a finite number")
    return m


class SecAggStrategy(FedLoraStrategy):
    """FedLoraStrategy whose training stage is a secure round; evaluation is unchanged."""

    def __init__(self, cfg: FederationConfig, aggregator: Aggregator, recorder: RoundRecorder, *,
                 secagg: SecAggConfig, seed: int = 0, **options) -> None:
        if aggregator.needs_individual_updates:
            raise ConfigError([f"federation.aggregator: {aggregator.name!r} needs individual updates, but secure "
                               "aggregation reveals only their sum; use fedavg or set secagg.enabled = false"])
        super().__init__(cfg, aggregator, recorder, seed=seed, **options)
        self.secagg = secagg
        self.quantizer = quantizer_for(secagg, cfg)
        self._outcome: SecAggOutcome | None = None

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└── Secure aggregation (SecAgg+): neighbours %s, threshold > %.2f, clip %g, "
            "%d bits mod 2^%d",
            self.secagg.neighbours or "all", self.secagg.threshold, self.secagg.clip,
            self.secagg.quantization_bits, self.secagg.modulus_bits)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = from_arrayrecord(arrays)
        nodes, connected = sample_nodes(grid, fraction=self.cfg.fraction_train, minimum=self.cfg.min_train_nodes,
                                        timeout=self.cfg.round_timeout, rng=self.rng)
        self.recorder.start_round(server_round, sampled=nodes, connected=connected)
        self._sampled, self._connected = len(nodes), connected
        log(INFO, "Round %d: %d of %d tenants sampled for a secure round", server_round, len(nodes), connected)
        train_config = ConfigRecord({**dict(config), keys.ROUND: server_round, keys.SEED: self.seed})
        shapes = {k: v.shape for k, v in self._global.items()}
        self._outcome = SecureRound(grid, self.secagg, self.quantizer, train_timeout=self.cfg.round_timeout,
                                    seed=self.seed).run(server_round, nodes, arrays, train_config, shapes)
        return []  # every message of the round has been exchanged already

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        out, self._outcome = self._outcome, None
        assert out is not None and self._global is not None
        self.recorder.add_bytes(down=out.bytes_down, up=out.bytes_up)
        for stage_drops in out.dropped.values():
            for d in stage_drops:
                self.recorder.drop(d["node"], d["reason"])
        for node, metrics in out.metrics.items():
            self.recorder.secure_reply(node, metrics)
        self.recorder.secagg(out.summary())
        if out.result is None:
            log(ERROR, "Round %d: secure aggregation failed: %s; the global adapter stays as it was",
                server_round, out.failure)
            self.recorder.end_train(None)
            if self.secagg.on_failure == "stop":
                self.recorder.end_round()
                raise SecAggFailed(f"round {server_round}: {out.failure} (secagg.on-failure = stop)")
            return None, None
        log(INFO, "Round %d: securely aggregated %d tenant(s), total weight %g", server_round,
            out.result.count, out.result.weight)
        summed = self.privacy.on_server_aggregate(out.result, received=out.result.count, sampled=self._sampled,
                                                  connected=self._connected)
        self.recorder.privacy(self.privacy.round_report())
        new_global = self.aggregator.apply(self._global, summed)
        self._global = new_global
        self.recorder.end_train(new_global)
        names = sorted(keys.SECAGG_TRAIN_METRICS - {keys.TENANT})
        metrics = {k: float(np.mean([m[k] for m in out.metrics.values()])) for k in names}
        metrics[keys.NUM_EXAMPLES] = int(out.result.weight)  # the total weight, all the server learns
        return to_arrayrecord(new_global), MetricRecord(metrics)


def make_strategy(cfg: FederationConfig, aggregator: Aggregator, recorder: RoundRecorder, *,
                  secagg: SecAggConfig, seed: int, **options) -> FedLoraStrategy:
    """The plain strategy, or the secure one when ``secagg.enabled`` (``options`` go to both)."""
    if secagg.enabled:
        return SecAggStrategy(cfg, aggregator, recorder, secagg=secagg, seed=seed, **options)
    return FedLoraStrategy(cfg, aggregator, recorder, seed=seed, **options)
