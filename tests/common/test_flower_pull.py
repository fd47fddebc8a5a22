"""Flower's object pull retries a missing object after 50 ms first, doubling up to 0.25 s,
in the processes that ask for it; only Flower's time limit ends the wait."""

from __future__ import annotations

import pytest
from flwr.supercore.inflatable import inflatable_utils

from fedlora.common.flower_pull import retry_schedule, shorten_pull_retries


@pytest.fixture
def defaults(monkeypatch):
    kw = inflatable_utils.pull_objects.__kwdefaults__
    for key, value in {"initial_backoff": 1, "backoff_cap": 10, "max_tries_per_object": 500,
                       "max_time": 7200}.items():  # as Flower ships them; restored after the test
        monkeypatch.setitem(kw, key, value)
    return kw


def test_the_retries_of_a_missing_message_object_are_shortened(defaults):
    # Execute
    changed = shorten_pull_retries(0.05, 0.25)
    # Assert: 50 ms first, doubling up to 0.25 s; Flower's time limit stays
    assert changed and (defaults["initial_backoff"], defaults["backoff_cap"], defaults["max_time"]) == (0.05, 0.25, 7200)


def test_only_the_time_limit_ends_the_wait(defaults):
    # Execute
    shorten_pull_retries(0.05, 0.25)
    # Assert: 7200 s at no less than 0.8 x 0.25 s a try is 36000 tries, plus the 3 doublings and the first
    assert defaults["max_tries_per_object"] == 36000 + 3 + 1
    assert retry_schedule(0.05, 0.25)["max_tries_per_object"] == 36004


def test_a_longer_retry_than_flowers_is_never_set(defaults):
    shorten_pull_retries(5.0, 60.0)
    assert (defaults["initial_backoff"], defaults["backoff_cap"]) == (1, 10)


def test_the_servers_grid_shortens_them_when_it_is_made(defaults):
    # Execute
    from fedlora.server.grid import PromptGrid

    PromptGrid(grid=None)
    # Assert: the ServerApp's pulls of tenants' replies retry after 50 ms, then every 0.25 s at most
    assert (defaults["initial_backoff"], defaults["backoff_cap"]) == (0.05, 0.25)
