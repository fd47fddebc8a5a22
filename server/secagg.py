"""Secure aggregation, server side: SecAgg+ driven through Flower's Grid.

One training round is four message exchanges (``fedlora.common.secagg_wire``): setup (public
keys), key sharing (encrypted Shamir shares, relayed), masked upload (each tenant trains
and sends its masked vector) and unmasking (shares of the finishers' self-mask seeds and
of the dropped tenants' mask keys). In an authenticated round (the tenants sign their keys,
``fedlora.common.secagg_identity``) a consistency stage comes before the unmasking: each survivor
signs the set of nodes that uploaded, and the unmask request carries those signatures, without
which a tenant with a roster reveals nothing. Dropout, stage by stage:

* lost in setup or key sharing: the round restarts **once** with the survivors (nothing
  was uploaded yet, so nothing counts twice); lost again: the round fails;
* lost in the masked upload: the tenant's pairwise masks are removed with its mask key,
  rebuilt from its neighbours' shares;
* lost in unmasking: the others' shares suffice while each secret keeps its threshold.

A round that cannot be unmasked fails loudly with the reason; the global adapter stays
as it was and the run goes on or stops (``secagg.on-failure``). Every stage has a
timeout. :class:`SecAggTransport` is the strategy's transport: the key stages run before
the upload (``configure``), the unmasking after it (``collect``), and the result is the
same :class:`~fedlora.server.aggregation.WeightedSum` the plain transport leads to.

What bounds a malicious tenant here: the server never sees an individual update, so no
L2-norm bound can hold. Each element of the masked vector decodes to a value in
``[-secagg.clip, +secagg.clip]`` of ``(w / max-weight) * delta`` (the quantization range),
and the weight to ``[1, max-weight]``; nothing else is enforced by the server.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log

from fedlora.common import messages as keys
from fedlora.common import secagg_crypto as crypto
from fedlora.common import secagg_wire as wire
from fedlora.common.adapter import from_arrayrecord
from fedlora.common.config import SecAggConfig
from fedlora.common.secagg import Quantizer, mask_sign, neighbour_graph, prg_mask, threshold, unpack
from fedlora.server.aggregation import Rejected, WeightedSum, check_metric_values
from fedlora.server.secagg_recover import Unrecoverable, recover
from fedlora.server.transport import Collected, RoundFailed, Transport, error_reason, sender


SecAggFailed = RoundFailed  # a secure round that could not be completed (secagg.on-failure = stop)


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
    culprits: dict[int, str] = field(default_factory=dict)  # node -> whose secret its share failed to rebuild
    authenticated: bool = False  # the tenants signed their keys (and the survivor set)

    def summary(self) -> dict:
        stages = {s: len(d) for s, d in self.dropped.items()
                  if self.authenticated or s != wire.STAGE_NAMES[wire.CONSISTENCY]}
        out = {"enabled": True, "authenticated": self.authenticated, "attempts": self.attempts,
               "finished": len(self.metrics), "dropped_per_stage": stages, "failure": self.failure}
        if self.culprits:  # identifiable abort: named in the round's record, excluded from later rounds
            out["inconsistent_shares"] = {str(n): why for n, why in sorted(self.culprits.items())}
        return out


@dataclass
class _Round:
    """One attempt's state between the key stages and the unmasking."""

    number: int
    attempt: int
    members: list[int]
    graph: dict[int, list[int]]
    holders: dict[int, list[int]]
    thr: dict[int, int]
    pk_s: dict[int, bytes]
    shapes: dict[str, tuple[int, ...]]
    q: Quantizer                  # sized for this attempt's members (Quantizer.for_tenants)
    signed: bool = False          # the tenants signed their keys: run the consistency stage
    commitments: dict[int, bytes] = field(default_factory=dict)  # node -> its self-mask seed's commitment
    ciphertexts: dict[int, dict[int, bytes]] = field(default_factory=dict)  # u -> {v: share for u}
    sent: list[Message] = field(default_factory=list)


