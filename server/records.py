"""What a run leaves behind, round by round: checkpoints and metrics files.

``RoundRecorder`` is fed by the strategy and knows nothing about Flower. Each round
writes ``checkpoints/round_XXX/`` (a PEFT adapter directory, atomically; with a stateful
server optimizer also its moments, ``server_optimizer.safetensors``, atomically, after the
adapter) and ``metrics/round_XXX.json``, a :class:`fedlora.common.records.RoundRecord` (who was sampled, who
was dropped and why, per-tenant training and evaluation metrics, the per-tenant audit,
bytes down/up, seconds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from fedlora.common import messages as keys
from fedlora.common.adapter import write_json_atomic
from fedlora.common.files import write_atomic
from fedlora.common.records import Drop, RoundRecord, TenantAudit, round_path

# The server optimizer's moments, beside the round's checkpointed adapter.
SERVER_OPTIMIZER_FILE = "server_optimizer.safetensors"


@dataclass
class _Round:
    number: int
    sampled: list[int]
    connected: int
    started: float = field(default_factory=time.perf_counter)
    bytes_down: int = 0
    bytes_up: int = 0
    train: dict[str, dict] = field(default_factory=dict)
    eval: dict[str, dict] = field(default_factory=dict)
    dropped: list[Drop] = field(default_factory=list)
    excluded: set[str] = field(default_factory=set)  # trained, but a server bound kept its update out
    aggregated: bool = False
    checkpoint: str | None = None
    privacy: dict = field(default_factory=dict)
    secagg: dict | None = None  # secure-aggregation summary; None when it was off
    audit: dict[str, TenantAudit] = field(default_factory=dict)
    aggregation: dict = field(default_factory=dict)


class RoundRecorder:
    """Writes per-round checkpoints and metrics into ``run_dir``."""

    def __init__(self, run_dir: str | Path, *, save: Callable[[Path, Mapping[str, np.ndarray], int], None]) -> None:
        self.run_dir = Path(run_dir)
        self._save = save
        self.rounds: list[RoundRecord] = []
        self._cur: _Round | None = None
        self._nodes: dict[int, int] = {}  # node id -> tenant id

    def _tenant(self, node: int) -> str:
        return str(self._nodes.get(node, f"node-{node}"))

    def start_round(self, number: int, *, sampled: list[int], connected: int) -> None:
        self._cur = _Round(number, sampled, connected)

    def add_bytes(self, *, down: int = 0, up: int = 0) -> None:
        assert self._cur is not None
        self._cur.bytes_down += down
        self._cur.bytes_up += up

    def drop(self, node: int, reason: str, *, after_training: bool = False) -> None:
        """A tenant left out of the round with the reason; ``after_training``: its reply came
        and its metrics are kept, but its update is not in the sum (it did not finish)."""
        assert self._cur is not None
        self._cur.dropped.append(Drop(node=node, tenant=self._tenant(node), reason=reason))
        if after_training:
            self._cur.excluded.add(self._tenant(node))

    def train_reply(self, node: int, metrics: Mapping[str, float]) -> None:
        """A tenant that finished training (under secure aggregation its weight stays inside
        the masked sum, so only its public metrics are known)."""
        assert self._cur is not None
        self._nodes[node] = int(metrics[keys.TENANT])
        self._cur.train[self._tenant(node)] = dict(metrics)

    def weight(self, node: int, weight: float) -> None:
        """The weight a tenant's update was summed with."""
        assert self._cur is not None
        self._cur.train.setdefault(self._tenant(node), {})["weight"] = weight

    def secagg(self, summary: Mapping[str, object]) -> None:
        assert self._cur is not None
        self._cur.secagg = dict(summary)

    def eval_reply(self, node: int, metrics: Mapping[str, float]) -> None:
        assert self._cur is not None
        self._nodes[node] = int(metrics[keys.TENANT])
        self._cur.eval[self._tenant(node)] = dict(metrics)

    def late_evaluation(self, number: int, evaluated: Mapping[int, Mapping[str, float]],
                        dropped: list[tuple[int, str]]) -> RoundRecord | None:
        """Round ``number``'s evaluation, which came with the next round's training replies
        (``federation.evaluate-with-train``): its record, written at its end, is written again
        with it, atomically. None when that round has no record (nothing to add it to)."""
        at = next((i for i, r in enumerate(self.rounds) if r.round == number), None)
        if at is None:
            return None
        for node, metrics in evaluated.items():
            self._nodes[node] = int(metrics[keys.TENANT])
        old = self.rounds[at]
        record = replace(old, eval={**old.eval, **{self._tenant(n): dict(m) for n, m in evaluated.items()}},
                         dropped=[*old.dropped, *(Drop(node=n, tenant=self._tenant(n), reason=why)
                                                  for n, why in dropped)])
        write_json_atomic(round_path(self.run_dir, number), record.to_json())
        self.rounds[at] = record
        return record

    def privacy(self, report: Mapping[str, Any]) -> None:
        """What central DP spent this round (empty without it)."""
        assert self._cur is not None
        self._cur.privacy = dict(report)

    def end_train(self, new_global: Mapping[str, np.ndarray] | None, *,
                  optimizer_arrays: Mapping[str, np.ndarray] | None = None,
                  optimizer_name: str = "") -> str | None:
        """Checkpoint the new global adapter (None: the round aggregated nothing) and, when
        there are any, the server optimizer's moments beside it (safetensors, written
        atomically after the adapter). Returns the moments file, relative to the run directory."""
        assert self._cur is not None
        if new_global is None:
            return None
        path = self.run_dir / "checkpoints" / f"round_{self._cur.number:03d}"
        self._save(path, new_global, self._cur.number)
        self._cur.aggregated = True
        self._cur.checkpoint = str(path.relative_to(self.run_dir))
        if not optimizer_arrays:
            return None
        from safetensors.numpy import save

        data = save({k: np.ascontiguousarray(v) for k, v in optimizer_arrays.items()},
                    metadata={"optimizer": optimizer_name, "round": str(self._cur.number)})
        write_atomic(path / SERVER_OPTIMIZER_FILE, data)
        return str((path / SERVER_OPTIMIZER_FILE).relative_to(self.run_dir))

    def resume_from(self, records: list[RoundRecord]) -> None:
        """Continue a run: its earlier rounds' records (node -> tenant names are relearnt)."""
        self.rounds = list(records)

    def audit(self, audits: Mapping[int, TenantAudit], aggregation: Mapping[str, Any]) -> None:
        """The per-tenant audit of this round's updates and how they were aggregated."""
        assert self._cur is not None
        self._cur.audit = {self._tenant(n): a for n, a in audits.items()}
        self._cur.aggregation = dict(aggregation)

    def end_round(self, server_state: Mapping[str, Any] | None = None) -> RoundRecord:
        cur = self._cur
        assert cur is not None
        record = RoundRecord(
            round=cur.number, connected=cur.connected, sampled=[self._tenant(n) for n in cur.sampled],
            finished=sorted(set(cur.train) - cur.excluded), dropped=cur.dropped, aggregated=cur.aggregated,
            checkpoint=cur.checkpoint, bytes_down=cur.bytes_down, bytes_up=cur.bytes_up,
            seconds=round(time.perf_counter() - cur.started, 3), train=cur.train, eval=cur.eval,
            secagg=cur.secagg or {"enabled": False}, privacy=cur.privacy, audit=cur.audit,
            aggregation=cur.aggregation, server_state=dict(server_state or {}))
        write_json_atomic(round_path(self.run_dir, cur.number), record.to_json())
        self.rounds.append(record)
        self._cur = None
        return record
