"""A tenant's privacy ledger: every DP-SGD spend of this node, in a file that outlives runs.

The ledger lives in the node's state directory (node config ``state-dir``; by default
``.fedlora-state/`` beside the tenant's training file) as ``privacy_ledger.json``. Each
entry is one local training run (noise multiplier, sample rate, steps); epsilon is always
recomputed from the *whole* history by Opacus' RDP accountant, so it accumulates across
rounds, runs and node restarts. The file is rewritten atomically (a crash leaves the old
or the new ledger, never half of one) and is written *before* the update it accounts for
leaves the node. A ledger that cannot be read is an error, never an empty budget.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fedlora.common.adapter import write_json_atomic

LEDGER_FILE = "privacy_ledger.json"
STATE_DIR_NAME = ".fedlora-state"
VERSION = 1


class LedgerError(RuntimeError):
    """The ledger file exists but cannot be trusted."""


class BudgetExhausted(RuntimeError):
    """The next round would take the tenant's epsilon over its budget; it declines to train."""


@dataclass(frozen=True)
class Spend:
    """One run of DP-SGD: ``steps`` Poisson-sampled steps at ``sample_rate`` with ``noise_multiplier``."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and 0 < self.sample_rate <= 1 and self.steps >= 0):
            raise ValueError(f"invalid privacy spend {self}: need noise_multiplier > 0, 0 < sample_rate <= 1, "
                             "steps >= 0")


def epsilon_of(history: list[Spend], *, delta: float) -> float:
    """Epsilon of a sequence of DP-SGD runs at ``delta``, by Opacus' RDP accountant."""
    from opacus.accountants import RDPAccountant

    if not history or all(s.steps == 0 for s in history):
        return 0.0
    acc = RDPAccountant()
    acc.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in history if s.steps > 0]
    return float(acc.get_epsilon(delta=delta))


class PrivacyLedger:
    """The persistent record of one tenant's privacy spend."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / LEDGER_FILE

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("version") != VERSION or not isinstance(doc.get("entries"), list):
                raise ValueError(f"unsupported ledger version {doc.get('version')!r}")
            for e in doc["entries"]:
                Spend(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise LedgerError(f"privacy ledger {self.path} is unreadable ({err}); refusing to train rather than "
                              "forget past spending. Restore it from a backup or investigate; never delete it "
                              "to reset a budget") from None
        return doc["entries"]

    def history(self) -> list[Spend]:
        return [Spend(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in self.entries()]

    def epsilon(self, *, delta: float) -> float:
        """Epsilon spent so far (all rounds of all runs) at ``delta``."""
        return epsilon_of(self.history(), delta=delta)

    def check(self, planned: Spend, *, delta: float, budget: float) -> float:
        """Epsilon after ``planned``; raises :class:`BudgetExhausted` if it would exceed ``budget``."""
        spent = self.epsilon(delta=delta)
        after = epsilon_of([*self.history(), planned], delta=delta)
        if after > budget:
            raise BudgetExhausted(f"privacy budget exhausted: epsilon spent {spent:.3f}, this round would take it to "
                                  f"{after:.3f} > budget {budget:g} (delta {delta:g}; ledger {self.path}); "
                                  "the tenant declines to train")
        return after

    def record(self, spend: Spend, *, delta: float, **context: object) -> float:
        """Append ``spend`` atomically and return the new cumulative epsilon."""
        entries = self.entries()
        history = [*self.history(), spend]
        eps = epsilon_of(history, delta=delta)
        entries.append({**asdict(spend), "delta": delta, "epsilon_after": eps,
                        "recorded_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        **context})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"version": VERSION, "accountant": "rdp", "entries": entries})
        return eps
