"""The SuperNode poll wrapper caps the sleeps of Flower's SuperNode loop, and only those."""

from __future__ import annotations

import time

import pytest

from simulations.cli import supernode_poll


@pytest.fixture
def loop():
    import flwr.supernode.start_client_internal as loop

    yield loop
    loop.time = time  # as Flower ships it


def test_capped_sleep_waits_at_most_the_cap():
    # Prepare
    clock = supernode_poll.CappedSleep(0.05)
    start = time.perf_counter()
    # Execute: Flower's idle sleep of 3 s
    clock.sleep(3)
    # Assert
    assert time.perf_counter() - start < 1.0


def test_capped_sleep_keeps_shorter_sleeps_and_the_rest_of_time():
    # Prepare
    clock = supernode_poll.CappedSleep(10.0)
    start = clock.monotonic()
    # Execute
    clock.sleep(0.01)
    # Assert
    assert 0.01 <= clock.monotonic() - start < 1.0 and clock.time is time.time


def test_the_supernode_loop_sleeps_through_the_cap(loop):
    # Execute
    changed = supernode_poll.cap_idle_poll(0.5)
    # Assert: only the SuperNode loop's module sees the capped clock
    assert changed and isinstance(loop.time, supernode_poll.CappedSleep) and loop.time.cap == 0.5
    assert time.sleep is not loop.time.sleep


def test_a_flower_whose_loop_no_longer_uses_time_is_left_alone(loop, monkeypatch):
    # Prepare
    monkeypatch.delattr(loop, "time")
    # Execute / Assert
    with pytest.warns(UserWarning, match="poll interval is unchanged"):
        assert supernode_poll.cap_idle_poll(0.5) is False
