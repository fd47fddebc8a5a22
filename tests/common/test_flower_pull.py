"""Flower's object pull retries a missing object after 50 ms first, in the processes that ask for it."""

from __future__ import annotations

import pytest
from flwr.supercore.inflatable import inflatable_utils

from common.flower_pull import shorten_first_pull_retry


@pytest.fixture
def defaults(monkeypatch):
    kw = inflatable_utils.pull_objects.__kwdefaults__
    monkeypatch.setitem(kw, "initial_backoff", 1)  # as Flower ships it; restored after the test
    return kw


def test_the_first_retry_of_a_missing_message_object_is_shortened(defaults):
    # Execute
    changed = shorten_first_pull_retry(0.05)
    # Assert: the first retry only; Flower's cap and limits stay
    assert changed and defaults["initial_backoff"] == 0.05 and defaults["backoff_cap"] == 10


def test_a_longer_retry_than_flowers_is_never_set(defaults):
    shorten_first_pull_retry(5.0)
    assert defaults["initial_backoff"] == 1


def test_the_servers_grid_shortens_it_when_it_is_made(defaults):
    # Execute
    from server.grid import PromptGrid

    PromptGrid(grid=None)
    # Assert: the ServerApp's pulls of tenants' replies retry after 50 ms
    assert defaults["initial_backoff"] == 0.05
