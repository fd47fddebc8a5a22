"""The SuperNode poll wrapper caps the sleeps of Flower's SuperNode loop, and only those."""

from __future__ import annotations

import time

import pytest

from fedlora.simulations.cli import supernode_poll


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


class FakeClock:
    """A clock whose sleeps are recorded and advance it."""

    def __init__(self):
        self.now, self.slept = 100.0, []

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds

    def __call__(self):
        return self.now


def test_idle_polls_are_fast_for_a_window_after_a_handled_message_then_slow_again():
    # Prepare: cap 0.5 s, 0.1 s polls for 1 s after the last wait on a handled message
    fake = FakeClock()
    clock = supernode_poll.CappedSleep(0.5, burst=0.1, window=1.0, local=0.05, sleep=fake.sleep, clock=fake)
    # Execute: idle before any message; one reply wait; then idle polls past the window
    clock.sleep(3)
    clock.sleep(0.5)  # the reply loop, at t = 100.5
    for _ in range(12):
        clock.sleep(3)
    # Assert: 0.5 before; the reply wait 0.05; polls of 0.1 while t - 100.5 < 1.0 (at 100.55 ... 101.45), then 0.5
    assert fake.slept[:2] == [0.5, 0.05]
    assert fake.slept[2:] == pytest.approx([0.1] * 10 + [0.5] * 2)


def test_no_wait_is_longer_than_asked_or_than_the_cap():
    # Prepare
    fake = FakeClock()
    clock = supernode_poll.CappedSleep(0.05, burst=0.1, local=0.2, sleep=fake.sleep, clock=fake)
    # Execute
    clock.sleep(3)
    clock.sleep(0.5)
    clock.sleep(0.01)
    # Assert
    assert fake.slept == [0.05, 0.05, 0.01]

