"""Round records and run summaries as a run writes them, for tests that read them back."""

from __future__ import annotations

from pathlib import Path

from fedlora.common.files import write_json_atomic
from fedlora.common.records import SUMMARY_FILE, Drop, FederationSummary, RoundRecord, round_path


def round_record(number: int, **fields) -> RoundRecord:
    """A round in which nothing happened, but for ``fields``; ``dropped`` may hold dicts."""
    dropped = [d if isinstance(d, Drop) else Drop(**{"node": 0, **d}) for d in fields.pop("dropped", [])]
    base = dict(round=number, connected=0, sampled=[], finished=[], dropped=dropped, aggregated=True,
                checkpoint=None, bytes_down=0, bytes_up=0, seconds=0.0, train={}, eval={})
    return RoundRecord(**{**base, **fields})


def write_round(run_dir: Path, number: int, **fields) -> RoundRecord:
    record = round_record(number, **fields)
    write_json_atomic(round_path(run_dir, number), record.to_json())
    return record


def write_summary(run_dir: Path, **fields) -> FederationSummary:
    base = dict(rounds=0, tenants=[], seconds=0.0, bytes_down=0, bytes_up=0, adapter_bytes=0, dropped=[])
    summary = FederationSummary(**{**base, **fields})
    write_json_atomic(Path(run_dir) / SUMMARY_FILE, summary.to_json())
    return summary