class SecAggTransport(Transport):
    """SecAgg+ as the strategy's transport: setup and key sharing before the upload, unmasking after."""

    name = "secagg+"
    reveals_individual_updates = False

    def __init__(self, scfg: SecAggConfig, q: Quantizer, *, seed: int) -> None:
        self.scfg, self.q, self.seed = scfg, q, seed
        self._round: _Round | None = None
        self._out: SecAggOutcome | None = None
        self.excluded: set[int] = set()  # nodes whose shares were inconsistent: never sampled again
        self._configured_bytes = 0

    def summary(self) -> str:
        sizing = (f"{self.q.bits} bits mod 2^{self.q.modulus_bits}" if not self.q.centred else
                  f"{self.q.encoding}: {self.q.bits} bits mod 2^{self.q.modulus_bits} ({np.dtype(self.q.dtype).name}) "
                  "for 2 tenants, sized per round")
        return (f"SecAgg+ (neighbours {self.scfg.neighbours or 'all'}, threshold > {self.scfg.threshold:.2f}, "
                f"clip {self.scfg.clip:g}, {sizing})")

    # -- before the upload --------------------------------------------------------
    def configure(self, server_round, nodes, arrays, config, grid):
        self.grid = grid
        out = self._out = SecAggOutcome()
        shapes = {k: v.shape for k, v in from_arrayrecord(arrays).items()}
        for u in sorted(set(nodes) & self.excluded):
            self._drop(out, wire.SETUP, u, "excluded: its shares were inconsistent in an earlier round")
        members = sorted(set(nodes) - self.excluded)
        msgs = self._configure(out, server_round, members, arrays, config, shapes)
        self._configured_bytes = out.bytes_down
        return msgs, out.bytes_down

    def _configure(self, out: SecAggOutcome, server_round: int, members: list[int], arrays: ArrayRecord,
                   config: ConfigRecord, shapes: dict[str, tuple[int, ...]]) -> list[Message]:
        for attempt in (1, 2):
            out.attempts = attempt
            try:
                self._round = self._keys(out, server_round, attempt, members, shapes)
                return self._upload_messages(self._round, arrays, config)
            except _Restart:
                lost = {d["node"] for ds in out.dropped.values() for d in ds}
                members = [n for n in members if n not in lost]
                log(WARNING, "Round %d: tenant(s) lost before masking; restarting once with %d survivor(s)",
                    server_round, len(members))
            except _RoundFailed as why:
                out.failure = str(why)
                return []
        out.failure = "tenants were lost before masking again after the restart"
        return []

    def _keys(self, out: SecAggOutcome, rnd: int, attempt: int, members: list[int],
              shapes: dict[str, tuple[int, ...]]) -> _Round:
        if len(members) < 2:
            raise _RoundFailed(f"{len(members)} tenant(s) left; secure aggregation needs at least 2")
        try:
            q = self.q.for_tenants(len(members))
        except ValueError as why:
            raise _RoundFailed(str(why)) from None
        if len(members) > q.capacity():
            raise _RoundFailed(f"{len(members)} tenants overflow the modulus (at most {q.capacity()}); "
                               "raise secagg.modulus-bits or lower secagg.quantization-bits")
        graph = neighbour_graph(members, self.scfg.neighbours, seed=_graph_seed(self.seed, rnd, attempt))
        holders = {u: sorted([*graph[u], u]) for u in members}
        thr = {u: threshold(len(holders[u]), self.scfg.threshold) for u in members}
        restartable = attempt == 1
        # 1. setup: fresh public keys
        replies = self._exchange(out, wire.SETUP, {
            u: wire.setup_request(rnd, attempt, graph[u], thr[u]) for u in members}, wire.read_setup_reply)
        self._after_key_stage(out, replies, members, restartable)
        out.authenticated = any(replies[u][2] for u in members)
        # 2. key sharing: relay the neighbourhood's public keys, collect encrypted shares
        shares = self._exchange(out, wire.SHARE, {
            u: wire.share_request(rnd, attempt, {v: replies[v] for v in holders[u]}) for u in members},
            wire.read_share_reply)
        for u, cts in list(shares.items()):
            if set(cts) != set(graph[u]):
                del shares[u]
                self._drop(out, wire.SHARE, u, f"shares addressed to {sorted(cts)}, not its neighbours")
        self._after_key_stage(out, shares, members, restartable)
        return _Round(rnd, attempt, members, graph, holders, thr, {u: replies[u][1] for u in members}, shapes, q,
                      signed=out.authenticated, commitments={u: replies[u][3] for u in members},
                      ciphertexts={u: {v: shares[v][u] for v in graph[u]} for u in members})

    def _upload_messages(self, st: _Round, arrays: ArrayRecord, config: ConfigRecord) -> list[Message]:
        """3. masked upload: each tenant trains and sends its masked vector (Flower sends these)."""
        msgs = []
        for u in st.members:
            content = wire.upload_request(st.number, st.attempt, st.ciphertexts[u], tenants=len(st.members))
            self._out.bytes_down += wire.content_bytes(content)
            content[keys.ARRAYS] = arrays
            content[keys.CONFIG] = config
            msgs.append(Message(content=content, message_type=wire.message_type(wire.UPLOAD), dst_node_id=u))
        st.sent = msgs
        return msgs

    # -- after the upload ---------------------------------------------------------
    def collect(self, server_round, replies, *, reference):
        out, st = self._out, self._round
        self._out = self._round = None
        assert out is not None
        if st is not None and out.failure is None:
            try:
                self._finish(out, st, replies)
            except _RoundFailed as why:
                out.failure, out.metrics = str(why), {}
        got = Collected(total=out.result, metrics=out.metrics, bytes_up=out.bytes_up, failure=out.failure,
                        bytes_down=out.bytes_down - self._configured_bytes,  # the unmasking stage's
                        dropped=[(d["node"], d["reason"]) for ds in out.dropped.values() for d in ds],
                        report=out.summary())
        if st is not None and st.q.centred:
            got.report = {**got.report, "quantizer": {"encoding": st.q.encoding, "bits": st.q.bits,
                                                      "modulus_bits": st.q.modulus_bits,
                                                      "wire_dtype": np.dtype(st.q.dtype).name}}
        if out.result is not None:
            log(INFO, "Round %d: securely aggregated %d tenant(s), total weight %g", server_round,
                out.result.count, out.result.weight)
        return got

    def _finish(self, out: SecAggOutcome, st: _Round, replies: Iterable[Message]) -> None:
        size = sum(int(np.prod(s)) for s in st.shapes.values()) + 1
        uploads = self._parse(out, wire.UPLOAD, {m.metadata.dst_node_id for m in st.sent}, replies, lambda c: (
            wire.read_upload_array(c, size=size, dtype=st.q.dtype), _secure_metrics(c)),
            sent=st.sent, timeout=None)
        for node, (_, metrics) in list(uploads.items()):  # a node that claims another tenant drops out here
            try:
                if self.roster is not None:
                    self.roster.tenant_of(node, metrics[keys.TENANT])
            except Rejected as why:
                del uploads[node]
                self._drop(out, wire.UPLOAD, node, str(why))
        active = sorted(uploads)
        dead = sorted(set(st.members) - set(active))
        self._check_thresholds(active, dead, st.holders, st.thr, "before unmasking")
        asked, signatures = active, None
        if st.signed:  # 3b. consistency: each survivor signs the set of nodes that uploaded
            signatures = self._exchange(out, wire.CONSISTENCY, {
                u: wire.consistency_request(st.number, st.attempt, active) for u in active},
                wire.read_consistency_reply)
            asked = sorted(signatures)
            self._check_thresholds(asked, dead, st.holders, st.thr, "after the consistency round", owners=active)

        def request(u: int):
            survivors = {} if signatures is None else {"survivors": active, "signatures": {
                v: signatures[v] for v in st.holders[u] if v in signatures and v != u}}
            return wire.unmask_request(st.number, st.attempt, [v for v in st.holders[u] if v in uploads],
                                       [v for v in st.holders[u] if v not in uploads], **survivors)
        # 4. unmasking
        shares = self._exchange(out, wire.UNMASK, {u: request(u) for u in asked}, wire.read_unmask_reply)
        for u, got in list(shares.items()):
            if set(got) != set(st.holders[u]):
                del shares[u]
                self._drop(out, wire.UNMASK, u, "shares for nodes outside its neighbourhood")
        self._check_thresholds(list(shares), dead, st.holders, st.thr, "after unmasking", owners=active)
        try:
            total = self._unmask(out, {u: uploads[u][0] for u in active}, shares, dead, st)
        except Unrecoverable as why:  # too few consistent shares left to rebuild a seed or a key
            raise _RoundFailed(f"unmasking failed, shares were corrupted: {why}"
                               + (f" (inconsistent: node(s) {sorted(out.culprits)}, excluded from later rounds)"
                                  if out.culprits else "")) from None
        n = len(active)
        top, weight_sum = int(total[:-1].max(initial=0)), int(total[-1])
        if weight_sum != n * st.q.max_weight and st.q.weighting == "uniform":
            raise _RoundFailed(f"unmasked weight total {weight_sum}, not {n}: every tenant weighs 1 under secure "
                               "aggregation, so a tenant forged its weight element (or a share was corrupted)")
        if top > n * st.q.top or not n <= weight_sum <= n * st.q.max_weight:
            raise _RoundFailed("unmasked sum out of range: a share or a masked vector was corrupted")
        summed, weight = unpack(total, n, st.shapes, st.q)
        out.result = WeightedSum(summed, weight, len(active))
        out.metrics = {u: uploads[u][1] for u in active}

    def _exchange(self, out: SecAggOutcome, stage: str, contents: dict[int, RecordDict],
                  parse: Callable, *, timeout: float | None = None) -> dict:
        """Send one stage; return {node: parsed reply}; drop the silent, the failed, the malformed."""
        timeout = self.scfg.stage_timeout if timeout is None else timeout
        msgs = [Message(content=c, message_type=wire.message_type(stage), dst_node_id=n)
                for n, c in contents.items()]
        out.bytes_down += sum(wire.content_bytes(c) for c in contents.values())
        replies = self.grid.send_and_receive(msgs, timeout=timeout)
        return self._parse(out, stage, set(contents), replies, parse, sent=msgs, timeout=timeout)

    def _parse(self, out: SecAggOutcome, stage: str, asked: set[int], replies: Iterable[Message],
               parse: Callable, *, sent: list[Message], timeout: float | None) -> dict:
        got: dict = {}
        for msg in replies:
            node = sender(sent, msg)
            if node not in asked or node in got:
                continue
            if msg.has_error():
                self._drop(out, stage, node, error_reason(msg.error))
                continue
            out.bytes_up += wire.content_bytes(msg.content)
            try:
                got[node] = parse(msg.content)
            except (ValueError, KeyError, TypeError) as why:
                self._drop(out, stage, node, f"malformed reply: {why}")
        known = {d["node"] for d in out.dropped[wire.STAGE_NAMES[stage]]}
        for node in sorted(asked):
            if node not in got and node not in known:
                self._drop(out, stage, node, "no reply" + (f" within {timeout:.0f}s" if timeout else " in time"))
        return got

    @staticmethod
    def _drop(out: SecAggOutcome, stage: str, node: int, reason: str) -> None:
        name = wire.STAGE_NAMES[stage]  # logged once, by the strategy, with the round
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

    def _unmask(self, out: SecAggOutcome, vectors: dict[int, np.ndarray], shares: dict[int, dict[int, bytes]],
                dead: list[int], st: _Round) -> np.ndarray:
        """The unmasked sum. Each secret is rebuilt from shares that agree (``secagg_recover``), checked
        against what its node announced in setup (a seed against its commitment, a mask key against
        its public key); a holder whose share does not agree is named in ``out.culprits`` and
        excluded from later rounds."""
        total = np.zeros_like(next(iter(vectors.values())))
        for vec in vectors.values():
            total += vec
        n, q = total.size, st.q

        def rebuild(node: int, what: str, check=None, *, own_claim: bool = False) -> bytes:
            """``own_claim``: ``check`` is the node's own claim (its seed commitment), so when no
            subset passes it the node lied, and the shares' majority value is taken instead."""
            held = {r: shares[r][node] for r in st.holders[node] if r in shares}
            try:
                secret, bad = recover(held, st.thr[node], check=check, what=f"node {node}'s {what}")
            except Unrecoverable:
                if not own_claim:
                    raise
                secret, bad = recover(held, st.thr[node], what=f"node {node}'s {what}")  # majority of the shares
                out.culprits.setdefault(node, "its self-mask seed does not match the commitment it sent in setup")
                self.excluded.add(node)
            for r in bad:
                out.culprits.setdefault(r, f"its share of node {node}'s {what} is inconsistent with the others'")
            self.excluded.update(bad)
            return secret

        for u in vectors:
            commitment = st.commitments.get(u, b"")
            check = (lambda s, c=commitment: crypto.seed_commitment(s) == c) if commitment else None
            total -= prg_mask(rebuild(u, "self-mask seed", check, own_claim=check is not None), n, q)
        for d in dead:
            sk = crypto.load_private(rebuild(d, "mask key", check=lambda s, d=d: _is_key_of(s, st.pk_s[d])))
            for u in st.graph[d]:
                if u in vectors:  # u added sign(u, d) * mask(u, d); take it out
                    mask = prg_mask(crypto.mask_seed(sk, st.pk_s[u]), n, q)
                    total = total - mask if mask_sign(u, d) > 0 else total + mask
        return q.reduce(total)


def _is_key_of(secret: bytes, public: bytes) -> bool:
    """Whether ``secret`` is the private key of the announced ``public`` key."""
    try:
        return crypto.public_bytes(crypto.load_private(secret)) == public
    except ValueError:
        return False


def _graph_seed(seed: int, server_round: int, attempt: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{server_round}/{attempt}".encode()).digest()[:8], "big")


def _secure_metrics(content: RecordDict) -> dict:
    """An upload's public metrics, each a finite number in its range (``check_metric_values``)."""
    if keys.METRICS not in content.metric_records:
        raise ValueError(f"reply lacks '{keys.METRICS}'")
    m = dict(content.metric_records[keys.METRICS])
    if not set(m) <= keys.SECAGG_TRAIN_METRICS or keys.TENANT not in m:
        raise ValueError(f"metric keys {sorted(m)} differ from the secure protocol")
    check_metric_values(m, max_examples=1)  # no example count here: it is inside the masked vector
    return m
