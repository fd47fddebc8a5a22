"""A tenant's side of secure aggregation: one state machine, four or five stages, no Flower.

setup -> share keys -> masked upload -> [consistency] -> unmask, all within one (round, attempt);
the consistency stage (survivors sign who uploaded) runs in authenticated rounds, where a
tenant with a roster requires it before any unmask share leaves. The
per-round secrets live in ``store`` — the node's ``context.state`` record in the
ClientApp, which Flower keeps per node between messages in simulation and deployment —
serialized as one JSON blob, and are wiped after the unmask stage.

Every stage checks before it acts and refuses (:class:`SecAggRefused`, with the reason)
rather than guess: messages out of order or from a stale attempt, a weak threshold,
public keys that are not exactly the neighbourhood, a missing neighbour's shares, an
update that is not finite, outside the clipping range or over the weight cap, a round
that claims fewer tenants than the neighbourhood, a second masked upload in the same
round, and an unmask request that names a node as both
active and dropped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, MutableMapping

import numpy as np

from fedlora.common import secagg_crypto as crypto
from fedlora.common.secagg import Quantizer, UpdateRefused, check_update, mask_sign, pack, prg_mask

STATE_KEY = "state"


class SecAggRefused(RuntimeError):
    """This tenant will not take part in the stage; the message says why."""


@dataclass
class _State:
    node: int
    round: int
    attempt: int
    stage: str
    neighbours: list[int]
    threshold: int
    c_sk: str = ""
    s_sk: str = ""
    b: str = ""
    c_pk: dict[str, str] = field(default_factory=dict)   # node -> hex public key (self included)
    s_pk: dict[str, str] = field(default_factory=dict)
    c_keys: dict[str, str] = field(default_factory=dict)     # node -> agreed encryption key (kept for replies)
    b_shares: dict[str, str] = field(default_factory=dict)   # src -> hex share held for src
    sk_shares: dict[str, str] = field(default_factory=dict)
    uploaded_round: int = 0
    survivors: list[int] = field(default_factory=list)  # the set this tenant signed (consistency)

    @property
    def holders(self) -> list[int]:
        return sorted([*self.neighbours, self.node])


def _load(store: Mapping[str, bytes]) -> _State | None:
    raw = store.get(STATE_KEY)
    return _State(**json.loads(raw)) if raw else None


def _save(store: MutableMapping[str, bytes], st: _State) -> None:
    store[STATE_KEY] = json.dumps(asdict(st)).encode()


def _expect(store: Mapping[str, bytes], stage: str | tuple[str, ...], server_round: int, attempt: int) -> _State:
    st = _load(store)
    if st is None or (st.round, st.attempt) != (server_round, attempt):
        have = "nothing" if st is None else f"round {st.round} attempt {st.attempt}"
        raise SecAggRefused(f"message for round {server_round} attempt {attempt}, but this tenant holds {have}")
    stages = (stage,) if isinstance(stage, str) else stage
    if st.stage not in stages:
        raise SecAggRefused(f"stage out of order: expected after '{' or '.join(stages)}', "
                            f"this tenant is at '{st.stage}'")
    return st


def setup(store: MutableMapping[str, bytes], *, node: int, server_round: int, attempt: int,
          neighbours: list[int], threshold: int, identity=None) -> tuple[bytes, bytes, bytes, bytes]:
    """Fresh key pairs and self-mask seed for this attempt; returns (c_pk, s_pk, signature,
    seed commitment): the signature by ``identity`` (the node's identity key,
    :mod:`fedlora.common.secagg_identity`) over both keys, or empty without one."""
    old = _load(store)
    if old is not None and (old.round, old.attempt) >= (server_round, attempt):
        raise SecAggRefused(f"stale setup: round {server_round} attempt {attempt} is not after "
                            f"round {old.round} attempt {old.attempt}")
    uploaded = old.uploaded_round if old is not None else 0
    if uploaded == server_round:
        raise SecAggRefused(f"already sent a masked update in round {server_round}; it must not count twice")
    if node in neighbours or len(set(neighbours)) != len(neighbours) or not neighbours:
        raise SecAggRefused(f"bad neighbourhood {neighbours} for node {node}")
    holders = len(neighbours) + 1
    if not holders // 2 + 1 <= threshold <= holders:
        raise SecAggRefused(f"threshold {threshold} for {holders} share holders must be a strict majority "
                            f"({holders // 2 + 1}..{holders})")
    c_sk, s_sk = crypto.new_private_key(), crypto.new_private_key()
    st = _State(node=node, round=server_round, attempt=attempt, stage="setup", neighbours=sorted(neighbours),
                threshold=threshold, c_sk=crypto.private_bytes(c_sk).hex(), s_sk=crypto.private_bytes(s_sk).hex(),
                b=crypto.new_seed().hex(), uploaded_round=uploaded)
    _save(store, st)
    c_pk, s_pk = crypto.public_bytes(c_sk), crypto.public_bytes(s_sk)
    commitment = crypto.seed_commitment(bytes.fromhex(st.b))
    if identity is None:
        return c_pk, s_pk, b"", commitment
    from fedlora.common.secagg_identity import sign, statement

    return c_pk, s_pk, sign(identity, statement(server_round, attempt, node, c_pk, s_pk)), commitment


def share_keys(store: MutableMapping[str, bytes], *, server_round: int, attempt: int,
               public_keys: Mapping[int, tuple[bytes, bytes]], signatures: Mapping[int, bytes] | None = None,
               roster=None) -> dict[int, bytes]:
    """Shamir-share the self-mask seed and the mask key among the neighbourhood;
    returns {neighbour: ciphertext only that neighbour can open}. With a ``roster``
    (:func:`fedlora.common.secagg_identity.load_roster`) every neighbour must be on it and its
    keys must carry its signature, or nothing is shared (a server that substituted keys)."""
    st = _expect(store, "setup", server_round, attempt)
    public_keys = {n: (pk[0], pk[1]) for n, pk in public_keys.items()}  # (c_pk, s_pk[, signature])
    if set(public_keys) != set(st.holders):
        raise SecAggRefused(f"public keys for {sorted(public_keys)} but the neighbourhood is {st.holders}")
    if roster is not None:
        from fedlora.common.secagg_identity import check_signature

        for v in st.neighbours:
            why = check_signature(roster, v, (signatures or {}).get(v, b""), server_round=server_round,
                                  attempt=attempt, c_pk=public_keys[v][0], s_pk=public_keys[v][1])
            if why is not None:
                raise SecAggRefused(f"no share leaves this tenant: {why}")
    c_sk, s_sk = crypto.load_private(bytes.fromhex(st.c_sk)), crypto.load_private(bytes.fromhex(st.s_sk))
    if public_keys[st.node] != (crypto.public_bytes(c_sk), crypto.public_bytes(s_sk)):
        raise SecAggRefused("the server relayed public keys for this tenant that it did not send")
    holders = st.holders
    b_sh = crypto.split(bytes.fromhex(st.b), threshold=st.threshold, holders=len(holders))
    sk_sh = crypto.split(bytes.fromhex(st.s_sk), threshold=st.threshold, holders=len(holders))
    out = {}
    for i, dst in enumerate(holders):
        if dst == st.node:
            st.b_shares[str(dst)], st.sk_shares[str(dst)] = b_sh[i].hex(), sk_sh[i].hex()
            continue
        key = crypto.agree(c_sk, public_keys[dst][0])
        st.c_keys[str(dst)] = key.decode()
        out[dst] = crypto.seal_shares(key, src=st.node, dst=dst, b_share=b_sh[i], sk_share=sk_sh[i])
    st.c_pk = {str(n): pk[0].hex() for n, pk in public_keys.items()}
    st.s_pk = {str(n): pk[1].hex() for n, pk in public_keys.items()}
    st.stage = "share"
    _save(store, st)
    return out


def receive_shares(store: MutableMapping[str, bytes], *, server_round: int, attempt: int,
                   ciphertexts: Mapping[int, bytes]) -> None:
    """Open and keep the neighbours' shares; every neighbour must have sent them."""
    st = _expect(store, "share", server_round, attempt)
    if st.uploaded_round == server_round:
        raise SecAggRefused(f"already sent a masked update in round {server_round}; it must not count twice")
    if set(ciphertexts) != set(st.neighbours):
        raise SecAggRefused(f"shares from {sorted(ciphertexts)} but the neighbours are {st.neighbours}")
    for src, ct in ciphertexts.items():
        key = st.c_keys[str(src)].encode()  # agreed in share_keys: same pair, same key
        try:
            b_share, sk_share = crypto.open_shares(key, ct, src=src, dst=st.node)
        except crypto.ShareError as err:
            raise SecAggRefused(str(err)) from None
        st.b_shares[str(src)], st.sk_shares[str(src)] = b_share.hex(), sk_share.hex()
    st.stage = "received"
    _save(store, st)


