"""What a tenant sends for its delta, in the run's wire encoding, with error feedback.

Error feedback (Seide et al. 2014; EF-SGD, Karimireddy et al. 2019): in round ``t`` the
tenant sends ``s_t = decode(encode(x_t))`` of ``x_t = delta_t + e_{t-1}`` and keeps the
rounding error ``e_t = x_t - s_t`` for its next round, so nothing is lost to rounding, only
delayed: ``sum_t s_t = sum_t delta_t - e_T`` (without a central clip). The encoding is
``fedlora.common.encoding``'s bf16 / int8 on the plain transport, and the secure quantizer
(``fedlora.common.secagg.pack``, sized from the encoding) under secure aggregation. fp32 sends the
delta as it is, keeps nothing and writes nothing: byte for byte what it always sent.

The residual must outlive the ClientApp process (simulation and deployment may run each
message in a new one): it is stored as ``error_feedback.safetensors`` in the tenant's
state directory (beside the privacy ledger), rewritten atomically before the reply leaves.
Its metadata key it to a lineage; a tenant starts from zero when the file is missing or
unreadable, or was written by another run (Flower run id), for another wire encoding or
other tensor names / shapes, or in a round that is not before this one (a restarted or
replayed round: the global adapter it belongs to is not this one's ancestor).

Privacy:

* **local DP**: ``delta_t`` is DP-SGD's output; the encoder is deterministic and sees no
  data, so ``e_t`` is a function of ``delta_1 .. delta_t`` alone — post-processing of
  already-privatized deltas. It costs no epsilon and the ledger's figure stands.
* **central DP**: what bounds a tenant's influence on the noised sum is the L2 norm of what
  it *sends*, and the residual could push ``delta_t + e_{t-1}`` past
  ``privacy.central-clip``. So the clip is applied **after** adding the residual,
  ``x_t = clip(delta_t + e_{t-1})``, and the encoding is held to it: rounded to nearest
  when ``||s_t|| <= clip``, otherwise toward zero (no element grows in magnitude, so
  ``||s_t|| <= ||x_t|| <= clip``; a hair of shrinking absorbs float rounding). Every round's
  sent update is within the clip, whatever the residual, so the per-round sensitivity the
  server's accountant assumes holds. What the clip cuts off is not carried forward: the
  residual keeps only the encoding's rounding error. This is a client-side bound (the
  server re-clips what it can see; under secure aggregation it cannot).
* **secure aggregation**: ``x_t`` is also clamped, element by element, into the
  quantizer's range (which never increases a magnitude), so the residual never gets a
  tenant refused for leaving the clipping range its delta respected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import numpy as np

from fedlora.client.privacy import clip_delta
from fedlora.common.encoding import FP32, Encoding, encode, encoding_for
from fedlora.common.files import write_atomic
from fedlora.common.secagg import Quantizer, dequantize, pack

log = logging.getLogger(__name__)

RESIDUAL_FILE = "error_feedback.safetensors"
VERSION = "1"
_SHRINK = (1.0, 1.0 - 2.0**-20, 1.0 - 2.0**-10)  # toward-zero attempts before sending zeros


def norm(arrays: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all tensors together, in float64."""
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in arrays.values()))


