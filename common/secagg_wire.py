"""Secure-aggregation stage payloads <-> Flower records, for both apps.

Message types are ``train.secagg_<stage>``. Node ids travel as JSON lists in a
string (they are unsigned 64-bit, Flower's ConfigRecord integers are signed). Every ``read_*``
raises ``ValueError`` naming what is missing or malformed, so the server drops a bad
reply with the reason and the client refuses a bad request.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

SETUP, SHARE, UPLOAD, UNMASK = "secagg_setup", "secagg_share", "secagg_upload", "secagg_unmask"
CONSISTENCY = "secagg_consistency"  # authenticated rounds only: survivors sign who uploaded
STAGES = (SETUP, SHARE, UPLOAD, CONSISTENCY, UNMASK)
STAGE_NAMES = {SETUP: "setup", SHARE: "key sharing", UPLOAD: "masked upload", CONSISTENCY: "consistency",
               UNMASK: "unmasking"}
RECORD = "secagg"   # ConfigRecord with the stage payload, both directions
MASKED = "masked"   # ArrayRecord key of the masked vector


def message_type(stage: str) -> str:
    return f"train.{stage}"


def _ids(text: str) -> list[int]:
    ids = json.loads(text) if isinstance(text, str) else None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"node ids must be a JSON list of integers, got {text!r:.60}")
    return ids


def _strs(ids) -> str:
    """A JSON list of ids (Flower's ConfigRecord cannot size an empty list or string)."""
    return json.dumps([int(i) for i in ids])


def _get(content: RecordDict, key: str) -> Any:
    if RECORD not in content.config_records:
        raise ValueError(f"message lacks the '{RECORD}' record")
    rec = content.config_records[RECORD]
    if key not in rec:
        raise ValueError(f"'{RECORD}' record lacks '{key}'")
    return rec[key]


def _record(**values) -> RecordDict:
    return RecordDict({RECORD: ConfigRecord(values)})


def header(content: RecordDict) -> tuple[int, int]:
    """(round, attempt) of a server request."""
    return int(_get(content, "round")), int(_get(content, "attempt"))


# -- setup --------------------------------------------------------------------------
def setup_request(server_round: int, attempt: int, neighbours: list[int], threshold: int) -> RecordDict:
    return _record(round=server_round, attempt=attempt, neighbours=_strs(neighbours), threshold=threshold)


def read_setup_request(content: RecordDict) -> dict:
    r, a = header(content)
    return {"server_round": r, "attempt": a, "neighbours": _ids(_get(content, "neighbours")),
            "threshold": int(_get(content, "threshold"))}


def setup_reply(c_pk: bytes, s_pk: bytes, sig: bytes = b"", commitment: bytes = b"") -> RecordDict:
    """The tenant's two public keys, (authenticated SecAgg+) its identity signature over them,
    and the commitment to its self-mask seed (``secagg_crypto.seed_commitment``)."""
    return _record(c_pk=c_pk, s_pk=s_pk, **({"sig": sig} if sig else {}),
                   **({"commit": commitment} if commitment else {}))


def read_setup_reply(content: RecordDict) -> tuple[bytes, bytes, bytes, bytes]:
    """(c_pk, s_pk, signature or b"", seed commitment or b"")."""
    c_pk, s_pk = _get(content, "c_pk"), _get(content, "s_pk")
    sig = content.config_records[RECORD].get("sig", b"")
    commitment = content.config_records[RECORD].get("commit", b"")
    if not all(isinstance(v, bytes) for v in (c_pk, s_pk, sig, commitment)):
        raise ValueError("public keys, signature or commitment are not bytes")
    return c_pk, s_pk, sig, commitment


# -- key sharing --------------------------------------------------------------------
def share_request(server_round: int, attempt: int, keys: dict[int, tuple[bytes, ...]]) -> RecordDict:
    """The neighbourhood's public keys as each node sent them: (c_pk, s_pk[, signature])."""
    nodes = sorted(keys)
    sigs = [keys[n][2] if len(keys[n]) > 2 else b"" for n in nodes]
    return _record(round=server_round, attempt=attempt, nodes=_strs(nodes),
                   c_pk=[keys[n][0] for n in nodes], s_pk=[keys[n][1] for n in nodes],
                   **({"sig": [s or b"-" for s in sigs]} if any(sigs) else {}))


def read_share_request(content: RecordDict) -> dict:
    r, a = header(content)
    nodes, c_pk, s_pk = _ids(_get(content, "nodes")), _get(content, "c_pk"), _get(content, "s_pk")
    sigs = content.config_records[RECORD].get("sig", [b""] * len(nodes))
    if not len(nodes) == len(c_pk) == len(s_pk) == len(sigs):
        raise ValueError("public key lists differ in length")
    return {"server_round": r, "attempt": a, "public_keys": {n: (c, s) for n, c, s in zip(nodes, c_pk, s_pk)},
            "signatures": {n: (b"" if g == b"-" else g) for n, g in zip(nodes, sigs)}}


def share_reply(ciphertexts: dict[int, bytes]) -> RecordDict:
    dst = sorted(ciphertexts)
    return _record(dst=_strs(dst), ct=[ciphertexts[d] for d in dst])


def read_share_reply(content: RecordDict) -> dict[int, bytes]:
    dst, ct = _ids(_get(content, "dst")), _get(content, "ct")
    if len(dst) != len(ct) or not all(isinstance(c, bytes) for c in ct):
        raise ValueError("ciphertext list malformed")
    return dict(zip(dst, ct))


# -- masked upload ------------------------------------------------------------------
def upload_request(server_round: int, attempt: int, ciphertexts: dict[int, bytes], *,
                   tenants: int | None = None) -> RecordDict:
    """Shares addressed to one node and the number of tenants the round sums (which sizes a
    bf16 / int8 quantizer, ``fedlora.common.secagg.Quantizer.for_tenants``); the caller adds the
    global adapter and train config."""
    src = sorted(ciphertexts)
    extra = {} if tenants is None else {"tenants": int(tenants)}
    return _record(round=server_round, attempt=attempt, src=_strs(src), ct=[ciphertexts[s] for s in src], **extra)


def read_upload_request(content: RecordDict) -> dict:
    r, a = header(content)
    src, ct = _ids(_get(content, "src")), _get(content, "ct")
    if len(src) != len(ct):
        raise ValueError("ciphertext list malformed")
    rec = content.config_records[RECORD]
    tenants = rec["tenants"] if "tenants" in rec else None
    if tenants is not None and (isinstance(tenants, bool) or not isinstance(tenants, int) or tenants < 2):
        raise ValueError(f"tenants {tenants!r} is not a count of at least 2")
    return {"server_round": r, "attempt": a, "ciphertexts": dict(zip(src, ct)), "tenants": tenants}


def upload_array(vector: np.ndarray) -> ArrayRecord:
    return ArrayRecord({MASKED: Array(np.ascontiguousarray(vector))})


def read_upload_array(content: RecordDict, *, size: int, dtype) -> np.ndarray:
    recs = content.array_records
    if len(recs) != 1 or MASKED not in next(iter(recs.values())):
        raise ValueError(f"reply must hold exactly one array record with '{MASKED}'")
    vec = next(iter(recs.values()))[MASKED].numpy()
    if vec.dtype != np.dtype(dtype) or vec.shape != (size,):
        raise ValueError(f"masked vector {vec.dtype}{vec.shape} != expected {np.dtype(dtype)}({size},)")
    return vec


# -- consistency (authenticated rounds) ---------------------------------------------
def consistency_request(server_round: int, attempt: int, survivors: list[int]) -> RecordDict:
    """The nodes whose masked vectors the server holds, for each survivor to sign."""
    return _record(round=server_round, attempt=attempt, survivors=_strs(sorted(survivors)))


def read_consistency_request(content: RecordDict) -> dict:
    r, a = header(content)
    return {"server_round": r, "attempt": a, "survivors": _ids(_get(content, "survivors"))}


def consistency_reply(sig: bytes) -> RecordDict:
    return _record(sig=sig or b"-")


def read_consistency_reply(content: RecordDict) -> bytes:
    sig = _get(content, "sig")
    if not isinstance(sig, bytes):
        raise ValueError("signature is not bytes")
    return b"" if sig == b"-" else sig


# -- unmasking ----------------------------------------------------------------------
def unmask_request(server_round: int, attempt: int, active: list[int], dead: list[int], *,
                   survivors: list[int] | None = None, signatures: dict[int, bytes] | None = None) -> RecordDict:
    """Whose self-mask seeds (``active``) and mask keys (``dead``) to reveal; in an authenticated
    round also the survivor set and the survivors' signatures over it (the consistency round)."""
    extra = {}
    if survivors is not None:
        signers = sorted(signatures or {})
        extra = {"survivors": _strs(sorted(survivors)), "signers": _strs(signers),
                 **({"sigs": [signatures[n] for n in signers]} if signers else {})}
    return _record(round=server_round, attempt=attempt, active=_strs(sorted(active)), dead=_strs(sorted(dead)),
                   **extra)


def read_unmask_request(content: RecordDict) -> dict:
    r, a = header(content)
    out = {"server_round": r, "attempt": a, "active": _ids(_get(content, "active")),
           "dead": _ids(_get(content, "dead")), "survivors": None, "signatures": None}
    rec = content.config_records[RECORD]
    if "survivors" in rec:
        signers, sigs = _ids(_get(content, "signers")), rec.get("sigs", [])
        if len(signers) != len(sigs) or not all(isinstance(g, bytes) for g in sigs):
            raise ValueError("signature list malformed")
        out.update(survivors=_ids(rec["survivors"]), signatures=dict(zip(signers, sigs)))
    return out


def unmask_reply(shares: dict[int, bytes]) -> RecordDict:
    nodes = sorted(shares)
    return _record(nodes=_strs(nodes), shares=[shares[n] for n in nodes])


def read_unmask_reply(content: RecordDict) -> dict[int, bytes]:
    nodes, shares = _ids(_get(content, "nodes")), _get(content, "shares")
    if len(nodes) != len(shares) or not all(isinstance(s, bytes) for s in shares):
        raise ValueError("share list malformed")
    return dict(zip(nodes, shares))


def content_bytes(content: RecordDict) -> int:
    """Bytes of arrays and config values in a message (what the report counts)."""
    return (sum(r.count_bytes() for r in content.array_records.values())
            + sum(r.count_bytes() for r in content.config_records.values()))
