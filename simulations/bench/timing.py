"""What every ratio benchmark shares: interleaved arms, median and spread, load average.

A ratio is only as good as its interleaving: timing all of arm A and then all of arm B lets
a change of machine load land on one side only. :func:`interleave` runs the arms in turn,
repeat by repeat (alternating which goes first), and :func:`ratio_summary` reports the
median ratio of each repeat's pair and how far the repeats spread.
"""

from __future__ import annotations

import os
import statistics
from typing import Callable


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def load_line(start: list[float], end: list[float]) -> str:
    cpus = os.cpu_count() or 0
    return (f"load average (1/5/15 min) at start {'/'.join(map(str, start)) or 'n/a'}, "
            f"at end {'/'.join(map(str, end)) or 'n/a'}, on {cpus} CPUs")


def interleave(arms: dict[str, Callable[[], float]], repeats: int, warmup: int = 0) -> dict[str, list[float]]:
    """Run every arm once per repeat, the order reversed on every other repeat (ABBA...);
    each arm returns the seconds it measured. Returns seconds per arm, repeat by repeat.

    ``warmup`` rounds of every arm run first and are discarded: the first run of a process
    pays for cold caches (page cache, allocator, imports, Ray's first workers) that later
    runs do not, and that cost lands unevenly on the arms."""
    names = list(arms)
    for _ in range(warmup):
        for n in names:
            arms[n]()
    out: dict[str, list[float]] = {n: [0.0] * repeats for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            out[n][r] = arms[n]()
    return out


def spread(values: list[float]) -> dict:
    """Median, min, max and the spread (max - min) / median, in %."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread_pct": 100.0 * (max(values) - min(values)) / med if med else 0.0}


def ratio_summary(num: list[float], den: list[float]) -> dict:
    """num / den repeat by repeat (each pair ran back to back): median and spread."""
    return spread([a / b for a, b in zip(num, den)])