def _shapes_digest(arrays: Mapping[str, np.ndarray]) -> str:
    text = json.dumps([[k, list(np.shape(v))] for k, v in arrays.items()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ResidualStore:
    """The tenant's residual on disk (safetensors), keyed to run, wire encoding, shapes and round."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / RESIDUAL_FILE

    def load(self, like: Mapping[str, np.ndarray], *, run: str, wire: str, server_round: int
             ) -> "OrderedDict[str, np.ndarray]":
        """The stored residual for tensors shaped as ``like``, or zeros (see the module docstring)."""
        zeros = OrderedDict((k, np.zeros(np.shape(v), np.float32)) for k, v in like.items())
        if not self.path.is_file():
            return zeros
        try:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="np") as f:
                meta = f.metadata() or {}
                key = (meta.get("version"), meta.get("run"), meta.get("wire"), meta.get("shapes"))
                if key != (VERSION, run, wire, _shapes_digest(like)) or not int(meta.get("round", "0")) < server_round:
                    return zeros
                out = OrderedDict((k, f.get_tensor(k).astype(np.float32)) for k in like)
        except Exception as why:  # noqa: BLE001 — a lost residual only delays nothing; never fail the round
            log.warning("error-feedback residual %s unreadable (%s); starting from zero", self.path, why)
            return zeros
        if not all(np.all(np.isfinite(v)) and v.shape == zeros[k].shape for k, v in out.items()):
            return zeros
        return out

    def save(self, residual: Mapping[str, np.ndarray], *, run: str, wire: str, server_round: int) -> None:
        from safetensors.numpy import save

        meta = {"version": VERSION, "run": run, "wire": wire, "round": str(server_round),
                "shapes": _shapes_digest(residual)}
        data = save({k: np.ascontiguousarray(v, np.float32) for k, v in residual.items()}, metadata=meta)
        write_atomic(self.path, data)


class DeltaSender:
    """One round's delta on its way out: residual added, clipped, encoded, new residual kept
    until :meth:`commit` (called once the reply or masked vector is ready to leave)."""

    def __init__(self, encoding: Encoding = FP32, *, store: ResidualStore | None = None, run: str = "",
                 server_round: int = 0, clip: float | None = None) -> None:
        self.encoding = encoding
        self.store = store          # None: no error feedback
        self.run = run
        self.server_round = server_round
        self.clip = clip            # central DP's clip norm, or None
        self._wire = ""
        self._pending: "OrderedDict[str, np.ndarray] | None" = None

    @classmethod
    def for_round(cls, cfg, *, state_dir: str | Path, run: str, server_round: int) -> "DeltaSender":
        """The sender a :class:`fedlora.common.config.Config` asks for, for one tenant's round."""
        fed = cfg.federation
        store = ResidualStore(state_dir) if fed.error_feedback and fed.delta_encoding != "fp32" else None
        clip = cfg.privacy.central_clip if cfg.privacy.mode == "central" else None
        return cls(encoding_for(fed), store=store, run=str(run), server_round=server_round, clip=clip)

    # -- the two transports -------------------------------------------------------
    def plain(self, delta: Mapping[str, np.ndarray]):
        """The reply's ``ArrayRecord`` in the run's encoding (fp32: ``to_arrayrecord(delta)``)."""
        if self.encoding.name == "fp32":
            from fedlora.common.adapter import to_arrayrecord

            return to_arrayrecord(delta)
        x = self._start(delta, wire=self.encoding.name + ("-" + self.encoding.int8_scale
                                                          if self.encoding.name == "int8" else ""))
        encoded = encode(x, self.encoding)
        sent = encoded.decoded()
        if self.clip is not None and norm(sent) > self.clip:
            encoded, sent = self._toward_zero(x, lambda y: encode(y, self.encoding, toward_zero=True),
                                              lambda e: e.decoded())
        self._finish(x, sent)
        return encoded.record()

    def secagg(self, delta: Mapping[str, np.ndarray], weight: int, q: Quantizer) -> np.ndarray:
        """The vector to mask (``fedlora.client.secagg.masked_upload``'s ``pack_update``); fp32: ``pack``."""
        if not q.centred:
            return pack(delta, weight, q)
        x = self._start(delta, wire=f"secagg-{q.encoding}")
        bound = q.clip * q.max_weight / weight  # the quantizer's range, in delta units
        x = OrderedDict((k, np.clip(v, -bound, bound)) for k, v in x.items())
        vector = pack(x, weight, q)
        if self.clip is not None and norm(self._unflatten(dequantize(vector, weight, q), x)) > self.clip:
            vector, _ = self._toward_zero(x, lambda y: pack(y, weight, q, toward_zero=True), lambda v: self._unflatten(
                dequantize(v, weight, q), x))
        self._finish(x, self._unflatten(dequantize(vector, weight, q), x))
        return vector

    def commit(self) -> None:
        """Write this round's residual (atomically); nothing without error feedback."""
        if self.store is not None and self._pending is not None:
            self.store.save(self._pending, run=self.run, wire=self._wire, server_round=self.server_round)
            self._pending = None

    # -- the steps ----------------------------------------------------------------
    def _start(self, delta: Mapping[str, np.ndarray], *, wire: str) -> "OrderedDict[str, np.ndarray]":
        """x = delta + the stored residual, clipped to the central clip."""
        self._wire = wire
        x = OrderedDict((k, np.asarray(v, np.float32)) for k, v in delta.items())
        if self.store is not None:
            e = self.store.load(x, run=self.run, wire=wire, server_round=self.server_round)
            x = OrderedDict((k, v + e[k]) for k, v in x.items())
        return clip_delta(x, clip=self.clip) if self.clip is not None else x

    def _finish(self, x: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> None:
        residual = OrderedDict((k, (np.asarray(v, np.float64) - np.asarray(sent[k], np.float64)).astype(np.float32))
                               for k, v in x.items())
        if not all(np.all(np.isfinite(v)) for v in residual.values()):  # a bad delta must not poison later rounds
            residual = OrderedDict((k, np.zeros_like(v)) for k, v in residual.items())
        self._pending = residual

    def _toward_zero(self, x, encode_fn, decode_fn):
        """Encode rounding toward zero (shrinking a hair for float rounding) until within the clip;
        zeros if nothing fits (never in practice)."""
        for shrink in _SHRINK:
            y = x if shrink == 1.0 else OrderedDict((k, (v * np.float32(shrink)).astype(np.float32))
                                                    for k, v in x.items())
            out = encode_fn(y)
            sent = decode_fn(out)
            if norm(sent) <= self.clip:
                return out, sent
        zeros = OrderedDict((k, np.zeros_like(v)) for k, v in x.items())
        out = encode_fn(zeros)
        return out, decode_fn(out)

    @staticmethod
    def _unflatten(flat: np.ndarray, like: Mapping[str, np.ndarray]) -> "OrderedDict[str, np.ndarray]":
        out, offset = OrderedDict(), 0
        for k, v in like.items():
            out[k] = flat[offset:offset + v.size].reshape(v.shape)
            offset += v.size
        return out
