"""fedlora.server.memory: the server process keeps the tensors' memory it frees for the next round."""

import subprocess
import sys

import pytest

# 100 MB in 400 tensors of 256 KB, written (so every page is resident), then freed: how much of
# it does the process still hold? Run in a fresh interpreter: mallopt is process-wide.
PROBE = """
import sys, numpy as np
from fedlora.server.memory import reuse_freed_memory
tuned = reuse_freed_memory() if sys.argv[1] == "tuned" else False
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096
before = rss()
xs = [np.ones(65536, np.float32) for _ in range(400)]
held = rss() - before
del xs
kept = rss() - before
print(tuned, held, kept)
"""


def _probe(mode: str) -> tuple[bool, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    tuned, held, kept = out.split()
    return tuned == "True", int(held), int(kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_tuned_process_keeps_freed_tensors_and_the_default_one_returns_them():
    # Execute
    tuned, held_t, kept_t = _probe("tuned")
    default, held_d, kept_d = _probe("default")
    # Assert: both held ~100 MB; the tuned process still holds it after the free, the default does not
    assert tuned and not default
    assert held_t > 95e6 and held_d > 95e6
    assert kept_t > 0.95 * held_t
    assert kept_d < 0.05 * held_d


def test_tuning_reports_false_where_it_cannot_apply(monkeypatch):
    # Prepare: a platform without glibc
    from fedlora.server import memory

    monkeypatch.setattr(memory.sys, "platform", "darwin")
    # Execute / Assert
    assert memory.reuse_freed_memory() is False
