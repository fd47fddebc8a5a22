"""A tenant's privacy ledger: every release of this node's data, in a file that outlives runs.

Each entry is one local training whose update left the node, or one evaluation answered:

* ``dp-sgd``: one local DP-SGD run (noise multiplier, sample rate, steps); epsilon is always
  recomputed from the *whole* history by Opacus' RDP accountant, so it accumulates across
  rounds, runs and node restarts;
* ``release``: an update that left without local DP (``mechanism`` none or central): its
  epsilon is infinite, which exceeds every finite budget, so a tenant that once released
  its data in the clear can no longer claim a finite local-DP guarantee for it;
* ``evaluation``: an evaluation answered (counted per run against a tenant policy's budget).

Where it lives: on a deployment node, ``<ledger dir>/<data digest>.json`` (:meth:`PrivacyLedger.for_data`;
the tenant policy's ``ledger.dir``, default ``<fedlora home>/ledgers``), so a new state
directory on the same data continues the same budget; elsewhere (simulation, tests)
``privacy_ledger.json`` in the tenant's state directory. The file is rewritten atomically (a
crash leaves the old or the new ledger, never half of one) and is written *before* the update
it accounts for leaves the node. A file lock (:meth:`PrivacyLedger.locked`) spans a round from
its budget check through its record, so two trainings against one ledger cannot both pass the
check. A ledger that cannot be read is an error, never an empty budget.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import math
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from fedlora.common.adapter import write_json_atomic

LEDGER_FILE = "privacy_ledger.json"
STATE_DIR_NAME = ".fedlora-state"
VERSION = 2
DP_SGD, RELEASE, EVALUATION = "dp-sgd", "release", "evaluation"


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


def epsilon_of(history: list[Spend], *, delta: float, clear_releases: int = 0) -> float:
    """Epsilon of a sequence of DP-SGD runs at ``delta``, by Opacus' RDP accountant; infinite
    when any release left without local DP (``clear_releases``)."""
    from opacus.accountants import RDPAccountant

    if clear_releases:
        return math.inf
    if not history or all(s.steps == 0 for s in history):
        return 0.0
    acc = RDPAccountant()
    acc.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in history if s.steps > 0]
    return float(acc.get_epsilon(delta=delta))


_DIGESTS: dict[tuple, str] = {}


def data_digest(path: Path) -> str:
    """``sha256:<hex>`` of a data file's bytes (cached per path, size and modification time)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = f"sha256:{h.hexdigest()}"
    return _DIGESTS[key]


def _spend(e: dict) -> Spend:
    return Spend(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))