def masked_upload(store: MutableMapping[str, bytes], *, server_round: int, attempt: int,
                  ciphertexts: Mapping[int, bytes], quantizer: Quantizer,
                  train: Callable[[], tuple[Mapping[str, np.ndarray], int]], tenants: int | None = None,
                  pack_update: Callable[[Mapping[str, np.ndarray], int, Quantizer], np.ndarray] = pack
                  ) -> np.ndarray:
    """Check the stage, train (``train() -> (delta, num_examples)``), check the update,
    and return ``pack_update(update) + self mask + pairwise masks`` mod the modulus.

    ``tenants`` (from the server's request) sizes a bf16 / int8 quantizer for the round
    (``Quantizer.for_tenants``); it cannot be fewer than this tenant's share holders.
    ``pack_update`` is :func:`fedlora.common.secagg.pack` unless the tenant keeps error feedback
    (``fedlora.client.feedback``)."""
    receive_shares(store, server_round=server_round, attempt=attempt, ciphertexts=ciphertexts)
    if tenants is not None:
        holders = len(_expect(store, "received", server_round, attempt).holders)
        if tenants < holders:
            raise SecAggRefused(f"the round claims {tenants} tenant(s), fewer than this tenant's {holders} share "
                                "holders")
        try:
            quantizer = quantizer.for_tenants(tenants)
        except ValueError as why:
            raise SecAggRefused(str(why)) from None
    delta, num_examples = train()
    try:
        weight = check_update(delta, num_examples, clip=quantizer.clip, max_weight=quantizer.max_weight,
                              weighting=quantizer.weighting)
        vector = pack_update(delta, weight, quantizer)
    except UpdateRefused as why:
        raise SecAggRefused(f"update refused before masking: {why}") from None
    st = _expect(store, "received", server_round, attempt)
    vector += prg_mask(bytes.fromhex(st.b), vector.size, quantizer)
    s_sk = crypto.load_private(bytes.fromhex(st.s_sk))
    for v in st.neighbours:
        mask = prg_mask(crypto.mask_seed(s_sk, bytes.fromhex(st.s_pk[str(v)])), vector.size, quantizer)
        if mask_sign(st.node, v) > 0:
            vector += mask
        else:
            vector -= mask
    st.stage, st.uploaded_round = "upload", server_round
    _save(store, st)
    return quantizer.reduce(vector)


