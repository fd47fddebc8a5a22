"""Peak memory of a whole process tree (this process and every descendant: SuperLink,
Ray workers, ClientApps), sampled from /proc — what "peak memory of a run" means here."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def _tree_rss_bytes(root: int) -> int:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            ppid = int(fields[1])
            pages = int((entry / "statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            continue
        pid = int(entry.name)
        children.setdefault(ppid, []).append(pid)
        rss[pid] = pages * page
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


class PeakTreeMemory:
    """``with PeakTreeMemory() as m: ...``; then ``m.peak_bytes``. ``root``: the process whose
    tree is measured (default: this one)."""

    def __init__(self, interval: float = 0.5, *, root: int | None = None) -> None:
        self.interval = interval
        self.root = root
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        root = self.root or os.getpid()
        while True:  # at least one sample, however short the run
            self.peak_bytes = max(self.peak_bytes, _tree_rss_bytes(root))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakTreeMemory":
        if Path("/proc/self/statm").exists():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