class PrivacyLedger:
    """The persistent record of one tenant's releases."""

    def __init__(self, state_dir: str | Path, *, path: Path | None = None, data: str | None = None) -> None:
        self.path = path or Path(state_dir) / LEDGER_FILE
        self.data = data  # the digest of the data this ledger accounts for (None: not bound)
        self._held = 0
        self._lock_fd: int | None = None
        self._thread_lock = threading.RLock()

    @classmethod
    def for_data(cls, ledger_dir: str | Path, train_path: Path) -> "PrivacyLedger":
        """The ledger of the data in ``train_path``: ``<ledger_dir>/<digest>.json``, whatever the
        node's state directory is."""
        digest = data_digest(train_path)
        return cls(ledger_dir, path=Path(ledger_dir) / f"{digest.split(':')[1][:32]}.json", data=digest)

    # -- the lock -------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self):
        """Hold the ledger's file lock (re-entrant in this object): check, train, record inside."""
        with self._thread_lock:
            if self._held == 0:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._lock_fd = fd
            self._held += 1
            try:
                yield self
            finally:
                self._held -= 1
                if self._held == 0 and self._lock_fd is not None:
                    os.close(self._lock_fd)  # closing releases the flock
                    self._lock_fd = None

    # -- reading --------------------------------------------------------------------
    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("version") not in (1, VERSION) or not isinstance(doc.get("entries"), list):
                raise ValueError(f"unsupported ledger version {doc.get('version')!r}")
            if self.data and doc.get("data") not in (None, self.data):
                raise ValueError(f"it accounts for data {doc.get('data')}, not {self.data}")
            for e in doc["entries"]:
                e.setdefault("kind", DP_SGD)  # version 1 held DP-SGD runs only
                if e["kind"] == DP_SGD:
                    _spend(e)
                elif e["kind"] not in (RELEASE, EVALUATION):
                    raise ValueError(f"unknown entry kind {e['kind']!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise LedgerError(f"privacy ledger {self.path} is unreadable ({err}); refusing to train rather than "
                              "forget past spending. Restore it from a backup or investigate; never delete it "
                              "to reset a budget") from None
        return doc["entries"]

    def history(self, *, run: str | None = None) -> list[Spend]:
        return [_spend(e) for e in self.entries() if e["kind"] == DP_SGD and (run is None or e.get("run") == run)]

    def clear_releases(self, *, run: str | None = None) -> int:
        """Updates that left without local DP (each one makes epsilon infinite)."""
        return sum(e["kind"] == RELEASE and (run is None or e.get("run") == run) for e in self.entries())

    def evaluations(self, *, run: str | None = None) -> int:
        """Evaluations answered in ``run``, or in every run (None)."""
        return sum(e["kind"] == EVALUATION and (run is None or e.get("run") == run) for e in self.entries())

    def epsilon(self, *, delta: float, run: str | None = None) -> float:
        """Epsilon spent so far (all rounds of all runs, or of one ``run``) at ``delta``."""
        return epsilon_of(self.history(run=run), delta=delta, clear_releases=self.clear_releases(run=run))

    def check(self, planned: Spend, *, delta: float, budget: float, run: str | None = None,
              run_budget: float = math.inf) -> float:
        """Epsilon after ``planned``; raises :class:`BudgetExhausted` if it would exceed ``budget``
        (lifetime) or, for ``run``, ``run_budget`` (this run's own spend)."""
        spent = self.epsilon(delta=delta)
        after = epsilon_of([*self.history(), planned], delta=delta, clear_releases=self.clear_releases())
        where = f"delta {delta:g}; ledger {self.path.name}"
        if math.isinf(after):
            raise BudgetExhausted(f"privacy budget exhausted: the ledger holds {self.clear_releases()} update(s) "
                                  f"released without local DP (epsilon = inf) ({where}); the tenant declines to train")
        if after > budget:
            raise BudgetExhausted(f"privacy budget exhausted: epsilon spent {spent:.3f}, this round would take it to "
                                  f"{after:.3f} > budget {budget:g} ({where}); the tenant declines to train")
        if run is not None and math.isfinite(run_budget):
            in_run = epsilon_of([*self.history(run=run), planned], delta=delta)
            if in_run > run_budget:
                raise BudgetExhausted(f"privacy budget exhausted for this run: it would spend epsilon {in_run:.3f} "
                                      f"> {run_budget:g} per run ({where}); the tenant declines to train")
        return after

    # -- writing --------------------------------------------------------------------
    def _append(self, entry: dict) -> list[dict]:
        with self.locked():
            entries = [*self.entries(), {**entry, "recorded_at": dt.datetime.now(dt.timezone.utc).isoformat(
                timespec="seconds")}]
            doc = {"version": VERSION, "accountant": "rdp", **({"data": self.data} if self.data else {}),
                   "entries": entries}
            write_json_atomic(self.path, doc)
        return entries

    def record(self, spend: Spend, *, delta: float, **context: object) -> float:
        """Append a DP-SGD ``spend`` atomically and return the new cumulative epsilon."""
        with self.locked():
            eps = epsilon_of([*self.history(), spend], delta=delta, clear_releases=self.clear_releases())
            self._append({"kind": DP_SGD, **asdict(spend), "delta": delta,
                          "epsilon_after": eps if math.isfinite(eps) else "inf", **context})
        return eps

    def record_release(self, *, mechanism: str, **context: object) -> float:
        """Append an update that leaves without local DP: epsilon is infinite from now on."""
        self._append({"kind": RELEASE, "mechanism": mechanism, "epsilon": "inf", **context})
        return math.inf

    def record_evaluation(self, **context: object) -> int:
        """Append an evaluation answered; returns how many this run has had."""
        entries = self._append({"kind": EVALUATION, **context})
        return sum(e["kind"] == EVALUATION and e.get("run") == context.get("run") for e in entries)