def consistency(store: MutableMapping[str, bytes], *, server_round: int, attempt: int, survivors: list[int],
                identity=None) -> bytes:
    """Sign the set of nodes the server says uploaded (with ``identity``; empty without one) and
    keep it: this tenant's unmask shares will follow that set and no other."""
    st = _expect(store, "upload", server_round, attempt)
    if len(set(survivors)) != len(survivors):
        raise SecAggRefused(f"survivor set {survivors} names a node twice")
    if st.node not in survivors:
        raise SecAggRefused("the survivor set leaves out this tenant, but it uploaded")
    alive = len(set(survivors) & set(st.holders))
    if alive < st.threshold:
        raise SecAggRefused(f"only {alive} survivor(s) in the neighbourhood, below the threshold {st.threshold}; "
                            "revealing shares could expose an individual update")
    st.survivors, st.stage = sorted(survivors), "consistent"
    _save(store, st)
    if identity is None:
        return b""
    from fedlora.common.secagg_identity import sign, survivors_statement

    return sign(identity, survivors_statement(server_round, attempt, st.survivors))


def _check_consistency(st: _State, survivors: list[int] | None, signatures: Mapping[int, bytes] | None,
                       roster, *, server_round: int, attempt: int) -> None:
    """An authenticated unmask request: the survivor set this tenant signed, signed by at least its
    threshold of share holders (itself included); any bad signature refuses the whole request."""
    from fedlora.common.secagg_identity import check_survivors

    if st.stage != "consistent":
        raise SecAggRefused("no consistency round before unmasking: this tenant reveals shares only for a survivor "
                            "set its neighbours signed")
    if survivors is None or sorted(survivors) != st.survivors:
        raise SecAggRefused(f"the unmask request's survivor set {survivors} is not the one this tenant signed "
                            f"({st.survivors})")
    signed = {st.node}
    for v, sig in (signatures or {}).items():
        if v not in st.holders or v not in st.survivors or v == st.node:
            raise SecAggRefused(f"a survivor signature from node {v}, which is not another surviving share holder")
        why = check_survivors(roster, v, sig, server_round=server_round, attempt=attempt, survivors=st.survivors)
        if why is not None:
            raise SecAggRefused(f"no unmask share leaves this tenant: {why}")
        signed.add(v)
    if len(signed) < st.threshold:
        raise SecAggRefused(f"only {len(signed)} of this tenant's share holders signed the survivor set, below the "
                            f"threshold {st.threshold}")


