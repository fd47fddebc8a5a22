"""Typed records of a run: one round (``metrics/round_XXX.json``) and the federation's
summary (``federation.json``), with to/from JSON.

The server writes them (``fedlora.server.records``); the report, the release stages, the
benchmarks and the CLI read them back through :func:`read_rounds` and
:func:`read_summary`, by field, never by key. Unknown keys in a file are refused, so a
reader and a writer cannot drift apart silently.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROUNDS_DIR = "metrics"
SUMMARY_FILE = "federation.json"


def round_path(run_dir: str | Path, number: int) -> Path:
    return Path(run_dir) / ROUNDS_DIR / f"round_{number:03d}.json"


@dataclass(frozen=True)
class Drop:
    """A tenant whose reply did not count, and why."""

    node: int            # Flower node id
    tenant: str          # tenant id once known, else "node-<id>"
    reason: str
    round: int = 0       # filled in the run summary


@dataclass(frozen=True)
class TenantAudit:
    """What the server saw of one tenant's update in one round (plain transport only)."""

    norm: float                  # L2 norm of the delta as received
    cosine: float                # cosine similarity to the round's aggregate delta
    cosine_median: float         # cosine similarity to the round's coordinate-wise median update
    weight_share: float          # share of the round's total weight
    weight: float                # weight used (after weighting rule and caps)
    claimed_examples: int        # example count the tenant claimed
    action: str = "accepted"     # accepted | capped (weight) | clipped | dropped | excluded (by the aggregator)
    bound: float = 0.0           # the norm bound in force (0 = none)
    outlier: bool = False        # flagged by the outlier rule (README, "Robust aggregation")
    why: str = ""                # why clipped, dropped or flagged


@dataclass(frozen=True)
class RoundRecord:
    """Everything one round left behind."""

    round: int
    connected: int
    sampled: list[str]
    finished: list[str]
    dropped: list[Drop]
    aggregated: bool
    checkpoint: str | None
    bytes_down: int
    bytes_up: int
    seconds: float
    train: dict[str, dict[str, float]]       # tenant -> training metrics (and weight)
    eval: dict[str, dict[str, float]]        # tenant -> evaluation metrics of the global adapter
    secagg: dict[str, Any] = field(default_factory=lambda: {"enabled": False})
    privacy: dict[str, Any] = field(default_factory=dict)   # central DP spent this round
    audit: dict[str, TenantAudit] = field(default_factory=dict)
    aggregation: dict[str, Any] = field(default_factory=dict)  # aggregator, bounds, server seconds
    # What the server needs to continue after this round (sampling RNG, central-DP
    # accountant, aggregator state): ``fedlora.server.strategy.FedLoraStrategy.resume_state``.
    server_state: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RoundRecord":
        data = _known(cls, data)
        data["dropped"] = [Drop(**_known(Drop, d)) for d in data.get("dropped", [])]
        data["audit"] = {t: TenantAudit(**_known(TenantAudit, a)) for t, a in data.get("audit", {}).items()}
        return cls(**data)

    def eval_exact_match(self) -> list[float]:
        return [m["eval-exact-match"] for m in self.eval.values() if "eval-exact-match" in m]


@dataclass(frozen=True)
class FederationSummary:
    """The federation's summary, written once after the last round."""

    rounds: int
    tenants: list[str]
    seconds: float
    bytes_down: int
    bytes_up: int
    adapter_bytes: int
    dropped: list[Drop]
    aggregated_rounds: int = 0
    failure: str | None = None      # why the run does not count (fewer aggregated rounds than required)
    resumed_after: int = 0          # the round a resumed run continued after (0: not resumed)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FederationSummary":
        data = _known(cls, data)
        data["dropped"] = [Drop(**_known(Drop, d)) for d in data.get("dropped", [])]
        return cls(**data)


def _known(cls, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}")
    return dict(data)


def read_rounds(run_dir: str | Path) -> list[RoundRecord]:
    """Every round record of a run, in round order (empty when there is none)."""
    paths = sorted((Path(run_dir) / ROUNDS_DIR).glob("round_*.json"))
    return [RoundRecord.from_json(json.loads(p.read_text())) for p in paths]


def read_summary(run_dir: str | Path) -> FederationSummary | None:
    """The run's federation summary, or None before the federation finished."""
    path = Path(run_dir) / SUMMARY_FILE
    return FederationSummary.from_json(json.loads(path.read_text())) if path.is_file() else None