def unmask(store: MutableMapping[str, bytes], *, server_round: int, attempt: int,
           active: list[int], dead: list[int], survivors: list[int] | None = None,
           signatures: Mapping[int, bytes] | None = None, roster=None) -> dict[int, bytes]:
    """Shares of the self-mask seed of each active node and of the mask key of each
    dropped node — never both for one node; then forget this round's secrets.

    With a ``roster`` (authenticated rounds) only after the consistency stage, for the survivor
    set this tenant signed, and with at least its threshold of holders' signatures on that set."""
    st = _expect(store, ("upload", "consistent"), server_round, attempt)
    if roster is not None:
        _check_consistency(st, survivors, signatures, roster, server_round=server_round, attempt=attempt)
    if st.survivors and (sorted(active) != sorted(set(st.holders) & set(st.survivors))
                         or sorted(dead) != sorted(set(st.holders) - set(st.survivors))):
        raise SecAggRefused(f"unmask request (active {sorted(active)}, dropped {sorted(dead)}) does not follow the "
                            f"survivor set {st.survivors} this tenant signed")
    both = sorted(set(active) & set(dead))
    if both:
        raise SecAggRefused(f"contradictory unmask request: node(s) {both} listed as both active and dropped")
    unknown = sorted((set(active) | set(dead)) - set(st.holders))
    if unknown:
        raise SecAggRefused(f"unmask request names node(s) {unknown} outside this tenant's neighbourhood")
    if st.node not in active:
        raise SecAggRefused("unmask request does not list this tenant as active, but it uploaded")
    if set(active) | set(dead) != set(st.holders):
        raise SecAggRefused(f"unmask request covers {sorted(set(active) | set(dead))}, "
                            f"the neighbourhood is {st.holders}")
    if len(active) < st.threshold:
        raise SecAggRefused(f"only {len(active)} active node(s) in the neighbourhood, below the threshold "
                            f"{st.threshold}; revealing shares could expose an individual update")
    out = {n: bytes.fromhex(st.b_shares[str(n)]) for n in active}
    out.update({n: bytes.fromhex(st.sk_shares[str(n)]) for n in dead})
    _save(store, _State(node=st.node, round=st.round, attempt=st.attempt, stage="done", neighbours=[],
                        threshold=0, uploaded_round=st.uploaded_round))
    return out
